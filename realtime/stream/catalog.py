"""Which tables stream and what columns they have, cached briefly so subscribing stays cheap."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import asyncpg

from realtime.stream import changelog
from realtime.stream.changelog import StreamedTable
from realtime.stream.changes import TableKey

ConnectionSource = Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]


class Catalog:
    """Known streamed tables. Only positive answers are cached (for `ttl_s`), so a table enabled with
    `realtime stream enable` can be subscribed to at once, and column changes show within `ttl_s`."""

    def __init__(self, connect: ConnectionSource, ttl_s: float = 5.0) -> None:
        self._connect = connect
        self._ttl_s = ttl_s
        self._cache: dict[TableKey, tuple[float, StreamedTable]] = {}

    async def lookup(self, key: TableKey) -> StreamedTable | None:
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._connect() as conn:
            table = await changelog.streamed_table(conn, key)
        if table is None:
            self._cache.pop(key, None)
        else:
            self._cache[key] = (now + self._ttl_s, table)
        return table
