-- Back from version 3 to version 2 (migration 0004's downgrade).

DROP FUNCTION realtime.read_changes(bigint, integer);
