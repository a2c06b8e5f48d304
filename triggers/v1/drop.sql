-- Removes everything capture.sql installed, streamed tables' triggers first.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT table_schema, table_name FROM realtime.streamed_tables LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS realtime_capture ON %I.%I', t.table_schema, t.table_name);
    END LOOP;
END;
$$;
DROP SCHEMA realtime CASCADE;
