"""Where an outbox's frames go: straight onto the connection's transport, or through ASGI `send`.

Every subscriber of a change gets the same bytes, so the hub encodes a frame once (`encode_text_frame`) and
the direct sink writes those bytes to each transport, several frames in one write. That is only valid for a
plain (uncompressed) server-to-client WebSocket, whose frames are unmasked: header + UTF-8 payload.

ASGI has no way to write raw frames, so the server must offer one: realtime's WebSocket protocol
(ws_protocol.py, the one module that knows uvicorn's internals) publishes a `DirectFrames` object under the ASGI
scope's `extensions` (`{FRAMES_EXTENSION: {"frames": ...}}`), usable when no extension such as compression was
negotiated. Without it (another server, WS_COMPRESSION=true) frames go through ASGI `send`, one message at a
time. A failed write to one transport closes that connection only: it never reaches the hub, which writes to
every connection in turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

_log = logging.getLogger(__name__)

FRAMES_EXTENSION = "realtime.frames"


class DirectFrames(Protocol):
    """What a server offers for writing encoded frames to one connection (see ws_protocol.py)."""

    transport: asyncio.Transport
    writable: asyncio.Event

    def usable(self) -> bool:
        """Raw frames are valid on this connection: it negotiated no extension."""
        ...

    def gone(self) -> bool:
        """The connection is closing or closed: nothing written now would arrive."""
        ...


_TEXT_FIN = 0x81


def encode_text_frame(text: str) -> bytes:
    """A complete, unfragmented, unmasked text frame (RFC 6455 §5.2) carrying `text`."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = bytes((_TEXT_FIN, size))
    elif size < 1 << 16:
        header = bytes((_TEXT_FIN, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((_TEXT_FIN, 127)) + size.to_bytes(8, "big")
    return header + payload


def frame_payload(frame: bytes) -> str:
    """The text an encoded frame carries (for the ASGI path)."""
    marker = frame[1]
    offset = 2 if marker < 126 else 4 if marker == 126 else 10
    return frame[offset:].decode()


class Sink(Protocol):
    direct: bool

    def writable(self) -> bool: ...

    def gone(self) -> bool: ...

    def ready(self) -> bool:
        """Frames may be written now, without waiting: a direct sink, open, below its high-water mark."""
        ...

    def write(self, data: bytes) -> None:
        """Write encoded frames (one, or several joined) to the transport; only when `ready()`."""
        ...

    async def wait_writable(self) -> None: ...

    async def send(self, frame: bytes, seq: int) -> None:
        """Send one encoded frame, waiting for the peer; `seq` is its position (0 for replies)."""
        ...

    def abort(self) -> None: ...


class TransportSink:
    """Writes encoded frames to the connection's transport; flow control follows the protocol's `writable` event."""

    direct = True

    def __init__(self, frames: DirectFrames) -> None:
        self._frames = frames
        self._transport = frames.transport
        self._writable = frames.writable

    def writable(self) -> bool:
        return self._writable.is_set()

    def gone(self) -> bool:
        return self._frames.gone()

    def ready(self) -> bool:
        return self._writable.is_set() and not self._frames.gone()

    def write(self, data: bytes) -> None:
        try:
            self._transport.write(data)
        except Exception as error:  # whatever one transport does, the hub goes on to the next connection
            _log.warning("writing to a WebSocket failed (%s: %s); closing it", type(error).__name__, error)
            self._transport.abort()

    async def wait_writable(self) -> None:
        await self._writable.wait()

    async def send(self, frame: bytes, seq: int = 0) -> None:
        self.write(frame)

    def abort(self) -> None:
        self._transport.abort()


class AsgiSink:
    """One ASGI `websocket.send` per frame: works with any server and any negotiated extension."""

    direct = False

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]], transport: Any) -> None:
        self._send = send
        self._transport = transport

    def writable(self) -> bool:
        return True

    def gone(self) -> bool:
        return False

    def ready(self) -> bool:
        return False  # every frame goes through the writer task

    def write(self, data: bytes) -> None:
        raise NotImplementedError("the ASGI sink sends one frame at a time from the writer task")

    async def wait_writable(self) -> None:
        return None

    async def send(self, frame: bytes, seq: int = 0) -> None:
        await self._send({"type": "websocket.send", "text": frame_payload(frame)})

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def sink_for(scope: Mapping[str, Any], send: Callable[[dict[str, Any]], Awaitable[None]]) -> Sink:
    """The fastest sink valid for this connection, once the handshake is complete: direct when the server offers
    DirectFrames and they are usable, else ASGI `send` (which still aborts through the offered transport)."""
    frames: DirectFrames | None = scope.get("extensions", {}).get(FRAMES_EXTENSION, {}).get("frames")
    if frames is not None and frames.usable():
        return TransportSink(frames)
    return AsgiSink(send, frames.transport if frames is not None else None)
