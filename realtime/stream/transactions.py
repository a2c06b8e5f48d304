"""Where transactions end in the change stream, so that frames can say it (`tx_end`, docs/protocol.md).

Positions are taken at commit, and transactions that commit at the same moment take theirs side by side, so their
changes can interleave: A1 B1 A2 B2. A client that applied everything up to A's last change would show half of B.
The stream is therefore cut into *segments*: a segment ends at a change after which no transaction begun in it
has changes left. Transactions that do not overlap each get a segment of their own (the usual case, and always
for one-change transactions); overlapping ones share one, which ends with the last of them. Applying frames up to
each segment's end shows only states the database was in: every transaction entirely, or not at all.

A subscription receives only some of a segment's changes (its table, its filter, its grant). Its last frame of
each segment carries `tx_end`: the hub and a replay hold a subscription's newest frame back until they know
whether another one of the same segment follows for it (`Lookbehind`).

A segment may run past one read of the changelog (a transaction larger than a read, `changelog.Pieces`): its
changes are then marked with the segment id it keeps in the next read, and the frames held back wait for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from realtime.stream.changes import Change


@dataclass(frozen=True, slots=True)
class Marks:
    """Per change of one read: the id of its segment, and whether the segment ends with it."""

    segments: list[int]
    ends: list[bool]
    open_segment: int | None  # the segment still open after the read (continued by the next one), if any


class Segmenter:
    """Cuts a stream of reads into segments; ids increase along the stream and carry across reads."""

    __slots__ = ("_next", "_open")

    def __init__(self) -> None:
        self._next = 0  # the id the next change's segment gets (an open segment's, when one is open)
        self._open = False

    @property
    def is_open(self) -> bool:
        """A segment of the previous read continues: a transaction is only partly read."""
        return self._open

    def skip(self, open_after: bool) -> None:
        """A read nobody receives: no frame waits on its segments, so they need no ids of their own. The next
        read starts a segment of its own (or continues this read's open one, under the same id)."""
        if self._open and not open_after:
            self._next += 1
        self._open = open_after

    def mark(self, changes: Sequence[Change], continuing: frozenset[str] = frozenset()) -> Marks:
        """`changes` in position order; `continuing`: transactions that have changes after these."""
        last: dict[str, int] = {}
        for index, change in enumerate(changes):
            if change.tx is not None:
                last[change.tx] = index
        never = len(changes)  # past every index: a continuing transaction keeps its segment open
        segments: list[int] = []
        ends: list[bool] = []
        segment = self._next
        reach = -1
        for index, change in enumerate(changes):
            tx = change.tx
            if tx is None:
                end = index
            elif tx in continuing:
                end = never
            else:
                end = last[tx]
            if end > reach:
                reach = end
            segments.append(segment)
            closes = reach == index
            ends.append(closes)
            if closes:
                segment += 1
        self._next = segment
        self._open = reach == never
        return Marks(segments, ends, segment if self._open else None)


@dataclass(slots=True)
class Held:
    """A subscription's newest frame, not yet sent: whether it ends its segment is not known yet."""

    seq: int
    segment: int
    payload: object  # what the holder needs to build the frame either way


class Lookbehind:
    """One subscription's frames in order, each told whether it is the subscription's last of its segment.

    `push` a frame as it comes; it returns the frames that can go now, each with its `tx_end`. A frame that ends
    its segment goes at once; any other waits for the subscription's next frame (same segment: not the end) or
    for `settle` (its segment closed with nothing more for this subscription: the end).
    """

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: Held | None = None

    def push(self, seq: int, segment: int, ends: bool, payload: object) -> list[tuple[Held, bool]]:
        ready: list[tuple[Held, bool]] = []
        held = self.held
        if held is not None:
            ready.append((held, held.segment != segment))
            self.held = None
        item = Held(seq, segment, payload)
        if ends:
            ready.append((item, True))
        else:
            self.held = item
        return ready

    def settle(self, open_segment: int | None) -> Held | None:
        """The held frame if its segment has closed (it is then the subscription's last of it), else None."""
        held = self.held
        if held is None or held.segment == open_segment:
            return None
        self.held = None
        return held
