"""The change source: K asyncpg connections committing single-row changes on a fixed, open-loop schedule.

Writer w of K sends change i at start + (w + i*K) / rate. A writer that falls behind runs its next change
at once instead of skipping it, and the worst slip is reported, so "offered" and "achieved" can be told apart
when the database, not the server under test, is the limit.

In "updates" mode a statement may update several rows (`rows_per_commit`): each row is a change of its own to
the capture, so the change rate can go past what the database commits per second. Statement j then updates
the next `rows_per_commit` ids after those of statement j - 1 (round robin over `ids`) and is due at
start + j * rows_per_commit / rate.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from bench.db import dsn

Mode = Literal["mixed", "updates"]

_INSERT = "INSERT INTO users (name, email) VALUES ($1, $2) RETURNING id"
_UPDATE = "UPDATE users SET name = $2, updated_at = now(), version = version + 1 WHERE id = $1"
_UPDATE_MANY = "UPDATE users SET name = $2, updated_at = now(), version = version + 1 WHERE id = ANY($1::bigint[])"
_DELETE = "DELETE FROM users WHERE id = $1"

# One cycle keeps the table's size steady: as many rows come as go.
_MIXED_CYCLE = ("INSERT", "UPDATE", "UPDATE", "DELETE")


@dataclass
class WriteStats:
    offered: int = 0
    committed: int = 0
    failed: int = 0
    seconds: float = 0.0  # first scheduled change to last commit
    max_lag_s: float = 0.0  # worst slip behind the schedule
    by_key: Counter[int] = field(default_factory=Counter)  # committed changes per row id
    ops: Counter[str] = field(default_factory=Counter)

    @property
    def achieved_rate(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0


class ChangeWriters:
    """K open connections; `run` may be called once per measured window.

    The connections are opened before the window starts so connection set-up stays out of the figures and
    their backends are visible to the database CPU sampler for the whole window.
    """

    def __init__(self, database: str, writers: int) -> None:
        self.database = database
        self.writers = writers
        self._conns: list[asyncpg.Connection] = []
        # Rows each writer owns in mixed mode; kept across runs so a delete never targets a deleted row.
        self._pools: list[deque[int]] | None = None

    async def __aenter__(self) -> ChangeWriters:
        self._conns = [await asyncpg.connect(dsn(self.database)) for _ in range(self.writers)]
        return self

    async def __aexit__(self, *_: object) -> None:
        for conn in self._conns:
            await conn.close()
        self._conns = []

    async def run(
        self, *, rate: float, seconds: float, ids: Sequence[int], mode: Mode = "mixed", rows_per_commit: int = 1
    ) -> WriteStats:
        """Commit about rate*seconds changes. `ids`: rows that exist (mixed) or the rows to update (updates)."""
        if rows_per_commit > 1:
            if mode != "updates":
                raise ValueError("rows_per_commit > 1 needs mode='updates'")
            return await self._run_batched(rate, seconds, ids, rows_per_commit)
        stats = WriteStats()
        # Inserted emails must be unique across runs that share a table without a reset in between.
        tag = f"r{time.time_ns() // 1000 % 10**12}"
        writers = len(self._conns)
        if self._pools is None:
            self._pools = [deque(ids[w::writers]) for w in range(writers)]
        pools = self._pools
        total = max(1, round(rate * seconds))
        start = time.monotonic() + 0.05

        async def writer(w: int, conn: asyncpg.Connection) -> None:
            pool = pools[w]
            for n, i in enumerate(range(w, total, writers)):
                due = start + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    stats.max_lag_s = max(stats.max_lag_s, -delay)
                stats.offered += 1
                try:
                    await _one_change(conn, w, n, i, pool, ids, mode, tag, stats)
                except asyncpg.PostgresError:
                    stats.failed += 1

        await asyncio.gather(*(writer(w, c) for w, c in enumerate(self._conns)))
        stats.seconds = time.monotonic() - start
        return stats

    async def _run_batched(self, rate: float, seconds: float, ids: Sequence[int], rows: int) -> WriteStats:
        if rows > len(ids):
            raise ValueError(f"rows_per_commit {rows} is more than the {len(ids)} ids to update")
        stats = WriteStats()
        tag = f"r{time.time_ns() // 1000 % 10**12}"
        writers = len(self._conns)
        statements = max(1, round(rate * seconds / rows))
        start = time.monotonic() + 0.05

        async def writer(w: int, conn: asyncpg.Connection) -> None:
            for j in range(w, statements, writers):
                due = start + j * rows / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    stats.max_lag_s = max(stats.max_lag_s, -delay)
                batch = [ids[(j * rows + k) % len(ids)] for k in range(rows)]
                stats.offered += len(batch)
                try:
                    status = await conn.execute(_UPDATE_MANY, batch, f"upd {tag} {j}")
                except asyncpg.PostgresError:
                    stats.failed += len(batch)
                    continue
                if status == f"UPDATE {len(batch)}":
                    stats.committed += len(batch)
                    stats.by_key.update(batch)
                    stats.ops["UPDATE"] += len(batch)
                else:
                    stats.failed += len(batch)

        await asyncio.gather(*(writer(w, c) for w, c in enumerate(self._conns)))
        stats.seconds = time.monotonic() - start
        return stats


async def _one_change(
    conn: asyncpg.Connection,
    w: int,
    n: int,
    i: int,
    pool: deque[int],
    ids: Sequence[int],
    mode: Mode,
    tag: str,
    stats: WriteStats,
) -> None:
    if mode == "updates":
        row_id = ids[i % len(ids)]
        status = await conn.execute(_UPDATE, row_id, f"upd {tag} {i}")
        if status == "UPDATE 1":
            stats.committed += 1
            stats.by_key[row_id] += 1
            stats.ops["UPDATE"] += 1
        return
    op = _MIXED_CYCLE[n % len(_MIXED_CYCLE)]
    if op != "INSERT" and not pool:
        op = "INSERT"
    if op == "INSERT":
        new_id = await conn.fetchval(_INSERT, f"new {tag} {w}.{n}", f"{tag}-{w}-{n}@example.com")
        pool.append(int(new_id))
        ok = True
    elif op == "UPDATE":
        row_id = pool[n % len(pool)]
        ok = await conn.execute(_UPDATE, row_id, f"upd {tag} {w}.{n}") == "UPDATE 1"
    else:
        # Delete the oldest row this writer owns; rows a writer inserted are deleted by it only.
        ok = await conn.execute(_DELETE, pool.popleft()) == "DELETE 1"
    if ok:
        stats.committed += 1
        stats.ops[op] += 1
