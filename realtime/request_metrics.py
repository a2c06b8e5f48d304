"""Counts every HTTP request by method, route template and status, and times it
(realtime_http_request_duration_seconds; its `_count` is the number of requests).

The route is the template the router matched (`/users/{user_id}`, never the id itself, which would make a series
per user); the demo page's files all count as `/{path}`, and a request answered before routing (a refused Host)
as `none`. WebSockets on /ws are not HTTP requests here: their own metrics count them.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from realtime.metrics import Metrics


class RequestMetrics:
    """ASGI middleware, outermost, so that requests refused by the Host check are counted too."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app fails before starting a response

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.metrics.http_request(scope["method"], route_template(scope), status, time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is None:
        return "none"
    path: str = getattr(route, "path", "")
    # The demo page is mounted at the root: its mount's path is empty and it serves every path no route has.
    return path or "/{path}"
