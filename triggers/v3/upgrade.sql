-- realtime change capture, version 3, applied over version 2 by migration 0004; see triggers/README.md.
--
-- Version 2's listener asked for the stable position and then read up to it: two round trips before the first
-- subscriber of a change could be written to. read_changes() does both in one call.

-- The stable position, then the changes after `after` up to it, in one round trip. The first row carries only
-- `seq`: the stable position the read went up to (every position up to it is final, holes included). Up to
-- `max_rows` changes with after < seq <= that position follow, in position order. Call it in a transaction of
-- its own (autocommit), like stable_position(), whose lock and 2 s wait it shares.
CREATE FUNCTION realtime.read_changes(after bigint, max_rows integer)
RETURNS TABLE (seq bigint, table_schema text, table_name text, op text, new_row jsonb, old_row jsonb,
               committed_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    through bigint := realtime.stable_position();
BEGIN
    RETURN QUERY SELECT through, NULL::text, NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz;
    -- In a volatile function each statement takes a fresh snapshot (READ COMMITTED): this one is taken after the
    -- position lock was granted, so it sees every transaction that held a position up to `through` committed.
    -- A single SQL statement could not do this: its snapshot would predate the wait for the lock.
    RETURN QUERY
        SELECT c.seq, c.table_schema, c.table_name, c.op, c.new_row, c.old_row, c.committed_at
        FROM realtime.changes c
        WHERE c.seq > after AND c.seq <= through
        ORDER BY c.seq
        LIMIT max_rows;
END;
$$;
