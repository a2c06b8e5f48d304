"""The browser client (web_demo/realtime.js) against a real `realtime serve` with a token key, in real Chromium:
it authenticates before subscribing, refreshes its token on the open connection before `exp`, stops at a token
the server refuses instead of reconnecting in a loop, and after an expired-token close (4001) reconnects with a
new token and resumes without loss. The demo page takes a token from its URL fragment or its token form.

Tokens are HS256 JWTs minted here with the server's secret; the server allows no leeway on `exp`, so a token
minted to live a few seconds really ends the connection then. Each client's `getToken` answers what the test
gave it last (tests/support/browser.py, `ClientTab.set_token`). What a client delivered is checked against the
ground truth, `realtime.changes`: every change after the subscription's first position, in order, none twice.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from playwright.async_api import Browser, BrowserContext, expect

from realtime.dsn import Dsn
from tests.support.browser import STREAM_TIMEOUT_MS, ClientTab, OpenDemo
from tests.support.faults import FAST_RECOVERY, stream_database
from tests.support.server import ServerProcess, running_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(60)

SECRET = "web-client-secret-" + "w" * 40
OTHER_SECRET = "not-the-server-secret-" + "x" * 40
# Short timers, as in tests/test_web_client_recovery.py: reconnects 0-500 ms apart, so a client that looped
# would open several sockets within a second or two.
FAST_CLIENT: dict[str, Any] = {
    "pingInterval": 250,
    "pongTimeout": 750,
    "connectTimeout": 1000,
    "backoff": {"initial": 100, "max": 500},
}
WITH_TOKEN = {**FAST_CLIENT, "withToken": "async"}
# How long a client that stopped must stay quiet: several of its reconnect delays, and the server's AUTH_TIMEOUT_S.
QUIET_MS = 2500

OpenClient = Callable[..., Awaitable[ClientTab]]


def make_token(*, sub: str = "web", ttl: float = 3600, secret: str = SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")


def exp_of(token: str) -> int:
    exp: int = jwt.decode(token, options={"verify_signature": False})["exp"]
    return exp


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def client_db(admin_url: Dsn) -> AsyncIterator[Dsn]:
    """A database of this module's own (users, and the streamed tables `ticks` and `docs`)."""
    async with stream_database(admin_url) as url:
        yield url


@pytest.fixture(scope="module")
async def secured(client_db: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server verifying HS256 tokens, with no leeway on `exp` and 2 s to authenticate."""
    env = {**FAST_RECOVERY, "AUTH_JWT_SECRET": SECRET, "AUTH_LEEWAY_S": "0", "AUTH_TIMEOUT_S": "2"}
    async with running_server(client_db, artifacts_dir / "web-client-auth.log", env=env) as server:
        yield server


@pytest.fixture(scope="module")
async def open_server(client_db: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server with no token key, on the same database."""
    async with running_server(client_db, artifacts_dir / "web-client-auth-open.log", env=FAST_RECOVERY) as server:
        yield server


@pytest.fixture
async def admin(client_db: Dsn) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection for writing and for reading the ground truth."""
    conn = await asyncpg.connect(client_db.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context()
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest.fixture
async def open_client(
    context: BrowserContext, artifacts_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[OpenClient]:
    """Open tabs running a client of the test's own; none of them may throw."""
    tabs: list[ClientTab] = []

    async def open_(base_url: str, options: dict[str, Any]) -> ClientTab:
        tab = await ClientTab.open(context, base_url, options)
        tabs.append(tab)
        return tab

    yield open_
    for number, tab in enumerate(tabs):
        tab.save_console(artifacts_dir / f"{request.node.name}-client{number}-console.log")
    errors = [error for tab in tabs for error in tab.page_errors]
    assert not errors, f"uncaught errors in the page: {errors}"


# ---------------------------------------------------------------------------------------------- helpers


async def add_ticks(conn: asyncpg.Connection, count: int) -> None:
    """Commit `count` changes to `ticks`, one transaction each."""
    for n in range(count):
        await conn.execute("INSERT INTO ticks (writer, n) VALUES (0, $1)", n)


async def ticks_seqs(conn: asyncpg.Connection, after: int) -> list[int]:
    """The ground truth: positions of every committed change to `ticks` after `after`, in order."""
    rows = await conn.fetch(
        "SELECT seq FROM realtime.changes WHERE table_schema = 'public' AND table_name = 'ticks' AND seq > $1"
        " ORDER BY seq",
        after,
    )
    return [row["seq"] for row in rows]


async def live_on_ticks(tab: ClientTab) -> tuple[str, int]:
    """Connect, subscribe to `ticks` with a snapshot and wait until live; returns the id and first position."""
    sub_id = await tab.subscribe({"table": "ticks", "snapshot": True})
    await tab.connect()
    index = await tab.wait_for("subscribed", id=sub_id)
    start: int = (await tab.log())[index]["seq"]
    return sub_id, start


async def assert_everything_once(tab: ClientTab, sub_id: str, admin: asyncpg.Connection, start: int) -> None:
    """Commit one more change, wait for it, and check the subscription delivered exactly the ground truth."""
    await add_ticks(admin, 1)
    truth = await ticks_seqs(admin, start)
    await tab.wait_change_at_least(sub_id, truth[-1])
    delivered = await tab.changes(sub_id)
    assert delivered == truth, f"delivered {delivered}, committed {truth}"


def wire(log: list[dict[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
    """The frames of a client's log as (sent | received, socket number, frame), in order."""
    return [(e["kind"], e["socket"], e["frame"]) for e in log if e["kind"] in ("sent", "received")]


# ------------------------------------------------------------------------------------------------- tests


async def test_client_authenticates_first_and_subscribes_once_authenticated(
    secured: ServerProcess, open_client: OpenClient, admin: asyncpg.Connection
) -> None:
    """With getToken the first frame is `auth`, subscribes go out only after `authenticated`, and changes flow."""
    tab = await open_client(secured.base_url, WITH_TOKEN)
    token = make_token(sub="ada")
    await tab.set_token(token)
    sub_id, start = await live_on_ticks(tab)
    await assert_everything_once(tab, sub_id, admin, start)

    frames = wire(await tab.log())
    assert frames[0] == ("sent", 1, {"type": "auth", "ref": frames[0][2]["ref"], "token": token}), frames[0]
    answered = next(i for i, (kind, _, f) in enumerate(frames) if kind == "received" and f["type"] == "authenticated")
    assert frames[answered][2]["sub"] == "ada"
    assert frames[answered][2]["exp"] == exp_of(token)
    first_request = next(i for i, (kind, _, f) in enumerate(frames) if kind == "sent" and f["type"] != "auth")
    assert first_request > answered, frames[: answered + 2]
    assert not [f for kind, _, f in frames if kind == "received" and f["type"] == "error"], frames
    assert {socket for _, socket, _ in frames} == {1}
    [reported] = await tab.log("authenticated")
    assert (reported["sub"], reported["role"], reported["exp"]) == ("ada", None, exp_of(token))


async def test_token_is_refreshed_before_exp_on_the_same_connection_with_no_gap(
    secured: ServerProcess, open_client: OpenClient, admin: asyncpg.Connection
) -> None:
    """A token about to expire is replaced through getToken before exp, on the open socket: no close, no gap."""
    tab = await open_client(secured.base_url, WITH_TOKEN)
    short = make_token(ttl=4)
    await tab.set_token(short)
    sub_id, start = await live_on_ticks(tab)
    fresh = make_token(ttl=3600)
    await tab.set_token(fresh)  # what the refresh will get

    async def writing_until_past_the_first_exp() -> bool:
        # Changes keep committing across the refresh and past the moment the first token ends.
        await add_ticks(admin, 1)
        return time.time() > exp_of(short) + 1.5

    await eventually(writing_until_past_the_first_exp, 15, "past the short token's exp", interval=0.1)
    await assert_everything_once(tab, sub_id, admin, start)

    log = await tab.log()
    assert not [e for e in log if e["kind"] == "disconnect"], [e for e in log if e["kind"] == "disconnect"]
    assert [e["socket"] for e in log if e["kind"] == "socket"] == [1]
    auths = [f["token"] for kind, _, f in wire(log) if kind == "sent" and f["type"] == "auth"]
    assert auths == [short, fresh]
    assert [e["exp"] for e in log if e["kind"] == "authenticated"] == [exp_of(short), exp_of(fresh)]
    asked = [e["wall"] for e in log if e["kind"] == "token"]
    assert len(asked) == 2, asked
    assert asked[1] < exp_of(short) * 1000, "the refresh was asked for only after exp"
    assert await tab.status() == "live"


@pytest.mark.parametrize("case", ["bad-signature", "no-get-token", "forbidden-refresh"])
async def test_a_refused_identity_ends_in_unauthorized_without_reconnecting(
    secured: ServerProcess, open_client: OpenClient, case: str
) -> None:
    """A token the server refuses (or none, or another user's on refresh) ends in `unauthorized`, with no retries."""
    if case == "no-get-token":
        tab = await open_client(secured.base_url, FAST_CLIENT)
    else:
        tab = await open_client(secured.base_url, WITH_TOKEN)
        if case == "bad-signature":
            await tab.set_token(make_token(secret=OTHER_SECRET))
        else:
            await tab.set_token(make_token(sub="ada", ttl=3))
    sub_id = await tab.subscribe({"table": "ticks"})
    await tab.connect()
    if case == "forbidden-refresh":
        await tab.wait_for("subscribed", id=sub_id)
        await tab.set_token(make_token(sub="bob"))  # the refresh brings another user's token

    stopped = await tab.wait_for("status", status="unauthorized")
    expected = "forbidden" if case == "forbidden-refresh" else "unauthorized"
    await tab.wait_for("client-error", code=expected)
    # A client that retried would open a new socket within its 500 ms backoff cap; this one stays put.
    await tab.expect_none("socket", within_ms=QUIET_MS, after=stopped)
    log = await tab.log()
    assert [e["socket"] for e in log if e["kind"] == "socket"] == [1]
    assert not [e for e in log[stopped + 1 :] if e["kind"] in ("sent", "status")], log[stopped:]
    assert await tab.status() == "unauthorized"
    # Kept, not failed: a later connect() with a token that works resumes it.
    assert await tab.state(sub_id) != "failed"
    expected_tokens = {"no-get-token": 0, "bad-signature": 1, "forbidden-refresh": 2}[case]
    assert len([e for e in log if e["kind"] == "token"]) == expected_tokens


async def test_expired_token_close_reconnects_with_a_new_token_and_resumes_without_loss(
    secured: ServerProcess, open_client: OpenClient, admin: asyncpg.Connection
) -> None:
    """A 4001 `token expired` close (the refresh never came) leads to a new connection with a new token and a resume."""
    tab = await open_client(secured.base_url, WITH_TOKEN)
    short = make_token(ttl=3)
    await tab.set_token(short, then_hold=True)  # the refresh waits on getToken until the server gives up
    sub_id, start = await live_on_ticks(tab)
    await add_ticks(admin, 1)
    await tab.wait_change_at_least(sub_id, (await ticks_seqs(admin, start))[-1])

    lost = await tab.wait_for("disconnect", timeout_ms=10_000, code=4001)
    reason = (await tab.log())[lost]["reason"]
    assert reason.startswith("token expired; last_seq="), reason
    await tab.wait_for("status", after=lost, status="reconnecting")
    await add_ticks(admin, 2)  # committed while the client waits for a token
    fresh = make_token()
    await tab.set_token(fresh)

    back = await tab.wait_for("subscribed", after=lost, id=sub_id)
    await tab.wait_for("status", after=lost, status="live")
    await assert_everything_once(tab, sub_id, admin, start)

    log = await tab.log()
    assert not [e for e in log if e["kind"] == "status" and e["status"] == "unauthorized"]
    resumed = [e for e in log[lost:back] if e["kind"] == "sent"]
    auth, subscribe = resumed[0]["frame"], resumed[1]["frame"]
    assert (auth["type"], auth["token"]) == ("auth", fresh), resumed
    assert subscribe["type"] == "subscribe", resumed
    assert "snapshot" not in subscribe, resumed
    assert subscribe["since"] >= start, resumed
    assert resumed[0]["socket"] == resumed[1]["socket"] > 1


async def test_get_token_against_an_open_server_streams_as_before(
    open_server: ServerProcess, open_client: OpenClient, admin: asyncpg.Connection
) -> None:
    """On a server without a token key, a client with (sync) getToken is answered with nulls and streams normally."""
    tab = await open_client(open_server.base_url, {**FAST_CLIENT, "withToken": "sync"})
    await tab.set_token("anything")
    sub_id, start = await live_on_ticks(tab)
    await assert_everything_once(tab, sub_id, admin, start)
    [answer] = await tab.log("authenticated")
    assert (answer["sub"], answer["role"], answer["exp"]) == (None, None, None)
    assert not [e for e in await tab.log() if e["kind"] == "client-error"]


async def test_demo_page_asks_for_a_token_and_then_streams_and_writes_with_it(
    secured: ServerProcess, demo_page: OpenDemo
) -> None:
    """Against a token-key server the demo shows `unauthorized` and a token form; a token makes it live and writable."""
    page = await demo_page("page")
    await page.page.goto(secured.base_url + "/")
    await expect(page.status).to_have_text("unauthorized", timeout=STREAM_TIMEOUT_MS)
    form = page.page.get_by_test_id("token-form")
    await expect(form).to_be_visible()
    await expect(page.page.get_by_test_id("token-message")).not_to_be_empty()

    await form.get_by_test_id("token-input").fill(make_token(sub="demo"))
    await form.get_by_test_id("token-submit").click()
    await page.wait_ready()
    await expect(form).to_be_hidden()
    assert "token" not in page.page.url, page.page.url  # taken out of the address bar

    email = f"demo.{secrets.token_hex(4)}@example.com"
    created = await page.create_user("Token Holder", email)
    await expect(page.cell(created["id"], "email")).to_have_text(email, timeout=STREAM_TIMEOUT_MS)


async def test_demo_page_takes_a_token_from_the_url_fragment(secured: ServerProcess, demo_page: OpenDemo) -> None:
    """`/#token=...` makes the demo authenticate on its first connection, and the token leaves the address bar."""
    page = await demo_page("page")
    await page.page.goto(f"{secured.base_url}/#token={make_token(sub='fragment')}")
    await page.wait_ready()
    assert "token" not in page.page.url, page.page.url
    assert page.sent_frames[0]["type"] == "auth", page.sent_frames[:2]
    assert not page.errors_received(), page.errors_received()
