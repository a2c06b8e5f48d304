"""The WebSocket endpoint `/ws`: client frames are read and handled on the server's own task for the connection.

Lifecycle of a connection:
    admission   an upgrade with a Host or Origin the Guard does not allow is refused (400, 403; realtime/origins.py);
                one past WS_MAX_CONNECTIONS (503) or WS_MAX_CONNECTIONS_PER_CLIENT (429) is answered
                over HTTP and never becomes a WebSocket
    accept      an outbox is created and attached to the hub (so shutdown can close it)
    reading     each client frame is rate-checked, parsed and handled in order; a bad frame gets an `error` frame
                and the connection stays usable; subscribe reads history (snapshot or replay) in bounded reads
                while the hub buffers live changes for the new subscription, then turns it live with no gap.
                While history is read and sent, the next client message is already awaited: a disconnect
                cancels the history work at once, and whatever it held is released
    closing     the client disconnects, or the outbox closes (4008 too slow, 1008 rate abuse, 1012 restarting,
                4001 not authenticated in time or token expired) and the peer answers the close: every
                subscription is removed from the hub

Authentication (with a token key configured): until an `auth` frame carries a valid token, every other frame
gets `unauthorized`; a timer (the loop's, not a task) closes the connection with 4001 at AUTH_TIMEOUT_S. Once
authenticated, a timer closes it with 4001 when the token expires (plus AUTH_LEEWAY_S), unless a later `auth`
frame for the same `sub` has moved that time on. Tokens are verified by the same TokenVerifier as REST.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import orjson
from starlette.types import Receive, Scope, Send

from realtime.auth.policy import Grant
from realtime.auth.tokens import Identity, KeysUnavailable, TokenError, TokenVerifier
from realtime.db import DATABASE_ERRORS
from realtime.stream import changelog
from realtime.stream.changelog import CursorExpired, SnapshotMemoryBusy, SnapshotTooLarge, StreamedTable
from realtime.stream.changes import TableKey
from realtime.stream.coalescing import Coalescer
from realtime.stream.filters import Condition, compile_filter
from realtime.stream.hub import Subscription
from realtime.stream.outbox import CLOSE_POLICY_VIOLATION, CLOSE_UNAUTHENTICATED, Outbox
from realtime.stream.pipeline import StreamPipeline
from realtime.stream.protocol import (
    MAX_ID_LENGTH,
    MAX_REF_LENGTH,
    Auth,
    Ping,
    ProtocolError,
    Ref,
    Subscribe,
    Unsubscribe,
    error_frame,
    parse_client_message,
    reply_frame,
    snapshot_frame,
)
from realtime.stream.rate import TokenBucket
from realtime.stream.reads import RETRY_AFTER_BUSY_MS, ReadsBusy
from realtime.stream.transactions import Held, Lookbehind, Segmenter
from realtime.stream.views import ChangeFrames, Decided
from realtime.stream.wire import encode_text_frame, sink_for

_log = logging.getLogger(__name__)
# The hint sent with `unavailable` when the database or the change stream is away; clients add jittered backoff.
RETRY_AFTER_DATABASE_MS = 1000
# A snapshot's read may take longer than one statement: it is several, and a filter decodes every row.
_SNAPSHOT_READ_S = 60.0


async def stream(scope: Scope, receive: Receive, send: Send) -> None:
    """The `/ws` endpoint as a bare ASGI app, called by the application before its middleware and router.

    Every coroutine between the server and this one stays suspended, holding its frame, for as long as the
    connection is open; each middleware layer costs hundreds of bytes per idle connection, and none of them
    does anything for a WebSocket (the HTTP ones pass it through, the exception handlers render HTTP errors).
    For the same reason it speaks ASGI directly rather than through Starlette's WebSocket wrapper. `send` is
    the server's own; the server's protocol (ws_protocol.py) offers the transport under the scope's extensions,
    which is what lets `sink_for` write frames straight to it.
    """
    pipeline: StreamPipeline = scope["state"]["stream"]
    settings = pipeline.settings
    if (await receive())["type"] != "websocket.connect":
        return  # the client left before the handshake completed
    # A foreign Host (DNS rebinding) or a foreign page's Origin is refused before anything is counted. The rule
    # is the pipeline's, not a key of the lifespan state: the server copies that dict for every connection.
    refusal = pipeline.guard.refusal(scope["headers"])
    client = scope["client"][0] if scope.get("client") else ""
    if refusal is None:
        refusal = pipeline.admission.enter(client)
    if refusal is not None:
        start, body = refusal.asgi_messages()
        await send(start)
        await send(body)
        return
    try:
        await send({"type": "websocket.accept"})
        # Nothing reads the handshake's headers after this, and the scope lives as long as the connection: a
        # browser's (cookies, user agent) alone can weigh more than the rest of an idle connection's state.
        scope["headers"] = ()
        sink = sink_for(scope, send)
        _say_once_if_not_direct(sink.direct)
        outbox = Outbox(
            sink,
            send,
            pipeline.flusher,
            max_frames=settings.ws_queue_size,
            max_bytes=settings.ws_queue_bytes,
            send_timeout=settings.ws_send_timeout_s,
            tally=pipeline.metrics.tally,
        )
        # Names the connection on every log line about it (realtime/logs.py), from the upgrade to the close.
        connection_id = os.urandom(6).hex()
        session = ClientSession(pipeline, outbox, receive, scope["state"]["auth"], connection_id)
        pipeline.hub.attach(outbox)
        pipeline.metrics.connection_opened("ws")
        _log.info("WebSocket connected", extra={"connection_id": connection_id, "client": _address(scope)})
        try:
            # Ends when the client disconnects, including after a close we started (4008, 1012): the peer answers
            # the close frame, or the server times the handshake out, or the transport is aborted.
            await session.read_frames()
        finally:
            session.end()
            pipeline.hub.detach(outbox)
            outbox.discard()
            pipeline.metrics.connection_closed("ws", outbox.close_code or session.peer_close_code)
            _log.info(
                "WebSocket closed",
                extra={
                    "connection_id": connection_id,
                    "client": _address(scope),
                    "close_code": outbox.close_code,  # None: the client closed first
                    "last_seq": outbox.last_seq_sent,
                },
            )
    finally:
        pipeline.admission.leave(client)


def _address(scope: Scope) -> str | None:
    """The client as uvicorn's access lines write it, `address:port`."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


_said_not_direct = False


def _say_once_if_not_direct(direct: bool) -> None:
    """Log once per process when frames cannot be written directly (WS_COMPRESSION, or a server other than
    `realtime serve`): every frame then costs an ASGI message, a visible difference in CPU per frame."""
    global _said_not_direct
    if not direct and not _said_not_direct:
        _said_not_direct = True
        _log.info("WebSocket frames go through ASGI send (compression negotiated, or not realtime's protocol)")


class _Closing(Exception):
    """The outbox is closing (too slow, shutting down): history still to send would never arrive."""


def _ref_and_id(text: str | None, max_bytes: int) -> tuple[Ref, str | None]:
    """The `ref` and `id` of a frame that is refused unhandled, so the client knows which one to send again."""
    if text is None or len(text) > max_bytes:
        return None, None
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(message, dict):
        return None, None
    ref, sub_id = message.get("ref"), message.get("id")
    valid_ref = (
        ref is None or isinstance(ref, int | float | bool) or (isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH)
    )
    valid_id = isinstance(sub_id, str) and 1 <= len(sub_id) <= MAX_ID_LENGTH
    return (ref if valid_ref else None), (sub_id if valid_id else None)


def _filter_values(conditions: tuple[Condition, ...]) -> int:
    """What a filter holds, for the connection's budget: each `in` item counts, every other condition one."""
    return sum(len(c.value) if c.op == "in" else 1 for c in conditions)


class ClientSession:
    """The subscriptions of one connection and the handling of its client frames."""

    def __init__(
        self,
        pipeline: StreamPipeline,
        outbox: Outbox,
        receive: Receive,
        verifier: TokenVerifier | None,
        connection_id: str,
    ) -> None:
        self.connection_id = connection_id
        self._pipeline = pipeline
        self._outbox = outbox
        self._receive = receive
        self._subscriptions: dict[str, Subscription] = {}
        # The code the client closed with (1000, 1001; 1006 when the connection dropped), once it has.
        self.peer_close_code = 1006
        settings = pipeline.settings
        self._rate = TokenBucket(settings.ws_messages_per_s, settings.ws_message_burst)
        self._refused = 0  # frames refused as rate_limited since the client last kept to the rate
        # The next client message, already awaited while a subscribe reads history (see _watching_peer).
        self._reading: asyncio.Task[Any] | None = None
        self._verifier = verifier
        self._identity: Identity | None = None
        # The authentication deadline, then the token's expiry: one loop timer, never a task per connection.
        self._auth_timer: asyncio.TimerHandle | None = None
        if verifier is not None:
            self._close_at(time.time() + settings.auth_timeout_s, "authentication required")

    async def _next_message(self) -> Any:
        if self._reading is not None:
            reading, self._reading = self._reading, None
            return await reading
        return await self._receive()

    async def read_frames(self) -> None:
        settings = self._pipeline.settings
        max_bytes = settings.ws_max_frame_bytes
        while True:
            message = await self._next_message()
            if message["type"] == "websocket.disconnect":
                self.peer_close_code = message.get("code", 1005)
                return
            if self._outbox.closed:
                continue  # closing (4008, 1008, 1012): nothing it asks for could be answered; wait for it to go
            text = message.get("text")
            try:
                if not self._rate.take():
                    self._refused += 1
                    if self._refused > settings.ws_rate_limit_close_after:
                        self._outbox.close(CLOSE_POLICY_VIOLATION, "rate limit exceeded")
                        continue
                    ref, sub_id = _ref_and_id(text, max_bytes)
                    raise ProtocolError(
                        "rate_limited",
                        f"at most {settings.ws_messages_per_s:g} frames per second; this one was ignored",
                        ref=ref,
                        sub_id=sub_id,
                        retry_after_ms=self._rate.wait_ms(),
                    )
                if self._refused and self._rate.rested():
                    self._refused = 0  # a client that slowed down is forgiven; one that keeps pushing is not
                if text is None:
                    raise ProtocolError("bad_message", "binary frames are not accepted; send JSON text frames")
                if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes):
                    raise ProtocolError("frame_too_large", f"frames are limited to {max_bytes} bytes")
                request = parse_client_message(text)
                if isinstance(request, Auth):
                    await self._authenticate(request)
                elif self._verifier is not None and self._identity is None:
                    raise ProtocolError(
                        "unauthorized",
                        'authenticate first: send {"type": "auth", "token": "<JWT>"}',
                        ref=request.ref,
                        sub_id=None if isinstance(request, Ping) else request.id,
                    )
                elif isinstance(request, Subscribe) and (request.snapshot or request.since is not None):
                    await self._watching_peer(self._subscribe(request))
                else:
                    await self._handle(request)
            except ProtocolError as error:
                frame = error_frame(
                    error.code, error.message, ref=error.ref, sub_id=error.sub_id, retry_after_ms=error.retry_after_ms
                )
                await self._outbox.put(encode_text_frame(frame))

    async def _authenticate(self, request: Auth) -> None:
        """Take the identity of the token, or refresh it: same `sub` only, subscriptions untouched."""
        verifier = self._verifier
        if verifier is None:
            # Open mode: there is no key to verify against, and nothing needs an identity. Accepting the frame
            # lets one client work against both modes.
            reply = reply_frame("authenticated", request.ref, sub=None, role=None, exp=None)
            await self._outbox.put(encode_text_frame(reply))
            return
        try:
            identity = await verifier.verify(request.token)
        except TokenError as error:
            raise ProtocolError("unauthorized", str(error), ref=request.ref) from None
        except KeysUnavailable as error:
            raise ProtocolError(
                "unavailable", f"{error}; retry shortly", ref=request.ref, retry_after_ms=RETRY_AFTER_DATABASE_MS
            ) from None
        current = self._identity
        if current is not None and identity.sub != current.sub:
            raise ProtocolError(
                "forbidden",
                f"this connection is authenticated as sub {current.sub!r}; another subject needs its own connection",
                ref=request.ref,
            )
        if self._outbox.closed:
            return  # the deadline or the old token's expiry came while this token was verified
        self._identity = identity
        self._close_at(identity.exp + verifier.leeway_s, "token expired")
        ended = self._recheck_subscriptions() if current is not None else []
        reply = reply_frame("authenticated", request.ref, sub=identity.sub, role=identity.role, exp=identity.exp)
        await self._outbox.put(encode_text_frame(reply))
        for sub_id, why in ended:
            await self._outbox.put(encode_text_frame(error_frame("forbidden", why, sub_id=sub_id)))

    def take_identity(self, identity: Identity) -> None:
        """Adopt an identity proved before the session began (SSE: a bearer header or a ticket), as a valid
        `auth` frame would: the authentication deadline gives way to the token's expiry."""
        self._identity = identity
        if self._verifier is not None:
            self._close_at(identity.exp + self._verifier.leeway_s, "token expired")

    async def subscribe(self, request: Subscribe) -> None:
        """Subscribe outside `read_frames` (SSE), by the same checks, history and go-live as a `subscribe` frame.
        ProtocolError refuses it; if the outbox closes while history is sent, it returns with nothing opened."""
        try:
            await self._subscribe(request)
        except _Closing:
            return

    def _read_grant(self, table: TableKey) -> Grant | None:
        """What this connection's identity may read of `table` (None: all of it); ProtocolError `forbidden` if
        nothing. The caller adds the frame's ref and id."""
        policy = self._pipeline.policy
        if policy is None:
            return None
        grant = policy.grant(self._identity, table, "read")
        if grant is None:
            role = self._identity.role if self._identity is not None else None
            raise ProtocolError("forbidden", f"role {role!r} may not read {table.wire_name!r}")
        return grant if grant.restricts else None

    def _recheck_subscriptions(self) -> list[tuple[str, str]]:
        """After a refresh, end the subscriptions whose grant the new token's claims change: rows they were not
        sent could now be theirs, or rows they hold no longer are. Returns (id, reason) of each one ended."""
        ended = []
        for sub in list(self._subscriptions.values()):
            try:
                unchanged = self._read_grant(sub.table) == sub.grant
                reason = "the refreshed token changes what this subscription may read; subscribe again"
            except ProtocolError as error:
                unchanged, reason = False, error.message
            if not unchanged:
                self._drop(sub)
                ended.append((sub.id, reason))
        return ended

    def _close_at(self, wall_time: float, why: str) -> None:
        """Close the connection with 4001 at `wall_time` (seconds since the epoch), replacing any earlier timer."""
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, wall_time - time.time())
        self._auth_timer = loop.call_at(when, self._outbox.close, CLOSE_UNAUTHENTICATED, why)

    async def _watching_peer(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` (a subscribe that reads history) while already awaiting the client's next message.

        A client that goes away mid-snapshot or mid-replay (reset, killed tab) cancels the work at once,
        whatever it waits for; a frame it sent meanwhile is handled after this subscribe is answered, in order.
        """
        task = asyncio.ensure_future(work)
        reading = self._reading = self._reading or asyncio.ensure_future(self._receive())
        try:
            await asyncio.wait((task, reading), return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and reading.result()["type"] == "websocket.disconnect":
                task.cancel()
            await asyncio.wait((task,))
        finally:
            if not task.done():  # this task is itself being cancelled: stop the work, and let it clean up first
                task.cancel()
                await asyncio.shield(asyncio.wait((task,)))
        if not reading.done():
            # Nothing was received meanwhile: stop waiting, so an idle connection holds no task (the message, when
            # it comes, stays in the server's queue for the next receive).
            reading.cancel()
            self._reading = None
            await asyncio.wait((reading,))  # the next receive may only start once this one has let go
        if not task.cancelled() and not isinstance(task.exception(), _Closing):
            task.result()

    async def _handle(self, request: Subscribe | Unsubscribe | Ping) -> None:
        if isinstance(request, Ping):
            await self._outbox.put(encode_text_frame(reply_frame("pong", request.ref)))
        elif isinstance(request, Unsubscribe):
            sub = self._subscriptions.get(request.id)
            if sub is None:
                raise ProtocolError(
                    "not_subscribed", f"no subscription {request.id!r} on this connection", ref=request.ref
                )
            self._drop(sub)
            await self._outbox.put(encode_text_frame(reply_frame("unsubscribed", request.ref, id=request.id)))
        else:
            await self._subscribe(request)

    async def _subscribe(self, request: Subscribe) -> None:
        def refuse(code: str, message: str, retry_after_ms: int | None = None) -> ProtocolError:
            return ProtocolError(code, message, ref=request.ref, sub_id=request.id, retry_after_ms=retry_after_ms)

        try:
            await self._subscribe_or_refuse(request, refuse)
        except ReadsBusy as error:
            raise refuse("unavailable", f"{error}; retry shortly", RETRY_AFTER_BUSY_MS) from None
        except DATABASE_ERRORS as error:
            _log.warning(
                "subscribe %r failed: %s: %s",
                request.id,
                type(error).__name__,
                error,
                extra={"connection_id": self.connection_id, "subscription_id": request.id},
            )
            raise refuse(
                "unavailable", "the database could not be reached; retry shortly", RETRY_AFTER_DATABASE_MS
            ) from None

    async def _subscribe_or_refuse(self, request: Subscribe, refuse: Callable[..., ProtocolError]) -> None:
        settings = self._pipeline.settings
        hub = self._pipeline.hub
        if request.id in self._subscriptions:
            raise refuse("duplicate_id", f"subscription {request.id!r} is already open on this connection")
        if len(self._subscriptions) >= settings.ws_max_subscriptions:
            raise refuse("too_many_subscriptions", f"at most {settings.ws_max_subscriptions} per connection")
        if hub.subscription_count >= settings.ws_max_subscriptions_total:
            raise refuse(
                "too_many_subscriptions",
                f"this server holds its maximum of {settings.ws_max_subscriptions_total} subscriptions; retry later",
                RETRY_AFTER_BUSY_MS,
            )
        values = _filter_values(request.conditions)
        held = sum(_filter_values(sub.filter.conditions) for sub in self._subscriptions.values())
        if held + values > settings.ws_max_filter_values:
            raise refuse(
                "filter_budget_exceeded",
                f"this connection's filters may hold {settings.ws_max_filter_values} values in all"
                f" ({held} held, this one has {values}); unsubscribe others or narrow the filter",
            )
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
        try:
            grant = self._read_grant(table.key)
        except ProtocolError as error:
            raise refuse(error.code, error.message) from None
        readable = grant.filterable_columns if grant is not None else None
        hidden = sorted({c.column for c in request.conditions} - readable) if readable is not None else []
        if hidden:
            raise refuse("forbidden", f"this token may not filter on {', '.join(hidden)}: not a column it can read")

        sub = Subscription(
            id=request.id,
            table=table.key,
            events=request.events,
            filter=compile_filter(request.conditions),
            outbox=self._outbox,
            max_pending=settings.ws_queue_size,
            max_pending_bytes=settings.ws_queue_bytes,
            grant=grant,
            key_columns=table.primary_key,
            coalescer=Coalescer(request.id, table.key.wire_name, settings.ws_coalesce_max_keys)
            if request.coalesce
            else None,
        )
        await self._wait_settled(refuse)
        if hub.subscription_count >= settings.ws_max_subscriptions_total:
            # Checked again: other connections' subscribes may have filled the process while this one waited.
            raise refuse(
                "too_many_subscriptions",
                f"this server holds its maximum of {settings.ws_max_subscriptions_total} subscriptions; retry later",
                RETRY_AFTER_BUSY_MS,
            )
        self._subscriptions[request.id] = sub
        hub.add(sub)
        # Everything from the last check of `settled` to here is synchronous: no change was published between
        # add() and reading this, and no transaction is partly published.
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
        except SnapshotTooLarge as error:
            self._drop(sub)
            raise refuse("snapshot_too_large", str(error)) from None
        except SnapshotMemoryBusy as error:
            self._drop(sub)
            raise refuse("unavailable", f"{error}; retry shortly", RETRY_AFTER_BUSY_MS) from None
        except BaseException:
            self._drop(sub)
            raise
        subscribed = reply_frame("subscribed", request.ref, id=request.id, seq=position)
        await self._outbox.put(encode_text_frame(subscribed), position)
        sub.go_live(position)
        _log.info(
            "subscribed",
            extra={
                "connection_id": self.connection_id,
                "subscription_id": request.id,
                "table": table.key.wire_name,
                "seq": position,
            },
        )

    async def _wait_settled(self, refuse: Callable[..., ProtocolError]) -> None:
        """Wait until no transaction is partly published (one larger than a listener read is being read)."""
        hub = self._pipeline.hub
        try:
            async with asyncio.timeout(self._pipeline.settings.listener_heartbeat_timeout_s):
                while not hub.settled.is_set():
                    await hub.settled.wait()
        except TimeoutError:
            raise refuse(
                "unavailable", "a large transaction is still being read; retry shortly", RETRY_AFTER_DATABASE_MS
            ) from None

    async def _send_history(self, text: str, seq: int) -> None:
        await self._outbox.put(encode_text_frame(text), seq)
        if self._outbox.gone:
            raise _Closing

    async def _send_snapshot(self, sub: Subscription, table: StreamedTable) -> int:
        settings = self._pipeline.settings
        budget = self._pipeline.snapshot_memory
        taken = 0
        started = time.monotonic()
        rows_sent = 0

        def reserve(size: int) -> bool:
            nonlocal taken
            if budget.take(size):
                taken += size
                return True
            return False

        try:
            async with self._pipeline.reads.connection(settings.pool_timeout + _SNAPSHOT_READ_S) as conn:
                position, chunks = await changelog.read_snapshot(
                    conn,
                    table,
                    sub.filter,
                    sub.grant,
                    settings.snapshot_chunk_rows,
                    settings.stream_snapshot_max_bytes,
                    reserve,
                )
            last = len(chunks) - 1
            for index, rows in enumerate(chunks):
                chunks[index] = []  # sent rows are freed as the snapshot goes out, not when it ends
                await self._send_history(snapshot_frame(sub.id, position, rows, last=index == last), position)
                rows_sent += len(rows)
        finally:
            budget.give(taken)
        self._pipeline.metrics.snapshot(time.monotonic() - started, rows_sent)
        return position

    async def _replay(self, sub: Subscription, since: int, until: int) -> int:
        """Send the subscription's changes after `since` up to `until` (a position no transaction spans), each
        frame with its `tx_end` as the hub would have sent it live."""
        started = time.monotonic()
        sent = await self._replay_range(sub, since, until)
        self._pipeline.metrics.replay(time.monotonic() - started, sent)
        return max(since, until)

    async def _replay_range(self, sub: Subscription, since: int, until: int) -> int:
        """The replay itself; returns how many changes it sent."""
        chunk_size = self._pipeline.settings.listener_batch_size
        sent = 0
        if since >= until:
            async with self._pipeline.reads.connection() as conn:
                await changelog.replay_chunk(conn, sub.table, since, since)  # still refuses an expired cursor
            return 0
        async with self._pipeline.reads.connection() as conn:
            pieces = await changelog.pieces(conn, since, until, chunk_size, sub.table)
        segmenter = Segmenter()
        lookbehind = Lookbehind()
        for after, through in pieces:
            if self._outbox.gone:
                raise _Closing  # checked per piece too: a piece with nothing for this filter sends nothing
            async with self._pipeline.reads.connection() as conn:
                changes = await changelog.replay_chunk(conn, sub.table, after, through)
            marks = segmenter.mark(changes, pieces.continuing(changes, through))
            for index, change in enumerate(changes):
                if change.op not in sub.events and change.op != "TRUNCATE":
                    continue
                frames = ChangeFrames(change)
                decided = frames.decide(sub.filter, sub.grant, sub.key_columns)
                if decided is None:
                    continue
                decision = (frames, decided)
                for ready, tx_end in lookbehind.push(change.seq, marks.segments[index], marks.ends[index], decision):
                    await self._send_replayed(sub, ready, tx_end)
                    sent += 1
            settled = lookbehind.settle(marks.open_segment)
            if settled is not None:
                await self._send_replayed(sub, settled, True)
                sent += 1
        return sent

    async def _send_replayed(self, sub: Subscription, held: Held, tx_end: bool) -> None:
        frames, decided = cast(tuple[ChangeFrames, Decided], held.payload)
        await self._send_history(frames.text_of(sub.id, decided, tx_end), held.seq)

    def _drop(self, sub: Subscription) -> None:
        self._subscriptions.pop(sub.id, None)
        self._pipeline.hub.remove(sub)

    def end(self) -> None:
        """The connection is over: its subscriptions leave the hub, and a message still awaited is abandoned."""
        for sub in self._subscriptions.values():
            self._pipeline.hub.remove(sub)
        self._subscriptions.clear()
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
