"""The bounded outbound queue of one WebSocket and the writer task that drains it when the socket is slow.

Lifecycle:
    open      the hub `offer()`s encoded frames without waiting; the connection's own task `put()`s replies
              and snapshot chunks, waiting for room. With a direct sink, everything offered during one turn of
              the event loop (a whole listener batch) goes out in one transport write at the end of that turn;
              only while the transport is above its high-water mark do frames wait, and the writer task sends
              them once it drains. With the ASGI sink, the writer sends every frame.
    closing   on overflow (4008), a send stuck longer than WS_SEND_TIMEOUT_S (4008) or shutdown (1012): frames
              still queued are dropped, the close frame names the last `seq` actually sent, and the client
              resumes from there, so nothing is lost to it
    closed    the writer has sent the close frame, or aborted the transport if even that could not be sent

Publishing never waits on a socket: `offer()` is synchronous and O(1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from realtime.stream.wire import Sink

_log = logging.getLogger(__name__)

CLOSE_TOO_SLOW = 4008
CLOSE_RESTARTING = 1012

SendFn = Callable[[dict[str, Any]], Awaitable[None]]


class Outbox:
    def __init__(self, sink: Sink, send: SendFn, *, max_frames: int, send_timeout: float) -> None:
        self._sink = sink
        self._send = send  # ASGI send: used for the close frame, so the server's protocol state stays right
        self._max_frames = max_frames
        self._send_timeout = send_timeout
        self._frames: deque[tuple[int, bytes]] = deque()
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closed = asyncio.Event()
        self._close: tuple[int, str, float] | None = None
        self.last_seq_sent = 0
        self.sending_since: float | None = None  # loop time a blocked send began; read by the hub's watchdog

    @property
    def closing(self) -> bool:
        return self._close is not None

    def abort(self) -> None:
        """Drop the TCP connection at once (a peer that reads nothing can never receive a close frame)."""
        self._sink.abort()

    def offer(self, frame: bytes, seq: int = 0) -> None:
        """Queue an encoded frame without waiting; a full queue closes the connection with 4008 instead."""
        if self._close is not None:
            return
        if len(self._frames) >= self._max_frames:
            self.close(CLOSE_TOO_SLOW, "too slow")
            return
        self._frames.append((seq, frame))
        if not self._sink.direct:
            self._wakeup.set()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    async def put(self, frame: bytes, seq: int = 0) -> None:
        """Queue a frame, waiting for room (for the connection's own replies and snapshot chunks)."""
        while len(self._frames) >= self._max_frames and self._close is None:
            self._room.clear()
            await self._room.wait()
        self.offer(frame, seq)

    def close(self, code: int, why: str, timeout: float | None = None) -> None:
        """Close after what is being written now; the reason tells the client where to resume.

        `timeout` bounds how long the close frame may wait for a slow peer before the connection is aborted
        (default: the send timeout).
        """
        if self._close is None:
            self._close = (code, why, self._send_timeout if timeout is None else timeout)
            self._closed.set()
            self._wakeup.set()
            self._room.set()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._close is not None or not self._frames:
            return
        if self._sink.gone():
            self._frames.clear()
        elif self._sink.writable():
            self._write_queued()
        else:
            self._wakeup.set()  # the writer task waits for the transport to drain

    def _write_queued(self) -> None:
        frames = self._frames
        batch = [frame for _, frame in frames]
        highest = max(seq for seq, _ in frames)
        frames.clear()
        self._sink.write(batch)
        if highest > self.last_seq_sent:
            self.last_seq_sent = highest
        self._room.set()

    async def run(self) -> None:
        """The writer task: send what the fast path could not, until closed; then send the close frame."""
        try:
            while self._close is None:
                if not self._frames:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                elif self._sink.direct:
                    await self._drain_direct()
                else:
                    await self._send_one()
        except asyncio.CancelledError:
            raise
        except Exception:  # the peer went away mid-send; nothing more can reach it
            self._sink.abort()
            return
        await self._send_close()

    async def _drain_direct(self) -> None:
        if self._sink.gone():
            self._frames.clear()
            return
        if not self._sink.writable():
            self.sending_since = self._loop.time()
            try:
                await _first_of(self._sink.wait_writable(), self._closed.wait())
            finally:
                self.sending_since = None
            return
        self._write_queued()

    async def _send_one(self) -> None:
        seq, frame = self._frames.popleft()
        if len(self._frames) < self._max_frames:
            self._room.set()
        self.sending_since = self._loop.time()
        await self._sink.send(frame)
        self.sending_since = None
        if seq > self.last_seq_sent:
            self.last_seq_sent = seq

    async def _send_close(self) -> None:
        assert self._close is not None
        code, why, timeout = self._close
        self._frames.clear()
        reason = f"{why}; last_seq={self.last_seq_sent}"
        try:
            async with asyncio.timeout(timeout):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except TimeoutError:
            _log.info("close frame could not be sent within %.1fs; aborting the connection", timeout)
            self._sink.abort()
        except Exception:  # already gone
            self._sink.abort()


async def _first_of(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
