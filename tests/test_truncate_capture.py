"""Capture of TRUNCATE (triggers/v4): one change per table and statement, its position taken at commit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest

from realtime.dsn import Dsn
from realtime.stream import changelog
from realtime.stream.changes import TableKey
from realtime.stream.filters import compile_filter
from tests.support.tables import committed_changes, create_streamed_table, head
from tests.support.waiting import eventually


@pytest.fixture
async def other(database_url: Dsn) -> AsyncIterator[asyncpg.Connection]:
    """A second connection, for a transaction that overlaps one on `db`."""
    conn = await asyncpg.connect(database_url.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


def ops(changes: list[dict[str, object]]) -> list[object]:
    return [change["op"] for change in changes]


async def _waiting_for_a_lock(db: asyncpg.Connection, conn: asyncpg.Connection) -> bool:
    pid = conn.get_server_pid()
    return bool(await db.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid))


async def test_truncate_is_one_change_without_rows(db: asyncpg.Connection) -> None:
    """TRUNCATE of a streamed table records one TRUNCATE change naming the table, with no rows, stamped at commit."""
    table = await create_streamed_table(db)
    await db.execute(f"INSERT INTO {table} (k) SELECT generate_series(1, 3)")
    before, started = await head(db), await db.fetchval("SELECT clock_timestamp()")
    await db.execute(f"TRUNCATE {table}")
    record = await db.fetchrow(
        "SELECT seq, table_schema, table_name, op, new_row, old_row,"
        " committed_at BETWEEN $2 AND clock_timestamp() AS stamped"
        " FROM realtime.changes WHERE seq > $1",
        before,
        started,
    )
    assert record is not None
    assert dict(record) == {
        "seq": before + 1,
        "table_schema": "public",
        "table_name": table,
        "op": "TRUNCATE",
        "new_row": None,
        "old_row": None,
        "stamped": True,
    }
    assert await db.fetchval("SELECT count(*) FROM realtime.pending_truncates") == 0


async def test_truncate_of_several_tables_is_one_change_for_each_streamed_one(db: asyncpg.Connection) -> None:
    """`TRUNCATE a, b, c` of two streamed tables and one that is not records exactly one change for each of the two."""
    first, second = await create_streamed_table(db), await create_streamed_table(db)
    await db.execute("CREATE TABLE IF NOT EXISTS unstreamed (id bigint PRIMARY KEY)")
    before = await head(db)
    await db.execute(f"TRUNCATE {first}, unstreamed, {second}")
    records = await db.fetch("SELECT table_name, op FROM realtime.changes WHERE seq > $1 ORDER BY seq", before)
    assert sorted(tuple(r) for r in records) == sorted([(first, "TRUNCATE"), (second, "TRUNCATE")])


async def test_truncate_takes_its_place_among_the_row_changes_of_its_transaction(db: asyncpg.Connection) -> None:
    """Within one transaction a TRUNCATE's position follows the rows written before it and precedes those after."""
    first, second, log = [await create_streamed_table(db) for _ in range(3)]
    before = await head(db)
    async with db.transaction():
        await db.execute(f"INSERT INTO {log} (k) VALUES (1)")
        await db.execute(f"TRUNCATE {first}")
        await db.execute(f"INSERT INTO {first} (k) VALUES (2)")
        await db.execute(f"INSERT INTO {log} (k) VALUES (3)")
        await db.execute(f"TRUNCATE {second}")
        await db.execute(f"INSERT INTO {second} (k) VALUES (4)")
    records = await db.fetch("SELECT table_name, op FROM realtime.changes WHERE seq > $1 ORDER BY seq", before)
    assert [tuple(r) for r in records] == [
        (log, "INSERT"),
        (first, "TRUNCATE"),
        (first, "INSERT"),
        (log, "INSERT"),
        (second, "TRUNCATE"),
        (second, "INSERT"),
    ]


async def test_truncate_keeps_statement_order_under_immediate_constraints(db: asyncpg.Connection) -> None:
    """Under SET CONSTRAINTS ALL IMMEDIATE rows may precede a TRUNCATE of their table, and positions keep order."""
    table = await create_streamed_table(db)
    before = await head(db)
    async with db.transaction():
        await db.execute("SET CONSTRAINTS ALL IMMEDIATE")
        await db.execute(f"INSERT INTO {table} (k) VALUES (1)")
        await db.execute(f"TRUNCATE {table}")
        await db.execute(f"INSERT INTO {table} (k) VALUES (2)")
    changes = await committed_changes(db, table, before)
    assert [(c["op"], (c["row"] or {}).get("k")) for c in changes] == [("INSERT", 1), ("TRUNCATE", None), ("INSERT", 2)]


async def test_truncate_takes_its_position_at_commit(db: asyncpg.Connection, other: asyncpg.Connection) -> None:
    """A TRUNCATE whose transaction commits after another's insert gets the larger position, though it ran first."""
    table, log = await create_streamed_table(db), await create_streamed_table(db)
    truncating = db.transaction()
    await truncating.start()
    try:
        await db.execute(f"TRUNCATE {table}")
        await asyncio.wait_for(other.execute(f"INSERT INTO {log} (k) VALUES (1)"), 10)
    finally:
        await truncating.commit()
    insert_seq = (await committed_changes(db, log))[-1]["seq"]
    truncate_seq = (await committed_changes(db, table))[-1]["seq"]
    assert truncate_seq > insert_seq


async def test_an_open_truncate_holds_no_position(db: asyncpg.Connection, other: asyncpg.Connection) -> None:
    """Between a TRUNCATE and its commit, readers find a stable position at once and no trace of the TRUNCATE."""
    table = await create_streamed_table(db)
    async with db.transaction():
        await db.execute(f"TRUNCATE {table}")
        stable = await asyncio.wait_for(changelog.stable_position(other), 1)
        assert await other.fetchval("SELECT count(*) FROM realtime.pending_truncates") == 0
        assert await other.fetchval("SELECT count(*) FROM realtime.changes WHERE table_name = $1", table) == 0
    assert (await committed_changes(db, table))[-1]["seq"] > stable


async def test_writers_of_a_truncated_table_come_after_it(db: asyncpg.Connection, other: asyncpg.Connection) -> None:
    """An insert that waited for a TRUNCATE's commit gets a larger position; a TRUNCATE that waited, likewise."""
    table = await create_streamed_table(db)
    async with db.transaction():
        await db.execute(f"TRUNCATE {table}")
        insert = asyncio.create_task(other.execute(f"INSERT INTO {table} (k) VALUES (1)"))
        await eventually(lambda: _waiting_for_a_lock(db, other), 10, "the insert waits for the TRUNCATE")
    await asyncio.wait_for(insert, 10)
    async with db.transaction():
        await db.execute(f"INSERT INTO {table} (k) VALUES (2)")
        truncate = asyncio.create_task(other.execute(f"TRUNCATE {table}"))
        await eventually(lambda: _waiting_for_a_lock(db, other), 10, "the TRUNCATE waits for the insert")
    await asyncio.wait_for(truncate, 10)
    changes = await committed_changes(db, table)
    assert [(c["op"], (c["row"] or {}).get("k")) for c in changes] == [
        ("TRUNCATE", None),
        ("INSERT", 1),
        ("INSERT", 2),
        ("TRUNCATE", None),
    ]


class _Undo(Exception):
    """Raised to roll a savepoint back."""


async def test_a_rolled_back_truncate_records_nothing(db: asyncpg.Connection) -> None:
    """A TRUNCATE rolled back, with its transaction or to a savepoint, leaves no change and no queued row."""
    table = await create_streamed_table(db)
    await db.execute(f"INSERT INTO {table} (k) VALUES (1)")
    before = await head(db)
    transaction = db.transaction()
    await transaction.start()
    try:
        await db.execute(f"TRUNCATE {table}")
    finally:
        await transaction.rollback()
    async with db.transaction():
        with contextlib.suppress(_Undo):
            async with db.transaction():
                await db.execute(f"TRUNCATE {table}")
                raise _Undo
        await db.execute(f"INSERT INTO {table} (k) VALUES (2)")
    assert ops(await committed_changes(db, table, before)) == ["INSERT"]
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2
    assert await db.fetchval("SELECT count(*) FROM realtime.pending_truncates") == 0


async def test_two_truncates_of_one_table_in_one_transaction_are_two_changes(db: asyncpg.Connection) -> None:
    """Each TRUNCATE statement is a change of its own, even of the same table in the same transaction."""
    table = await create_streamed_table(db)
    before = await head(db)
    async with db.transaction():
        await db.execute(f"TRUNCATE {table}")
        await db.execute(f"TRUNCATE {table}")
    assert ops(await committed_changes(db, table, before)) == ["TRUNCATE", "TRUNCATE"]


async def test_a_truncate_alone_wakes_the_listeners(db: asyncpg.Connection, other: asyncpg.Connection) -> None:
    """A transaction that only truncates sends the wake-up NOTIFY like one that writes rows."""
    table = await create_streamed_table(db)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await other.add_listener("realtime_changes", lambda *args: woken.put_nowait(args[3]))
    await db.execute(f"TRUNCATE {table}")
    assert await asyncio.wait_for(woken.get(), 10) == ""


async def test_the_changelog_reads_a_truncate(db: asyncpg.Connection) -> None:
    """The stream's reads (live range and replay) return a TRUNCATE as a change without rows, which no filter sees."""
    table = await create_streamed_table(db)
    before = await head(db)
    await db.execute(f"TRUNCATE {table}")
    through = await changelog.stable_position(db)
    live = await changelog.read_range(db, before, through)
    replayed = await changelog.replay_chunk(db, TableKey("public", table), before, through)
    for changes in (live, replayed):
        assert [(c.seq, c.table, c.op, c.new_json, c.old_json) for c in changes] == [
            (through, TableKey("public", table), "TRUNCATE", None, None)
        ]
        assert (changes[0].new_row, changes[0].old_row, changes[0].filter_row) == (None, None, {})


async def _snapshot(conn: asyncpg.Connection, table: str) -> tuple[int, list[int]]:
    """The position and the `k` of every row of a whole-table snapshot read on `conn`."""
    streamed = await changelog.streamed_table(conn, TableKey("public", table))
    assert streamed is not None
    position, chunks = await changelog.read_snapshot(conn, streamed, compile_filter([]), None, 100, 10**6, bool)
    return position, sorted(orjson.loads(text)["k"] for chunk in chunks for text in chunk)


async def test_a_snapshot_is_exact_across_a_truncate_in_progress(
    db: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    """A snapshot of a table being truncated holds the rows at its position: TRUNCATE is not MVCC-safe, so a
    snapshot taken before the TRUNCATE commits and read after must not find the table already empty."""
    table = await create_streamed_table(db)
    await db.execute(f"INSERT INTO {table} (k) VALUES (1), (2)")
    async with db.transaction():
        await db.execute(f"TRUNCATE {table}")
        await db.execute(f"INSERT INTO {table} (k) VALUES (3)")
        snapshot = asyncio.create_task(_snapshot(other, table))
        await eventually(lambda: _waiting_for_a_lock(db, other), 10, "the snapshot waits for the TRUNCATE")
    position, rows = await asyncio.wait_for(snapshot, 10)
    changes = await committed_changes(db, table)
    state: list[int] = []
    for change in (c for c in changes if c["seq"] <= position):
        state = [] if change["op"] == "TRUNCATE" else [*state, change["row"]["k"]]
    assert rows == sorted(state)
    assert (position, rows) == (changes[-1]["seq"], [3])


async def test_a_snapshot_holds_no_position_while_its_table_is_locked(
    db: asyncpg.Connection, other: asyncpg.Connection, database_url: Dsn
) -> None:
    """A snapshot of a table that another transaction keeps locked waits without holding the position (commits to
    streamed tables and stable positions go on), gives up after a bounded wait, and leaves nothing held."""
    table, log = await create_streamed_table(db), await create_streamed_table(db)
    writer = await asyncpg.connect(database_url.asyncpg())
    try:
        async with db.transaction():
            await db.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            snapshot = asyncio.create_task(_snapshot(other, table))
            await eventually(lambda: _waiting_for_a_lock(db, other), 10, "the snapshot waits for the table")
            await asyncio.wait_for(writer.execute(f"INSERT INTO {log} (k) VALUES (1)"), 1)
            assert await asyncio.wait_for(changelog.stable_position(writer), 1) >= await head(writer)
            with pytest.raises(asyncpg.LockNotAvailableError):
                await asyncio.wait_for(snapshot, 10)
    finally:
        await writer.close()
    held = "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
    assert await other.fetchval(held) == 0
