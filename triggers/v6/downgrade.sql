-- Back from version 6 to version 5 (migration 0008's downgrade): version 2's prune(), verbatim.
CREATE OR REPLACE FUNCTION realtime.prune(max_age interval, max_rows bigint, through bigint) RETURNS bigint
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
