"""Reading Server-Sent Events in tests: an httpx stream parsed into events by the rules of the SSE format
(fields per line, an event ends at a blank line, `:` lines are comments), each wait bounded by a deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class Event:
    kind: str
    data: str
    id: str | None = None

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.data)
        return value


@dataclass
class EventReader:
    """The events of one streaming response, in order; comments and `retry:` values are kept aside."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    _lines: AsyncIterator[str] | None = None

    async def next(self, timeout: float = 10.0) -> Event | None:
        """The next event; None when the response ended."""
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        kind, event_id = "message", None
        data: list[str] = []
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if line == "":
                    if data:
                        return Event(kind, "\n".join(data), event_id)
                    kind, event_id = "message", None
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    self.comments.append(value)
                elif name == "event":
                    kind = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    event_id = value
                elif name == "retry":
                    self.retry.append(int(value))
        return None

    async def until(self, predicate: Callable[[Event], bool], timeout: float = 10.0) -> tuple[Event, list[Event]]:
        """The first event `predicate` holds for, and every event before it."""
        before: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next(timeout)
                if event is None:
                    raise AssertionError(f"the stream ended first; events: {before}")
                if predicate(event):
                    return event, before
                before.append(event)


@contextlib.asynccontextmanager
async def open_stream(
    http: httpx.AsyncClient, path: str, *, params: Any = None, headers: dict[str, str] | None = None
) -> AsyncIterator[EventReader]:
    """GET `path` as a stream; the caller checks the status (a refusal is problem+json, read in full)."""
    async with http.stream("GET", path, params=params, headers=headers, timeout=httpx.Timeout(30.0)) as response:
        if response.status_code != 200:
            await response.aread()
        yield EventReader(response)


def seqs(events: list[Event]) -> list[int]:
    return [event.json["seq"] for event in events if event.kind == "change"]
