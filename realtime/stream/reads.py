"""History reads (snapshots, replays, catalog look-ups) share a few pool connections, never the whole pool.

Lifecycle of a read:
    waiting   for one of STREAM_MAX_CONCURRENT_READS slots, in arrival order, at most STREAM_READ_WAIT_S;
              then `ReadsBusy`, which the client sees as `unavailable` with a `retry_after_ms` hint
    reading   a slot and a pool connection are held for one bounded read (a chunk of a replay, a whole
              snapshot into memory), never while a frame waits for the client
    done      both released in `finally`, whatever happened to the client or the task
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg

ConnectionSource = Callable[[float | None], AbstractAsyncContextManager[asyncpg.Connection]]
# What a refused reader is told to wait before retrying: reads are short, so slots free up within this.
RETRY_AFTER_BUSY_MS = 1000


class ReadsBusy(Exception):
    """Every read slot stayed taken for the whole wait."""


class ReadSlots:
    def __init__(self, connect: ConnectionSource, limit: int, wait_s: float) -> None:
        self._connect = connect
        self._slots = asyncio.Semaphore(limit)
        self._wait_s = wait_s

    @asynccontextmanager
    async def connection(self, seconds: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A pool connection for one bounded read (within `seconds`, default the source's); ReadsBusy if no slot
        frees up in time."""
        try:
            async with asyncio.timeout(self._wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise ReadsBusy(f"no history read slot became free within {self._wait_s:g}s") from None
        try:
            async with self._connect(seconds) as conn:
                yield conn
        finally:
            self._slots.release()


class MemoryBudget:
    """Bytes the process lets snapshots hold between reading their rows and handing them to the socket."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0

    def take(self, size: int) -> bool:
        if self._used + size > self._limit:
            return False
        self._used += size
        return True

    def give(self, size: int) -> None:
        self._used -= size
