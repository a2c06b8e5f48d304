-- Back from version 2 to version 1 (migration 0003's downgrade): version 1's capture() and prune(), verbatim.

DROP FUNCTION realtime.stable_position();
DROP FUNCTION realtime.hold_position();
DROP FUNCTION realtime.release_position();
DROP FUNCTION realtime.prune(interval, bigint, bigint);

CREATE OR REPLACE FUNCTION realtime.capture() RETURNS trigger
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
