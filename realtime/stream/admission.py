"""Which WebSocket upgrades and SSE streams a process accepts: at most WS_MAX_CONNECTIONS in all and
WS_MAX_CONNECTIONS_PER_CLIENT per client address, the two kinds counted together. A refused one gets a plain
HTTP answer (503 or 429 with `Retry-After`) before any WebSocket or stream exists, so it costs the server no
connection state.

The client address is the socket's peer, or the `X-Forwarded-For` address when FORWARDED_ALLOW_IPS trusts
the proxy in front (uvicorn rewrites the ASGI scope's `client` before the app sees it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import orjson

from realtime.errors import PROBLEM_JSON, problem_type

RETRY_AFTER_S = 5


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    slug: str
    title: str
    detail: str
    retry_after_s: int | None = RETRY_AFTER_S  # None: retrying will not help (a refused Host or Origin)

    def asgi_messages(self) -> tuple[dict[str, object], dict[str, object]]:
        """The `websocket.http.response` messages that answer the upgrade with problem+json."""
        body = orjson.dumps(
            {"type": problem_type(self.slug), "title": self.title, "status": self.status, "detail": self.detail}
        )
        headers = [(b"content-type", PROBLEM_JSON.encode())]
        if self.retry_after_s is not None:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        start = {"type": "websocket.http.response.start", "status": self.status, "headers": headers}
        return start, {"type": "websocket.http.response.body", "body": body}


class Admission:
    def __init__(self, max_connections: int, max_per_client: int) -> None:
        self._max_connections = max_connections
        self._max_per_client = max_per_client
        self._total = 0
        self._by_client: Counter[str] = Counter()

    def enter(self, client: str) -> Refusal | None:
        """Count a new connection from `client`, or say why it is refused (and count nothing)."""
        if self._total >= self._max_connections:
            return Refusal(
                503,
                "too-many-connections",
                "Too many connections",
                f"this server holds its maximum of {self._max_connections} streaming connections (WebSockets and SSE"
                " streams); retry later or elsewhere",
            )
        if self._by_client[client] >= self._max_per_client:
            return Refusal(
                429,
                "too-many-connections-from-client",
                "Too many connections from this client",
                f"at most {self._max_per_client} streaming connections (WebSockets and SSE streams) per client address",
            )
        self._total += 1
        self._by_client[client] += 1
        return None

    def leave(self, client: str) -> None:
        self._total -= 1
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]
