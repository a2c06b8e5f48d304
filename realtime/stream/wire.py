"""Where an outbox's frames go: straight onto uvicorn's transport, or through ASGI `send`.

Every subscriber of a change gets the same bytes, so the hub encodes a frame once (`encode_text_frame`) and
the direct sink writes those bytes to each transport, several frames in one write. That is only valid for a
plain (uncompressed) server-to-client WebSocket, whose frames are unmasked: header + UTF-8 payload. The sink is
used when the connection is served by uvicorn's websockets-sansio protocol with no extension negotiated;
anything else (e.g. WS_COMPRESSION=true) goes through ASGI `send`, one message at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

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

    async def send(self, frame: bytes) -> None: ...

    def abort(self) -> None: ...


class TransportSink:
    """Writes encoded frames to uvicorn's transport; flow control follows the protocol's `writable` event."""

    direct = True

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._transport: asyncio.Transport = protocol.transport
        self._writable: asyncio.Event = protocol.writable

    def writable(self) -> bool:
        return self._writable.is_set()

    def gone(self) -> bool:
        return bool(self._protocol.close_sent or self._protocol.disconnected or self._transport.is_closing())

    def ready(self) -> bool:
        return self._writable.is_set() and not self.gone()

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    async def wait_writable(self) -> None:
        await self._writable.wait()

    async def send(self, frame: bytes) -> None:
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

    async def send(self, frame: bytes) -> None:
        await self._send({"type": "websocket.send", "text": frame_payload(frame)})

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def sink_for(send: Callable[[dict[str, Any]], Awaitable[None]]) -> Sink:
    """The fastest sink valid for this connection, given the ASGI `send` the app received.

    uvicorn's `send` is a bound method of its protocol object, which owns the transport and the `writable`
    flow-control event; ASGI itself offers no way to write raw frames or to abort a peer that reads nothing.
    Any other `send` (another server, a wrapping middleware, a negotiated extension) gets the ASGI sink.
    """
    protocol = getattr(send, "__self__", None)
    transport = getattr(protocol, "transport", None)
    conn = getattr(protocol, "conn", None)
    if (
        isinstance(protocol, WebSocketsSansIOProtocol)
        and transport is not None
        and isinstance(getattr(protocol, "writable", None), asyncio.Event)
        and conn is not None
        and not getattr(conn, "extensions", [None])
    ):
        return TransportSink(protocol)
    return AsgiSink(send, transport)
