"""One subscription of a `Client`: what it asked for, the position it has reached, and its bounded buffer.

Lifecycle, repeated on every connection of its client:

    pending ─subscribe sent─► [snapshot chunks, assembled] ─► live ─► change, change, ...
       ├─ with `since` its position once it holds one, so the server replays exactly what it missed
       ├─ error cursor_expired ─► Reset event ─► sent again with `snapshot: true` ─► Snapshot event
       ├─ error unavailable / rate_limited ─► retrying: sent again after the server's hint and a backoff
       └─ any other error ─► failed: the iterator raises SubscriptionError after the buffered events

The position (`seq`) moves when an event enters the buffer, not when the program reads it: events already in
the buffer survive a reconnect, so resuming from the buffered position delivers each change once.

Buffer policy: at most `capacity` events wait for the program. When the buffer is full the client stops reading
the connection (every subscription of that client waits with it). If the program stays behind long enough, the
server cuts the connection with 4008 ("too slow") and the client reconnects once every buffer is at most half
full, resuming from the buffered positions: a slow program is slowed down and loses nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from realtime.client.backoff import Backoff
from realtime.client.events import Change, Event, Reset, Snapshot

if TYPE_CHECKING:
    from realtime.client.connection import Client

Operation: TypeAlias = Literal["INSERT", "UPDATE", "DELETE"]
FilterOp: TypeAlias = Literal["eq", "neq", "lt", "lte", "gt", "gte", "in", "is"]
# (column, op, value): value is a JSON scalar, a non-empty list for `in`, or None/True/False for `is`.
Condition: TypeAlias = tuple[str, FilterOp, Any]
State: TypeAlias = Literal["pending", "live", "retrying", "closed", "failed"]

OPERATIONS: tuple[Operation, ...] = ("INSERT", "UPDATE", "DELETE")
FILTER_OPS: tuple[FilterOp, ...] = ("eq", "neq", "lt", "lte", "gt", "gte", "in", "is")


class EventBuffer:
    """A bounded FIFO of events for one reader; `end` lets the reader drain what is left and then raise."""

    def __init__(self, capacity: int, on_take: Callable[[], None]) -> None:
        if capacity < 1:
            raise ValueError(f"a subscription buffer holds at least one event, not {capacity}")
        self.capacity = capacity
        self._items: deque[Event] = deque()
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._end: BaseException | None = None
        self._on_take = on_take

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, event: Event) -> bool:
        """Wait for room and add `event`; False (nothing added) once the buffer has ended."""
        while len(self._items) >= self.capacity and self._end is None:
            self._not_full.clear()
            await self._not_full.wait()
        if self._end is not None:
            return False
        self._items.append(event)
        self._not_empty.set()
        return True

    async def get(self) -> Event:
        while not self._items:
            if self._end is not None:
                raise self._end
            self._not_empty.clear()
            await self._not_empty.wait()
        event = self._items.popleft()
        self._not_full.set()
        self._on_take()
        return event

    def end(self, reason: BaseException) -> None:
        """No more events: `get` raises `reason` once the buffered ones are read (StopAsyncIteration: a clean end)."""
        if self._end is None:
            self._end = reason
        self._not_empty.set()
        self._not_full.set()


class Subscription:
    """Use it as `async with client.subscribe(...) as sub:` and iterate: `async for event in sub`.

    Events are `Snapshot`, `Change` and `Reset` (realtime.client.events), in `seq` order, each change once.
    """

    def __init__(
        self,
        client: Client,
        sub_id: str,
        table: str,
        *,
        filter: Sequence[Condition],
        events: Sequence[Operation] | None,
        since: int | None,
        snapshot: bool,
        capacity: int,
        backoff: Backoff,
    ) -> None:
        if since is not None and snapshot:
            raise ValueError("`since` and `snapshot` are mutually exclusive")
        if since is not None and since < 0:
            raise ValueError(f"`since` is a position (>= 0), not {since}")
        if events is not None and (not events or any(op not in OPERATIONS for op in events)):
            raise ValueError(f"`events` is a non-empty subset of {', '.join(OPERATIONS)}, not {list(events)}")
        for condition in filter:
            if len(condition) != 3 or condition[1] not in FILTER_OPS:
                raise ValueError(
                    f"a filter condition is (column, op, value) with op one of {' '.join(FILTER_OPS)},"
                    f" not {condition!r}"
                )
        self.id = sub_id
        self.table = table
        self.filter = [{"column": column, "op": op, "value": value} for column, op, value in filter]
        self.events = list(events) if events is not None else None
        self.seq: int | None = since
        self.state: State = "pending"
        self._client = client
        self._snapshot_wanted = snapshot
        self._snapshot_rows: list[dict[str, Any]] | None = None
        self._buffer = EventBuffer(capacity, client._room_made)
        self.retry_backoff = backoff
        # The connection this subscription was last sent on; a connection sends each subscription once.
        self.sent_on = 0
        self.retry_task: asyncio.Task[None] | None = None
        self._entered = False

    def request(self) -> dict[str, Any]:
        """The subscribe frame for the position this subscription has reached."""
        frame: dict[str, Any] = {"type": "subscribe", "id": self.id, "table": self.table}
        if self.events is not None:
            frame["events"] = self.events
        if self.filter:
            frame["filter"] = self.filter
        if self.seq is not None:
            frame["since"] = self.seq
        elif self._snapshot_wanted:
            frame["snapshot"] = True
        # A snapshot cut off by a lost connection is thrown away and read again whole.
        self._snapshot_rows = None
        return frame

    @property
    def buffered(self) -> int:
        """Events waiting for the program to read them."""
        return len(self._buffer)

    @property
    def capacity(self) -> int:
        return self._buffer.capacity

    # ---------------------------------------------------------------- frames from the connection's reader

    async def on_snapshot(self, frame: dict[str, Any]) -> None:
        rows = self._snapshot_rows if self._snapshot_rows is not None else []
        rows.extend(frame["rows"])
        self._snapshot_rows = rows
        if frame.get("last") is True:
            self._snapshot_rows = None
            seq = int(frame["seq"])
            if await self._buffer.put(Snapshot(self.id, self.table, seq, rows)):
                self.seq = seq
                self._snapshot_wanted = False

    def on_subscribed(self, frame: dict[str, Any]) -> None:
        seq = int(frame["seq"])
        # No matching change lies between the position reached and the one the subscription is live from.
        if self.seq is None or seq > self.seq:
            self.seq = seq
        self.state = "live"
        self.retry_backoff.reset()

    async def on_change(self, frame: dict[str, Any]) -> None:
        seq = int(frame["seq"])
        if self.seq is not None and seq <= self.seq:
            return  # already delivered before a reconnect
        if await self._buffer.put(Change.from_frame(frame)):
            self.seq = seq

    async def on_cursor_expired(self, message: str) -> None:
        """The gap cannot be replayed: say so, then start over from a snapshot."""
        await self._buffer.put(Reset(self.id, self.table, message))
        self.seq = None
        self._snapshot_wanted = True

    def end(self, reason: BaseException, state: State) -> None:
        self.state = state
        if self.retry_task is not None:
            self.retry_task.cancel()
            self.retry_task = None
        self._buffer.end(reason)

    # ---------------------------------------------------------------- the program's side

    async def __aenter__(self) -> Subscription:
        await self._client._open(self)
        self._entered = True
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Unsubscribe; iteration ends once the events already buffered are read."""
        await self._client._close_subscription(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        if not self._entered:
            raise RuntimeError("open the subscription first: `async with client.subscribe(...) as sub:`")
        return await self._buffer.get()
