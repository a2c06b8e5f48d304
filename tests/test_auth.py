"""Bearer tokens against real `realtime serve` processes with a token key: REST and WebSocket refuse what does
not prove an identity, say why, and serve what does; connections re-authenticate and end when their token does."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from websockets.exceptions import ConnectionClosed

from realtime.dsn import Dsn
from realtime.errors import PROBLEM_JSON
from tests.support.server import ServerProcess, free_port, running_server
from tests.support.tables import committed_changes, create_streamed_table
from tests.support.waiting import eventually
from tests.support.ws import Frame, StreamClient

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
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE, "AUTH_LEEWAY_S": "0", "AUTH_TIMEOUT_S": "2"}
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
BAD_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
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
    """/healthz, /readyz, the demo page and /openapi.json need no token; the users, SSE and /metrics routes declare
    401 and the bearer scheme."""
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path
    description = (await client.get("/openapi.json")).json()
    assert description["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for operations in description["paths"].values():
        for method, operation in operations.items():
            if {"users", "stream", "operations"} & set(operation.get("tags", [])):
                assert "401" in operation["responses"], method
                assert operation["security"] == [{"bearerAuth": []}], method
            else:
                assert "security" not in operation, method


async def test_an_open_server_describes_no_bearer_scheme(http: httpx.AsyncClient) -> None:
    """Without a token key the OpenAPI description asks for no credentials (its clients would send none)."""
    description = (await http.get("/openapi.json")).json()
    assert "securitySchemes" not in description.get("components", {})
    assert not [op for ops in description["paths"].values() for op in ops.values() if "security" in op]


# --- WebSocket ------------------------------------------------------------------------------------------------


async def authenticated(url: str, token: str) -> StreamClient:
    client = await StreamClient.open(url)
    reply = await client.request({"type": "auth", "token": token})
    assert reply["type"] == "authenticated", reply
    return client


async def frames_until_closed(client: StreamClient, timeout: float) -> tuple[list[Frame], int, str]:
    """Every frame until the server closes the connection, and the close code and reason."""
    frames: list[Frame] = []
    with pytest.raises(ConnectionClosed) as closed:
        await _collect(client, frames, timeout)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return frames, closed.value.rcvd.code, closed.value.rcvd.reason


async def _collect(client: StreamClient, frames: list[Frame], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            frames.append(await client.recv(timeout))


async def test_ws_frames_before_auth_are_unauthorized_then_the_deadline_closes_4001(secured: ServerProcess) -> None:
    """Before `auth` every frame gets `unauthorized` (the connection stays open); no auth in time closes 4001."""
    client = await StreamClient.open(secured.ws_url)
    try:
        for frame in ({"type": "ping"}, {"type": "subscribe", "id": "s1", "table": "users"}):
            error = await client.request(frame)
            assert (error["type"], error["code"]) == ("error", "unauthorized"), error
        assert error["id"] == "s1"
        frames, code, reason = await frames_until_closed(client, timeout=10)
        assert frames == []
        assert code == 4001
        assert reason.startswith("authentication required")
    finally:
        await client.close()


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_ws_refuses_a_bad_token_saying_why(secured: ServerProcess, kind: str) -> None:
    """An `auth` frame with a bad token gets `unauthorized` with a precise message; a good one then works."""
    token, message = BAD_TOKENS[kind]
    client = await StreamClient.open(secured.ws_url)
    try:
        error = await client.request({"type": "auth", "token": token()})
        assert (error["type"], error["code"]) == ("error", "unauthorized"), error
        assert message in error["message"]
        assert (await client.request({"type": "auth", "token": make_token()}))["type"] == "authenticated"
    finally:
        await client.close()


async def test_ws_auth_frames_are_validated(secured: ServerProcess) -> None:
    """An `auth` frame without a string token, with a token over 8 KiB, or with unknown fields gets `bad_message`."""
    client = await StreamClient.open(secured.ws_url)
    try:
        for frame in (
            {"type": "auth"},
            {"type": "auth", "token": 42},
            {"type": "auth", "token": "x" * 8193},
            {"type": "auth", "token": make_token(), "sub": "1"},
        ):
            error = await client.request(frame)
            assert (error["type"], error["code"]) == ("error", "bad_message"), error
        assert (await client.request({"type": "auth", "token": make_token()}))["type"] == "authenticated"
    finally:
        await client.close()


async def test_ws_valid_token_authenticates_and_streams(secured: ServerProcess, db: asyncpg.Connection) -> None:
    """A valid `auth` is answered `authenticated` (sub, role, exp); the client then subscribes and gets changes."""
    table = await create_streamed_table(db)
    token = make_token(sub="42", role="admin")
    client = await StreamClient.open(secured.ws_url)
    try:
        reply = await client.request({"type": "auth", "token": token})
        assert reply == {
            "type": "authenticated",
            "ref": reply["ref"],
            "sub": "42",
            "role": "admin",
            "exp": jwt.decode(token, options={"verify_signature": False})["exp"],
        }
        await client.subscribe("s1", table)
        await db.execute(f"INSERT INTO {table} (k) VALUES (1)")
        [change] = await client.changes(1)
        assert (change["op"], change["row"]["k"]) == ("INSERT", 1)
    finally:
        await client.close()


async def test_ws_refresh_with_the_same_sub_keeps_subscriptions_without_a_gap(
    secured: ServerProcess, db: asyncpg.Connection
) -> None:
    """A later `auth` for the same sub moves exp on; changes committed around it all arrive, once each, in order."""
    table = await create_streamed_table(db)
    client = await authenticated(secured.ws_url, make_token(ttl=60))
    try:
        await client.subscribe("s1", table)
        fresh = make_token(ttl=3600)

        async def write(count: int) -> None:
            for k in range(count):
                await db.execute(f"INSERT INTO {table} (k) VALUES ($1)", k)

        writing = asyncio.create_task(write(20))
        await client.send({"type": "auth", "ref": "refresh", "token": fresh})
        await writing
        await write(5)
        frames = await _frames(client, lambda frames: sum(f["type"] == "change" for f in frames) == 25)
        [reply] = [f for f in frames if f.get("ref") == "refresh"]
        assert reply["type"] == "authenticated"
        assert reply["exp"] == jwt.decode(fresh, options={"verify_signature": False})["exp"]
        seqs = [f["seq"] for f in frames if f["type"] == "change"]
        assert seqs == [change["seq"] for change in await committed_changes(db, table)]
    finally:
        await client.close()


async def _frames(client: StreamClient, done: Any, timeout: float = 10) -> list[Frame]:
    frames: list[Frame] = []
    async with asyncio.timeout(timeout):
        while not done(frames):
            frames.append(await client.recv(timeout))
    return frames


async def test_ws_auth_for_another_sub_is_forbidden(secured: ServerProcess) -> None:
    """An `auth` frame for a different sub gets `forbidden`; the connection keeps its identity and works."""
    client = await authenticated(secured.ws_url, make_token(sub="1"))
    try:
        error = await client.request({"type": "auth", "token": make_token(sub="2")})
        assert (error["type"], error["code"]) == ("error", "forbidden"), error
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        refreshed = await client.request({"type": "auth", "token": make_token(sub="1")})
        assert (refreshed["type"], refreshed["sub"]) == ("authenticated", "1")
    finally:
        await client.close()


async def test_ws_expiry_closes_4001_with_last_seq_and_a_reconnect_loses_nothing(
    secured: ServerProcess, db: asyncpg.Connection
) -> None:
    """At exp the server closes 4001 `token expired; last_seq=N`; a new token and `since` N resume with no loss."""
    table = await create_streamed_table(db)
    # exp is whole seconds, so this token lives 4 to 5 s: room for the subscribe and one change on a busy machine.
    client = await authenticated(secured.ws_url, make_token(ttl=5))
    try:
        await client.subscribe("s1", table)
        await db.execute(f"INSERT INTO {table} (k) VALUES (1)")
        frames, code, reason = await frames_until_closed(client, timeout=10)
    finally:
        await client.close()
    [change] = [f for f in frames if f["type"] == "change"]
    assert code == 4001
    assert reason == f"token expired; last_seq={change['seq']}"
    await db.execute(f"INSERT INTO {table} (k) VALUES (2), (3)")  # committed while disconnected

    again = await authenticated(secured.ws_url, make_token())
    try:
        _, replayed = await again.subscribe("s1", table, since=change["seq"])
        await db.execute(f"INSERT INTO {table} (k) VALUES (4)")
        [live] = await again.changes(1)
    finally:
        await again.close()
    received = [change, *replayed, live]
    assert [f["row"]["k"] for f in received] == [1, 2, 3, 4]
    assert [f["seq"] for f in received] == [c["seq"] for c in await committed_changes(db, table)]


async def test_ws_open_mode_accepts_auth_without_an_identity(server: ServerProcess) -> None:
    """With no token key, `auth` is answered `authenticated` with null sub, role and exp, and nothing else changes."""
    client = await StreamClient.open(server.ws_url)
    try:
        reply = await client.request({"type": "auth", "token": "anything"})
        assert reply == {"type": "authenticated", "ref": reply["ref"], "sub": None, "role": None, "exp": None}
        assert (await client.request({"type": "ping"}))["type"] == "pong"
    finally:
        await client.close()


# --- public keys: a PEM file, and an identity provider's JWKS ----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_hs256(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token whose HMAC key is `secret` (PyJWT itself refuses to use a public key as an HMAC secret)."""
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "1", "exp": int(time.time() + 3600), "aud": AUDIENCE, **extra}


async def test_rs256_tokens_are_verified_with_a_public_key_file(
    database_url: Dsn, artifacts_dir: Path, tmp_path: Path
) -> None:
    """With AUTH_PUBLIC_KEY_FILE, RS256 tokens of the key are served; HS256 "signed" with the public key is refused."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(pem)
    env = {"AUTH_PUBLIC_KEY_FILE": str(key_file), "AUTH_AUDIENCE": AUDIENCE}
    async with (
        running_server(database_url, artifacts_dir / "auth-pem.log", env=env) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http,
    ):
        good = jwt.encode(claims(), private_key, algorithm="RS256")
        assert (await http.get("/users", headers=bearer(good))).status_code == 200
        confused = forged_hs256(claims(), pem)
        assert_unauthorized(await http.get("/users", headers=bearer(confused)), "algorithm 'HS256' is not accepted")
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = jwt.encode(claims(), other_key, algorithm="RS256")
        assert_unauthorized(await http.get("/users", headers=bearer(forged)), "bad signature")
        client = await authenticated(server.ws_url, good)
        await client.close()


class KeySet:
    """A JWKS document served over HTTP on 127.0.0.1 from a thread, replaceable while it runs."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/.well-known/jwks.json"

    def publish(self, kid: str, jwk: dict[str, Any]) -> None:
        self.keys = [{**jwk, "kid": kid, "use": "sig"}]


@pytest.fixture
def key_set() -> Iterator[KeySet]:
    keys = KeySet()
    thread = threading.Thread(target=keys.http.serve_forever, daemon=True)
    thread.start()
    try:
        yield keys
    finally:
        keys.http.shutdown()
        keys.http.server_close()
        thread.join(timeout=5)


async def test_jwks_keys_are_fetched_by_kid_and_a_rotation_is_followed(
    database_url: Dsn, artifacts_dir: Path, key_set: KeySet
) -> None:
    """Tokens are verified with the JWKS key of their kid; after a rotation the new kid is fetched and served."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_set.publish("k1", {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "alg": "RS256"})
    env = {"AUTH_JWKS_URL": key_set.url, "AUTH_AUDIENCE": AUDIENCE, "AUTH_ROLE_CLAIM": "app_metadata.role"}
    async with (
        running_server(database_url, artifacts_dir / "auth-jwks.log", env=env) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http,
    ):
        first = jwt.encode(claims(app_metadata={"role": "editor"}), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        assert (await http.get("/users", headers=bearer(first))).status_code == 200
        client = await StreamClient.open(server.ws_url)
        reply = await client.request({"type": "auth", "token": first})
        await client.close()
        assert (reply["type"], reply["role"]) == ("authenticated", "editor")
        no_kid = jwt.encode(claims(), rsa_key, algorithm="RS256")
        assert_unauthorized(await http.get("/users", headers=bearer(no_kid)), "no key id")

        ec_key = ec.generate_private_key(ec.SECP256R1())
        rotated = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "k2"})
        assert_unauthorized(await http.get("/users", headers=bearer(rotated)), "unknown key id")
        key_set.publish("k2", {**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "alg": "ES256"})

        async def served() -> bool:
            return (await http.get("/users", headers=bearer(rotated))).status_code == 200

        await eventually(served, 10, "the rotated key k2 fetched and accepted")
        unsigned = jwt.encode(claims(), "", algorithm="none", headers={"kid": "k2"})  # "": no key, typed
        assert_unauthorized(await http.get("/users", headers=bearer(unsigned)), "algorithm 'none' is not accepted")
        assert 2 <= key_set.fetches <= 10  # fetched on demand, not per request


async def test_an_unreachable_jwks_is_a_retryable_refusal(database_url: Dsn, artifacts_dir: Path) -> None:
    """When the JWKS cannot be fetched, REST answers 503 with Retry-After and `auth` gets `unavailable`."""
    env = {"AUTH_JWKS_URL": f"http://127.0.0.1:{free_port()}/jwks.json"}
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"})
    async with (
        running_server(database_url, artifacts_dir / "auth-jwks-down.log", env=env) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http,
    ):
        response = await http.get("/users", headers=bearer(token))
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) > 0
        client = await StreamClient.open(server.ws_url)
        try:
            error = await client.request({"type": "auth", "token": token})
        finally:
            await client.close()
        assert (error["type"], error["code"]) == ("error", "unavailable"), error
        assert error["retry_after_ms"] > 0


def test_contradictory_auth_settings_are_refused_by_name(tmp_path: Path) -> None:
    """Two token keys, AUTH_MODE=none with a key, or a short secret stop the command with exit 2 and the reason."""
    key_file = tmp_path / "key.pem"
    cases = [
        ({"AUTH_JWT_SECRET": SECRET, "AUTH_JWKS_URL": "https://idp.example/jwks"}, "set only one of"),
        ({"AUTH_JWT_SECRET": SECRET, "AUTH_MODE": "none"}, "AUTH_MODE=none (serve open) contradicts"),
        ({"AUTH_JWT_SECRET": "too-short"}, "at least 32 bytes"),
        ({"AUTH_JWKS_URL": "ftp://idp.example/jwks"}, "https://"),
    ]
    for env, message in cases:
        result = run_cli(tmp_path, "token", "--sub", "1", **env)
        assert result.returncode == 2, (env, result.stderr)
        assert message in result.stderr, result.stderr
    key_file.write_text("not a key")
    result = run_cli(tmp_path, "serve", "--port", str(free_port()), AUTH_PUBLIC_KEY_FILE=str(key_file))
    assert result.returncode == 2
    assert "AUTH_PUBLIC_KEY_FILE is not a PEM public key" in result.stderr


# --- the command line -----------------------------------------------------------------------------------------


def cli_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """The test's environment without any AUTH_* setting, plus `env`."""
    base = {name: value for name, value in os.environ.items() if not name.startswith("AUTH_")}
    return {**base, "LOG_LEVEL": "info", "MIGRATE_ON_START": "false", **env}


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "realtime", *args],
        env=cli_env(tmp_path, **env),
        cwd=tmp_path,  # away from any .env file of the checkout
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_serve_refuses_to_run_open_on_a_public_address(database_url: Dsn, tmp_path: Path) -> None:
    """`serve --host 0.0.0.0` with no token key and no AUTH_MODE=none exits 2 with the reason, before binding."""
    port = free_port()
    result = await asyncio.to_thread(
        run_cli, tmp_path, "serve", "--host", "0.0.0.0", "--port", str(port), DATABASE_URL=database_url.libpq()
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to serve without authentication on 0.0.0.0" in result.stderr
    assert "AUTH_MODE=none" in result.stderr
    assert "Uvicorn running" not in result.stderr


def _start_on_all_interfaces(database_url: Dsn, tmp_path: Path, **env: str) -> ServerProcess:
    """`realtime serve --host 0.0.0.0` on a free port (ServerProcess itself binds loopback only)."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "realtime", "serve", "--host", "0.0.0.0", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=cli_env(tmp_path, DATABASE_URL=database_url.libpq(), **env),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServerProcess(database=database_url, log_path=log_path, port=port, process=process)


async def test_serve_runs_open_on_a_public_address_only_with_auth_mode_none(database_url: Dsn, tmp_path: Path) -> None:
    """With AUTH_MODE=none `serve --host 0.0.0.0` starts, logs a warning, and serves /users without a token."""
    server = await asyncio.to_thread(_start_on_all_interfaces, database_url, tmp_path, AUTH_MODE="none")
    try:
        await asyncio.to_thread(server.wait_ready)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http:
            assert (await http.get("/users")).status_code == 200
        assert "serving WITHOUT authentication on 0.0.0.0 (AUTH_MODE=none)" in server.log_text()
    finally:
        await asyncio.to_thread(server.terminate)


async def test_token_command_prints_a_token_the_server_accepts(secured: ServerProcess, tmp_path: Path) -> None:
    """`realtime token --sub 7 --role admin` signs with AUTH_JWT_SECRET a token REST and /ws accept as sub 7."""
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE}
    result = await asyncio.to_thread(
        run_cli, tmp_path, "token", "--sub", "7", "--role", "admin", "--ttl", "600", "--claim", "team=blue", **env
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert (claims["sub"], claims["role"], claims["team"]) == ("7", "admin", "blue")
    assert claims["exp"] - claims["iat"] == 600
    async with httpx.AsyncClient(base_url=secured.base_url, timeout=10.0) as http:
        assert (await http.get("/users", headers=bearer(token))).status_code == 200
    client = await authenticated(secured.ws_url, token)
    await client.close()

    refused = await asyncio.to_thread(run_cli, tmp_path, "token", "--sub", "7")
    assert refused.returncode == 2
    assert "AUTH_JWT_SECRET is not set" in refused.stderr
