"""The hub of one process: subscriptions by table, matching, and fan-out onto each connection's outbox.

Lifecycle of a subscription:
    catching up   registered, but its frames go to `pending` while the connection reads a snapshot or replays
                  history; `position` is where that history ends
    live          `go_live()` flushes the pending frames newer than `position`, then frames go straight to the
                  connection's outbox
    removed       unsubscribe or disconnect

`publish()` runs on the listener's task for each batch, in `seq` order. It never awaits: a change is matched,
encoded once per distinct subscription id, and offered to each outbox. A change inside a transaction of several
changes is the exception: a subscriber's frame waits for its next one, or the end of the read, to learn whether it
is the subscriber's last of the transaction (`tx_end`, transactions.py). Subscriptions with an `eq` condition are
indexed by that column's value, so a change costs nothing for subscriptions whose indexed value differs.

A subscription restricted by a policy grant (realtime/auth/policy.py) is indexed the same way, on its grant's
`eq` when it has one (a claim-bound `id = sub` puts each member under their own id). What a change means for each
subscription's view (added, modified, removed) is views.py's. Because a row may move out of a view, an UPDATE also
reaches the subscriptions indexed under the old row's value, which is the only way they learn the row left.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from realtime.auth.policy import Grant
from realtime.metrics import Metrics
from realtime.stream.changes import Change, TableKey
from realtime.stream.coalescing import Coalescer, Pending
from realtime.stream.filters import Condition, RowFilter, value_key
from realtime.stream.outbox import CLOSE_TOO_SLOW, Outbox
from realtime.stream.transactions import Held, Lookbehind, Segmenter
from realtime.stream.views import ChangeFrames, Decided, Parts
from realtime.stream.wire import encode_text_frame

_log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Subscription:
    id: str
    table: TableKey
    events: frozenset[str]
    filter: RowFilter
    outbox: Outbox
    max_pending: int
    max_pending_bytes: int
    position: int = 0
    pending: list[tuple[int, bytes]] | None = field(default_factory=list)
    pending_bytes: int = 0
    grant: Grant | None = None  # None: every row and column of the table (open mode, or a rule without limits)
    key_columns: tuple[str, ...] = ("id",)  # the table's primary key, sent as each frame's `key`
    lookbehind: Lookbehind = field(default_factory=Lookbehind)  # its newest frame until `tx_end` is known
    coalescer: Coalescer | None = None  # `"coalesce": true`: merges its frames while the socket is behind

    @property
    def index_condition(self) -> Condition | None:
        if self.grant is not None:
            return self.grant.index_condition or self.filter.index_condition
        return self.filter.index_condition

    def deliver(self, seq: int, frame: bytes, flush: bool = False) -> None:
        if self.pending is not None:
            self._hold(seq, frame)
        elif seq > self.position:
            self.position = seq
            self.outbox.offer(frame, seq, flush=flush)

    def _hold(self, seq: int, frame: bytes) -> None:
        """Keep a live change for after the history, within the connection's queue bounds."""
        if self.outbox.closed:
            return  # the connection is closing: nothing held now could be sent
        assert self.pending is not None
        self.pending.append((seq, frame))
        self.pending_bytes += len(frame)
        held = len(self.pending)
        # As in the outbox, one frame larger than the byte bound is let through alone.
        if held > self.max_pending or (held > 1 and self.pending_bytes > self.max_pending_bytes):
            self.outbox.close(CLOSE_TOO_SLOW, "too slow")
            self.pending.clear()
            self.pending_bytes = 0

    def coalesce(self, seq: int, change: Change, parts: Parts) -> None:
        """Merge a live frame into the backlog (the socket is behind, or the backlog is not yet written)."""
        assert self.coalescer is not None
        if self.outbox.closed or seq <= self.position:
            return
        if not self.coalescer.add(Pending(seq, change.op, change.ts, change.tx, parts)):
            self.outbox.close(CLOSE_TOO_SLOW, "too slow")
            return
        if self.outbox.behind:
            self.outbox.when_room(self.write_coalesced)
        else:
            self.write_coalesced()

    def write_coalesced(self) -> None:
        """Write the merged backlog, oldest first, a burst at a time: a burst goes out at once, and the next one
        when the connection has written it. A slow link then holds little more than its transport's buffer, and
        a send is never stuck for long (the send timeout cuts a reader that takes nothing, not a slow one)."""
        coalescer, outbox = self.coalescer, self.outbox
        assert coalescer is not None
        written = 0
        while coalescer and not outbox.closed:
            text, seq, last = coalescer.peek()
            frame = encode_text_frame(text)
            if not outbox.has_room(len(frame)):
                outbox.when_room(self.write_coalesced)  # the connection signals once it has written its queue
                return
            coalescer.pop()
            self.position = seq
            outbox.tally.add(frame)
            written += len(frame)
            if written >= COALESCED_BURST_BYTES and coalescer:
                outbox.offer(frame, seq, flush=True)
                # The next burst once this one is written: soon if it went out now, else when the writer waiting
                # for the socket has sent it.
                if outbox.behind:
                    outbox.when_room(self.write_coalesced)
                else:
                    asyncio.get_running_loop().call_soon(self.write_coalesced)
                return
            outbox.offer(frame, seq, flush=last)

    def go_live(self, position: int) -> None:
        """Start live delivery after history up to `position` was sent; no change is skipped or repeated."""
        self.position = position
        pending, self.pending = self.pending or [], None
        self.pending_bytes = 0
        for seq, frame in pending:
            self.deliver(seq, frame)


_ABSENT = object()
# How much of a merged backlog is written at once (coalescing.py): about what a transport buffers before it
# pushes back, so a slow link drains each burst in moments.
COALESCED_BURST_BYTES = 16 * 1024


class _TableSubscriptions:
    def __init__(self) -> None:
        self.unindexed: dict[Subscription, None] = {}
        self.by_value: defaultdict[str, defaultdict[Hashable, dict[Subscription, None]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        self.count = 0
        # Subscriptions that see whole rows (no filter, no grant), by operation and subscription id: how many
        # frames a change sends them, counted for the metrics once per change instead of once per frame.
        self.whole_counts: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, sub: Subscription) -> None:
        condition = sub.index_condition
        if condition is None:
            self.unindexed[sub] = None
        else:
            self.by_value[condition.column][value_key(condition.value)][sub] = None
        self.count += 1
        if _sees_whole_rows(sub):
            for op in _operations(sub):
                self.whole_counts[op][sub.id] += 1

    def _uncount(self, sub: Subscription) -> None:
        if _sees_whole_rows(sub):
            for op in _operations(sub):
                counts = self.whole_counts[op]
                counts[sub.id] -= 1
                if not counts[sub.id]:
                    del counts[sub.id]

    def remove(self, sub: Subscription) -> bool:
        """Take `sub` out; False if it was not here (removing twice must not touch the others' count)."""
        condition = sub.index_condition
        if condition is None:
            if self.unindexed.pop(sub, _ABSENT) is _ABSENT:
                return False
        else:
            column = self.by_value.get(condition.column)
            key = value_key(condition.value)
            subs = column.get(key) if column is not None else None
            if column is None or subs is None or subs.pop(sub, _ABSENT) is _ABSENT:
                return False
            if not subs:
                del column[key]
            if not column:
                del self.by_value[condition.column]
        self.count -= 1
        self._uncount(sub)
        return True

    def every(self) -> Iterator[Subscription]:
        yield from self.unindexed
        for subs_by_value in self.by_value.values():
            for subs in subs_by_value.values():
                yield from subs

    def candidates(self, change: Change) -> Iterator[Subscription]:
        if change.op == "TRUNCATE":  # empties every view of the table
            yield from self.every()
            return
        yield from self.unindexed
        if self.by_value:
            row = change.filter_row
            # An UPDATE that changes an indexed value leaves the views of the subscriptions under the old value.
            old = change.old_row if change.op == "UPDATE" else None
            for column, subs_by_value in self.by_value.items():
                key = value_key(row.get(column))
                subs = subs_by_value.get(key)
                if subs:
                    yield from subs
                if old is not None:
                    old_key = value_key(old.get(column))
                    if old_key != key:
                        subs = subs_by_value.get(old_key)
                        if subs:
                            yield from subs


def _sees_whole_rows(sub: Subscription) -> bool:
    """Its frames are the change's whole rows, the same bytes for every such subscription with the same id."""
    return sub.grant is None and not sub.filter.conditions


def _operations(sub: Subscription) -> frozenset[str]:
    return sub.events | {"TRUNCATE"}  # a TRUNCATE reaches every subscription of its table


class Hub:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics.off()
        self._tally = self.metrics.tally
        self.position = 0  # seq of the last change published (the listener's read position)
        self._tables: dict[TableKey, _TableSubscriptions] = {}
        self._outboxes: dict[Outbox, None] = {}
        self.no_connections = asyncio.Event()
        self.no_connections.set()
        self._segmenter = Segmenter()
        self._holding: dict[Subscription, None] = {}  # subscriptions with a frame held back (transactions.py)
        self._coalescing = 0  # subscriptions made with "coalesce": true
        # Set while no transaction is partly published. A subscription registered mid-transaction would receive
        # its second half only, and a replay up to `position` would end inside it: subscribing waits for this.
        self.settled = asyncio.Event()
        self.settled.set()

    @property
    def has_subscriptions(self) -> bool:
        return bool(self._tables)

    @property
    def subscription_count(self) -> int:
        return sum(table.count for table in self._tables.values())

    def connection_counts(self) -> dict[str, int]:
        """Open WebSockets by how their frames are written (see wire.py): `direct` is the fast path."""
        direct = sum(1 for outbox in self._outboxes if outbox.direct)
        return {"direct": direct, "asgi": len(self._outboxes) - direct}

    def attach(self, outbox: Outbox) -> None:
        self._outboxes[outbox] = None
        self.no_connections.clear()

    def detach(self, outbox: Outbox) -> None:
        self._outboxes.pop(outbox, None)
        if not self._outboxes:
            self.no_connections.set()

    def add(self, sub: Subscription) -> None:
        table = self._tables.get(sub.table)
        if table is None:
            table = self._tables[sub.table] = _TableSubscriptions()
        table.add(sub)
        self.metrics.subscription_added(sub.table.wire_name)
        if sub.coalescer is not None:
            self._coalescing += 1

    def remove(self, sub: Subscription) -> None:
        self._holding.pop(sub, None)
        table = self._tables.get(sub.table)
        if table is None or not table.remove(sub):
            return
        self.metrics.subscription_removed(sub.table.wire_name)
        if sub.coalescer is not None:
            self._coalescing -= 1
            sub.coalescer.clear()  # a write already scheduled must find nothing to send after the unsubscribe
        if table.count == 0:
            del self._tables[sub.table]

    def publish(self, changes: Sequence[Change], continuing: frozenset[str] = frozenset()) -> None:
        """Fan out one read of the changelog, in `seq` order; `continuing`: its transactions that have changes
        after it (a transaction larger than one read), whose subscribers' last frames wait for the next read."""
        if not self._tables:
            # Nobody to send to (a process between clients, or one that only serves REST): no frame is held, so
            # only whether a transaction stays open matters.
            self._segmenter.skip(bool(continuing))
            self.position = changes[-1].seq
            if continuing:
                self.settled.clear()
            else:
                self.settled.set()
            return
        marks = self._segmenter.mark(changes, continuing)
        segments, ends = marks.segments, marks.ends
        # A batch's last change is written to each socket as soon as it is matched, together with the batch's
        # earlier frames queued before it: still one write per socket per batch, but the first subscriber no
        # longer waits until every other subscriber has been matched.
        last = len(changes) - 1
        for index, change in enumerate(changes):
            self._publish_one(change, segments[index], ends[index], flush=index == last)
            self.position = change.seq
            if ends[index] and self._holding:
                # The segment closed: frames held for it are their subscribers' last of it. Sent now, before
                # any later change's frame, so that one connection's frames of different subscriptions still
                # leave in transaction order.
                self._settle(None)
        if marks.open_segment is None:
            self.settled.set()
        else:
            self.settled.clear()

    def _publish_one(self, change: Change, segment: int, tx_end: bool, flush: bool) -> None:
        table = self._tables.get(change.table)
        if table is None:
            return
        frames = ChangeFrames(change)
        op = change.op
        seq = change.seq
        if not tx_end or self._holding or self._coalescing:
            # Inside a transaction of several changes a frame may not be its subscriber's last of it, a held frame
            # must go first, and a coalescing subscription's may have to wait, merged, for a slow socket: every
            # frame goes through the lookbehind. A change that is a whole transaction on its own, with nothing
            # held or coalescing (the usual case), takes the loop below, which does no more than that.
            for sub in table.candidates(change):
                if op in sub.events or op == "TRUNCATE":
                    self._push(sub, frames, seq, segment, tx_end, flush)
            return
        # The frames of subscriptions whose view is the whole table, by id: looked up here rather than through
        # `frames.frame()`, as this loop runs once per delivered frame and a call per frame was a fifth of it.
        whole: dict[str, bytes] = {}
        tally = self._tally
        for sub in table.candidates(change):
            if op not in sub.events and op != "TRUNCATE":
                continue
            if sub.grant is None and not sub.filter.conditions:
                frame = whole.get(sub.id)
                if frame is None:
                    frame = whole[sub.id] = frames.whole_frame(sub.id, sub.key_columns, True)
            else:
                restricted = frames.frame(sub.id, sub.filter, sub.grant, sub.key_columns, True)
                if restricted is None:
                    continue
                frame = restricted
                tally.add(frame)
            sub.deliver(seq, frame, flush)
        if whole:
            counts = table.whole_counts[op]
            for sub_id, frame in whole.items():
                sent = counts[sub_id]
                tally.frames += sent
                tally.byte_count += sent * len(frame)

    def _push(self, sub: Subscription, frames: ChangeFrames, seq: int, segment: int, ends: bool, flush: bool) -> None:
        decided = frames.decide(sub.filter, sub.grant, sub.key_columns)
        if decided is None:
            return  # not in this subscriber's view: nothing to hold or send
        for held, tx_end in sub.lookbehind.push(seq, segment, ends, (frames, decided)):
            self._send_held(sub, held, tx_end, flush)
        if sub.lookbehind.held is None:
            self._holding.pop(sub, None)
        else:
            self._holding[sub] = None

    def _send_held(self, sub: Subscription, held: Held, tx_end: bool, flush: bool) -> None:
        frames, decided = cast(tuple[ChangeFrames, Decided], held.payload)
        frame = frames.encode(sub.id, decided, tx_end)
        # A coalescing subscription merges instead of queueing once its socket is behind or its queue is full
        # (where the frame would close it with 4008), and as long as merged frames wait: they go out first.
        if sub.coalescer is not None and sub.pending is None and (sub.coalescer or not sub.outbox.has_room(len(frame))):
            sub.coalesce(held.seq, frames.change, decided[1]())
            return
        self._tally.add(frame)
        sub.deliver(held.seq, frame, flush)

    def _settle(self, open_segment: int | None) -> None:
        """Send the held frames whose segment has closed (all but `open_segment`'s) as their subscribers' last."""
        for sub in list(self._holding):
            held = sub.lookbehind.settle(open_segment)
            if held is not None:
                self._send_held(sub, held, True, flush=True)
                del self._holding[sub]

    def close_all(self, code: int, why: str, timeout: float) -> None:
        for outbox in list(self._outboxes):
            outbox.close(code, why, timeout)

    def expire_stuck_sends(self, now: float, send_timeout: float) -> int:
        """Close and abort connections whose current send has been blocked longer than `send_timeout`; returns how
        many were still open (those cut here, rather than already closing for another reason)."""
        stuck = [o for o in self._outboxes if o.sending_since is not None and now - o.sending_since > send_timeout]
        cut = sum(1 for outbox in stuck if not outbox.closed)
        for outbox in stuck:
            outbox.close(CLOSE_TOO_SLOW, "too slow")
            outbox.abort()
        if stuck:
            _log.info("closed %d connection(s) whose send was stuck for over %.1fs", len(stuck), send_timeout)
        return cut
