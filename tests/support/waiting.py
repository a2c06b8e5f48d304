"""Waiting on conditions with deadlines (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy (returned) or the deadline passes (AssertionError).

    For conditions no event announces (a row in pg_stat_activity, a page's DOM); `interval` is the time between
    checks, not a wait for an effect.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)
