"""uvicorn's httptools HTTP protocol, with bounds on what a client can make it hold before a request starts.

`realtime serve` runs uvicorn with this class as its HTTP implementation. Requests are parsed and answered
exactly as by `httptools`; what changes is what a connection may cost before it has sent a complete request
head (the request line and the headers), which uvicorn does not bound at all:

    open        a timer of HTTP_HEADER_TIMEOUT_S starts
    head        bytes are counted as they arrive, before the parser sees them; a head larger than
                HTTP_MAX_HEADER_BYTES, or with more than HTTP_MAX_HEADERS headers, is answered 431 and the
                connection closed (httptools joins the pieces of a header that arrives in many reads by copying,
                quadratic in its length, so the excess must never reach it). The timer firing first: 408 if
                anything arrived, else the connection is closed without a word
    request     head complete: the timer is cancelled; the body (bounded by MAX_BODY_BYTES in the app) and the
                response are uvicorn's
    keep-alive  after the response, uvicorn's own idle timer (5 s) runs until the next request's first bytes;
                if they are not a whole head, the head timer starts again from them
    upgrade     a WebSocket handshake is a head like any other; once upgraded, the WebSocket protocol owns the
                connection
    streaming   a request under /sse/ is offered an abort of its connection under the scope's extensions
                (ABORT_EXTENSION), for a stream whose reader takes nothing
    lost        the timer is cancelled; the request being answered learns of it even when requests were
                pipelined behind it (uvicorn tells only the newest one), and a write after the peer has reset
                the connection is dropped instead of raising inside the app (uvloop closes the transport on the
                failed write and reports the loss only on the next loop iteration)

A refusal is written only when no response is under way on the connection; otherwise it would land in the
middle of that response, and the connection is just closed. Bytes of the next request that arrive in the same
read as the end of a request's body are not counted (the parser does not say where one message ends within a
read), so a pipelining client can exceed the head bound by at most one read buffer.

This is the one module that relies on uvicorn's httptools protocol internals (pinned in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from realtime.config import Settings, get_settings
from realtime.errors import PROBLEM_JSON, Problem, problem_type
from realtime.stream.sse_wire import ABORT_EXTENSION, SSE_PATH_PREFIX

_log = logging.getLogger(__name__)

# Between a request's head and the end of its body the parser is fed without counting.
_IN_BODY = -1
# After a refusal, what still arrives is read and dropped until the client closes or _LINGER_S have passed.
_DISCARDING = -2
_LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """What one request head may cost: bytes, headers, and seconds from its first byte to its end."""

    max_bytes: int
    max_headers: int
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> HeadLimits:
        return cls(settings.http_max_header_bytes, settings.http_max_headers, settings.http_header_timeout_s)


@functools.cache
def _process_limits() -> HeadLimits:
    # uvicorn builds the protocol with its own Config only; the worker reads the same settings as the app does.
    return HeadLimits.from_settings(get_settings())


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = _process_limits()
        # Bytes of the current head received so far; _IN_BODY once it is complete, _DISCARDING once refused.
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._answering: RequestResponseCycle | None = None
        self._writes: _PeerAwareWrites | None = None

    # Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._writes = _PeerAwareWrites(transport)
        self._head_timer = self.loop.call_later(self._limits.timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        answering = self._answering
        if answering is not None and not answering.response_complete:
            # uvicorn marks only the newest request as disconnected; with pipelining that is not the one being
            # answered, whose app would otherwise wait forever for `http.disconnect`.
            answering.disconnected = True
            answering.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._receive(data)

    def _receive(self, data: bytes | memoryview) -> None:
        counted = self._head_bytes
        if counted < 0:
            if counted == _IN_BODY:
                self._feed(data)
            return
        room = self._limits.max_bytes - counted
        if len(data) <= room:
            self._head_bytes = counted + len(data)
            if self._feed(data) and self._head_bytes > 0 and self._head_timer is None:
                # The first bytes of a request after a response: its head has this long to arrive.
                self._head_timer = self.loop.call_later(self._limits.timeout_s, self._head_timed_out)
            return
        # More than the head may still take: give the parser only that much. If the head ends within it, the
        # rest is the body or the next request; if not, the head is too large and the rest is never parsed.
        self._head_bytes = self._limits.max_bytes
        view = memoryview(data)
        if not self._feed(view[:room]):
            return
        if self._head_bytes == self._limits.max_bytes:
            self._refuse(431, "headers-too-large", f"request heads are limited to {self._limits.max_bytes} bytes")
            return
        self._receive(view[room:])

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse `data`; False once the connection is no longer this protocol's to read (refused or upgraded)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, _TooManyHeaders):
                self._refuse(431, "too-many-headers", f"requests are limited to {self._limits.max_headers} headers")
            else:
                message = "Invalid HTTP request received."
                self.logger.warning(message)
                self.send_400_response(message)
            return False
        return True

    # Parser callbacks

    def on_headers_complete(self) -> None:
        # Counted once the head is complete rather than one by one as they are parsed: the byte bound already
        # caps how many there can be (a few thousand), and a hook per header would cost every request.
        if len(self.headers) > self._limits.max_headers:
            raise _TooManyHeaders  # httptools stops parsing and raises HttpParserCallbackError from feed_data
        self._head_bytes = _IN_BODY
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes = 0

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        assert self._writes is not None
        cycle.transport = self._writes
        if cycle.scope["path"].startswith(SSE_PATH_PREFIX):
            # An SSE stream must be able to drop a peer that reads nothing: ending the response only closes the
            # transport, which then waits for the peer to take what is buffered, forever. Offered to those
            # requests only, so that no other request pays for the dict.
            cycle.scope["extensions"] = {ABORT_EXTENSION: {"abort": self.transport.abort}}
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    # Refusals

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:
            _log.debug("closed %s: nothing received in %g s", _peer(self.client), self._limits.timeout_s)
            self.transport.close()
            return
        self._refuse(408, "request-timeout", f"request heads must arrive within {self._limits.timeout_s:g} s")

    def _refuse(self, status: int, slug: str, detail: str) -> None:
        self._cancel_head_timer()
        _log.info("%d to %s: %s", status, _peer(self.client), detail)
        answering = self.cycle is not None and not self.cycle.response_complete
        if answering or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write(_problem_response(status, slug, detail, self.server_state.default_headers))
        # Closing a socket with unread input makes the kernel reset the connection, which can destroy the
        # answer before the client has read it, and a client whose head is too large is usually still sending.
        # So: send the answer and end our side, drop what still arrives, close when the client does (uvicorn
        # closes on end of input) or after _LINGER_S.
        self.transport.write_eof()
        self._head_bytes = _DISCARDING
        self._head_timer = self.loop.call_later(_LINGER_S, self.transport.close)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class _TooManyHeaders(Exception):
    pass


class _PeerAwareWrites(asyncio.Transport):
    """The transport as a request's cycle sees it: writes after the connection has closed are dropped.

    A cycle calls only these three methods. asyncio's own transports drop such writes; uvloop's raise
    RuntimeError, which would surface in the app as an error of the request.
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


_TITLES = {408: "Request timeout", 431: "Request header fields too large"}


def _problem_response(status: int, slug: str, detail: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = Problem(type=problem_type(slug), title=_TITLES[status], status=status, detail=detail)
    content = body.model_dump_json(exclude_none=True).encode()
    head = [STATUS_LINE[status]]
    head.extend(name + b": " + value + b"\r\n" for name, value in default_headers)
    head.append(b"content-type: " + PROBLEM_JSON.encode() + b"\r\n")
    head.append(b"content-length: %d\r\n" % len(content))
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + content


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown peer"
