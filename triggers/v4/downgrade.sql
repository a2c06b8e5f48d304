-- Back from version 4 to version 3 (migration 0005's downgrade): TRUNCATE is captured no more, and the changes
-- that recorded one are gone, since code of version 3 cannot read them.

-- The TRUNCATE triggers first: dropping one waits for a transaction that is truncating that table, whose commit
-- still records its change, so every recorded TRUNCATE is there for the clean-up below.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT tgname, tgrelid::regclass AS target FROM pg_trigger
        WHERE tgfoid = 'realtime.queue_truncate()'::regprocedure
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.target);
    END LOOP;
END;
$$;
DROP TABLE realtime.pending_truncates;
DROP FUNCTION realtime.capture_truncate();
DROP FUNCTION realtime.queue_truncate();

-- Version 1's enable_stream() and disable_stream(), verbatim (versions 2 and 3 did not change them).
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
    INSERT INTO realtime.streamed_tables (table_schema, table_name) VALUES (rel_schema, rel_name)
    ON CONFLICT DO NOTHING;
END;
$$;

CREATE OR REPLACE FUNCTION realtime.disable_stream(target regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS realtime_capture ON %s', target);
    DELETE FROM realtime.streamed_tables s
    USING pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = target AND s.table_schema = n.nspname AND s.table_name = c.relname;
END;
$$;

-- The recorded TRUNCATEs go as retention would take them: the mark moves up to the newest one, so a resume from
-- before it is refused (the client takes a new snapshot) instead of silently keeping rows that are gone.
WITH removed AS (
    DELETE FROM realtime.changes WHERE op = 'TRUNCATE' RETURNING seq
)
UPDATE realtime.retention
SET pruned_through = GREATEST(pruned_through, (SELECT max(seq) FROM removed))
WHERE EXISTS (SELECT 1 FROM removed);

ALTER TABLE realtime.changes
    DROP CONSTRAINT changes_op_check,
    ADD CONSTRAINT changes_op_check CHECK (op IN ('INSERT', 'UPDATE', 'DELETE'));
