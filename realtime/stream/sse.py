"""Server-Sent Events: `GET /sse/{table}` streams one subscription's events over plain HTTP, and
`POST /sse/tickets` gives a browser's EventSource (which cannot send headers) a single-use ticket.

An SSE stream is a WebSocket session without client frames: the same `ClientSession` subscribes it (so the
same checks, row-level grant, snapshot, replay and go-live decide what it gets), the same hub offers it the same
encoded frames, and an `Outbox` bounds its queue; only its sink (sse_wire.py) differs.

Lifecycle of a request:
    refused     before anything is streamed, every failure is problem+json with the WebSocket error's `code`:
                a foreign Origin (403), a bad query (400), too many streams (503, 429, shared with /ws),
                no valid token or ticket (401), then whatever the subscribe refuses (404, 403, 410, 503...)
    history     the snapshot or replay is sent as events while the hub holds live changes back; an error once
                events were sent ends the stream with an `end` event instead
    live        `subscribed`, then a `change` event per change; a comment every SSE_HEARTBEAT_S
    ended       the client disconnects, or the outbox closes (too slow, restarting on SIGTERM, token expired):
                the `end` event names the position to resume from, which is also the last `id:` sent
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from realtime.auth.dependencies import IdentityDep
from realtime.auth.tickets import TicketError, Tickets, TicketsFull
from realtime.auth.tokens import Identity, KeysUnavailable, TokenError, TokenVerifier
from realtime.db import DATABASE_ERRORS
from realtime.errors import PROBLEM_JSON, Problem, Unavailable, bearer_challenge, problem_type
from realtime.stream.endpoint import RETRY_AFTER_DATABASE_MS, ClientSession
from realtime.stream.outbox import Outbox
from realtime.stream.pipeline import StreamPipeline
from realtime.stream.protocol import ProtocolError, Subscribe
from realtime.stream.sse_request import parse_request
from realtime.stream.sse_wire import ABORT_EXTENSION, HEARTBEAT, SseSink

_log = logging.getLogger(__name__)

# HTTP status of each refusal, by the WebSocket error code it carries.
STATUS = {
    "bad_message": 400,
    "invalid_filter": 400,
    "unknown_column": 400,
    "filter_budget_exceeded": 400,
    "snapshot_too_large": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "unknown_table": 404,
    "cursor_expired": 410,
    "too_many_subscriptions": 503,
    "unavailable": 503,
}
_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 410: "Gone"}


class StreamProblem(Problem):
    """A refused SSE request: problem+json with the WebSocket `error` frame's `code` (and its `retry_after_ms`)."""

    code: str
    retry_after_ms: int | None = None


class TicketOut(BaseModel):
    ticket: str
    expires_in: float


_PROBLEM = {"model": StreamProblem, "content": {PROBLEM_JSON: {}}}
router = APIRouter(prefix="/sse", tags=["stream"])


@router.post(
    "/tickets",
    status_code=201,
    responses={401: {"model": Problem, "content": {PROBLEM_JSON: {}}}, 503: {"model": Problem}},
)
async def issue_ticket(identity: IdentityDep, request: Request) -> TicketOut:
    """A single-use ticket for `GET /sse/{table}?ticket=...`, for the bearer token's identity, good for
    SSE_TICKET_TTL_S seconds on any process of the server. The long-lived token never goes in a URL."""
    tickets: Tickets = request.state.tickets
    try:
        ticket = await tickets.issue(identity)
    except TicketsFull as error:
        raise Unavailable(str(error)) from None
    except DATABASE_ERRORS as error:
        _log.warning("issuing an SSE ticket failed: %s: %s", type(error).__name__, error)
        raise Unavailable("the database could not be reached; retry shortly") from None
    return TicketOut(ticket=ticket, expires_in=tickets.ttl_s)


_EVENTS = r"^(INSERT|UPDATE|DELETE)(,(INSERT|UPDATE|DELETE))*$"
_FILTER = r"^[^=]+=(eq|neq|lt|lte|gt|gte|in|is):.*$"
_SEQ = r"^[0-9]{1,18}$"


@router.get(
    "/{table}",
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream (docs/sse.md)."},
        **dict.fromkeys((400, 401, 403, 404, 410, 429, 503), _PROBLEM),
    },
)
async def stream_events(
    table: str,
    request: Request,
    # The shapes below are documented (json_schema_extra), not enforced by FastAPI: the handler reads each
    # parameter itself, so that a malformed one gets its WebSocket error code rather than a generic 422.
    events: Annotated[
        str | None,
        Query(description="Comma list of INSERT, UPDATE, DELETE.", json_schema_extra={"pattern": _EVENTS}),
    ] = None,
    filter: Annotated[
        list[str] | None,
        Query(description="`column=op:value`, repeatable.", json_schema_extra={"items": {"pattern": _FILTER}}),
    ] = None,
    since: Annotated[
        str | None, Query(description="Replay the changes after this position.", json_schema_extra={"pattern": _SEQ})
    ] = None,
    snapshot: Annotated[
        str | None, Query(description="`true`: the matching rows first.", json_schema_extra={"enum": ["true", "false"]})
    ] = None,
    ticket: Annotated[str | None, Query(description="From POST /sse/tickets, in place of a header.")] = None,
    last_event_id: Annotated[str | None, Header(description="Resume after this position; wins over since.")] = None,
) -> Response:
    """Stream a table's changes as Server-Sent Events (see docs/sse.md). The parameters are read from the
    request itself, so that each malformed one gets its WebSocket error code rather than a generic 422."""
    return EventStream(table)


def _problem(
    code: str, detail: str, *, status: int | None = None, retry_after_ms: int | None = None, slug: str | None = None
) -> Response:
    status = status or STATUS.get(code, 400)
    body: dict[str, Any] = {
        "type": problem_type(slug or code.replace("_", "-")),
        "title": _TITLES.get(status, "Service unavailable" if status == 503 else "Too many requests"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    headers: dict[str, str] = {}
    if retry_after_ms is not None:
        body["retry_after_ms"] = retry_after_ms
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))
    if code == "unauthorized":
        headers["WWW-Authenticate"] = bearer_challenge(detail)
    return Response(orjson.dumps(body), status, headers, media_type=PROBLEM_JSON)


class EventStream(Response):
    """The streaming answer of `GET /sse/{table}`: an ASGI app run by Starlette in place of a body."""

    def __init__(self, table: str) -> None:
        super().__init__()
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pipeline: StreamPipeline = scope["state"]["stream"]
        refusal = pipeline.guard.refusal(scope["headers"])
        if refusal is not None:  # a foreign page's Origin: the same rule as a WebSocket upgrade
            await _problem(refusal.slug.replace("-", "_"), refusal.detail, status=refusal.status, slug=refusal.slug)(
                scope, receive, send
            )
            return
        request = Request(scope, receive)
        try:
            subscribe = parse_request(
                self.table,
                {name: request.query_params.getlist(name) for name in request.query_params},
                request.headers.get("last-event-id"),
            )
        except ProtocolError as error:
            await _problem(error.code, error.message)(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else ""
        refusal = pipeline.admission.enter(client)
        if refusal is not None:
            await _problem(
                refusal.slug.replace("-", "_"),
                refusal.detail,
                status=refusal.status,
                retry_after_ms=None if refusal.retry_after_s is None else refusal.retry_after_s * 1000,
                slug=refusal.slug,
            )(scope, receive, send)
            return
        try:
            verifier: TokenVerifier | None = scope["state"]["auth"]
            try:
                identity = await _identity(request, verifier, scope["state"]["tickets"])
            except ProtocolError as error:
                await _problem(error.code, error.message, retry_after_ms=error.retry_after_ms)(scope, receive, send)
                return
            await _run(pipeline, verifier, identity, subscribe, scope, receive, send)
        finally:
            pipeline.admission.leave(client)


async def _identity(request: Request, verifier: TokenVerifier | None, tickets: Tickets) -> Identity | None:
    """Who the stream is for: the bearer header's token, or the ticket's identity (None on an open server)."""
    if verifier is None:
        return None  # open mode: a header or ticket is accepted unread, as `auth` frames are
    header = request.headers.get("authorization")
    ticket = request.query_params.get("ticket")
    if header is not None and ticket is not None:
        raise ProtocolError("bad_message", "send a bearer token or a ticket, not both")
    if ticket is not None:
        try:
            return await tickets.redeem(ticket)
        except TicketError as error:
            raise ProtocolError("unauthorized", str(error)) from None
        except DATABASE_ERRORS as error:
            _log.warning("redeeming an SSE ticket failed: %s: %s", type(error).__name__, error)
            raise ProtocolError(
                "unavailable",
                "the database could not be reached; retry shortly",
                retry_after_ms=RETRY_AFTER_DATABASE_MS,
            ) from None
    if header is None:
        raise ProtocolError(
            "unauthorized",
            "missing bearer token: send `Authorization: Bearer <token>`, or a ticket from POST /sse/tickets",
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ProtocolError("unauthorized", "the Authorization header must be `Bearer <token>`")
    try:
        return await verifier.verify(token.strip())
    except TokenError as error:
        raise ProtocolError("unauthorized", str(error)) from None
    except KeysUnavailable as error:
        raise ProtocolError("unavailable", f"{error}; retry shortly", retry_after_ms=RETRY_AFTER_DATABASE_MS) from None


async def _run(
    pipeline: StreamPipeline,
    verifier: TokenVerifier | None,
    identity: Identity | None,
    subscribe: Subscribe,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    settings = pipeline.settings
    offered = scope.get("extensions", {}).get(ABORT_EXTENSION)
    sink = SseSink(send, subscribe.since, offered["abort"] if offered else None)
    outbox = Outbox(
        sink,
        sink.close_message,
        pipeline.flusher,
        max_frames=settings.ws_queue_size,
        max_bytes=settings.ws_queue_bytes,
        send_timeout=settings.ws_send_timeout_s,
        tally=pipeline.metrics.tally,
    )
    connection_id = os.urandom(6).hex()
    session = ClientSession(pipeline, outbox, receive, verifier, connection_id)
    if identity is not None:
        session.take_identity(identity)
    pipeline.hub.attach(outbox)
    pipeline.metrics.connection_opened("sse")
    client = f"{scope['client'][0]}:{scope['client'][1]}" if scope.get("client") else None
    _log.info("SSE stream opened", extra={"connection_id": connection_id, "client": client})
    watching = asyncio.ensure_future(_until_disconnect(receive, sink))
    heartbeat: _Heartbeat | None = None
    refused = False  # answered with a problem document: no stream was ever sent
    try:
        subscribing = asyncio.ensure_future(session.subscribe(subscribe))
        await asyncio.wait((subscribing, watching), return_when=asyncio.FIRST_COMPLETED)
        if not subscribing.done():
            subscribing.cancel()  # the client left while history was read: stop reading it
            await asyncio.wait((subscribing,))
            return
        error = subscribing.exception()
        if isinstance(error, ProtocolError):
            if not sink.started and outbox.queued == 0:
                refused = True
                await _problem(error.code, error.message, retry_after_ms=error.retry_after_ms)(scope, receive, send)
                return
            # Events were sent: the stream ends with what the refusal says, and where to resume.
            sink.failure = (error.code, error.message, error.retry_after_ms)
            outbox.close(4000, error.message)
        elif error is not None:
            raise error
        else:
            heartbeat = _Heartbeat(outbox, settings.sse_heartbeat_s)
        ended = asyncio.ensure_future(sink.ended.wait())
        try:
            await asyncio.wait((ended, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        watching.cancel()
        session.end()
        pipeline.hub.detach(outbox)
        outbox.discard()
        # The client's close has no code over HTTP: `client` when it went away first.
        pipeline.metrics.connection_closed("sse", outbox.close_code or ("refused" if refused else "client"))
        _log.info(
            "SSE stream closed",
            extra={
                "connection_id": connection_id,
                "client": client,
                "close_code": outbox.close_code,
                "last_seq": sink.last_id,
            },
        )


async def _until_disconnect(receive: Receive, sink: SseSink) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    sink.disconnected = True


class _Heartbeat:
    """A comment every `interval_s` (so proxies and the client see a live stream), on a loop timer, not a task."""

    def __init__(self, outbox: Outbox, interval_s: float) -> None:
        self._outbox = outbox
        self._interval_s = interval_s
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(interval_s, self._beat)

    def _beat(self) -> None:
        if not self._outbox.closed:
            self._outbox.offer(HEARTBEAT)
            self._handle = self._loop.call_later(self._interval_s, self._beat)

    def cancel(self) -> None:
        self._handle.cancel()
