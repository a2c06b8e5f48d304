-- Back from version 5 to version 4 (migration 0006's downgrade): changes no longer record their transaction.
ALTER TABLE realtime.changes DROP COLUMN tx;
