"""uvicorn's sans-I/O WebSocket protocol, without what an open connection no longer needs.

`realtime serve` runs uvicorn with this class as its WebSocket implementation. It behaves exactly like
`websockets-sansio`; it only holds less for as long as a connection stays open, which for a subscriber is
hours of doing nothing:

    handshake   the parsed upgrade Request is dropped (its headers emptied, since the parser keeps a reference)
                as soon as the ASGI scope is built from it, and the prepared 101 Response once it has been sent
                (about 4 KB with a test client's seven headers; a browser's cookies and user agent make it more)
    open        ASGI messages from the client wait in a list with one future for the app's single reader,
                not in an asyncio.Queue, which allocates four deques up front (3 KB)

It also offers the app a way to write pre-encoded frames straight to the transport (wire.py): a `_DirectFrames`
under the scope's `extensions`, so that what the stream needs of uvicorn's protocol (its transport, its flow
control event, whether a close was sent) is read here, next to the code it depends on, and nowhere else.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.http11 import Request

from realtime.stream.wire import FRAMES_EXTENSION


class LeanWebSocketsSansIOProtocol(WebSocketsSansIOProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.queue = _Inbox()  # type: ignore[assignment]  # it has the three methods uvicorn calls

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.handshake_complete:
            return  # refused by websockets before the app (the 4xx response is already written)
        # ASGI extensions are dicts of what the server offers; this one holds the object wire.py writes through.
        self.scope.setdefault("extensions", {})[FRAMES_EXTENSION] = {"frames": _DirectFrames(self)}
        # The scope carries everything the app may read; uvicorn keeps the request but never reads it again.
        del self.request
        # websockets' parser holds on to the request too (a local of its generator, which runs for as long as
        # the connection does). Its headers are most of its size, and they have been copied into the scope.
        event.headers.clear()

    async def send(self, message: ASGISendEvent) -> None:
        accepting = message["type"] == "websocket.accept" and not self.handshake_complete
        await super().send(message)
        if accepting and self.handshake_complete:
            # Sent: uvicorn only reads the prepared response to complete the handshake.
            del self.response


class _DirectFrames:
    """wire.DirectFrames for one connection of this protocol."""

    __slots__ = ("_protocol", "transport", "writable")

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._protocol = protocol
        self.transport = protocol.transport
        self.writable = protocol.writable

    def usable(self) -> bool:
        # Known once the handshake is complete; a negotiated extension (compression) changes the framing.
        return not self._protocol.conn.extensions

    def gone(self) -> bool:
        protocol = self._protocol
        return bool(protocol.close_sent or protocol.disconnected or self.transport.is_closing())


class _Inbox:
    """The part of asyncio.Queue that uvicorn's protocol uses, for one reader (the app's receive loop)."""

    __slots__ = ("_items", "_reader")

    def __init__(self) -> None:
        self._items: list[ASGIReceiveEvent] = []
        self._reader: asyncio.Future[None] | None = None

    def put_nowait(self, item: ASGIReceiveEvent) -> None:
        self._items.append(item)
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> ASGIReceiveEvent:
        while not self._items:
            if self._reader is not None:
                raise RuntimeError("a WebSocket's messages can only be received by one task at a time")
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return self._items.pop(0)
