"""X-Request-ID: every HTTP request gets an id, the caller's own or a new one, echoed in the response and written
on every log line about the request (realtime/logs.py), uvicorn's access line included.

A caller (a proxy, another service) that sends `X-Request-ID` with 1 to 128 visible ASCII characters keeps its
id, so one id follows the request across services; anything else is replaced by 32 random hex digits.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_ACCEPTED = re.compile(rb"[\x21-\x7e]{1,128}")

# The id of the request whose task is running, or None outside requests (WebSockets, background tasks). It is
# not reset when the app returns: the server writes its line about a failed request after that, in the same task,
# and each request runs in a task of its own, so the value never reaches another request.
current: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestId:
    """ASGI middleware, outermost, so that every response and every log line of an HTTP request has the id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _given(scope["headers"]) or os.urandom(16).hex()
        current.set(request_id)
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _given(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == HEADER:
            return value.decode() if _ACCEPTED.fullmatch(value) else None
    return None
