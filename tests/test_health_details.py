"""What /readyz tells whom, against real `realtime serve` processes with a token key: the status (and its 200 or
503) to everybody, what it found (database, listener) only to operator tokens or with HEALTH_DETAILS=public.

An open server keeps showing everything to everybody; tests/test_users_api.py and the fault tests read the
details from the shared open server without a token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from realtime.config import Settings
from realtime.dsn import Dsn
from tests.support.faults import OutageProxy
from tests.support.server import ServerProcess, running_server
from tests.test_auth import AUDIENCE, BAD_TOKENS, SECRET, bearer, make_token
from tests.test_auth import secured as secured  # the module's server with a token key, shared as a fixture

pytestmark = pytest.mark.timeout(60)

AUTH = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE}


async def readyz(server: ServerProcess, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:
        response = await client.get("/readyz", headers=headers)
    assert response.headers["content-type"] == "application/json", response.text
    body: dict[str, Any] = response.json()
    return response.status_code, body


def assert_details(body: dict[str, Any], status: str) -> None:
    assert body["status"] == status, body
    assert set(body) == {"status", "database", "listener"}, body
    assert {"state", "position", "reconnects", "subscriptions"} <= set(body["listener"]), body


@pytest.fixture
def proxy(admin_url: Dsn) -> Iterator[OutageProxy]:
    """A proxy in front of PostgreSQL that can make the database refuse connections."""
    running = OutageProxy(admin_url)
    running.start()
    try:
        yield running
    finally:
        running.close()


async def test_anonymous_probes_get_the_status_alone(secured: ServerProcess) -> None:
    """Without a token, /readyz answers 200 {"status": "ready"} and /healthz 200 {"status": "ok"}."""
    assert await readyz(secured) == (200, {"status": "ready"})
    async with httpx.AsyncClient(base_url=secured.base_url, timeout=10.0) as client:
        response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_a_token_without_an_operator_role_gets_the_status_alone(secured: ServerProcess) -> None:
    """A valid token whose role is not an operator role, or that has no role, sees no more than the anonymous."""
    assert await readyz(secured, bearer(make_token(role="member"))) == (200, {"status": "ready"})
    assert await readyz(secured, bearer(make_token(role=None))) == (200, {"status": "ready"})


async def test_an_operator_token_gets_the_details(secured: ServerProcess) -> None:
    """A valid token with the role `operator` (the default AUTH_OPERATOR_ROLES) sees the database and listener."""
    status, body = await readyz(secured, bearer(make_token(role="operator")))
    assert status == 200
    assert_details(body, "ready")
    assert (body["database"], body["listener"]["state"]) == ("ok", "live")


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_a_bad_token_is_not_refused_and_gets_the_status_alone(secured: ServerProcess, kind: str) -> None:
    """An invalid token, even one claiming the operator role, gets 200 and the anonymous body, never 401."""
    token, _ = BAD_TOKENS[kind]
    assert await readyz(secured, bearer(token())) == (200, {"status": "ready"})
    forged = make_token("not-the-server-secret-" + "x" * 40, role="operator")
    assert await readyz(secured, bearer(forged)) == (200, {"status": "ready"})
    assert await readyz(secured, {"Authorization": "Basic dXNlcjpwYXNz"}) == (200, {"status": "ready"})


async def test_health_details_public_shows_the_details_to_everybody(database_url: Dsn, artifacts_dir: Path) -> None:
    """With HEALTH_DETAILS=public and a token key, an anonymous probe sees the database and listener."""
    env = {**AUTH, "HEALTH_DETAILS": "public"}
    async with running_server(database_url, artifacts_dir / "health-public.log", env=env) as server:
        status, body = await readyz(server)
    assert status == 200
    assert_details(body, "ready")


async def test_not_ready_keeps_its_503_and_hides_the_reason_from_the_anonymous(
    database_url: Dsn, proxy: OutageProxy, artifacts_dir: Path
) -> None:
    """While the database refuses connections, /readyz is 503 for everybody; only an operator learns why."""
    log_path = artifacts_dir / "health-not-ready.log"
    async with running_server(proxy.url(database_url), log_path, env=AUTH) as server:
        proxy.refuse()
        assert await readyz(server) == (503, {"status": "not_ready"})
        assert await readyz(server, bearer(make_token(role="member"))) == (503, {"status": "not_ready"})
        status, body = await readyz(server, bearer(make_token(role="operator")))
        assert status == 503
        assert_details(body, "not_ready")
        assert body["database"].startswith("unreachable: "), body
        proxy.restore()


def test_operator_roles_are_a_comma_separated_list() -> None:
    """AUTH_OPERATOR_ROLES is split at commas with blanks ignored; empty means no role sees the details."""
    assert Settings(auth_operator_roles=" ops , sre,,").operator_roles == {"ops", "sre"}
    assert Settings(auth_operator_roles="").operator_roles == frozenset()
