"""The event loop the harness and its standalone benchmarks run on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when installed: the load this side of the server (writers, subscribers, probes) then
    leaves more CPU to the servers under test."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
