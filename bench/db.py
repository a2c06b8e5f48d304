"""The bench databases: one migrated by realtime, one holding the plain table and trigger the peers use.

Both live on the shared PostgreSQL server; the harness only ever creates, changes and reads databases whose
name starts with `bench_`, so it can run next to other work on the same server.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg

from bench.proc import cpu_seconds
from realtime import embedded
from realtime.dsn import Dsn

PG_BASE = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
REALTIME_DB = "bench_realtime"
PEERS_DB = "bench_peers"
NOTIFY_CHANNEL = "changes"

_PEERS_DIR = Path(__file__).parent / "peers"


def dsn(database: str) -> str:
    return f"{PG_BASE}/{database}"


def realtime_cli() -> Path:
    """The `realtime` script of the virtualenv running the harness, so both use the same code."""
    return Path(sys.executable).parent / "realtime"


async def ensure_database(name: str) -> None:
    if not name.startswith("bench_"):
        raise ValueError(f"refusing to manage a database outside the bench namespace: {name}")
    await embedded.ensure_database(Dsn.parse(dsn("postgres")), name)  # `name` is checked above, from constants


async def setup_peers_db() -> None:
    await ensure_database(PEERS_DB)
    conn = await asyncpg.connect(dsn(PEERS_DB))
    try:
        await conn.execute((_PEERS_DIR / "schema.sql").read_text())
        await conn.execute((_PEERS_DIR / "notify_trigger.sql").read_text())
    finally:
        await conn.close()


async def set_notify_trigger(enabled: bool) -> None:
    """Install (or drop) the peers' row-payload NOTIFY trigger; the write-cost and REST runs need both."""
    conn = await asyncpg.connect(dsn(PEERS_DB))
    try:
        if enabled:
            await conn.execute((_PEERS_DIR / "notify_trigger.sql").read_text())
        else:
            await conn.execute("DROP TRIGGER IF EXISTS users_notify_change ON users")
    finally:
        await conn.close()


async def _run_cli(*args: str, timeout: float = 120.0) -> tuple[int, str]:
    env = {**os.environ, "DATABASE_URL": dsn(REALTIME_DB)}
    proc = await asyncio.create_subprocess_exec(
        str(realtime_cli()),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"realtime {' '.join(args)} timed out after {timeout:.0f}s"
    return proc.returncode or 0, out.decode(errors="replace")


async def setup_realtime_db() -> None:
    await ensure_database(REALTIME_DB)
    code, out = await _run_cli("migrate")
    if code != 0:
        raise RuntimeError(f"realtime migrate failed ({code}):\n{out}")


async def set_realtime_stream(enabled: bool) -> None:
    code, out = await _run_cli("stream", "enable" if enabled else "disable", "users")
    if code != 0:
        raise RuntimeError(f"realtime stream {'enable' if enabled else 'disable'} users failed ({code}):\n{out}")


async def reset_users(database: str, rows: int) -> None:
    """Empty `users` and insert `rows` rows with ids 1..rows, so every run starts from the same table."""
    conn = await asyncpg.connect(dsn(database))
    try:
        async with conn.transaction():
            try:
                async with conn.transaction():
                    await conn.execute("TRUNCATE users RESTART IDENTITY")
            except asyncpg.PostgresError:
                # A capture that refuses TRUNCATE still accepts row deletes.
                await conn.execute("DELETE FROM users")
                await conn.execute("ALTER TABLE users ALTER COLUMN id RESTART WITH 1")
            await conn.execute(
                "INSERT INTO users (name, email) "
                "SELECT 'user ' || g, 'seed-' || g || '@example.com' FROM generate_series(1, $1) AS g",
                rows,
            )
        await conn.execute("VACUUM ANALYZE users")
    finally:
        await conn.close()


async def background_counts(database: str) -> dict[str, int]:
    """Counters of what PostgreSQL and the changelog's pruning do besides the workload, read before and after a
    step so that a step sunk by a stall can be matched with its cause: checkpoints (server-wide), autovacuum and
    autoanalyze runs in `database`, and changelog rows deleted (realtime's retention pruning)."""
    conn = await asyncpg.connect(dsn(database))
    try:
        version = int(await conn.fetchval("SHOW server_version_num"))
        checkpoints_sql = (
            "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
            if version >= 170000
            else "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        )
        checkpoints = int(await conn.fetchval(checkpoints_sql))
        vacuums = await conn.fetchval(
            "SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0) FROM pg_stat_all_tables"
        )
        deleted = await conn.fetchval(
            "SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_all_tables"
            " WHERE schemaname = 'realtime' AND relname = 'changes'"
        )
    finally:
        await conn.close()
    return {"checkpoints": checkpoints, "autovacuums": int(vacuums), "changelog_deleted": int(deleted)}


class DbCpu:
    """CPU spent by the PostgreSQL backends connected to one database (writers, listeners, server pools).

    The backends are found through pg_stat_activity at both ends of the window; one that connects inside
    the window counts from zero, one that leaves inside it is lost (none do in the bench's runs).
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self._start: dict[int, float] = {}
        self.seconds = 0.0

    async def _pids(self) -> list[int]:
        conn = await asyncpg.connect(dsn("postgres"))
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                self.database,
            )
        finally:
            await conn.close()
        return [int(r["pid"]) for r in rows]

    async def start(self) -> None:
        self._start = {pid: cpu_seconds([pid]) for pid in await self._pids()}

    async def stop(self) -> float:
        total = 0.0
        for pid in await self._pids():
            total += cpu_seconds([pid]) - self._start.get(pid, 0.0)
        self.seconds = total
        return total
