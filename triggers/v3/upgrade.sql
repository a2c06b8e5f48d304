-- realtime change capture, version 3, applied over version 2 by migration 0004; see triggers/README.md.
--
-- to_jsonb() renders timestamptz values in the session's TimeZone, so up to version 2 a row written by a session
-- set to, say, America/New_York was recorded with "-05:00" offsets, and the same row read back in UTC showed
-- different strings. Version 3 records every row in UTC, whatever the writer's TimeZone.

-- The row as JSON, rendered under TimeZone UTC. The SET clause applies for the call only and is restored after
-- it, but it costs a configuration change per call, so capture() uses it only when the session is not in UTC.
CREATE FUNCTION realtime.utc_jsonb(r anyelement) RETURNS jsonb
LANGUAGE sql STABLE SET "TimeZone" = 'UTC' AS $$
    SELECT to_jsonb(r)
$$;

CREATE OR REPLACE FUNCTION realtime.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- UTC under its usual names (realtime's connections say 'UTC', initdb on a system in UTC writes 'Etc/UTC');
    -- any other zone, even one that equals UTC, takes the slower path, which renders the same.
    in_utc boolean := current_setting('TimeZone') IN ('UTC', 'Etc/UTC');
    new_json jsonb;
    old_json jsonb;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        new_json := CASE WHEN in_utc THEN to_jsonb(NEW) ELSE realtime.utc_jsonb(NEW) END;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_json := CASE WHEN in_utc THEN to_jsonb(OLD) ELSE realtime.utc_jsonb(OLD) END;
    END IF;
    -- From here on as in version 2: see triggers/v2/upgrade.sql for why each step is there.
    PERFORM pg_advisory_xact_lock_shared(8243122744022200677);
    INSERT INTO realtime.changes (seq, table_schema, table_name, op, new_row, old_row, committed_at)
    VALUES (nextval('realtime.changes_seq'), TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, new_json, old_json,
            clock_timestamp());
    IF pg_try_advisory_xact_lock(8243122744022200679) THEN
        PERFORM pg_notify('realtime_changes', '');
    END IF;
    RETURN NULL;
END;
$$;
