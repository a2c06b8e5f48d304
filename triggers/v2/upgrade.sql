-- realtime change capture, version 2, applied over version 1 by migration 0003; see triggers/README.md.
--
-- Version 1 made committers to streamed tables go one at a time (an exclusive lock from the first position to the
-- end of the commit) and each of them NOTIFY, which PostgreSQL serializes too. Version 2 lets them commit side
-- by side and moves the waiting to the readers, which are few:
--
--   writers  take the position lock in SHARED mode, then a position; at most one of them at a time (the holder
--            of the notify token) sends the wake-up NOTIFY, the others rely on it
--   readers  take the position lock in EXCLUSIVE mode for an instant (stable_position()): that waits for every
--            transaction that already holds a position to finish, so every position up to the sequence's
--            last value is then final (committed and visible, or rolled back) and can be read in order

-- 0x7265616c74696d65 ("realtime" in ASCII) is the position lock, ...66 the pruning lock, ...67 the notify token.
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

-- The newest position whose transaction, and every earlier one's, has finished: reading up to it in position
-- order can never be overtaken by a later commit. Call it in a transaction of its own (autocommit): the
-- exclusive lock is held to the end of the calling transaction and stops writers at their commit meanwhile.
-- Waits at most 2 s for open transactions that hold positions (e.g. under SET CONSTRAINTS ALL IMMEDIATE),
-- then fails with lock_not_available (55P03).
CREATE FUNCTION realtime.stable_position() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    -- Try first: a waiting exclusive request makes every arriving writer queue behind it; a free lock does not.
    IF NOT pg_try_advisory_xact_lock(8243122744022200677) THEN
        PERFORM set_config('lock_timeout', '2s', true);
        PERFORM pg_advisory_xact_lock(8243122744022200677);
    END IF;
    RETURN COALESCE(pg_sequence_last_value('realtime.changes_seq'), 0);
END;
$$;

-- The same, but the lock stays held by the session until release_position(): a snapshot reader calls this,
-- then starts its REPEATABLE READ transaction with release_position() as the first statement, so that its
-- snapshot contains exactly the changes up to the returned position.
CREATE FUNCTION realtime.hold_position() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_lock(8243122744022200677) THEN
        PERFORM set_config('lock_timeout', '2s', true);
        PERFORM pg_advisory_lock(8243122744022200677);
    END IF;
    RETURN COALESCE(pg_sequence_last_value('realtime.changes_seq'), 0);
END;
$$;

CREATE FUNCTION realtime.release_position() RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_unlock(8243122744022200677);
$$;

-- Retention now stops at a position the caller found stable, so it never deletes past a hole that an open
-- transaction may still fill (a reader would find the rows before it gone).
DROP FUNCTION realtime.prune(interval, bigint);
CREATE FUNCTION realtime.prune(max_age interval, max_rows bigint, through bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    newest  bigint;
    cutoff  bigint;
    deleted bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(8243122744022200678) THEN
        RETURN 0;
    END IF;
    SELECT max(seq) INTO newest FROM realtime.changes WHERE seq <= through;
    IF newest IS NULL THEN
        RETURN 0;
    END IF;
    -- committed_at grows with seq up to the overlap of concurrent commits (microseconds), so the rows too old
    -- to keep are those before the first one young enough: found by walking the primary key from the oldest.
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
