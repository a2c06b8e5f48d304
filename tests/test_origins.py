"""Origins and hosts against real servers: cross-site WebSocket hijacking and DNS rebinding are refused before
anything runs, CORS follows the same rule, every response carries the security headers, and the demo page works
under its Content-Security-Policy in Chromium."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from playwright.async_api import async_playwright
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from realtime.config import Settings
from realtime.dsn import Dsn
from realtime.origins import Guard
from tests.support.browser import DemoPage, launch
from tests.support.server import ServerProcess, running_server
from tests.support.ws import StreamClient

pytestmark = pytest.mark.timeout(90)

FOREIGN = "https://evil.example"
CONFIGURED_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
async def configured(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server with ALLOWED_ORIGINS and ALLOWED_HOSTS set, as for a deployment behind a front-end."""
    env = {"ALLOWED_ORIGINS": f"{CONFIGURED_ORIGIN}, https://admin.example.com:443/", "ALLOWED_HOSTS": "*.example.com"}
    async with running_server(database_url, artifacts_dir / "origins-configured.log", env=env) as server:
        yield server


def own_origin(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}"


async def upgrade(server: ServerProcess, *, origin: str | None = None, host: str | None = None) -> ClientConnection:
    """Open /ws on `server`, sending `origin` (none by default) and `host` as the Host header (the URL's by default)."""
    sent_origin = Origin(origin) if origin is not None else None
    if host is None:
        return await connect(server.ws_url, origin=sent_origin, open_timeout=10)
    # The TCP connection goes to the server; the URL's authority is only what the Host header says.
    return await connect(f"ws://{host}/ws", origin=sent_origin, host="127.0.0.1", port=server.port, open_timeout=10)


async def assert_works(connection: ClientConnection) -> None:
    client = StreamClient(connection)
    try:
        assert (await client.request({"type": "ping"}))["type"] == "pong"
    finally:
        await client.close()


async def refused(server: ServerProcess, **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as refusal:
        await upgrade(server, **kwargs)
    return refusal.value


def assert_problem(status: int, headers: Any, body: bytes | bytearray, expected: int, slug: str) -> None:
    assert status == expected, body
    assert headers["content-type"] == "application/problem+json"
    problem = orjson.loads(body)
    assert (problem["type"], problem["status"]) == (f"/problems/{slug}", expected), problem
    assert "retry-after" not in headers  # retrying does not help


def assert_refused_upgrade(refusal: InvalidStatus, expected: int, slug: str) -> None:
    response = refusal.response
    assert_problem(response.status_code, response.headers, response.body or b"", expected, slug)


# ------------------------------------------------------------------------------------------------ origins


async def test_cross_origin_upgrade_is_refused_and_same_origin_accepted(server: ServerProcess) -> None:
    """A foreign page's upgrade gets 403 problem+json before the handshake; own, loopback and no Origin work."""
    assert_refused_upgrade(await refused(server, origin=FOREIGN), 403, "origin-not-allowed")
    assert_refused_upgrade(await refused(server, origin="null"), 403, "origin-not-allowed")
    assert_refused_upgrade(await refused(server, origin="http://127.0.0.1.evil.example"), 403, "origin-not-allowed")

    await assert_works(await upgrade(server, origin=own_origin(server)))
    await assert_works(await upgrade(server, origin="http://localhost:5173"))
    await assert_works(await upgrade(server, origin="https://[::1]:8443"))
    await assert_works(await upgrade(server))  # a program, not a page: no Origin


async def test_configured_origins_are_allowed_and_others_refused(configured: ServerProcess) -> None:
    """With ALLOWED_ORIGINS set, its origins and the server's own upgrade; another site and loopback pages do not."""
    await assert_works(await upgrade(configured, origin=CONFIGURED_ORIGIN))
    await assert_works(await upgrade(configured, origin="https://admin.example.com"))
    await assert_works(await upgrade(configured, origin=own_origin(configured)))
    await assert_works(await upgrade(configured))
    for origin in ("https://other.example.com", "http://app.example.com", "http://localhost:5173"):
        assert_refused_upgrade(await refused(configured, origin=origin), 403, "origin-not-allowed")


async def test_cors_preflight_is_granted_to_allowed_origins_only(configured: ServerProcess) -> None:
    """A preflight from an allowed origin gets 204 with the grant; a foreign one 403 and no CORS header at all."""
    async with httpx.AsyncClient(base_url=configured.base_url, timeout=10.0) as client:
        asked = {"Access-Control-Request-Method": "PATCH", "Access-Control-Request-Headers": "content-type, if-match"}
        allowed = await client.options("/users/1", headers={"Origin": CONFIGURED_ORIGIN, **asked})
        assert allowed.status_code == 204, allowed.text
        assert allowed.headers["access-control-allow-origin"] == CONFIGURED_ORIGIN
        assert "PATCH" in allowed.headers["access-control-allow-methods"]
        assert allowed.headers["access-control-allow-headers"] == "content-type, if-match"
        assert "Origin" in allowed.headers["vary"]

        denied = await client.options("/users/1", headers={"Origin": FOREIGN, **asked})
        assert_problem(denied.status_code, denied.headers, denied.content, 403, "origin-not-allowed")
        assert not [name for name in denied.headers if name.startswith("access-control-")]

        granted = await client.get("/users", params={"limit": 1}, headers={"Origin": CONFIGURED_ORIGIN})
        assert granted.status_code == 200
        assert granted.headers["access-control-allow-origin"] == CONFIGURED_ORIGIN
        assert "ETag" in granted.headers["access-control-expose-headers"]
        foreign = await client.get("/users", params={"limit": 1}, headers={"Origin": FOREIGN})
        assert foreign.status_code == 200  # answered, but the foreign page may not read it
        assert "access-control-allow-origin" not in foreign.headers


async def test_a_foreign_page_cannot_write_without_a_preflight(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A cross-site form-style POST (no preflight needed) from a foreign origin is refused 403 and writes nothing."""
    email = f"csrf.{secrets.token_hex(4)}@example.com"
    body = orjson.dumps({"name": "Mallory", "email": email})
    response = await http.post("/users", content=body, headers={"Origin": FOREIGN, "Content-Type": "text/plain"})
    assert_problem(response.status_code, response.headers, response.content, 403, "origin-not-allowed")
    assert await db.fetchval("SELECT count(*) FROM users WHERE email = $1", email) == 0

    same_site = await http.post(
        "/users", content=body, headers={"Origin": own_origin(server), "Content-Type": "application/json"}
    )
    assert same_site.status_code == 201, same_site.text


# -------------------------------------------------------------------------------------------------- hosts


async def test_foreign_host_is_refused_on_rest_and_on_the_upgrade(server: ServerProcess) -> None:
    """DNS rebinding: a Host that is not a loopback name gets 400 problem+json on REST and before the handshake."""
    rebound = f"rebind.evil.example:{server.port}"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:
        for path in ("/users", "/", "/healthz"):
            response = await client.get(path, headers={"Host": rebound})
            assert_problem(response.status_code, response.headers, response.content, 400, "host-not-allowed")
            assert response.headers["x-content-type-options"] == "nosniff"
        for loopback in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "localhost"):
            assert (await client.get("/users", headers={"Host": loopback})).status_code == 200, loopback

    assert_refused_upgrade(await refused(server, host=rebound), 400, "host-not-allowed")
    # The page's own origin, as a rebinding page would send it, does not help.
    assert_refused_upgrade(await refused(server, host=rebound, origin=f"http://{rebound}"), 400, "host-not-allowed")
    await assert_works(await upgrade(server, host=f"localhost:{server.port}", origin=f"http://localhost:{server.port}"))


async def test_configured_hosts_are_answered_and_others_refused(configured: ServerProcess) -> None:
    """With ALLOWED_HOSTS=*.example.com, its subdomains and loopback names are answered; other names get 400."""
    async with httpx.AsyncClient(base_url=configured.base_url, timeout=10.0) as client:
        for host in ("api.example.com", "a.b.example.com:8443", "localhost"):
            assert (await client.get("/users", headers={"Host": host})).status_code == 200, host
        for host in ("example.com", "api.example.com.evil.example", "evil.example"):
            response = await client.get("/users", headers={"Host": host})
            assert_problem(response.status_code, response.headers, response.content, 400, "host-not-allowed")
    await assert_works(await upgrade(configured, host="api.example.com", origin=CONFIGURED_ORIGIN))
    assert_refused_upgrade(
        await refused(configured, host="evil.example", origin=CONFIGURED_ORIGIN), 400, "host-not-allowed"
    )


async def test_star_allows_any_origin_and_any_host(database_url: Dsn, artifacts_dir: Path) -> None:
    """ALLOWED_ORIGINS=* and ALLOWED_HOSTS=* let a foreign page upgrade and answer any Host."""
    env = {"ALLOWED_ORIGINS": "*", "ALLOWED_HOSTS": "*"}
    async with running_server(database_url, artifacts_dir / "origins-star.log", env=env) as server:
        await assert_works(await upgrade(server, origin=FOREIGN, host="anything.example"))
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:
            response = await client.get("/users", headers={"Host": "anything.example", "Origin": FOREIGN})
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == FOREIGN


def test_malformed_settings_fail_at_start() -> None:
    """An ALLOWED_ORIGINS entry that is not an origin, or a bad ALLOWED_HOSTS pattern, is refused when compiled."""
    for bad in ({"allowed_origins": "app.example.com"}, {"allowed_origins": "https://app.example.com/path"}):
        with pytest.raises(ValueError, match="ALLOWED_ORIGINS"):
            Guard.from_settings(Settings(**bad))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ALLOWED_HOSTS"):
        Guard.from_settings(Settings(allowed_hosts="api.*.com"))
    # An empty ALLOWED_HOSTS answers any name once the server binds a public interface.
    assert Guard.from_settings(Settings(host="0.0.0.0", allowed_hosts="")).hosts.allows("api.example.com")
    assert not Guard.from_settings(Settings(host="127.0.0.1", allowed_hosts="")).hosts.allows("api.example.com")


# ------------------------------------------------------------------------------------------------ headers


async def test_security_headers_on_every_response(http: httpx.AsyncClient) -> None:
    """nosniff, no-referrer and DENY on API, error, docs and demo responses; the CSP on the demo's files only."""
    responses = {
        path: await http.get(path)
        for path in ("/users?limit=1", "/users/0", "/healthz", "/openapi.json", "/docs", "/", "/app.js")
    }
    for path, response in responses.items():
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "no-referrer", path
        assert response.headers["x-frame-options"] == "DENY", path
    for path in ("/", "/app.js"):
        policy = responses[path].headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert f"ws://{http.base_url.netloc.decode()}" in policy
    for path in ("/users?limit=1", "/docs", "/openapi.json"):
        assert "content-security-policy" not in responses[path].headers, path


# Collects every CSP violation the page reports, from its first script on.
_RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


async def test_demo_page_goes_live_under_its_csp(server: ServerProcess, artifacts_dir: Path) -> None:
    """In Chromium the demo page, served with its Content-Security-Policy, goes live and reports no violation."""
    async with async_playwright() as playwright:
        browser = await launch(playwright)
        try:
            context = await browser.new_context()
            await context.add_init_script(_RECORD_VIOLATIONS)
            demo = await DemoPage.new(context, "csp")
            try:
                async with demo.page.expect_response(lambda r: r.url == server.base_url + "/") as document:
                    await demo.load(server.base_url)
                assert "default-src 'self'" in (await (await document.value).all_headers())["content-security-policy"]
                await demo.create_user("Csp Check", f"csp.{secrets.token_hex(4)}@example.com")
                violations = await demo.page.evaluate("window.__cspViolations")
            finally:
                demo.save_console(artifacts_dir / "demo-csp-console.log")
            assert violations == []
            assert not [line for line in demo.console if "Content Security Policy" in line], demo.console
            assert demo.page_errors == []
        finally:
            await browser.close()
