-- The row-payload NOTIFY trigger as it is usually written: every row change becomes one
-- pg_notify('changes', <json>) carrying the whole row. `ts` is clock_timestamp() at the moment the row
-- changed, so the load generator can time delivery exactly as it does with realtime's `ts`.
-- Payloads over 8000 bytes make pg_notify fail; the bench rows are far smaller.
CREATE OR REPLACE FUNCTION bench_notify_users_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSE
        changed := NEW;
    END IF;
    PERFORM pg_notify('changes', json_build_object(
        'table', TG_TABLE_NAME,
        'op', TG_OP,
        'row', row_to_json(changed),
        'ts', clock_timestamp()
    )::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS users_notify_change ON users;
CREATE TRIGGER users_notify_change
    AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION bench_notify_users_change();
