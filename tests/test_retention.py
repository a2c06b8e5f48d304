"""Changelog retention: pruning by count and age, one pruner at a time, never the newest row."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from realtime import migrate
from realtime.dsn import Dsn
from tests.support.databases import create_database, drop_database
from tests.support.server import running_server
from tests.support.ws import StreamClient


@pytest.fixture
def own_database(admin_url: Dsn) -> Iterator[Dsn]:
    url = create_database(admin_url, prefix="rt_retention")
    try:
        migrate.upgrade(url)
        yield url
    finally:
        drop_database(admin_url, url)


@pytest.fixture
async def conn(own_database: Dsn) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(own_database.asyncpg())
    try:
        yield connection
    finally:
        await connection.close()


async def _write_users(conn: asyncpg.Connection, count: int) -> list[int]:
    for index in range(count):
        await conn.execute("INSERT INTO users (name, email) VALUES ('r', $1)", f"r{index}@example.com")
    return [r["seq"] for r in await conn.fetch("SELECT seq FROM realtime.changes ORDER BY seq")]


async def test_prune_by_count_keeps_the_newest_rows_and_records_how_far(conn: asyncpg.Connection) -> None:
    """Pruning by count deletes the oldest rows and advances pruned_through to the last deleted position."""
    seqs = await _write_users(conn, 30)
    deleted = await conn.fetchval("SELECT realtime.prune(interval '1 day', 10, $1)", seqs[-1])
    assert deleted == 20
    kept = [r["seq"] for r in await conn.fetch("SELECT seq FROM realtime.changes ORDER BY seq")]
    assert kept == seqs[-10:]
    assert await conn.fetchval("SELECT pruned_through FROM realtime.retention") == seqs[-11]


async def test_prune_by_count_counts_positions_so_a_hole_keeps_fewer_rows(conn: asyncpg.Connection) -> None:
    """The count is of positions back from the newest (found without reading the rows): where positions are
    missing (a transaction that took one and failed to commit), fewer than max_rows rows are kept, never more."""
    seqs = await _write_users(conn, 30)
    holes = seqs[22:25]  # three positions among the newest ten left empty
    await conn.execute("DELETE FROM realtime.changes WHERE seq = ANY($1::bigint[])", holes)
    deleted = await conn.fetchval("SELECT realtime.prune(interval '1 day', 10, $1)", seqs[-1])
    assert deleted == 20
    kept = [r["seq"] for r in await conn.fetch("SELECT seq FROM realtime.changes ORDER BY seq")]
    assert kept == [seq for seq in seqs[-10:] if seq not in holes]
    assert await conn.fetchval("SELECT pruned_through FROM realtime.retention") == seqs[-11]


async def test_prune_by_age_never_deletes_the_newest_row(conn: asyncpg.Connection) -> None:
    """Rows older than the age limit go, except the newest one, which anchors snapshot positions."""
    seqs = await _write_users(conn, 5)
    await conn.execute("UPDATE realtime.changes SET committed_at = now() - interval '2 days'")
    assert await conn.fetchval("SELECT realtime.prune(interval '1 day', 1000000, $1)", seqs[-1]) == 4
    assert [r["seq"] for r in await conn.fetch("SELECT seq FROM realtime.changes")] == [seqs[-1]]


async def test_prune_stops_at_the_position_it_is_given(conn: asyncpg.Connection) -> None:
    """Rows past `through` stay, whatever their age: they may follow a hole an open transaction still fills."""
    seqs = await _write_users(conn, 6)
    await conn.execute("UPDATE realtime.changes SET committed_at = now() - interval '2 days'")
    assert await conn.fetchval("SELECT realtime.prune(interval '1 day', 1, $1)", seqs[2]) == 2
    assert [r["seq"] for r in await conn.fetch("SELECT seq FROM realtime.changes ORDER BY seq")] == seqs[2:]
    assert await conn.fetchval("SELECT pruned_through FROM realtime.retention") == seqs[1]


async def test_only_one_pruner_runs_at_a_time(conn: asyncpg.Connection, own_database: Dsn) -> None:
    """While one transaction prunes, another prune call returns 0 at once instead of queueing."""
    seqs = await _write_users(conn, 5)
    other = await asyncpg.connect(own_database.asyncpg())
    try:
        async with conn.transaction():
            assert await conn.fetchval("SELECT realtime.prune(interval '1 day', 1, $1)", seqs[-1]) == 4
            assert (
                await asyncio.wait_for(other.fetchval("SELECT realtime.prune(interval '1 day', 1, $1)", seqs[-1]), 5)
                == 0
            )
    finally:
        await other.close()


async def test_the_server_prunes_and_refuses_resumes_from_pruned_positions(
    own_database: Dsn, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """The server's pruner applies the age limit, and a since from before it gets cursor_expired."""
    seqs = await _write_users(conn, 5)
    await conn.execute("UPDATE realtime.changes SET committed_at = now() - interval '2 hours'")
    env = {"RETENTION_INTERVAL_S": "0.1", "RETENTION_MAX_AGE_S": "3600"}
    async with running_server(own_database, tmp_path / "server.log", env=env) as server:
        async with asyncio.timeout(15):
            while await conn.fetchval("SELECT count(*) FROM realtime.changes") > 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        client = await StreamClient.open(server.ws_url)
        try:
            expired = await client.request({"type": "subscribe", "id": "a", "table": "users", "since": seqs[0]})
            await client.subscribe("b", since=seqs[-2])
        finally:
            await client.close()
    assert expired["code"] == "cursor_expired"
