"""The bounded outbound queue of one WebSocket, and the writer task that drains it when the socket is slow.

Lifecycle:
    open      the hub `offer()`s encoded frames without waiting; the connection's own task `put()`s replies
              and snapshot chunks, waiting for room. With a direct sink, everything offered during one turn of
              the event loop goes out in one transport write at the end of that turn, or at once when the hub
              offers the last frame of a listener batch (`flush=True`).
              Only while the transport is above its high-water mark do frames wait, and a writer task, started
              for the occasion, sends them once it drains. With the ASGI sink a writer task sends every frame.
    closing   on overflow (more than WS_QUEUE_SIZE frames or WS_QUEUE_BYTES bytes queued: 4008), a send
              stuck longer than WS_SEND_TIMEOUT_S (4008), rate abuse (1008) or shutdown (1012): frames still
              queued are dropped, the close frame names the last `seq` actually sent, and the client resumes
              from there, so nothing is lost to it
    closed    the close frame was sent, or the transport aborted if even that could not be sent in time

Publishing never waits on a socket: `offer()` is synchronous and O(1). An idle connection holds no task and
no event of its own, which keeps memory per connection small.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from realtime.metrics import Tally
from realtime.stream.wire import Sink

_log = logging.getLogger(__name__)

CLOSE_TOO_SLOW = 4008
CLOSE_UNAUTHENTICATED = 4001  # no valid `auth` within AUTH_TIMEOUT_S, or the token expired
CLOSE_RESTARTING = 1012
CLOSE_POLICY_VIOLATION = 1008  # the client kept sending past its frame rate

SendFn = Callable[[dict[str, Any]], Awaitable[None]]


class Flusher:
    """Flushes, from one callback at the end of the event-loop turn, every outbox that got frames during it.

    One callback per turn rather than one per connection: with a thousand subscribers a change would otherwise
    allocate a thousand loop handles, which outlive enough allocations to be promoted into the collector's old
    generation and trigger full collections that stall the loop for tens of milliseconds.
    """

    __slots__ = ("_due", "_loop")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._due: list[Outbox] = []

    def schedule(self, outbox: Outbox) -> None:
        if not self._due:
            self._loop.call_soon(self._run)
        self._due.append(outbox)

    def _run(self) -> None:
        due = self._due
        self._due = []
        for outbox in due:
            outbox._flush()


class Outbox:
    __slots__ = (
        "_close",
        "_flush_scheduled",
        "_flusher",
        "_frames",
        "_loop",
        "_max_bytes",
        "_max_frames",
        "_queued_bytes",
        "_queued_seq",
        "_room",
        "_room_hooks",
        "_send",
        "_send_timeout",
        "_seqs",
        "_sink",
        "_writer",
        "last_seq_sent",
        "sending_since",
        "tally",
    )

    def __init__(
        self,
        sink: Sink,
        send: SendFn,
        flusher: Flusher,
        *,
        max_frames: int,
        max_bytes: int,
        send_timeout: float,
        tally: Tally | None = None,
    ) -> None:
        self._sink = sink
        # Where the connection's own frames (replies, history, merged backlogs) are counted for the metrics; the
        # hub counts the live frames it offers (metrics.py).
        self.tally = tally or Tally()
        self._flusher = flusher
        self._send = send  # ASGI send: used for the close frame, so the server's protocol state stays right
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._send_timeout = send_timeout
        # Queued frames, and beside them their positions (0 for replies): the fast path writes the frames list
        # as it is, and only the frame-by-frame ASGI path reads positions one at a time.
        self._frames: list[bytes] = []
        self._seqs: list[int] = []
        self._queued_bytes = 0
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._writer: asyncio.Task[None] | None = None
        self._room: asyncio.Event | None = None  # created only when a put() has to wait
        # Called (soon after, never from inside a write) once the queue has been written or dropped: coalescing
        # subscriptions waiting to send what they merged while the socket was behind (coalescing.py).
        self._room_hooks: list[Callable[[], None]] = []
        self._close: tuple[int, str, float] | None = None
        self.last_seq_sent = 0
        self._queued_seq = 0  # highest seq ever queued: what last_seq_sent becomes once the queue is written
        self.sending_since: float | None = None  # loop time a blocked send began; read by the hub's watchdog

    @property
    def direct(self) -> bool:
        return self._sink.direct

    @property
    def queued(self) -> int:
        """Frames waiting to be written."""
        return len(self._frames)

    @property
    def closed(self) -> bool:
        """Closing or closed: nothing offered from now on is sent."""
        return self._close is not None

    @property
    def close_code(self) -> int | None:
        """The code this side closed the connection with (4008, 1008, 1012, 4001), or None."""
        return None if self._close is None else self._close[0]

    @property
    def gone(self) -> bool:
        """The peer has left, or the connection is closing: nothing more can reach the client."""
        return self._close is not None or self._sink.gone()

    @property
    def behind(self) -> bool:
        """The socket has not taken what was written: frames wait for the transport to drain."""
        return self._writer is not None and self._close is None

    def has_room(self, size: int) -> bool:
        return self._close is None and self._writer is None and self._has_room(size)

    def when_room(self, hook: Callable[[], None]) -> None:
        """Call `hook` once, soon after the queue is next written (or the connection closes)."""
        if hook not in self._room_hooks:
            self._room_hooks.append(hook)

    def _has_room(self, size: int) -> bool:
        # One frame larger than the byte bound still goes out when nothing else is queued.
        frames = len(self._frames)
        return frames == 0 or (frames < self._max_frames and self._queued_bytes + size <= self._max_bytes)

    def abort(self) -> None:
        """Drop the TCP connection at once (a peer that reads nothing can never receive a close frame)."""
        self._sink.abort()

    def offer(self, frame: bytes, seq: int = 0, *, flush: bool = False) -> None:
        """Queue an encoded frame without waiting; a full queue closes the connection with 4008 instead.

        `flush` writes the queue now rather than at the end of the loop turn (when the socket can take it).
        """
        if self._close is not None:
            return
        if flush and not self._frames and self._writer is None and self._sink.ready():
            # The common case of a live subscriber: nothing queued and the socket takes it, so no queueing at all
            # (in-process with sinks that discard, 1,000 subscribers: 380 ns per frame with this, 550 without).
            self._sink.write(frame)
            if seq > self._queued_seq:
                self._queued_seq = self.last_seq_sent = seq
            return
        size = len(frame)
        frames = self._frames
        if frames and (len(frames) >= self._max_frames or self._queued_bytes + size > self._max_bytes):
            # Full of frames the socket was never offered (a listener batch, a catch-up) is not slowness:
            # write them if the socket takes them now, and only overflow if it does not.
            if self._writer is None and self._sink.ready():
                self._write_queued()
            else:
                self.close(CLOSE_TOO_SLOW, "too slow")
                return
        frames.append(frame)
        self._seqs.append(seq)
        self._queued_bytes += size
        if seq > self._queued_seq:
            self._queued_seq = seq
        if flush:
            self._flush()
        elif not self._flush_scheduled and self._writer is None:
            self._flush_scheduled = True
            self._flusher.schedule(self)

    async def put(self, frame: bytes, seq: int = 0) -> None:
        """Queue a frame, waiting for room (for the connection's own replies and history); returns at once when
        the connection is closing or its peer is gone, having dropped the frame."""
        while not self._has_room(len(frame)) and self._close is None:
            if self._sink.gone():
                self._drop_queued()
                return
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()
        if self._close is None:
            self.tally.add(frame)
        self.offer(frame, seq)

    def close(self, code: int, why: str, timeout: float | None = None) -> None:
        """Close after what is being written now; the reason tells the client where to resume.

        `timeout` bounds how long the close frame may wait for a slow peer before the connection is aborted
        (default: the send timeout).
        """
        if self._close is not None:
            return
        if code == CLOSE_TOO_SLOW:
            _log.info("closing a WebSocket that could not keep up (4008) at last_seq=%d", self.last_seq_sent)
        self._close = (code, why, self._send_timeout if timeout is None else timeout)
        self._drop_queued()
        self._signal_room()
        if self._writer is not None:
            self._writer.cancel()  # it may be waiting for a transport that never drains
        self._writer = self._loop.create_task(self._send_close())

    def discard(self) -> None:
        """The connection is over: stop any writer and drop what is queued."""
        self._drop_queued()
        if self._writer is not None and self._close is None:
            self._writer.cancel()
            self._writer = None

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._close is not None or not self._frames or self._writer is not None:
            return
        if self._sink.ready():
            self._write_queued()
        elif self._sink.gone():
            self._drop_queued()
            self._signal_room()
        else:
            self._writer = self._loop.create_task(self._drain())

    def _write_queued(self) -> None:
        frames = self._frames
        if not frames:  # dropped while we waited (closed or disconnected)
            return
        self._sink.write(frames[0] if len(frames) == 1 else b"".join(frames))
        # Cleared in place, not replaced: a fresh list per flush per connection would outlive the flush and be
        # promoted into the garbage collector's old generation, making full collections frequent and long.
        self._drop_queued()
        self.last_seq_sent = self._queued_seq
        self._signal_room()

    def _drop_queued(self) -> None:
        self._frames.clear()
        self._seqs.clear()
        self._queued_bytes = 0

    def _signal_room(self) -> None:
        if self._room is not None:
            self._room.set()
        if self._room_hooks:
            hooks, self._room_hooks = self._room_hooks, []
            for hook in hooks:
                self._loop.call_soon(hook)

    async def _drain(self) -> None:
        """Send what the fast path could not: wait for the transport to drain, or send frame by frame."""
        try:
            while self._frames and self._close is None:
                if self._sink.gone():
                    self._drop_queued()
                    self._signal_room()  # a put() waiting for room must not wait for a peer that left
                elif self._sink.direct:
                    if not self._sink.writable():
                        self.sending_since = self._loop.time()
                        await self._sink.wait_writable()
                        self.sending_since = None
                    self._write_queued()
                else:
                    frame, seq = self._frames.pop(0), self._seqs.pop(0)
                    self._queued_bytes -= len(frame)
                    self._signal_room()
                    self.sending_since = self._loop.time()
                    await self._sink.send(frame, seq)
                    self.sending_since = None
                    if seq > self.last_seq_sent:
                        self.last_seq_sent = seq
        except Exception:  # the peer went away mid-send; nothing more can reach it
            self._drop_queued()
            self._signal_room()
            self._sink.abort()
        finally:
            # Cancelled by close() mid-send: the send is over, and the watchdog must not find it stuck later.
            self.sending_since = None
            if self._close is None:
                self._writer = None

    async def _send_close(self) -> None:
        assert self._close is not None
        code, why, timeout = self._close
        reason = f"{why}; last_seq={self.last_seq_sent}"
        try:
            async with asyncio.timeout(timeout):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except TimeoutError:
            _log.info("close frame could not be sent within %.1fs; aborting the connection", timeout)
            self._sink.abort()
        except Exception:  # already gone
            self._sink.abort()
