-- realtime change capture, version 5, applied over version 4 by migration 0006; see triggers/README.md.
--
-- Every change records the transaction that made it, so that readers can tell where a transaction's changes end.
-- Positions of transactions that commit at the same moment may interleave, and a transaction of many rows can
-- span several of a reader's batches: the id is what lets a reader group them.
--
-- The column is added without a default first, which only changes the catalog (no rewrite of the changelog, no
-- long lock), and then given its default, which applies to rows inserted from now on. capture() and
-- capture_truncate() name the columns they insert, so they fill `tx` through the default and stay unchanged.
-- Rows recorded before this version keep NULL: readers treat each of them as a transaction of its own.
ALTER TABLE realtime.changes ADD COLUMN tx xid8;
ALTER TABLE realtime.changes ALTER COLUMN tx SET DEFAULT pg_current_xact_id();
