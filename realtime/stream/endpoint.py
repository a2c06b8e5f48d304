"""The WebSocket endpoint `/ws`: client frames are read and handled on the server's own task for the connection.

Lifecycle of a connection:
    accept      an outbox is created and attached to the hub (so shutdown can close it)
    reading     each client frame is parsed and handled in order; a bad frame gets an `error` frame and the
                connection stays usable; subscribe reads history (snapshot or replay) on this task while the
                hub buffers live changes for the new subscription, then turns it live with no gap
    closing     the client disconnects, or the outbox closes (4008 too slow, 1012 restarting) and the peer
                answers the close: every subscription is removed from the hub
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from realtime.db import DATABASE_ERRORS
from realtime.stream import changelog
from realtime.stream.changelog import CursorExpired, StreamedTable
from realtime.stream.filters import compile_filter
from realtime.stream.hub import Subscription
from realtime.stream.outbox import Outbox
from realtime.stream.pipeline import StreamPipeline
from realtime.stream.protocol import (
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    change_body,
    change_frame,
    error_frame,
    parse_client_message,
    reply_frame,
    snapshot_frame,
)
from realtime.stream.wire import encode_text_frame, sink_for

_log = logging.getLogger(__name__)
# The hint sent with `unavailable` when the database or the change stream is away; clients add jittered backoff.
RETRY_AFTER_DATABASE_MS = 1000


async def stream(scope: Scope, receive: Receive, send: Send) -> None:
    """The `/ws` endpoint as a bare ASGI app, called by the application before its middleware and router.

    Every coroutine between the server and this one stays suspended, holding its frame, for as long as the
    connection is open; each middleware layer costs hundreds of bytes per idle connection, and none of them
    does anything for a WebSocket (the HTTP ones pass it through, the exception handlers render HTTP errors).
    For the same reason it speaks ASGI directly rather than through Starlette's WebSocket wrapper. `send` is
    the server's own, which is what lets `sink_for` write frames straight to the transport.
    """
    pipeline: StreamPipeline = scope["state"]["stream"]
    settings = pipeline.settings
    if (await receive())["type"] != "websocket.connect":
        return  # the client left before the handshake completed
    await send({"type": "websocket.accept"})
    # Nothing reads the handshake's headers after this, and the scope lives as long as the connection: a
    # browser's (cookies, user agent) alone can weigh more than the rest of an idle connection's state.
    scope["headers"] = ()
    outbox = Outbox(
        sink_for(send),
        send,
        pipeline.flusher,
        max_frames=settings.ws_queue_size,
        send_timeout=settings.ws_send_timeout_s,
    )
    session = ClientSession(pipeline, outbox)
    pipeline.hub.attach(outbox)
    try:
        # Ends when the client disconnects, including after a close we started (4008, 1012): the peer answers
        # the close frame, or the server times the handshake out, or the transport is aborted.
        await session.read_frames(receive)
    finally:
        session.remove_all()
        pipeline.hub.detach(outbox)
        outbox.discard()


class ClientSession:
    """The subscriptions of one connection and the handling of its client frames."""

    def __init__(self, pipeline: StreamPipeline, outbox: Outbox) -> None:
        self._pipeline = pipeline
        self._outbox = outbox
        self._subscriptions: dict[str, Subscription] = {}

    async def read_frames(self, receive: Receive) -> None:
        max_bytes = self._pipeline.settings.ws_max_frame_bytes
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            try:
                if text is None:
                    raise ProtocolError("bad_message", "binary frames are not accepted; send JSON text frames")
                if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes):
                    raise ProtocolError("frame_too_large", f"frames are limited to {max_bytes} bytes")
                await self._handle(parse_client_message(text))
            except ProtocolError as error:
                frame = error_frame(
                    error.code, error.message, ref=error.ref, sub_id=error.sub_id, retry_after_ms=error.retry_after_ms
                )
                await self._outbox.put(encode_text_frame(frame))

    async def _handle(self, request: Subscribe | Unsubscribe | Ping) -> None:
        if isinstance(request, Ping):
            await self._outbox.put(encode_text_frame(reply_frame("pong", request.ref)))
        elif isinstance(request, Unsubscribe):
            sub = self._subscriptions.pop(request.id, None)
            if sub is None:
                raise ProtocolError(
                    "not_subscribed", f"no subscription {request.id!r} on this connection", ref=request.ref
                )
            self._pipeline.hub.remove(sub)
            await self._outbox.put(encode_text_frame(reply_frame("unsubscribed", request.ref, id=request.id)))
        else:
            await self._subscribe(request)

    async def _subscribe(self, request: Subscribe) -> None:
        def refuse(code: str, message: str, retry_after_ms: int | None = None) -> ProtocolError:
            return ProtocolError(code, message, ref=request.ref, sub_id=request.id, retry_after_ms=retry_after_ms)

        try:
            await self._subscribe_or_refuse(request, refuse)
        except DATABASE_ERRORS as error:
            _log.warning("subscribe %r failed: %s: %s", request.id, type(error).__name__, error)
            raise refuse(
                "unavailable", "the database could not be reached; retry shortly", RETRY_AFTER_DATABASE_MS
            ) from None

    async def _subscribe_or_refuse(self, request: Subscribe, refuse: Callable[..., ProtocolError]) -> None:

        settings = self._pipeline.settings
        if request.id in self._subscriptions:
            raise refuse("duplicate_id", f"subscription {request.id!r} is already open on this connection")
        if len(self._subscriptions) >= settings.ws_max_subscriptions:
            raise refuse("too_many_subscriptions", f"at most {settings.ws_max_subscriptions} per connection")
        if not self._pipeline.listener.connected_once.is_set():
            # Until the listener knows the current position, "live from N" could not be promised truthfully.
            try:
                async with asyncio.timeout(settings.listener_heartbeat_timeout_s):
                    await self._pipeline.listener.connected_once.wait()
            except TimeoutError:
                raise refuse(
                    "unavailable", "the change stream is not connected yet; retry shortly", RETRY_AFTER_DATABASE_MS
                ) from None
        table = await self._pipeline.catalog.lookup(request.table)
        if table is None:
            raise refuse("unknown_table", f"table {request.table.wire_name!r} does not exist or does not stream")
        unknown = sorted({c.column for c in request.conditions} - table.columns)
        if unknown:
            raise refuse("unknown_column", f"table {table.key.wire_name!r} has no column {', '.join(unknown)}")

        hub = self._pipeline.hub
        sub = Subscription(
            id=request.id,
            table=table.key,
            events=request.events,
            filter=compile_filter(request.conditions),
            outbox=self._outbox,
            max_pending=settings.ws_queue_size,
        )
        self._subscriptions[request.id] = sub
        hub.add(sub)
        # Everything up to here is synchronous, so no change was published between add() and reading this.
        hub_position = hub.position
        try:
            if request.snapshot:
                position = await self._send_snapshot(sub, table)
            elif request.since is not None:
                position = await self._replay(sub, request.since, hub_position)
            else:
                position = hub_position
        except CursorExpired as error:
            self._drop(sub)
            raise refuse("cursor_expired", str(error)) from None
        except BaseException:
            self._drop(sub)
            raise
        subscribed = reply_frame("subscribed", request.ref, id=request.id, seq=position)
        await self._outbox.put(encode_text_frame(subscribed), position)
        sub.go_live(position)

    async def _send_snapshot(self, sub: Subscription, table: StreamedTable) -> int:
        chunk_rows = self._pipeline.settings.snapshot_chunk_rows
        position = 0
        # aclosing: if sending fails midway, the generator's transaction ends here, on this connection, and not
        # later from the garbage collector when the connection may already serve someone else.
        async with (
            self._pipeline.connection() as conn,
            contextlib.aclosing(changelog.snapshot(conn, table, sub.filter, chunk_rows)) as chunks,
        ):
            previous: tuple[int, list[str]] | None = None
            async for chunk in chunks:
                if previous is not None:
                    chunk_frame = snapshot_frame(sub.id, previous[0], previous[1], last=False)
                    await self._outbox.put(encode_text_frame(chunk_frame), previous[0])
                previous = chunk
            assert previous is not None
            position = previous[0]
            await self._outbox.put(
                encode_text_frame(snapshot_frame(sub.id, position, previous[1], last=True)), position
            )
        return position

    async def _replay(self, sub: Subscription, since: int, until: int) -> int:
        async with (
            self._pipeline.connection() as conn,
            contextlib.aclosing(changelog.replay(conn, sub.table, since, until)) as changes,
        ):
            async for change in changes:
                if change.op in sub.events and (not sub.filter.conditions or sub.filter.matches(change.filter_row)):
                    await self._outbox.put(encode_text_frame(change_frame(sub.id, change_body(change))), change.seq)
        return max(since, until)

    def _drop(self, sub: Subscription) -> None:
        self._subscriptions.pop(sub.id, None)
        self._pipeline.hub.remove(sub)

    def remove_all(self) -> None:
        for sub in self._subscriptions.values():
            self._pipeline.hub.remove(sub)
        self._subscriptions.clear()
