"""Server-Sent Events on the wire: the sink an SSE stream's outbox writes through.

The hub encodes a change once per subscription as a WebSocket text frame, and an SSE subscription is offered
the same bytes as every WebSocket one: there is no second fan-out path and nothing in the hub knows SSE. The
frame becomes an event only here, when the stream's writer task sends it (`event_from_frame`): its JSON payload
is cut out of the frame unchanged and framed as `id:`/`event:`/`data:` lines. The WebSocket path pays nothing for
this; an SSE stream pays one slice and one join per event, and an ASGI message, as a WebSocket without the
direct sink does.

Lifecycle of a stream (an `SseSink`):
    waiting    nothing sent: a refusal can still be a problem+json response (see `started`)
    streaming  the first event starts the `text/event-stream` response, led by `retry:`; events follow as the
               outbox's writer sends them
    ending     the outbox closes (too slow, restarting, token expired, an error midway): it sends its close
               message to `close_message`, which writes the final `end` event naming the position to resume
               from and ends the response
    ended      `ended` is set: by the end of the response, by `abort` (a peer that takes nothing, after
               WS_SEND_TIMEOUT_S: the connection is dropped), or by the client's disconnect
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

SSE_PATH_PREFIX = "/sse/"
# The ASGI scope extension under which realtime's HTTP protocol (http_protocol.py) offers `{"abort": ...}`: drop
# the connection at once. Without it (another server) a stuck stream's response is left incomplete, and the
# server closes the connection once the peer has taken what was buffered.
ABORT_EXTENSION = "realtime.abort"
# How long a browser's EventSource waits before reconnecting after the stream ends or breaks.
RETRY_MS = 1000
HEARTBEAT = b": keep-alive\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    # Reverse proxies that buffer responses (nginx) would hold events back until their buffer fills.
    (b"x-accel-buffering", b"no"),
]
# Events whose position is a resume position: the browser keeps the last `id:` it saw and sends it back as
# `Last-Event-ID`. Snapshot events carry none, so a stream cut mid-snapshot does not resume past the rest of it.
_POSITIONED = frozenset({b"change", b"subscribed"})
# What the end event says for each close code of the outbox (realtime/stream/outbox.py).
END_CODES = {4008: "too_slow", 1012: "restarting", 4001: "token_expired", 1008: "rate_limited"}
_TEXT_FIN = 0x81

SendFn = Callable[[dict[str, Any]], Awaitable[None]]


def event(kind: bytes, data: bytes, event_id: int | None = None) -> bytes:
    """One event. `data` is JSON; should it hold a line break (orjson and PostgreSQL escape them in strings, so
    only as whitespace), each line is its own `data:` line, which the client joins back with newlines."""
    head = b"event: " + kind + b"\n"
    if event_id is not None:
        head = b"id: %d\n" % event_id + head
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return head + b"data: " + data + b"\n\n"


def _payload(frame: bytes) -> bytes:
    marker = frame[1]
    return frame[2 if marker < 126 else 4 if marker == 126 else 10 :]


def _kind(payload: bytes) -> bytes:
    """The frame's `type`, read from its first field where every frame of realtime's puts it."""
    if payload.startswith(b'{"type":"'):
        end = payload.find(b'"', 9)
        if end > 9:
            return payload[9:end]
    kind = orjson.loads(payload).get("type")
    return str(kind).encode()


def event_from_frame(frame: bytes, seq: int) -> tuple[bytes, int | None]:
    """The SSE event for an encoded WebSocket frame of the outbox, and its `id` (None: it carries none).

    Anything that is not a WebSocket text frame is already SSE (a heartbeat, an end event) and passes as it is.
    """
    if not frame or frame[0] != _TEXT_FIN:
        return frame, None
    payload = _payload(frame)
    kind = _kind(payload)
    event_id = seq if kind in _POSITIONED else None
    return event(kind, payload, event_id), event_id


def end_event(code: str, message: str, seq: int | None, retry_after_ms: int | None = None) -> bytes:
    body: dict[str, Any] = {"type": "end", "code": code, "message": message, "seq": seq}
    if retry_after_ms is not None:
        body["retry_after_ms"] = retry_after_ms
    return event(b"end", orjson.dumps(body))


class SseSink:
    """Writes an SSE stream's events through ASGI `send` (one `http.response.body` per event, from the outbox's
    writer task) and ends the response with an `end` event when the outbox closes. Implements wire.Sink, and its
    `close_message` is the outbox's `send` for the close."""

    direct = False

    def __init__(self, send: SendFn, resume_from: int | None, abort: Callable[[], None] | None = None) -> None:
        self._send = send
        self._abort = abort
        self.started = False  # the response has begun: a refusal can no longer be a problem+json response
        self.ended = asyncio.Event()
        self.disconnected = False
        # The `id` of the last event written, or the position the stream started from: where to resume.
        self.last_id = resume_from
        # Set before the outbox closes for an error midway (cursor_expired, unavailable): what `end` says.
        self.failure: tuple[str, str, int | None] | None = None

    def writable(self) -> bool:
        return True

    def gone(self) -> bool:
        return self.disconnected or self.ended.is_set()

    def ready(self) -> bool:
        return False  # every event goes through the writer task, which waits for the client

    def write(self, data: bytes) -> None:
        raise NotImplementedError("an SSE stream sends one event at a time from the writer task")

    async def wait_writable(self) -> None:
        return None

    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        await self._send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await self._send({"type": "http.response.body", "body": b"retry: %d\n\n" % RETRY_MS, "more_body": True})

    async def send(self, frame: bytes, seq: int = 0) -> None:
        if self.gone():
            return
        data, event_id = event_from_frame(frame, seq)
        await self.start()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})
        if event_id is not None:
            self.last_id = event_id  # only once written: a send cancelled while it waited wrote nothing

    async def close_message(self, message: dict[str, Any]) -> None:
        """The outbox's close (`websocket.close` with its code): the `end` event, then the end of the response."""
        if self.gone():
            return
        if self.failure is not None:
            code, why, retry_after_ms = self.failure
        else:
            code = END_CODES.get(int(message.get("code", 1000)), "closed")
            why, retry_after_ms = str(message.get("reason", "")).partition("; last_seq=")[0], None
        await self.finish(end_event(code, why, self.last_id, retry_after_ms))

    async def finish(self, data: bytes) -> None:
        await self.start()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        self.ended.set()

    def abort(self) -> None:
        """Drop the connection at once (a peer that reads nothing could never receive the end); the stream's task
        returns."""
        if self._abort is not None and not self.ended.is_set():
            self._abort()
        self.ended.set()
