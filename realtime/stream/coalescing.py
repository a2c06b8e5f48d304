"""Coalescing for slow links: a subscription's backlog as at most one pending frame per row (`"coalesce": true`).

Without the option, a connection that falls behind is closed with 4008 once its queue overflows, and the client
resumes with `since`. A dashboard on a slow link would fall behind again at once; it wants the newest state of
each row, not every step. A coalescing subscription whose connection is behind (the socket has not taken what was
written: its outbox is waiting for the transport to drain) keeps its frames here instead, one per `key`, merged so
that applying the merged frames by the view's rules (docs/protocol.md, "change") gives the same view as applying
every frame:

    pending    then       merged
    added      modified   added, the newest row
    added      removed    nothing (the client never saw the row)
    modified   modified   modified, the newest row, the first `old`
    modified   removed    removed, the first `old` (the row as the client last had it)
    removed    added      modified, the newest row, the removed `old`
    any        reset      reset alone: a TRUNCATE empties the view, and what was pending for it is moot

A merged frame takes the position, `op`, `ts` and `tx` of its newest change and says `"coalesced": true`. Frames
leave in the order of their newest change, so `seq` still increases. When the connection catches up, the pending
frames are written as the socket takes them; the last of them carries `tx_end`, and none before it does: the view
is whole (at the newest pending position) only once all of them are applied. For the same reason a merged frame
without `tx_end` is no position to resume from: a frame sent before it may stand for a change older than it, still
pending under another key. A client resumes from the last frame that is not merged or carries `tx_end`.
Memory is bounded by the number of distinct keys pending, `WS_COALESCE_MAX_KEYS`; past it the connection is
closed with 4008 as without the option.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from realtime.stream.views import (
    ADDED,
    MODIFIED,
    REMOVED,
    RESET,
    Parts,
    change_frame,
    compose_body,
    transaction_tail,
)

_RESET_KEY = ""  # no key's JSON text is empty


@dataclass(slots=True)
class Pending:
    """One row's merged frame, waiting for the socket."""

    seq: int
    op: str
    ts: str
    tx: str | None
    parts: Parts  # view, key, row, old


def merge(pending: Pending | None, newer: Pending) -> Pending | None:
    """The one frame standing for `pending` followed by `newer` (same key), or None for no frame at all."""
    if pending is None:
        return newer
    before, after = pending.parts[0], newer.parts[0]
    _, key, row, _ = newer.parts
    first_old = pending.parts[3]
    if before == ADDED:
        if after == REMOVED:
            return None
        merged: Parts = (ADDED, key, row, None)
    elif before == MODIFIED:
        merged = (REMOVED, key, None, first_old) if after == REMOVED else (MODIFIED, key, row, first_old)
    elif before == REMOVED and after == ADDED:
        merged = (MODIFIED, key, row, first_old)
    else:
        merged = newer.parts
    return Pending(newer.seq, newer.op, newer.ts, newer.tx, merged)


class Coalescer:
    """The pending frames of one subscription, by key, in the order of their newest change."""

    __slots__ = ("_max_keys", "_pending", "_sub_id", "_table")

    def __init__(self, sub_id: str, table: str, max_keys: int) -> None:
        self._sub_id = sub_id
        self._table = orjson.dumps(table).decode()  # as frames carry it: JSON text
        self._max_keys = max_keys
        self._pending: dict[str, Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: Pending) -> bool:
        """Merge a frame in; False when that would hold more than the bound of distinct keys."""
        pending = self._pending
        view, key = item.parts[0], item.parts[1]
        if view == RESET:
            pending.clear()
            pending[_RESET_KEY] = item
            return True
        assert key is not None
        merged = merge(pending.pop(key, None), item)
        if merged is not None:
            pending[key] = merged  # re-inserted: it moves behind every key with an older newest change
        return len(pending) <= self._max_keys

    def peek(self) -> tuple[str, int, bool]:
        """The oldest pending frame's text and position, and whether it is the last one pending (it then
        carries `tx_end`: the view is whole only once every pending frame is applied)."""
        item = next(iter(self._pending.values()))
        last = len(self._pending) == 1
        body = compose_body(item.seq, self._table, item.op, item.parts, item.ts) + ',"coalesced":true'
        return change_frame(self._sub_id, body, transaction_tail(item.tx, last)), item.seq, last

    def clear(self) -> None:
        self._pending.clear()

    def pop(self) -> None:
        """Drop the oldest pending frame (it was written)."""
        del self._pending[next(iter(self._pending))]
