"""Migrations on fresh databases of their own: up to head, down to base leaving nothing behind, and up again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from realtime import migrate
from realtime.dsn import Dsn
from tests.support.databases import create_database, drop_database

HEAD = "0008_prune_by_position"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_url(admin_url: Dsn) -> Iterator[Dsn]:
    """An empty database, dropped after the test."""
    url = create_database(admin_url, prefix="rt_mig")
    try:
        yield url
    finally:
        drop_database(admin_url, url)


async def _objects(url: Dsn) -> dict[str, object]:
    """What the migrations may have left in the database, as plain values."""
    conn = await asyncpg.connect(url.asyncpg())
    try:
        return {
            "users": await conn.fetchval("SELECT to_regclass('public.users') IS NOT NULL"),
            "schema": await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'realtime'"),
            "users_touch": await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = 'users_touch'"),
            "capture_triggers": await conn.fetchval(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'realtime_capture'"
            ),
            "truncate_triggers": await conn.fetchval(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'realtime_capture_truncate'"
            ),
            "sse_tickets": await conn.fetchval("SELECT to_regclass('realtime.sse_tickets') IS NOT NULL"),
            "changes_tx": await conn.fetchval(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = to_regclass('realtime.changes') AND attname = 'tx' AND NOT attisdropped"
            ),
            "functions": [
                row[0]
                for row in await conn.fetch(
                    "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                    " WHERE n.nspname = 'realtime' ORDER BY 1"
                )
            ],
            "streamed": [
                f"{row[0]}.{row[1]}"
                for row in await conn.fetch(
                    "SELECT table_schema, table_name FROM realtime.streamed_tables ORDER BY 1, 2"
                )
            ]
            if await conn.fetchval("SELECT to_regclass('realtime.streamed_tables') IS NOT NULL")
            else None,
            "revision": await conn.fetchval("SELECT version_num FROM alembic_version")
            if await conn.fetchval("SELECT to_regclass('public.alembic_version') IS NOT NULL")
            else None,
        }
    finally:
        await conn.close()


def objects(url: Dsn) -> dict[str, object]:
    return asyncio.run(_objects(url))


CAPTURE_V2_FUNCTIONS = [
    "realtime.capture()",
    "realtime.disable_stream(regclass)",
    "realtime.enable_stream(regclass)",
    "realtime.hold_position()",
    "realtime.prune(interval,bigint,bigint)",
    "realtime.release_position()",
    "realtime.stable_position()",
]
CAPTURE_V3_FUNCTIONS = [*CAPTURE_V2_FUNCTIONS, "realtime.utc_jsonb(anyelement)"]
MIGRATED = {
    "users": True,
    "schema": 1,
    "users_touch": 1,
    "capture_triggers": 1,
    "truncate_triggers": 1,
    "functions": [
        "realtime.capture()",
        "realtime.capture_truncate()",
        "realtime.disable_stream(regclass)",
        "realtime.enable_stream(regclass)",
        "realtime.hold_position()",
        "realtime.prune(interval,bigint,bigint)",
        "realtime.queue_truncate()",
        "realtime.release_position()",
        "realtime.stable_position()",
        "realtime.utc_jsonb(anyelement)",
    ],
    "streamed": ["public.users"],
    "changes_tx": "xid8",
    "sse_tickets": True,
    "revision": HEAD,
}
SSE_TICKETS = {**MIGRATED, "revision": "0007_sse_tickets"}
CAPTURE_V5 = {**MIGRATED, "sse_tickets": False, "revision": "0006_transaction_ids"}
CAPTURE_V4 = {**CAPTURE_V5, "changes_tx": None, "revision": "0005_truncate_capture"}
CAPTURE_V3 = {**CAPTURE_V4, "truncate_triggers": 0, "functions": CAPTURE_V3_FUNCTIONS, "revision": "0004_utc_rows"}
CAPTURE_V2 = {**CAPTURE_V3, "functions": CAPTURE_V2_FUNCTIONS, "revision": "0003_shared_capture"}
CAPTURE_V1 = {
    **CAPTURE_V2,
    "functions": [
        "realtime.capture()",
        "realtime.disable_stream(regclass)",
        "realtime.enable_stream(regclass)",
        "realtime.prune(interval,bigint)",
    ],
    "revision": "0002_capture",
}
EMPTY = {
    "users": False,
    "schema": 0,
    "users_touch": 0,
    "capture_triggers": 0,
    "truncate_triggers": 0,
    "functions": [],
    "streamed": None,
    "changes_tx": None,
    "sse_tickets": False,
    "revision": None,
}


def test_upgrade_downgrade_upgrade_round_trip(fresh_url: Dsn) -> None:
    """Head creates users, its trigger and the realtime schema; base removes all of it; head works again."""
    migrate.upgrade(fresh_url)
    assert objects(fresh_url) == MIGRATED
    migrate.downgrade(fresh_url, "base")
    assert objects(fresh_url) == EMPTY
    migrate.upgrade(fresh_url)
    assert objects(fresh_url) == MIGRATED


def test_each_revision_downgrades_on_its_own(fresh_url: Dsn) -> None:
    """Each revision's downgrade undoes exactly that revision: capture v6's prune (same objects), the SSE tickets
    table, capture v5 to v4 to v3 to v2 to v1, then the schema."""
    migrate.upgrade(fresh_url, "0001_users")
    assert objects(fresh_url) == {**EMPTY, "users": True, "users_touch": 1, "revision": "0001_users"}
    migrate.upgrade(fresh_url, "0002_capture")
    assert objects(fresh_url) == CAPTURE_V1
    migrate.upgrade(fresh_url, "0003_shared_capture")
    assert objects(fresh_url) == CAPTURE_V2
    migrate.upgrade(fresh_url, "0004_utc_rows")
    assert objects(fresh_url) == CAPTURE_V3
    migrate.upgrade(fresh_url, "0005_truncate_capture")
    assert objects(fresh_url) == CAPTURE_V4
    migrate.upgrade(fresh_url, "0006_transaction_ids")
    assert objects(fresh_url) == CAPTURE_V5
    migrate.upgrade(fresh_url, "0007_sse_tickets")
    assert objects(fresh_url) == SSE_TICKETS
    migrate.upgrade(fresh_url)
    assert objects(fresh_url) == MIGRATED
    migrate.downgrade(fresh_url, "0007_sse_tickets")
    assert objects(fresh_url) == SSE_TICKETS
    migrate.downgrade(fresh_url, "0006_transaction_ids")
    assert objects(fresh_url) == CAPTURE_V5
    migrate.downgrade(fresh_url, "0005_truncate_capture")
    assert objects(fresh_url) == CAPTURE_V4
    migrate.downgrade(fresh_url, "0004_utc_rows")
    assert objects(fresh_url) == CAPTURE_V3
    migrate.downgrade(fresh_url, "0003_shared_capture")
    assert objects(fresh_url) == CAPTURE_V2
    migrate.downgrade(fresh_url, "0002_capture")
    assert objects(fresh_url) == CAPTURE_V1
    migrate.downgrade(fresh_url, "0001_users")
    assert objects(fresh_url) == {**EMPTY, "users": True, "users_touch": 1, "revision": "0001_users"}


async def _execute(url: Dsn, script: str) -> None:
    conn = await asyncpg.connect(url.asyncpg())
    try:
        await conn.execute(script)
    finally:
        await conn.close()


async def _rows(url: Dsn, query: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url.asyncpg())
    try:
        return [tuple(row) for row in await conn.fetch(query)]
    finally:
        await conn.close()


def execute(url: Dsn, script: str) -> None:
    """Run `script` (one or more statements, one transaction) on a connection of its own."""
    asyncio.run(_execute(url, script))


def rows(url: Dsn, query: str) -> list[tuple[object, ...]]:
    return asyncio.run(_rows(url, query))


STREAMED_AT_V3 = """
    CREATE SCHEMA shop;
    CREATE TABLE shop.orders (id bigint PRIMARY KEY, total numeric);
    CREATE TABLE notes (id bigint PRIMARY KEY, body text);
    CREATE TABLE plain (id bigint PRIMARY KEY);
    SELECT realtime.enable_stream('shop.orders');
    SELECT realtime.enable_stream('notes');
"""
CHANGES = "SELECT seq, table_name, op FROM realtime.changes ORDER BY seq"
TRUNCATE_TRIGGERS = (
    "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = 'realtime_capture_truncate' ORDER BY 1"
)
OP_CHECK = (
    "SELECT pg_get_constraintdef(oid), convalidated FROM pg_constraint"
    " WHERE conrelid = 'realtime.changes'::regclass AND contype = 'c'"
)


def test_capture_v4_upgrades_and_downgrades_with_streamed_tables(fresh_url: Dsn) -> None:
    """v3 to v4 gives every streamed table its TRUNCATE trigger; back to v3 removes them and the recorded
    TRUNCATEs (retention's mark moves past them); row capture goes on throughout and v4 works again after."""
    migrate.upgrade(fresh_url, "0004_utc_rows")
    execute(fresh_url, STREAMED_AT_V3)
    v3_check = rows(fresh_url, OP_CHECK)

    migrate.upgrade(fresh_url, "0005_truncate_capture")
    assert rows(fresh_url, TRUNCATE_TRIGGERS) == [("notes",), ("shop.orders",), ("users",)]
    execute(fresh_url, "INSERT INTO notes VALUES (1, 'a')")
    execute(fresh_url, "TRUNCATE shop.orders, notes, plain; INSERT INTO notes VALUES (2, 'b');")
    changes = rows(fresh_url, CHANGES)
    assert [change[1:] for change in changes] == [
        ("notes", "INSERT"),
        ("orders", "TRUNCATE"),
        ("notes", "TRUNCATE"),
        ("notes", "INSERT"),
    ]

    migrate.downgrade(fresh_url, "0004_utc_rows")
    streamed = ["public.notes", "public.users", "shop.orders"]
    assert objects(fresh_url) == {**CAPTURE_V3, "capture_triggers": 3, "streamed": streamed}
    assert rows(fresh_url, "SELECT to_regclass('realtime.pending_truncates')") == [(None,)]
    assert rows(fresh_url, OP_CHECK) == v3_check
    assert rows(fresh_url, CHANGES) == [(1, "notes", "INSERT"), (4, "notes", "INSERT")]
    assert rows(fresh_url, "SELECT pruned_through FROM realtime.retention") == [(3,)]
    execute(fresh_url, "TRUNCATE notes; INSERT INTO notes VALUES (3, 'c');")
    assert rows(fresh_url, CHANGES)[-1] == (5, "notes", "INSERT")

    migrate.upgrade(fresh_url, "0005_truncate_capture")
    assert rows(fresh_url, TRUNCATE_TRIGGERS) == [("notes",), ("shop.orders",), ("users",)]
    execute(fresh_url, "TRUNCATE shop.orders; SELECT realtime.enable_stream('plain'); TRUNCATE plain;")
    assert rows(fresh_url, CHANGES)[-2:] == [(6, "orders", "TRUNCATE"), (7, "plain", "TRUNCATE")]
    execute(fresh_url, "SELECT realtime.disable_stream('plain'); TRUNCATE plain;")
    assert rows(fresh_url, TRUNCATE_TRIGGERS) == [("notes",), ("shop.orders",), ("users",)]
    assert rows(fresh_url, CHANGES)[-1] == (7, "plain", "TRUNCATE")


TRANSACTIONS = "SELECT seq, tx::text FROM realtime.changes ORDER BY seq"


def test_capture_v5_records_each_change_transaction(fresh_url: Dsn) -> None:
    """From v5 on every change names its transaction: one id for all changes of a transaction, TRUNCATE included;
    rows recorded before the upgrade keep none; back to v4 the column is gone and capture goes on."""
    migrate.upgrade(fresh_url, "0005_truncate_capture")
    execute(fresh_url, "CREATE TABLE notes (id bigint PRIMARY KEY); SELECT realtime.enable_stream('notes');")
    execute(fresh_url, "INSERT INTO notes VALUES (1)")

    migrate.upgrade(fresh_url)
    execute(fresh_url, "INSERT INTO notes VALUES (2), (3)")
    execute(fresh_url, "TRUNCATE notes; INSERT INTO notes VALUES (4);")
    recorded = rows(fresh_url, TRANSACTIONS)
    assert [seq for seq, _ in recorded] == [1, 2, 3, 4, 5]
    before, first, second = recorded[0][1], {tx for _, tx in recorded[1:3]}, {tx for _, tx in recorded[3:]}
    assert before is None
    assert len(first) == 1
    assert len(second) == 1
    assert first != second
    assert None not in first | second

    migrate.downgrade(fresh_url, "0005_truncate_capture")
    assert objects(fresh_url)["changes_tx"] is None
    execute(fresh_url, "INSERT INTO notes VALUES (6)")
    assert rows(fresh_url, CHANGES)[-1] == (6, "notes", "INSERT")


PRUNE_SOURCE = "SELECT prosrc FROM pg_proc WHERE oid = 'realtime.prune(interval,bigint,bigint)'::regprocedure"


def test_capture_v6_finds_the_count_cutoff_without_reading_rows(fresh_url: Dsn) -> None:
    """v6's prune() takes the count cutoff from the newest position; its downgrade restores v2's, which reads up to
    max_rows rows with OFFSET."""
    migrate.upgrade(fresh_url)
    (source,) = rows(fresh_url, PRUNE_SOURCE)[0]
    assert "newest - max_rows" in str(source)
    assert "OFFSET" not in str(source)
    migrate.downgrade(fresh_url, "0007_sse_tickets")
    (source,) = rows(fresh_url, PRUNE_SOURCE)[0]
    assert "OFFSET max_rows" in str(source)
    migrate.upgrade(fresh_url)
    (source,) = rows(fresh_url, PRUNE_SOURCE)[0]
    assert "OFFSET" not in str(source)


def test_upgrade_at_head_is_a_no_op(fresh_url: Dsn) -> None:
    """Upgrading a database already at head changes nothing (serve migrates on every start)."""
    migrate.upgrade(fresh_url)
    migrate.upgrade(fresh_url)
    assert objects(fresh_url) == MIGRATED


def _cli_environment(url: Dsn) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url.libpq(), "LOG_LEVEL": "warning"}


def test_realtime_migrate_cli_upgrades_and_downgrades(fresh_url: Dsn, tmp_path: Path) -> None:
    """`realtime migrate` with DATABASE_URL migrates to head from any directory; `--down base` reverts it."""
    command = [sys.executable, "-m", "realtime", "migrate"]
    env = _cli_environment(fresh_url)
    up = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    assert objects(fresh_url) == MIGRATED
    down = subprocess.run([*command, "--down", "base"], env=env, cwd=tmp_path, capture_output=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert objects(fresh_url) == EMPTY


def test_alembic_command_uses_alembic_ini(fresh_url: Dsn) -> None:
    """Plain `alembic upgrade head` from the repository root (alembic.ini, DATABASE_URL) reaches the same head."""
    command = [sys.executable, "-m", "alembic", "upgrade", "head"]
    env = _cli_environment(fresh_url)
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert objects(fresh_url) == MIGRATED
