"""The browser client's view helper (web_demo/realtime.js `LiveView`) in real Chromium against a real server: it
applies whole transactions with one render each, holds a transaction's frames across a lost connection until the
resume brings its end, and after `cursor_expired` rebuilds its rows from the fresh snapshot instead of adding to
them. What a view holds is checked against the ground truth, the table as PostgreSQL returns it.

Each test drives a client of its own (tests/support/browser.py `ClientTab`, `view`) with short timers, on this
module's own database and server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser

from realtime.dsn import Dsn
from tests.support.browser import ClientTab
from tests.support.faults import FAST_RECOVERY, stream_database
from tests.support.server import ServerProcess, running_server

pytestmark = pytest.mark.timeout(60)

FAST_CLIENT: dict[str, Any] = {
    "pingInterval": 250,
    "pongTimeout": 750,
    "connectTimeout": 1000,
    "backoff": {"initial": 100, "max": 500},
}
# A table whose primary key has two columns, declared in the other order than the frames' `key` might list them.
PLACES = """
CREATE TABLE places (
    region text NOT NULL,
    id     integer NOT NULL,
    name   text NOT NULL,
    PRIMARY KEY (region, id)
);
SELECT realtime.enable_stream('places');
"""

OpenClient = Callable[[], Awaitable[ClientTab]]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def view_db(admin_url: Dsn) -> AsyncIterator[Dsn]:
    """A database of this module's own: `docs` (one-column key) and `places` (two-column key)."""
    async with stream_database(admin_url) as url:
        conn = await asyncpg.connect(url.asyncpg())
        try:
            await conn.execute(PLACES)
        finally:
            await conn.close()
        yield url


@pytest.fixture(scope="module")
async def view_server(view_db: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    async with running_server(view_db, artifacts_dir / "web-client-view.log", env=FAST_RECOVERY) as server:
        yield server


@pytest.fixture
async def admin(view_db: Dsn) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection for writing and for reading the ground truth."""
    conn = await asyncpg.connect(view_db.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def open_client(
    browser: Browser, view_server: ServerProcess, artifacts_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[OpenClient]:
    """A tab running a client of the test's own on the module's server, not yet connected; it may not throw."""
    context = await browser.new_context()
    tabs: list[ClientTab] = []

    async def open_() -> ClientTab:
        tab = await ClientTab.open(context, view_server.base_url, FAST_CLIENT)
        tabs.append(tab)
        return tab

    try:
        yield open_
    finally:
        for number, tab in enumerate(tabs):
            tab.save_console(artifacts_dir / f"{request.node.name}-client{number}-console.log")
        await context.close()
    errors = [error for tab in tabs for error in tab.page_errors]
    assert not errors, f"uncaught errors in the page: {errors}"


# ---------------------------------------------------------------------------------------------- helpers


async def docs_by_key(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    """The ground truth of `docs`, keyed as a view keys it: the JSON of `{"id": …}`."""
    rows = await conn.fetch("SELECT id, body FROM docs ORDER BY id")
    return {json.dumps({"id": row["id"]}, separators=(",", ":")): dict(row) for row in rows}


async def places_by_key(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    """The ground truth of `places`, keyed as a view with `key: ['region', 'id']` keys it."""
    rows = await conn.fetch("SELECT region, id, name FROM places ORDER BY region, id")
    return {json.dumps({"region": row["region"], "id": row["id"]}, separators=(",", ":")): dict(row) for row in rows}


async def renders(tab: ClientTab, sub_id: str, after: int = 0) -> list[dict[str, Any]]:
    return [entry for entry in (await tab.log())[after:] if entry["kind"] == "render" and entry["id"] == sub_id]


# ------------------------------------------------------------------------------------------------- tests


async def test_a_transaction_cut_by_a_lost_connection_is_applied_whole_after_the_resume(
    open_client: OpenClient, admin: asyncpg.Connection
) -> None:
    """Five inserts in one transaction, the socket lost after its first frame: the view holds that frame, resumes
    with `since`, and applies all five in one render once the replay brings the `tx_end`."""
    await admin.execute("INSERT INTO docs (body) VALUES ('before')")
    tab = await open_client()
    sub_id = await tab.view({"table": "docs"})
    await tab.connect()
    await tab.wait_for("subscribed", id=sub_id)
    [snapshot] = await renders(tab, sub_id)
    assert snapshot["cause"] == "snapshot"
    assert await tab.view_rows(sub_id) == await docs_by_key(admin)

    await tab.drop_socket_when("(f) => f.type === 'change' && f.tx !== undefined && f.tx_end !== true")
    mark = len(await tab.log())
    async with admin.transaction():
        for n in range(5):
            await admin.execute("INSERT INTO docs (body) VALUES ($1)", f"in one transaction {n}")
    dropped = await tab.wait_for("drop", after=mark)
    resumed = await tab.wait_for("subscribed", after=dropped, id=sub_id)
    await tab.wait_for("render", after=mark, id=sub_id, cause="transaction")

    log = await tab.log()
    [step] = await renders(tab, sub_id, after=mark)
    assert step["changes"] == ["added"] * 5, step
    assert step["held"] == 0
    assert len(step["transactions"]) == 1, step
    # The first frame arrived on the lost socket and was held; the rest came on the next one, replayed from it.
    arrived = [e for e in log[mark:] if e["kind"] == "change"]
    assert [e["txEnd"] for e in arrived] == [False, False, False, False, True], arrived
    assert len({e["tx"] for e in arrived}) == 1, arrived
    sockets = [e["socket"] for e in log[mark:] if e["kind"] == "received" and e["frame"].get("type") == "change"]
    assert sockets[0] == log[dropped]["socket"], sockets
    assert sockets[-1] > sockets[0], sockets
    resubscribe = [
        e["frame"] for e in log[dropped:resumed] if e["kind"] == "sent" and e["frame"]["type"] == "subscribe"
    ]
    assert resubscribe, log[dropped:resumed]
    assert resubscribe[-1]["since"] == arrived[0]["seq"], resubscribe
    assert "snapshot" not in resubscribe[-1]
    assert await tab.view_rows(sub_id) == await docs_by_key(admin)


async def test_cursor_expired_rebuilds_the_view_from_the_fresh_snapshot(
    open_client: OpenClient, admin: asyncpg.Connection
) -> None:
    """A view away past retention (its resume answered `cursor_expired`) holds exactly the table afterwards, keyed
    by a two-column primary key: the fresh snapshot replaced its rows, none kept twice, none deleted kept."""
    await admin.execute("TRUNCATE places")
    await admin.execute("INSERT INTO places VALUES ('eu', 1, 'Lyon'), ('eu', 2, 'Porto'), ('us', 1, 'Austin')")
    tab = await open_client()
    sub_id = await tab.view({"table": "places", "key": ["region", "id"]})
    await tab.connect()
    await tab.wait_for("subscribed", id=sub_id)
    assert await tab.view_rows(sub_id) == await places_by_key(admin)
    await tab.close()

    # While it is away: a row deleted, one renamed, two added; then retention drops all but the newest change.
    await admin.execute("DELETE FROM places WHERE region = 'eu' AND id = 2")
    await admin.execute("UPDATE places SET name = 'Lyon 2' WHERE region = 'eu' AND id = 1")
    await admin.execute("INSERT INTO places VALUES ('eu', 3, 'Graz'), ('us', 2, 'Boston')")
    newest = await admin.fetchval("SELECT max(seq) FROM realtime.changes")
    assert await admin.fetchval("SELECT realtime.prune(interval '1 day', 1, $1)", newest) > 0
    mark = len(await tab.log())
    await tab.connect()

    await tab.wait_for("reset", after=mark, id=sub_id)
    await tab.wait_for("render", after=mark, id=sub_id, cause="snapshot")
    truth = await places_by_key(admin)
    assert await tab.view_rows(sub_id) == truth
    [rebuilt] = await renders(tab, sub_id, after=mark)
    assert rebuilt["size"] == len(truth) == 4
    sent = [e["frame"] for e in (await tab.log())[mark:] if e["kind"] == "sent" and e["frame"]["type"] == "subscribe"]
    assert [("since" in frame, frame.get("snapshot")) for frame in sent] == [(True, None), (False, True)], sent

    # Live again, and keyed the same way: an update of one row replaces it, it is not added beside it.
    await admin.execute("UPDATE places SET name = 'Boston, MA' WHERE region = 'us' AND id = 2")
    await tab.wait_for("render", after=mark, id=sub_id, cause="transaction")
    assert await tab.view_rows(sub_id) == await places_by_key(admin)
