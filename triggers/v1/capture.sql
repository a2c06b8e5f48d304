-- realtime change capture, version 1. Installed by migration 0002; see triggers/README.md for the contract.

CREATE SCHEMA IF NOT EXISTS realtime;

-- Positions are handed out by this sequence, but only while holding the commit-order lock (see capture()).
CREATE SEQUENCE realtime.changes_seq AS bigint;

CREATE TABLE realtime.changes (
    seq          bigint PRIMARY KEY,
    table_schema text        NOT NULL,
    table_name   text        NOT NULL,
    op           text        NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    new_row      jsonb,
    old_row      jsonb,
    committed_at timestamptz NOT NULL
);
-- No index on committed_at: every index is maintained inside the commit-order critical section (see capture()),
-- and retention finds its age cutoff by walking the primary key from the oldest row instead (see prune()).

-- Which tables stream is data: enable_stream()/disable_stream() keep this table and the triggers in step.
CREATE TABLE realtime.streamed_tables (
    table_schema text NOT NULL,
    table_name   text NOT NULL,
    enabled_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name)
);

-- One row: every position <= pruned_through may have been deleted by retention.
CREATE TABLE realtime.retention (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    pruned_through bigint  NOT NULL DEFAULT 0
);
INSERT INTO realtime.retention DEFAULT VALUES;

-- The capture trigger function. It runs as a DEFERRED constraint trigger, i.e. at COMMIT, once per changed row.
--
-- Why the advisory lock: a position taken from a sequence when a row changes is not in commit order (T1 takes
-- 10, T2 takes 11 and commits first; a reader that saw 11 and resumes "after 11" would lose 10). Holding a
-- transaction-level lock from the moment the first position is taken until the transaction has committed
-- means no other transaction can take a position in between, so positions are strictly increasing in commit
-- order and the set of visible positions is always a prefix (with holes only where a transaction rolled back).
-- PostgreSQL releases transaction locks only after the commit is visible to others, which is what makes the
-- prefix property hold. Deferring the trigger keeps the lock short: it is taken at COMMIT, not at the first
-- write. (A session that runs SET CONSTRAINTS ALL IMMEDIATE stays correct; it just holds the lock longer.)
CREATE FUNCTION realtime.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_json jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    old_json jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
BEGIN
    -- 0x7265616c74696d65 is "realtime" in ASCII: the commit-order lock's key.
    PERFORM pg_advisory_xact_lock(8243122744022200677);
    INSERT INTO realtime.changes (seq, table_schema, table_name, op, new_row, old_row, committed_at)
    VALUES (nextval('realtime.changes_seq'), TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, new_json, old_json,
            clock_timestamp());
    -- A wake-up only, never the row: identical notifications in one transaction are folded into one.
    PERFORM pg_notify('realtime_changes', '');
    RETURN NULL;
END;
$$;

CREATE FUNCTION realtime.enable_stream(target regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    rel_schema text;
    rel_name   text;
BEGIN
    SELECT n.nspname, c.relname INTO rel_schema, rel_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = target;
    IF rel_schema = 'realtime' THEN
        RAISE EXCEPTION 'the realtime schema cannot be streamed';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = target AND indisprimary) THEN
        RAISE EXCEPTION 'table % has no primary key; only tables with one can stream', target;
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS realtime_capture ON %s', target);
    EXECUTE format(
        'CREATE CONSTRAINT TRIGGER realtime_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
        'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION realtime.capture()', target);
    INSERT INTO realtime.streamed_tables (table_schema, table_name) VALUES (rel_schema, rel_name)
    ON CONFLICT DO NOTHING;
END;
$$;

CREATE FUNCTION realtime.disable_stream(target regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS realtime_capture ON %s', target);
    DELETE FROM realtime.streamed_tables s
    USING pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = target AND s.table_schema = n.nspname AND s.table_name = c.relname;
END;
$$;

-- Retention: delete by age and by count, never the newest row (it anchors snapshot positions), and record how
-- far it went so that a resume from before that point is refused instead of silently missing changes. Only one
-- caller prunes at a time; the others return at once.
CREATE FUNCTION realtime.prune(max_age interval, max_rows bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    newest  bigint;
    cutoff  bigint;
    deleted bigint;
BEGIN
    -- 0x7265616c74696d66: the pruning lock, one key above the commit-order lock.
    IF NOT pg_try_advisory_xact_lock(8243122744022200678) THEN
        RETURN 0;
    END IF;
    SELECT max(seq) INTO newest FROM realtime.changes;
    IF newest IS NULL THEN
        RETURN 0;
    END IF;
    -- committed_at grows with seq (both are taken under the commit-order lock), so the rows too old to keep are
    -- exactly those before the first one young enough: found by walking the primary key from the oldest row.
    SELECT GREATEST(
        COALESCE((SELECT seq - 1 FROM realtime.changes
                  WHERE committed_at >= clock_timestamp() - max_age ORDER BY seq LIMIT 1), newest),
        COALESCE((SELECT seq FROM realtime.changes ORDER BY seq DESC OFFSET max_rows LIMIT 1), 0))
    INTO cutoff;
    cutoff := LEAST(cutoff, newest - 1);
    IF cutoff <= 0 THEN
        RETURN 0;
    END IF;
    DELETE FROM realtime.changes WHERE seq <= cutoff;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    UPDATE realtime.retention SET pruned_through = GREATEST(pruned_through, cutoff);
    RETURN deleted;
END;
$$;
