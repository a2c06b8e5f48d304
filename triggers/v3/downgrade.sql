-- Back from version 3 to version 2 (migration 0004's downgrade): version 2's capture(), verbatim.

CREATE OR REPLACE FUNCTION realtime.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_json jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    old_json jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
BEGIN
    -- Held until this transaction has ended and its rows are visible; shared holders do not wait for each other.
    PERFORM pg_advisory_xact_lock_shared(8243122744022200677);
    INSERT INTO realtime.changes (seq, table_schema, table_name, op, new_row, old_row, committed_at)
    VALUES (nextval('realtime.changes_seq'), TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, new_json, old_json,
            clock_timestamp());
    -- Whoever holds the token will NOTIFY after its commit; a reader woken by it waits for this transaction too
    -- (it holds the shared lock), so skipping our own NOTIFY loses nothing. NOTIFY makes committers queue
    -- behind one another; skipping it is what lets them commit side by side. If the token holder rolls back
    -- instead, its wake-up never comes and readers find these changes on their next periodic read.
    IF pg_try_advisory_xact_lock(8243122744022200679) THEN
        -- A wake-up only, never the row: identical notifications in one transaction are folded into one.
        PERFORM pg_notify('realtime_changes', '');
    END IF;
    RETURN NULL;
END;
$$;

DROP FUNCTION realtime.utc_jsonb(anyelement);
