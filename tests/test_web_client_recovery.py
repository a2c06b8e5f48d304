"""The browser client (web_demo/realtime.js) recovering from what goes wrong on the way, in real Chromium against
real `realtime serve` processes: a killed server, a server that stops answering, the browser going offline, and
a subscribe refused as `unavailable` while the database is cut off.

Each test drives a `RealtimeClient` of its own (tests/support/browser.py `ClientTab`) with short timers, so that
what takes the defaults tens of seconds takes a second here, and checks what it delivered against the ground
truth, `realtime.changes`: every change after the subscription's first position, in order, none twice. The
database is this module's own; every server is started, stopped, killed or paused by the test that owns it, by
PID.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, BrowserContext, expect

from realtime.db import POOL_APPLICATION_NAME
from realtime.dsn import Dsn
from tests.support.browser import STREAM_TIMEOUT_MS, ClientTab, DemoPage
from tests.support.faults import FAST_RECOVERY, PgProxy, stream_database
from tests.support.server import ServerProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(60)

# Timers short enough that every recovery here takes about a second: a ping every 250 ms and 750 ms for its
# pong, so a silent link is given up within a second; a hanging handshake abandoned after one; reconnects
# between 0 and 100-500 ms apart.
FAST_CLIENT: dict[str, Any] = {
    "pingInterval": 250,
    "pongTimeout": 750,
    "connectTimeout": 1000,
    "backoff": {"initial": 100, "max": 500},
}
# What the server says with `unavailable` when its database is away (realtime/stream/endpoint.py).
DATABASE_RETRY_AFTER_MS = 1000

StartServer = Callable[..., Awaitable[ServerProcess]]
OpenClient = Callable[..., Awaitable[ClientTab]]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def client_db(admin_url: Dsn) -> AsyncIterator[Dsn]:
    """A database of this module's own (users, and the streamed tables `ticks` and `docs`)."""
    async with stream_database(admin_url) as url:
        yield url


@pytest.fixture
async def admin(client_db: Dsn) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection (never through a proxy) for writing and for reading the ground truth."""
    conn = await asyncpg.connect(client_db.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """This test's own browser context (its own network state, for `set_offline`)."""
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

    async def open_(base_url: str, options: dict[str, Any] | None = None) -> ClientTab:
        tab = await ClientTab.open(context, base_url, FAST_CLIENT if options is None else options)
        tabs.append(tab)
        return tab

    yield open_
    for number, tab in enumerate(tabs):
        tab.save_console(artifacts_dir / f"{request.node.name}-client{number}-console.log")
    errors = [error for tab in tabs for error in tab.page_errors]
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
async def start_server(
    client_db: Dsn, artifacts_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[StartServer]:
    """Start `realtime serve` processes of this test's own (on this module's database unless told otherwise);
    each is continued, in case the test paused it, and stopped afterwards, by PID."""
    started: list[ServerProcess] = []

    async def start(database: Dsn | None = None, port: int | None = None) -> ServerProcess:
        log_path = artifacts_dir / f"{request.node.name}-server.log"
        process = ServerProcess(database=database or client_db, log_path=log_path, env=FAST_RECOVERY)
        if port is not None:
            process.port = port
        started.append(process)
        await asyncio.to_thread(process.start)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.process is not None and process.process.poll() is None:
                os.kill(process.process.pid, signal.SIGCONT)
            await asyncio.to_thread(process.terminate)


@pytest.fixture
def proxy(admin_url: Dsn) -> Iterator[PgProxy]:
    """A proxy to the run's PostgreSQL through which a server under test can be cut off from its database."""
    running = PgProxy(admin_url)
    running.start()
    try:
        yield running
    finally:
        running.close()


# ---------------------------------------------------------------------------------------------- helpers


async def add_ticks(conn: asyncpg.Connection, count: int) -> None:
    """Commit `count` changes to `ticks`, one transaction each."""
    for n in range(count):
        await conn.execute("INSERT INTO ticks (writer, n) VALUES (0, $1)", n)


async def table_seqs(conn: asyncpg.Connection, table: str, after: int) -> list[int]:
    """The ground truth: positions of every committed change to `table` after `after`, in order."""
    rows = await conn.fetch(
        "SELECT seq FROM realtime.changes WHERE table_schema = 'public' AND table_name = $1 AND seq > $2 ORDER BY seq",
        table,
        after,
    )
    return [row["seq"] for row in rows]


async def live_on_ticks(tab: ClientTab) -> tuple[str, int]:
    """Connect, subscribe to `ticks` with a snapshot and wait until live; returns the id and first position."""
    sub_id = await tab.subscribe({"table": "ticks", "snapshot": True})
    await tab.connect()
    await tab.wait_for("subscribed", id=sub_id)
    (subscribed,) = await tab.log("subscribed")
    start: int = subscribed["seq"]
    return sub_id, start


async def assert_everything_once(tab: ClientTab, sub_id: str, admin: asyncpg.Connection, start: int) -> list[int]:
    """Commit one more change, wait for it, and check the subscription delivered exactly the ground truth."""
    await add_ticks(admin, 1)
    truth = await table_seqs(admin, "ticks", start)
    await tab.wait_change_at_least(sub_id, truth[-1])
    delivered = await tab.changes(sub_id)
    assert delivered == truth, f"delivered {delivered}, committed {truth}"
    return truth


async def assert_resumed_from_position(tab: ClientTab, start: int) -> None:
    """The first subscribe asked for a snapshot; every later one resumed from a position, never from a snapshot."""
    first, *later = await tab.sent("subscribe")
    assert first.get("snapshot") is True, first
    assert later, "the subscription was never sent again"
    for frame in later:
        assert "snapshot" not in frame, later
        assert frame.get("since", -1) >= start, later


async def cut_pool(proxy: PgProxy, admin: asyncpg.Connection) -> None:
    """The server's connection pool loses the database: its connections are ended and new ones are refused at
    the proxy. Its listener (another application name) stays connected, so changes keep being published."""
    proxy.refuse(POOL_APPLICATION_NAME)
    query = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = $1 AND datname = current_database()"
    )
    await admin.execute(query, POOL_APPLICATION_NAME)

    async def pool_gone() -> bool:
        count = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
            POOL_APPLICATION_NAME,
        )
        return bool(count == 0)

    await eventually(pool_gone, 10, "the pool's backends ended")


# ------------------------------------------------------------------------------------------------- tests


async def test_killed_server_client_reconnects_and_resumes_exactly(
    start_server: StartServer, open_client: OpenClient, admin: asyncpg.Connection
) -> None:
    """A killed server (1006): the client reconnects to its successor and resumes, no change lost or twice."""
    first = await start_server()
    tab = await open_client(first.base_url)
    sub_id, start = await live_on_ticks(tab)
    await add_ticks(admin, 1)
    await tab.wait_change_at_least(sub_id, (await table_seqs(admin, "ticks", start))[-1])

    assert first.process is not None
    first.process.kill()
    await asyncio.to_thread(first.process.wait, 10)
    lost = await tab.wait_for("disconnect", code=1006)
    await tab.wait_for("status", after=lost, status="reconnecting")
    await add_ticks(admin, 3)  # committed while no server is there

    await start_server(port=first.port)
    back = await tab.wait_for("subscribed", after=lost, id=sub_id)
    await tab.wait_for("status", after=lost, status="live")
    assert (await tab.log())[back]["state"] == "live"
    await assert_everything_once(tab, sub_id, admin, start)
    await assert_resumed_from_position(tab, start)


async def test_silent_server_is_given_up_on_after_a_missing_pong(
    start_server: StartServer, open_client: OpenClient, admin: asyncpg.Connection
) -> None:
    """A server that stops answering (SIGSTOP) is dropped on a missing pong; after SIGCONT the client resumes."""
    server = await start_server()
    assert server.process is not None
    pid = server.process.pid
    tab = await open_client(server.base_url)
    sub_id, start = await live_on_ticks(tab)
    await add_ticks(admin, 1)
    await tab.wait_change_at_least(sub_id, (await table_seqs(admin, "ticks", start))[-1])

    mark = len(await tab.log())
    os.kill(pid, signal.SIGSTOP)
    try:
        # The socket still looks open (the kernel keeps ACKing); only the missing pong gives it away.
        lost = await tab.wait_for("disconnect", timeout_ms=5000, after=mark, code=4000, reason="no pong")
        await tab.wait_for("status", after=lost, status="reconnecting")
        await add_ticks(admin, 2)  # the database is fine; only the server is silent
        paused = await tab.log()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not [e for e in paused[mark:] if e["kind"] == "status" and e["status"] == "live"], paused[mark:]

    await tab.wait_for("subscribed", after=lost, id=sub_id)
    await assert_everything_once(tab, sub_id, admin, start)
    await assert_resumed_from_position(tab, start)


async def test_offline_then_online_client_resumes_exactly(
    start_server: StartServer, open_client: OpenClient, context: BrowserContext, admin: asyncpg.Connection
) -> None:
    """Offline, the client reports `offline` and waits; back online it reconnects at once and resumes exactly."""
    server = await start_server()
    tab = await open_client(server.base_url)
    sub_id, start = await live_on_ticks(tab)
    await add_ticks(admin, 1)
    await tab.wait_change_at_least(sub_id, (await table_seqs(admin, "ticks", start))[-1])

    mark = len(await tab.log())
    await context.set_offline(True)
    try:
        away = await tab.wait_for("status", after=mark, status="offline")
        await add_ticks(admin, 2)  # committed while the browser is offline
        offline = await tab.log()
    finally:
        await context.set_offline(False)
    # Offline, it waits for the network instead of retrying into the void.
    assert not [e for e in offline[away + 1 :] if e["kind"] in ("status", "sent")], offline[away:]
    await tab.wait_for("status", after=away, status="live")
    await tab.wait_for("subscribed", after=away, id=sub_id)
    await assert_everything_once(tab, sub_id, admin, start)
    await assert_resumed_from_position(tab, start)


async def test_unavailable_resume_is_retried_after_the_hint_with_growing_backoff(
    start_server: StartServer,
    open_client: OpenClient,
    proxy: PgProxy,
    client_db: Dsn,
    admin: asyncpg.Connection,
) -> None:
    """An `unavailable` resume is re-sent with its `since` after the hint, later each time, and then loses nothing."""
    server = await start_server(database=proxy.url(client_db))
    # Own backoff 800 ms, doubling: the first retry waits for the server's 1000 ms hint, the second 1600 ms.
    tab = await open_client(server.base_url, {"backoff": {"initial": 800, "max": 5000}})
    sub_id, start = await live_on_ticks(tab)
    await add_ticks(admin, 1)
    await tab.wait_change_at_least(sub_id, (await table_seqs(admin, "ticks", start))[-1])
    position = (await tab.changes(sub_id))[-1]

    await cut_pool(proxy, admin)
    await tab.close()
    await add_ticks(admin, 1)  # missed while disconnected: the resume must replay it
    mark = len(await tab.log())
    await tab.connect()
    first = await tab.wait_for("retry", after=mark, id=sub_id)
    await add_ticks(admin, 1)  # committed while the subscription waits to retry
    second = await tab.wait_for("retry", after=first + 1, id=sub_id)
    proxy.refuse(None)
    done = await tab.wait_for("subscribed", after=second, id=sub_id)
    await assert_everything_once(tab, sub_id, admin, start)

    log = await tab.log()
    retries = [log[first], log[second]]
    for retry in retries:
        assert (retry["code"], retry["retryAfter"], retry["state"]) == (
            "unavailable",
            DATABASE_RETRY_AFTER_MS,
            "retrying",
        )
    # Bases: max(hint 1000, own 800) and max(1000, own 1600); up to half again of each is jitter.
    assert 1000 <= retries[0]["delay"] <= 1500, retries
    assert 1600 <= retries[1]["delay"] <= 2400, retries
    assert log[done]["state"] == "live"

    # On the wire: each refused subscribe is followed by the same request, no sooner than the delay.
    wire = [e for e in log[mark:] if e["kind"] in ("sent", "received")]
    subscribes = [e for e in wire if e["kind"] == "sent" and e["frame"]["type"] == "subscribe"]
    assert len(subscribes) == 3, subscribes
    assert [s["frame"].get("since") for s in subscribes] == [position] * 3
    assert all("snapshot" not in s["frame"] for s in subscribes)
    refusals = [
        e for e in wire if e["kind"] == "received" and e["frame"]["type"] == "error" and e["frame"].get("id") == sub_id
    ]
    assert [r["frame"]["code"] for r in refusals] == ["unavailable", "unavailable"], refusals
    assert [r["frame"]["retry_after_ms"] for r in refusals] == [DATABASE_RETRY_AFTER_MS] * 2
    for refusal, retry, again in zip(refusals, retries, subscribes[1:], strict=True):
        waited = again["t"] - refusal["t"]
        assert waited >= retry["delay"] - 1 >= DATABASE_RETRY_AFTER_MS - 1, (waited, retry)


async def test_other_refusals_stay_final(server: ServerProcess, open_client: OpenClient) -> None:
    """A refusal other than `unavailable` (here `unknown_table`) fails the subscription at once: no retry."""
    tab = await open_client(server.base_url)
    sub_id = await tab.subscribe({"table": "no_such_table"})
    await tab.connect()
    await tab.wait_for("error", id=sub_id, code="unknown_table", state="failed")
    assert await tab.state(sub_id) == "failed"
    assert not await tab.log("retry")
    assert len(await tab.sent("subscribe")) == 1


async def test_demo_page_shows_retrying_then_goes_live(
    start_server: StartServer,
    proxy: PgProxy,
    client_db: Dsn,
    admin: asyncpg.Connection,
    context: BrowserContext,
    artifacts_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    """With the database cut off the page shows `retrying`, then, once it is back, goes live with a complete table."""
    server = await start_server(database=proxy.url(client_db))
    existing = await admin.fetchval(
        "INSERT INTO users (name, email) VALUES ('Before the cut', $1) RETURNING id",
        f"cut.{secrets.token_hex(4)}@example.com",
    )
    await cut_pool(proxy, admin)

    page = await DemoPage.new(context, "page")
    try:
        await page.page.goto(server.base_url + "/")
        subscription = page.page.get_by_test_id("subscription")
        await expect(subscription).to_have_text("retrying", timeout=STREAM_TIMEOUT_MS)
        await expect(page.status).to_have_text("live")
        await expect(page.page.get_by_test_id("seq")).to_have_text("—")
        note = page.page.locator('[data-testid="event-log-entry"][data-kind="warn"]', has_text="asking again in")
        await expect(note).not_to_have_count(0)

        proxy.refuse(None)
        await expect(subscription).to_have_text("live", timeout=STREAM_TIMEOUT_MS)
        await page.wait_ready()
        await expect(page.row(existing)).to_have_count(1)
        later = await admin.fetchval(
            "INSERT INTO users (name, email) VALUES ('After the cut', $1) RETURNING id",
            f"after-cut.{secrets.token_hex(4)}@example.com",
        )
        await expect(page.row(later)).to_have_count(1, timeout=STREAM_TIMEOUT_MS)

        refusals = page.errors_received()
        assert refusals, "no refusal reached the page"
        assert {(r["code"], r["retry_after_ms"]) for r in refusals} == {("unavailable", DATABASE_RETRY_AFTER_MS)}
        subscribes = page.subscribes()
        assert len(subscribes) == len(refusals) + 1, (subscribes, refusals)
        # It never got a position, so every retry asks the way the first request did: for a snapshot.
        assert all(s["snapshot"] is True and s["id"] == subscribes[0]["id"] for s in subscribes), subscribes
    finally:
        page.save_console(artifacts_dir / f"{request.node.name}-page-console.log")
    assert not page.page_errors, page.page_errors
