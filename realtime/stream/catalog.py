"""Which tables stream and what columns they have, cached briefly so subscribing stays cheap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import asyncpg

from realtime.stream import changelog
from realtime.stream.changelog import StreamedTable
from realtime.stream.changes import TableKey

ConnectionSource = Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]


_MISSING_TTL_S = 1.0


class Catalog:
    """Known streamed tables. Answers are cached for `ttl_s` (a missing table for one second only, so one enabled
    with `realtime stream enable` can be subscribed to almost at once), and column changes show within `ttl_s`.
    Concurrent look-ups of one table share one query, so a burst of subscribes costs one read, not one each."""

    def __init__(self, connect: ConnectionSource, ttl_s: float = 5.0) -> None:
        self._connect = connect
        self._ttl_s = ttl_s
        self._cache: dict[TableKey, tuple[float, StreamedTable | None]] = {}
        self._in_flight: dict[TableKey, asyncio.Future[StreamedTable | None]] = {}

    async def lookup(self, key: TableKey) -> StreamedTable | None:
        if "\x00" in key.schema or "\x00" in key.name:
            return None  # PostgreSQL names cannot hold NUL: no such table, and no query to send
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        running = self._in_flight.get(key)
        if running is None:
            running = self._in_flight[key] = asyncio.ensure_future(self._read(key))
            running.add_done_callback(lambda done: self._finished(key, done))
        # shield: one caller leaving (its client disconnected) must not cancel the others' answer.
        return await asyncio.shield(running)

    def _finished(self, key: TableKey, done: asyncio.Future[StreamedTable | None]) -> None:
        self._in_flight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every caller may have left before it failed

    async def _read(self, key: TableKey) -> StreamedTable | None:
        async with self._connect() as conn:
            table = await changelog.streamed_table(conn, key)
        # A missing table is remembered briefly too: subscribes to made-up names must not keep the read slots
        # busy, and a table enabled meanwhile is seen within a second.
        self._cache[key] = (time.monotonic() + (self._ttl_s if table is not None else _MISSING_TTL_S), table)
        return table
