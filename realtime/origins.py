"""Which Host headers and browser Origins the server answers: one rule, compiled once, for HTTP and /ws alike.

Two attacks from a web page a visitor's browser runs:
    DNS rebinding          a page of the attacker's name re-resolves it to this server's address; the browser then
                           treats the server as that page's own origin. Its requests carry the attacker's name in
                           `Host`, so only Host values in ALLOWED_HOSTS are answered (400 otherwise).
    cross-site WebSocket   browsers let any page open a WebSocket anywhere and read what it receives; the upgrade
    hijacking              carries the page's `Origin`, so only allowed origins may upgrade (403 otherwise).
                           REST answers grant CORS to the same origins, and refuse a state-changing request that a
                           browser sent from any other origin (a plain form POST needs no preflight).

`Guard` holds both rules. `HttpGuard` applies it to every HTTP response (and adds the security headers);
`stream()` calls `Guard.refusal` on the upgrade's headers before it counts or accepts the connection.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from realtime.config import Settings
from realtime.errors import problem_response
from realtime.stream.admission import Refusal

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Sent on every HTTP response: no MIME sniffing, no Referer leaving the page, no framing.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
# Requests that change nothing: a browser sends them cross-origin without asking, and without a CORS grant the
# page cannot read the answer. Any other method from a foreign origin is refused before it runs.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CORS_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE"
# Response headers a cross-origin page may read besides the CORS-safelisted ones.
CORS_EXPOSE = b"ETag, Location, Retry-After, Allow"
CORS_MAX_AGE = b"600"


def _split_host(value: str) -> str:
    """The name of a `host[:port]` (Host header or an origin's authority), lower-cased, IPv6 without brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, colon, port = value.rpartition(":")
    return name if colon and port.isdigit() else value


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True, slots=True)
class HostRule:
    """Host names answered: exact names, `*.suffix` patterns (any subdomain), or any (`None`)."""

    names: frozenset[str] | None
    suffixes: tuple[str, ...] = ()

    @classmethod
    def compile(cls, allowed_hosts: str, bind_host: str) -> HostRule:
        items = _split_list(allowed_hosts)
        if not items:
            return cls(LOOPBACK_NAMES) if _is_loopback_address(bind_host) else cls(None)
        if "*" in items:
            return cls(None)
        names: set[str] = set(LOOPBACK_NAMES)  # the process's own health checks; a rebinding page never sends them
        suffixes: list[str] = []
        for item in items:
            if item.startswith("*."):
                suffixes.append(item[1:].lower())
            elif "*" in item or "/" in item:
                raise ValueError(f"ALLOWED_HOSTS: {item!r} is not a host name, `*.domain` or `*`")
            else:
                names.add(_split_host(item))
        return cls(frozenset(names), tuple(suffixes))

    def allows(self, host: str | None) -> bool:
        if self.names is None:
            return True
        if not host:
            return False
        name = _split_host(host)
        return name in self.names or name.endswith(self.suffixes)


@dataclass(frozen=True, slots=True)
class OriginRule:
    """Browser origins trusted: the server's own (the Origin's authority is the request's Host), the listed ones,
    loopback pages when nothing is listed, or any (`any_origin`)."""

    origins: frozenset[str]
    loopback: bool
    any_origin: bool = False

    @classmethod
    def compile(cls, allowed_origins: str) -> OriginRule:
        items = _split_list(allowed_origins)
        if "*" in items:
            return cls(frozenset(), loopback=False, any_origin=True)
        origins = set()
        for item in items:
            parts = urlsplit(item.rstrip("/"))
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
                raise ValueError(f"ALLOWED_ORIGINS: {item!r} is not an origin such as https://app.example.com")
            netloc = parts.netloc.lower()
            default_port = ":443" if parts.scheme == "https" else ":80"
            # Browsers leave the scheme's default port out of Origin.
            origins.add(f"{parts.scheme}://{netloc.removesuffix(default_port)}")
        return cls(frozenset(origins), loopback=not items)

    def allows(self, origin: str, host: str | None) -> bool:
        if self.any_origin:
            return True
        origin = origin.lower()
        if origin in self.origins:
            return True
        scheme, sep, authority = origin.partition("://")
        if not sep or scheme not in ("http", "https") or not authority or "/" in authority:
            return False  # `null` (sandboxed frames, files) and anything malformed
        if host is not None and authority == host.strip().lower():
            return True
        return self.loopback and _split_host(authority) in LOOPBACK_NAMES


ORIGIN_NOT_ALLOWED = ("origin-not-allowed", "Origin not allowed")
HOST_NOT_ALLOWED = ("host-not-allowed", "Host not allowed")


@dataclass(frozen=True, slots=True)
class Guard:
    hosts: HostRule
    origins: OriginRule

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        """Compile the rules once; a malformed ALLOWED_HOSTS or ALLOWED_ORIGINS fails here, at start-up."""
        return cls(
            HostRule.compile(settings.allowed_hosts, settings.host), OriginRule.compile(settings.allowed_origins)
        )

    def refusal(self, headers: Iterable[tuple[bytes, bytes]]) -> Refusal | None:
        """Why a WebSocket upgrade with these headers is refused (foreign Host, foreign Origin), or None.

        An upgrade with no Origin comes from a program, not a browser page, and is allowed.
        """
        host, origin = _host_and_origin(headers)
        if not self.hosts.allows(host):
            return host_refusal(host)
        if origin is not None and not self.origins.allows(origin, host):
            return origin_refusal(origin)
        return None


def _host_and_origin(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    host = origin = None
    for name, value in headers:
        if name == b"host":
            host = value.decode("latin-1")
        elif name == b"origin":
            origin = value.decode("latin-1")
    return host, origin


def host_refusal(host: str | None) -> Refusal:
    detail = f"this server does not answer for Host {host!r}; see ALLOWED_HOSTS" if host else "a Host header is needed"
    return Refusal(400, *HOST_NOT_ALLOWED, detail, retry_after_s=None)


def origin_refusal(origin: str) -> Refusal:
    return Refusal(
        403,
        *ORIGIN_NOT_ALLOWED,
        f"pages of {origin!r} may not use this server; see ALLOWED_ORIGINS",
        retry_after_s=None,
    )


# A Host value safe to write into the Content-Security-Policy (no spaces, semicolons or quotes).
_PLAIN_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


def content_security_policy(host: str | None) -> bytes:
    """The demo page's policy: its own scripts, styles and API only, the WebSocket of the same host, no framing.

    `'self'` covers ws/wss of the same host in current browsers; they are named as well for the ones before.
    """
    connect = "'self'"
    if host and _PLAIN_HOST.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ).encode()


class HttpGuard:
    """Pure ASGI middleware, outermost: Host and Origin rules, CORS and the security headers on every response.

    What it adds to a response is a few header tuples; nothing is parsed but the Host and Origin headers.
    """

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host, origin = _host_and_origin(scope["headers"])
        if not self.guard.hosts.allows(host):
            await self._refuse(host_refusal(host), scope, receive, send)
            return
        extra: tuple[tuple[bytes, bytes], ...] = SECURITY_HEADERS
        if origin is not None:
            allowed = self.guard.origins.allows(origin, host)
            method = scope["method"]
            if method == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
                await self._preflight(origin, allowed, scope, receive, send)
                return
            if not allowed and method not in SAFE_METHODS:
                await self._refuse(origin_refusal(origin), scope, receive, send)
                return
            if allowed:
                extra = (*SECURITY_HEADERS, *_cors_grant(origin))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _preflight(self, origin: str, allowed: bool, scope: Scope, receive: Receive, send: Send) -> None:
        if not allowed:
            await self._refuse(origin_refusal(origin), scope, receive, send)
            return
        headers = [*SECURITY_HEADERS, *_cors_grant(origin)]
        headers += [(b"access-control-allow-methods", CORS_METHODS), (b"access-control-max-age", CORS_MAX_AGE)]
        requested = _header(scope, b"access-control-request-headers")
        if requested:
            headers.append((b"access-control-allow-headers", requested))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, refusal: Refusal, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(refusal.status, refusal.detail, slug=refusal.slug, title=refusal.title)
        response.raw_headers.extend(SECURITY_HEADERS)
        await response(scope, receive, send)


def _cors_grant(origin: str) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-expose-headers", CORS_EXPOSE),
        (b"vary", b"Origin"),
    )


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value)
    return None


class DemoPagePolicy:
    """Wraps the static demo app: its responses carry the page's Content-Security-Policy.

    Only the demo's own files get it; /docs and /redoc load their scripts and styles from a CDN and would break
    under `default-src 'self'`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = (b"content-security-policy", content_security_policy(_host_and_origin(scope["headers"])[0]))

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), policy]
            await send(message)

        await self.app(scope, receive, send_with_policy)
