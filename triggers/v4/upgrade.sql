-- realtime change capture, version 4, applied over version 3 by migration 0005; see triggers/README.md.
--
-- Up to version 3 a TRUNCATE of a streamed table recorded nothing, and every reader kept rows that were gone.
-- Version 4 records each TRUNCATE statement as one change per table, op 'TRUNCATE', without rows, at a position
-- taken at commit exactly as capture() takes the positions of row changes.
--
-- TRUNCATE fires statement triggers only, and only a row trigger can be a deferred constraint trigger, so the
-- TRUNCATE trigger cannot wait for the commit itself. It queues the truncation instead, as a row of
-- realtime.pending_truncates. That row's deferred constraint trigger runs at commit, in the one queue of deferred
-- events where the transaction's capture() calls wait too, so the TRUNCATE's position falls between those of
-- the row changes written before and after it, and it is taken under the position lock like theirs. The row
-- capture() of version 3 is unchanged: writers that never truncate pay nothing.
--
--   TRUNCATE a          queue_truncate() (AFTER TRUNCATE, per statement) inserts (schema, name) into
--                       realtime.pending_truncates
--   COMMIT              capture_truncate() (deferred, per queued row) takes the shared position lock, a
--                       position, records the change, deletes the queued row, and sends the wake-up if it gets
--                       the notify token

-- The new op. Every row already there holds one of the three older ones, so a validating scan could only find
-- what is known, while holding the changelog's exclusive lock (every commit to a streamed table waiting): the
-- wider check applies to new rows only, which is all it needs to.
ALTER TABLE realtime.changes
    DROP CONSTRAINT changes_op_check,
    ADD CONSTRAINT changes_op_check CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')) NOT VALID;

-- Truncations waiting for their transaction's commit. A row lives from the TRUNCATE to the end of its own
-- transaction, so the table is empty whenever no truncating transaction is open. The key lets the commit trigger
-- delete exactly its row, and gives the table the replica identity that deletes need in a publication.
CREATE TABLE realtime.pending_truncates (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_schema text NOT NULL,
    table_name   text NOT NULL
);

CREATE FUNCTION realtime.queue_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO realtime.pending_truncates (table_schema, table_name) VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

-- 0x7265616c74696d65 ("realtime" in ASCII) is the position lock, ...67 the notify token: see
-- triggers/v2/upgrade.sql for why each step is there; they are capture()'s steps for a change without rows.
CREATE FUNCTION realtime.capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(8243122744022200677);
    INSERT INTO realtime.changes (seq, table_schema, table_name, op, new_row, old_row, committed_at)
    VALUES (nextval('realtime.changes_seq'), NEW.table_schema, NEW.table_name, 'TRUNCATE', NULL, NULL,
            clock_timestamp());
    DELETE FROM realtime.pending_truncates WHERE id = NEW.id;
    IF pg_try_advisory_xact_lock(8243122744022200679) THEN
        PERFORM pg_notify('realtime_changes', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER capture_at_commit AFTER INSERT ON realtime.pending_truncates
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION realtime.capture_truncate();

-- As in version 1, plus the TRUNCATE trigger beside the row trigger.
CREATE OR REPLACE FUNCTION realtime.enable_stream(target regclass) RETURNS void
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
    EXECUTE format('DROP TRIGGER IF EXISTS realtime_capture_truncate ON %s', target);
    EXECUTE format(
        'CREATE TRIGGER realtime_capture_truncate AFTER TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION realtime.queue_truncate()', target);
    INSERT INTO realtime.streamed_tables (table_schema, table_name) VALUES (rel_schema, rel_name)
    ON CONFLICT DO NOTHING;
END;
$$;

CREATE OR REPLACE FUNCTION realtime.disable_stream(target regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS realtime_capture ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS realtime_capture_truncate ON %s', target);
    DELETE FROM realtime.streamed_tables s
    USING pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = target AND s.table_schema = n.nspname AND s.table_name = c.relname;
END;
$$;

-- Every table captured now gets the TRUNCATE trigger too: the tables with the row trigger, whatever
-- realtime.streamed_tables says (a renamed table is still captured under its new name).
DO $$
DECLARE
    target regclass;
BEGIN
    FOR target IN
        SELECT tgrelid::regclass FROM pg_trigger
        WHERE tgname = 'realtime_capture' AND tgfoid = 'realtime.capture()'::regprocedure
    LOOP
        EXECUTE format(
            'CREATE TRIGGER realtime_capture_truncate AFTER TRUNCATE ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION realtime.queue_truncate()', target);
    END LOOP;
END;
$$;
