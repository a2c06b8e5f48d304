"""The bounded outbound queue of one WebSocket and the writer task that drains it.

Lifecycle:
    open      the hub `offer()`s frames without waiting; the connection's own task `put()`s replies and
              snapshot chunks, waiting for room; the writer sends them in order
    closing   on overflow (4008), a send stuck longer than the send timeout (4008) or shutdown (1012): frames
              still queued are dropped, the close frame names the last `seq` actually sent, and the client
              resumes from there, so nothing is lost to it
    closed    the writer has sent the close frame, or aborted the transport if even that could not be sent

Publishing never waits on a socket: `offer()` is synchronous and O(1).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

_log = logging.getLogger(__name__)

CLOSE_TOO_SLOW = 4008
CLOSE_RESTARTING = 1012

SendFn = Callable[[dict[str, Any]], Awaitable[None]]


class Outbox:
    def __init__(self, send: SendFn, *, max_frames: int, abort: Callable[[], None]) -> None:
        self._send = send
        self._abort = abort
        self._max_frames = max_frames
        self._frames: deque[tuple[int, str]] = deque()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._close: tuple[int, str] | None = None
        self.last_seq_sent = 0
        self.sending_since: float | None = None  # loop time a send started; read by the hub's watchdog

    def abort(self) -> None:
        """Drop the TCP connection at once (a peer that reads nothing can never receive a close frame)."""
        self._abort()

    @property
    def closing(self) -> bool:
        return self._close is not None

    def offer(self, frame: str, seq: int = 0) -> None:
        """Queue a frame without waiting; a full queue closes the connection with 4008 instead."""
        if self._close is not None:
            return
        if len(self._frames) >= self._max_frames:
            self.close(CLOSE_TOO_SLOW, "too slow")
            return
        self._frames.append((seq, frame))
        self._wakeup.set()

    async def put(self, frame: str, seq: int = 0) -> None:
        """Queue a frame, waiting for room (for the connection's own replies and snapshot chunks)."""
        while len(self._frames) >= self._max_frames and self._close is None:
            self._room.clear()
            await self._room.wait()
        self.offer(frame, seq)

    def close(self, code: int, why: str) -> None:
        """Close after the frame being sent now; the reason tells the client where to resume."""
        if self._close is None:
            self._close = (code, why)
            self._wakeup.set()
            self._room.set()

    async def run(self, close_timeout: float) -> None:
        """The writer task: send queued frames in order until closed, then send the close frame."""
        loop = asyncio.get_running_loop()
        frames = self._frames
        try:
            while self._close is None:
                if not frames:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                seq, frame = frames.popleft()
                if len(frames) < self._max_frames:
                    self._room.set()
                self.sending_since = loop.time()
                await self._send({"type": "websocket.send", "text": frame})
                self.sending_since = None
                if seq > self.last_seq_sent:
                    self.last_seq_sent = seq
        except asyncio.CancelledError:
            raise
        except Exception:  # the peer went away mid-send; nothing more can reach it
            self._abort()
            return
        code, why = self._close
        frames.clear()
        reason = f"{why}; last_seq={self.last_seq_sent}"
        try:
            async with asyncio.timeout(close_timeout):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except TimeoutError:
            _log.info("close frame could not be sent within %.1fs; aborting the connection", close_timeout)
            self._abort()
        except Exception:  # already gone
            self._abort()
