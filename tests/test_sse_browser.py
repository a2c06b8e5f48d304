"""A browser's own `EventSource` on `GET /sse/{table}`, in real Chromium: it survives a server restart and resumes
by `Last-Event-ID` with every change exactly once, and a ticket opens a stream on a server that needs tokens."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, Page, async_playwright

from realtime.dsn import Dsn
from tests.support.browser import STREAM_TIMEOUT_MS, launch
from tests.support.server import ServerProcess, free_port
from tests.support.tables import committed_changes, create_streamed_table, head
from tests.test_auth import AUDIENCE, SECRET, make_token

pytestmark = pytest.mark.timeout(90)

# Records what an EventSource reports: each change's position and the id the browser saw with it, `end` events,
# and how often it (re)opened.
_OPEN_SOURCE = """
([path, token]) => {
  const log = window.__sse = {changes: [], ends: [], subscribed: [], opens: 0};
  const open = (url) => {
    const source = new EventSource(url);
    source.addEventListener("open", () => { log.opens += 1; });
    source.addEventListener("subscribed", (e) => log.subscribed.push(JSON.parse(e.data).seq));
    source.addEventListener("change", (e) => log.changes.push({seq: JSON.parse(e.data).seq, id: e.lastEventId}));
    source.addEventListener("end", (e) => log.ends.push(JSON.parse(e.data)));
    window.__source = source;
  };
  if (token === null) { open(path); return; }
  // A ticket in the URL, never the token: POST /sse/tickets with the token, then open the stream with it.
  return fetch("/sse/tickets", {method: "POST", headers: {Authorization: "Bearer " + token}})
    .then((response) => response.json())
    .then((body) => open(path + "?ticket=" + encodeURIComponent(body.ticket)));
}
"""


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await launch(playwright)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    errors: list[str] = []
    try:
        tab = await context.new_page()
        tab.on("pageerror", lambda error: errors.append(str(error)))
        yield tab
    finally:
        await context.close()
    assert not errors, errors


async def wait_for(page: Page, condition: str, argument: Any = None) -> Any:
    handle = await page.wait_for_function(condition, arg=argument, timeout=STREAM_TIMEOUT_MS)
    return await handle.json_value()


async def test_eventsource_survives_a_restart_and_resumes_by_last_event_id_exactly_once(
    page: Page, database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection
) -> None:
    """Writers commit while the server is SIGTERMed and started again on its port; the page's EventSource gets
    `end` `restarting`, reconnects by itself with `Last-Event-ID`, and holds every change once, in order."""
    table = await create_streamed_table(db, "ssebrowser")
    server = ServerProcess(database=database_url, log_path=artifacts_dir / "sse-browser.log", port=free_port())
    await asyncio.to_thread(server.start)
    stop = asyncio.Event()
    written = 0

    async def write() -> None:
        nonlocal written
        conn = await asyncpg.connect(database_url.asyncpg())
        try:
            while not stop.is_set():
                await conn.execute(f"INSERT INTO {table} (k, v) VALUES ($1, 'w')", written)
                written += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.02)  # pacing the writer, not waiting for an effect
        finally:
            await conn.close()

    writer: asyncio.Task[None] | None = None
    try:
        await page.goto(server.base_url + "/realtime.js")
        await page.evaluate(_OPEN_SOURCE, [f"/sse/{table}", None])
        (start,) = await wait_for(page, "() => window.__sse.subscribed.length > 0 && window.__sse.subscribed")
        writer = asyncio.ensure_future(write())
        await wait_for(page, "() => window.__sse.changes.length >= 10")
        assert await asyncio.to_thread(server.terminate) == 0
        (end,) = await wait_for(page, "() => window.__sse.ends.length > 0 && window.__sse.ends")
        assert end["code"] == "restarting"
        down_at = await head(db)
        await asyncio.to_thread(server.start)
        up_at = await head(db)
        assert up_at > down_at, "nothing was committed while the server was down"
        await wait_for(page, "seq => window.__sse.changes.some((c) => c.seq > seq)", up_at)
        assert await page.evaluate("() => window.__sse.opens") == 2
        stop.set()
        await writer
        truth = [c["seq"] for c in await committed_changes(db, table, start)]
        got = await wait_for(
            page, "last => window.__sse.changes.at(-1)?.seq === last && window.__sse.changes", truth[-1]
        )
        assert [c["seq"] for c in got] == truth
        assert all(c["id"] == str(c["seq"]) for c in got)
        assert any(c["seq"] > end["seq"] for c in got)
        assert end["seq"] in [c["seq"] for c in got]
    finally:
        stop.set()
        if writer is not None:
            await asyncio.gather(writer, return_exceptions=True)
        await asyncio.to_thread(server.terminate)


async def test_a_ticket_opens_a_stream_for_an_eventsource(
    page: Page, database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection
) -> None:
    """On a server with a token key, the page trades its token for a ticket and streams with it."""
    table = await create_streamed_table(db, "ssebrowser")
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE}
    server = ServerProcess(database=database_url, log_path=artifacts_dir / "sse-browser-ticket.log", env=env)
    await asyncio.to_thread(server.start)
    try:
        await page.goto(server.base_url + "/realtime.js")
        token = make_token(role="admin")
        await page.evaluate(_OPEN_SOURCE, [f"/sse/{table}", token])
        await wait_for(page, "() => window.__sse.subscribed.length > 0")
        await db.execute(f"INSERT INTO {table} (k, v) VALUES (1, 'ticket')")
        (change,) = await wait_for(page, "() => window.__sse.changes.length > 0 && window.__sse.changes")
        assert change["seq"] == await head(db)
        url = await page.evaluate("() => window.__source.url")
        assert "ticket=" in url
        assert token not in url
    finally:
        await asyncio.to_thread(server.terminate)


def _documented_follow() -> str:
    """The `follow` function of docs/client.md's Server-Sent Events example, as the page would run it."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "client.md").read_text()
    section = doc[doc.index("## Server-Sent Events") :]
    start = section.index("async function follow(")
    return section[start : section.index("\n}\n", start) + 2]


async def test_the_documented_ticket_example_resumes_across_a_restart_exactly_once(
    page: Page, database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection
) -> None:
    """docs/client.md's `follow` (a ticket per stream, reopened with `since`) on a server with a token key keeps
    every change once, in order, while writers commit and the server is SIGTERMed and started again."""
    table = await create_streamed_table(db, "ssefollow")
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE}
    log_path = artifacts_dir / "sse-browser-follow.log"
    server = ServerProcess(database=database_url, log_path=log_path, env=env, port=free_port())
    await asyncio.to_thread(server.start)
    stop = asyncio.Event()

    async def write() -> None:
        conn = await asyncpg.connect(database_url.asyncpg())
        try:
            while not stop.is_set():
                await conn.execute(f"INSERT INTO {table} (k, v) VALUES (1, 'w')")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.02)  # pacing the writer, not waiting for an effect
        finally:
            await conn.close()

    writer = asyncio.ensure_future(write())
    try:
        await page.goto(server.base_url + "/realtime.js")
        script = "async ([table, token]) => { window.__got = []; " + _documented_follow()
        script += "\nwindow.__stop = await follow(table, () => token, (frame) => window.__got.push(frame.seq)); }"
        await page.evaluate(script, [table, make_token(role="admin")])
        await wait_for(page, "() => window.__got.length >= 10")
        assert await asyncio.to_thread(server.terminate) == 0
        down_at = await head(db)
        await asyncio.to_thread(server.start)
        up_at = await head(db)
        assert up_at > down_at, "nothing was committed while the server was down"
        await wait_for(page, "seq => window.__got.some((s) => s > seq)", up_at)
        stop.set()
        await writer
        got: list[int] = await page.evaluate("() => window.__got")
        truth = [c["seq"] for c in await committed_changes(db, table, got[0] - 1)]
        got = await wait_for(page, "last => window.__got.at(-1) === last && window.__got", truth[-1])
        assert got == truth
        await page.evaluate("() => window.__stop()")
    finally:
        stop.set()
        await asyncio.gather(writer, return_exceptions=True)
        await asyncio.to_thread(server.terminate)
