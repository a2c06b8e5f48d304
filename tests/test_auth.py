"""Bearer tokens against real `realtime serve` processes with a token key: REST and WebSocket refuse what does
not prove an identity, say why, and serve what does; connections re-authenticate and end when their token does."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from realtime.dsn import Dsn
from realtime.errors import PROBLEM_JSON
from tests.support.server import ServerProcess, running_server

SECRET = "test-secret-" + "s" * 40
OTHER_SECRET = "other-secret-" + "o" * 40
AUDIENCE = "realtime-tests"


def make_token(
    secret: Any = SECRET,
    *,
    sub: str = "1",
    ttl: float = 3600,
    algorithm: str = "HS256",
    kid: str | None = None,
    **claims: Any,
) -> str:
    payload = {"sub": sub, "exp": int(time.time() + ttl), "aud": AUDIENCE, "role": "member", **claims}
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, secret, algorithm=algorithm, headers=headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
async def secured(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server verifying HS256 tokens with a required audience and no leeway."""
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE, "AUTH_LEEWAY_S": "0", "AUTH_TIMEOUT_S": "1"}
    async with running_server(database_url, artifacts_dir / "auth.log", env=env) as server:
        yield server


@pytest.fixture
async def client(secured: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=secured.base_url, timeout=10.0) as http:
        yield http


def assert_unauthorized(response: httpx.Response, detail: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    problem = response.json()
    assert problem["type"] == "/problems/unauthorized"
    assert detail in problem["detail"], problem


# A token for each way to fail, and the words the refusal must contain.
BAD_TOKENS = {
    "expired": (lambda: make_token(ttl=-60), "token expired"),
    "wrong-signature": (lambda: make_token(OTHER_SECRET), "bad signature"),
    "alg-none": (lambda: make_token(None, algorithm="none"), "algorithm 'none' is not accepted"),
    "wrong-audience": (lambda: make_token(aud="someone-else"), "wrong audience"),
    "no-exp": (lambda: jwt.encode({"sub": "1", "aud": AUDIENCE}, SECRET), "'exp'"),
    "malformed": (lambda: "not-a-jwt", "malformed token"),
}


async def test_rest_without_a_token_is_401(client: httpx.AsyncClient) -> None:
    """Every users route answers 401 problem+json with a Bearer challenge when no token is sent."""
    for method, path in (("GET", "/users"), ("POST", "/users"), ("GET", "/users/1"), ("PATCH", "/users/1")):
        assert_unauthorized(await client.request(method, path, json={}), "missing bearer token")
    assert_unauthorized(await client.delete("/users/1"), "missing bearer token")
    response = await client.get("/users", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_unauthorized(response, "must be `Bearer <token>`")


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_rest_refuses_a_bad_token_saying_why(client: httpx.AsyncClient, kind: str) -> None:
    """An expired, forged, unsigned, wrongly addressed or malformed token gets 401 with a precise detail."""
    token, detail = BAD_TOKENS[kind]
    assert_unauthorized(await client.get("/users", headers=bearer(token())), detail)


async def test_rest_serves_a_valid_token(client: httpx.AsyncClient) -> None:
    """A valid token creates, reads, updates and deletes a user."""
    headers = bearer(make_token())
    email = f"{uuid.uuid4().hex}@example.com"
    created = await client.post("/users", json={"name": "Ada", "email": email}, headers=headers)
    assert created.status_code == 201, created.text
    user_id = created.json()["id"]
    assert (await client.get(f"/users/{user_id}", headers=headers)).status_code == 200
    patched = await client.patch(
        f"/users/{user_id}", json={"name": "Ada L."}, headers={**headers, "If-Match": created.headers["etag"]}
    )
    assert patched.status_code == 200, patched.text
    assert (await client.delete(f"/users/{user_id}", headers=headers)).status_code == 204


async def test_probes_demo_page_and_openapi_stay_anonymous(client: httpx.AsyncClient) -> None:
    """/healthz, /readyz, the demo page and /openapi.json need no token; the users routes declare 401."""
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path
    paths = (await client.get("/openapi.json")).json()["paths"]
    for operations in paths.values():
        for method, operation in operations.items():
            if "users" in operation.get("tags", []):
                assert "401" in operation["responses"], method
