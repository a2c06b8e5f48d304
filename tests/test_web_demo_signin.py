"""Signing in on the demo page: `POST /auth/dev-token` exists only with AUTH_DEV_TOKENS, and under the example
row-level policy (docs/examples/policy.toml) two tabs signed in as two members each see their own row, without its
email, live, and never the other's.

The browser is Debian's Chromium driven by playwright (tests/support/browser.py). The servers run on the suite's
shared database, so each test makes its own users and looks rows up by id. Absence is proved by order, not by
waiting: a page that has received a later change of its own row has received every change before it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from playwright.async_api import expect

from realtime.auth.dev_tokens import PATH, TTL_S
from realtime.dsn import Dsn
from realtime.errors import PROBLEM_JSON
from tests.support.browser import STREAM_TIMEOUT_MS, DemoPage, OpenDemo
from tests.support.server import ServerProcess, free_port, running_server
from tests.test_auth import run_cli

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "docs" / "examples" / "policy.toml"
SECRET = "demo-signin-secret-" + "d" * 40


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def dev_server(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server that verifies tokens, signs development ones, and applies the example policy."""
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_DEV_TOKENS": "true", "AUTH_POLICY_FILE": str(POLICY)}
    async with running_server(database_url, artifacts_dir / "web-demo-signin.log", env=env) as server:
        yield server


@pytest.fixture(scope="module")
async def tokens_server(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server that verifies tokens and, as by default, signs none."""
    env = {"AUTH_JWT_SECRET": SECRET}
    async with running_server(database_url, artifacts_dir / "web-demo-signin-off.log", env=env) as server:
        yield server


# ---------------------------------------------------------------------------------------------- helpers


async def dev_token(http: httpx.AsyncClient, sub: str, role: str) -> str:
    response = await http.post(PATH, json={"sub": sub, "role": role})
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


async def create_user(http: httpx.AsyncClient, token: str, name: str) -> dict[str, Any]:
    email = f"signin.{secrets.token_hex(4)}@example.com"
    response = await http.post("/users", json={"name": name, "email": email}, headers=bearer(token))
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


async def rename(http: httpx.AsyncClient, token: str, user: dict[str, Any], name: str) -> None:
    headers = {**bearer(token), "If-Match": f'"{user["version"]}"'}
    response = await http.patch(f"/users/{user['id']}", json={"name": name}, headers=headers)
    assert response.status_code == 200, response.text


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sign_in(page: DemoPage, base_url: str, sub: str, role: str = "member") -> int:
    """Open the demo without a token, wait for the server's refusal, and sign in with the picker; returns how many
    frames the page had received before (the refusal among them)."""
    await page.page.goto(base_url + "/")
    await expect(page.status).to_have_text("unauthorized", timeout=STREAM_TIMEOUT_MS)
    form = page.page.get_by_test_id("signin-form")
    await expect(form).to_be_visible()
    before = len(page.received_frames)
    await form.get_by_test_id("signin-sub").fill(sub)
    await form.get_by_test_id("signin-role").select_option(role)
    await form.get_by_test_id("signin-submit").click()
    return before


def frames_since(page: DemoPage, start: int) -> list[dict[str, Any]]:
    return [frame for _, frame in page.received_frames[start:]]


def rows_received(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row (or old row, or key) of these snapshot and change frames."""
    rows: list[dict[str, Any]] = []
    for frame in frames:
        if frame.get("type") == "snapshot":
            rows.extend(frame["rows"])
        elif frame.get("type") == "change":
            rows.extend(frame[part] for part in ("row", "old", "key") if part in frame)
    return rows


# ------------------------------------------------------------------------------------------ the endpoint


async def test_dev_token_is_signed_for_the_asked_identity_and_accepted(dev_server: ServerProcess) -> None:
    """With AUTH_DEV_TOKENS a POST returns an HS256 token for that sub and role, with its exp; REST accepts it."""
    async with httpx.AsyncClient(base_url=dev_server.base_url, timeout=10.0) as http:
        response = await http.post(PATH, json={"sub": "7", "role": "admin"})
        assert response.status_code == 200, response.text
        body = response.json()
        claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
        assert (claims["sub"], claims["role"], claims["exp"]) == ("7", "admin", body["exp"])
        assert abs(body["exp"] - time.time() - TTL_S) < 60
        assert (await http.get("/users", headers=bearer(body["token"]))).status_code == 200
        no_role = await http.post(PATH, json={"sub": "8"})
        assert no_role.status_code == 200, no_role.text
        assert "role" not in jwt.decode(no_role.json()["token"], SECRET, algorithms=["HS256"])
        assert PATH in (await http.get("/openapi.json")).json()["paths"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "sub"),
        ({"sub": ""}, "sub"),
        ({"sub": "1 2", "role": "member"}, "sub"),
        ({"sub": "1", "role": 3}, "role"),
        ({"sub": "1", "ttl": 99999}, "ttl"),
        ("not json", "body"),
    ],
)
async def test_dev_token_refuses_bad_bodies_as_problem_json(dev_server: ServerProcess, body: Any, field: str) -> None:
    """A missing or malformed sub or role, an unknown key or a body that is not JSON gets a 422 problem naming it."""
    async with httpx.AsyncClient(base_url=dev_server.base_url, timeout=10.0) as http:
        if isinstance(body, str):
            response = await http.post(PATH, content=body, headers={"Content-Type": "application/json"})
        else:
            response = await http.post(PATH, json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert problem["type"] == "/problems/validation-error"
    assert field in [error["field"] for error in problem["errors"]], problem


async def test_dev_token_route_does_not_exist_when_the_setting_is_off(tokens_server: ServerProcess) -> None:
    """Without AUTH_DEV_TOKENS the path is answered like one that never existed, and OpenAPI does not list it."""
    async with httpx.AsyncClient(base_url=tokens_server.base_url, timeout=10.0) as http:
        asked = await http.post(PATH, json={"sub": "1", "role": "admin"})
        never_existed = await http.post("/auth/no-such-route", json={"sub": "1", "role": "admin"})
        assert (await http.get(PATH)).status_code == 404
        paths = (await http.get("/openapi.json")).json()["paths"]
    assert asked.status_code == 404, asked.text
    assert (asked.status_code, asked.json()["type"]) == (never_existed.status_code, never_existed.json()["type"])
    assert "token" not in asked.json()
    assert not [path for path in paths if path.startswith("/auth")], paths


async def test_dev_tokens_need_a_secret_and_a_loopback_address(database_url: Dsn, tmp_path: Path) -> None:
    """AUTH_DEV_TOKENS without AUTH_JWT_SECRET is a configuration error; `serve` refuses it on a public address."""
    no_secret = await asyncio.to_thread(run_cli, tmp_path, "serve", "--port", str(free_port()), AUTH_DEV_TOKENS="true")
    assert no_secret.returncode == 2, no_secret.stderr
    assert "AUTH_DEV_TOKENS needs AUTH_JWT_SECRET" in no_secret.stderr

    public = await asyncio.to_thread(
        run_cli,
        tmp_path,
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        AUTH_DEV_TOKENS="true",
        AUTH_JWT_SECRET=SECRET,
        DATABASE_URL=database_url.libpq(),
    )
    assert public.returncode == 2, public.stderr
    assert "refusing AUTH_DEV_TOKENS on 0.0.0.0" in public.stderr
    assert "Uvicorn running" not in public.stderr


# ------------------------------------------------------------------------------------------ the demo page


async def test_two_members_in_two_tabs_see_only_their_own_rows_live(
    dev_server: ServerProcess, demo_page: OpenDemo
) -> None:
    """Members A and B, signed in with the picker in two browsers, each see only their own row, without its email;
    an admin's update of A's row appears live in A's tab and never in B's."""
    page_a, page_b = await demo_page("a"), await demo_page("b")
    async with httpx.AsyncClient(base_url=dev_server.base_url, timeout=10.0) as http:
        admin = await dev_token(http, "admin", "admin")
        a = await create_user(http, admin, "Member A")
        b = await create_user(http, admin, "Member B")

        signed_in: dict[str, int] = {}
        for page, user in ((page_a, a), (page_b, b)):
            signed_in[page.name] = await sign_in(page, dev_server.base_url, str(user["id"]))
            await page.wait_ready()
            await expect(page.page.get_by_test_id("identity")).to_have_text(f"{user['id']} · member")
            await expect(page.page.get_by_test_id("user-row")).to_have_count(1)
            await expect(page.cell(user["id"], "name")).to_have_text(user["name"])
            email = page.cell(user["id"], "email")
            await expect(email).to_have_text("—")
            await expect(email).to_have_attribute("data-withheld", "")
            await expect(page.page.get_by_test_id("token-panel")).to_be_hidden()
            assert "token" not in page.page.url, page.page.url

        await rename(http, admin, a, "Member A, renamed")
        await expect(page_a.cell(a["id"], "name")).to_have_text("Member A, renamed", timeout=STREAM_TIMEOUT_MS)
        await expect(page_a.cell(a["id"], "version")).to_have_text("2")
        # B's own change commits after A's: once B shows it, B has been sent everything it would ever get of A's.
        await rename(http, admin, b, "Member B, renamed")
        await expect(page_b.cell(b["id"], "name")).to_have_text("Member B, renamed", timeout=STREAM_TIMEOUT_MS)

    await expect(page_b.any_row(a["id"])).to_have_count(0)
    await expect(page_a.any_row(b["id"])).to_have_count(0)
    for page, user in ((page_a, a), (page_b, b)):
        frames = frames_since(page, signed_in[page.name])
        received = rows_received(frames)
        assert {row["id"] for row in received} == {user["id"]}, received
        assert not [row for row in received if "email" in row], received
        assert not [frame for frame in frames if frame.get("type") == "error"], frames


async def test_sign_in_without_dev_tokens_says_how_to_mint_one(
    tokens_server: ServerProcess, demo_page: OpenDemo
) -> None:
    """Where the server signs no development tokens, the picker names the `realtime token` command to run instead,
    and a token minted that way signs the page in."""
    page = await demo_page("page")
    await sign_in(page, tokens_server.base_url, "5", "admin")
    message = page.page.get_by_test_id("signin-message")
    await expect(message).to_contain_text("AUTH_DEV_TOKENS is off", timeout=STREAM_TIMEOUT_MS)
    await expect(message.locator("code")).to_have_text("realtime token --sub 5 --role admin")
    await expect(page.page.get_by_test_id("token-input")).to_be_focused()

    minted = jwt.encode({"sub": "5", "role": "admin", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    await page.page.get_by_test_id("token-input").fill(minted)
    await page.page.get_by_test_id("token-submit").click()
    await page.wait_ready()
    await expect(page.page.get_by_test_id("identity")).to_have_text("5 · admin")
