"""The demo page in a real browser: live updates across tabs, recovery from a lost listener and from a server
restart, inline errors, literal display of markup, a screenshot, and a phone-width layout.

Chromium is Debian's (/usr/bin/chromium), driven by playwright's async API: one browser for the session and a
fresh context per test. The users table is shared with the rest of the suite, so every test makes its own users
(unique emails) and finds rows by `data-id`; it never assumes the table is empty.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, ViewportSize, async_playwright, expect

from realtime.dsn import Dsn
from tests.support.browser import DESKTOP, PHONE, STREAM_TIMEOUT_MS, DemoPage, launch
from tests.support.faults import FAST_RECOVERY, listener_pids
from tests.support.server import ServerProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)

NOT_EMPTY = re.compile(r"\S")
OpenPage = Callable[..., Awaitable[DemoPage]]


def unique_email(label: str) -> str:
    return f"{label}.{secrets.token_hex(4)}@example.com"


async def insert_user(db: asyncpg.Connection, name: str, email: str) -> int:
    user_id: int = await db.fetchval("INSERT INTO users (name, email) VALUES ($1, $2) RETURNING id", name, email)
    return user_id


async def users_seqs(db: asyncpg.Connection, after: int) -> list[int]:
    """The ground truth: positions of every committed change to `users` after `after`, in order."""
    rows = await db.fetch(
        "SELECT seq FROM realtime.changes WHERE table_schema = 'public' AND table_name = 'users' AND seq > $1"
        " ORDER BY seq",
        after,
    )
    return [row["seq"] for row in rows]


def assert_once_in_order(entries: list[dict[str, Any]]) -> None:
    seqs = [entry["seq"] for entry in entries]
    assert seqs == sorted(set(seqs)), f"event log seqs not unique and increasing: {seqs}"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the whole run."""
    async with async_playwright() as playwright:
        chromium = await launch(playwright)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def open_page(browser: Browser, artifacts_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[OpenPage]:
    """Open demo pages in this test's own browser contexts (one per viewport size); no page may throw."""
    contexts: dict[tuple[int, int], BrowserContext] = {}
    pages: list[DemoPage] = []

    async def open_(base_url: str, name: str, viewport: ViewportSize = DESKTOP) -> DemoPage:
        key = (viewport["width"], viewport["height"])
        if key not in contexts:
            phone = viewport["width"] < 600
            contexts[key] = await browser.new_context(
                viewport=viewport, is_mobile=phone, has_touch=phone, device_scale_factor=2 if phone else 1
            )
        page = await DemoPage.new(contexts[key], name)
        pages.append(page)  # before loading, so a page that never gets ready still leaves its console log
        await page.load(base_url)
        return page

    try:
        yield open_
    finally:
        for page in pages:
            page.save_console(artifacts_dir / f"{request.node.name}-{page.name}-console.log")
        for context in contexts.values():
            await context.close()
    errors = {page.name: page.page_errors for page in pages if page.page_errors}
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
async def private_server(
    database_url: Dsn, artifacts_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[ServerProcess]]]:
    """Start `realtime serve` processes of this test's own on the shared database; all stopped (by PID) after."""
    started: list[ServerProcess] = []

    async def start(port: int | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        log_path = artifacts_dir / f"{request.node.name}-server.log"
        process = ServerProcess(database=database_url, log_path=log_path, env=env or {})
        if port is not None:
            process.port = port
        started.append(process)
        await asyncio.to_thread(process.start)
        return process

    try:
        yield start
    finally:
        for process in started:
            await asyncio.to_thread(process.terminate)


async def listener_status(server: ServerProcess) -> dict[str, Any]:
    """The listener part of /readyz (answered with 503 while the listener reconnects)."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as client:
        response = await client.get("/readyz")
    status: dict[str, Any] = response.json()["listener"]
    return status


# ------------------------------------------------------------------------------------------------- tests


async def test_form_create_edit_delete_reach_the_other_page(server: ServerProcess, open_page: OpenPage) -> None:
    """A create, an inline edit and a delete made in page A appear in page B without a reload."""
    a = await open_page(server.base_url, "a")
    b = await open_page(server.base_url, "b")
    await b.page.evaluate("window.__notReloaded = true")
    email = unique_email("ada")

    created = await a.create_user("Ada Lovelace", email)
    user_id = created["id"]
    await expect(b.cell(user_id, "email")).to_have_text(email, timeout=STREAM_TIMEOUT_MS)
    await expect(b.cell(user_id, "name")).to_have_text("Ada Lovelace")
    await expect(a.page.get_by_test_id("create-status")).to_contain_text(f"Added user {user_id}")

    assert await a.save_edit(user_id, "Ada King") == 200
    await expect(b.cell(user_id, "name")).to_have_text("Ada King", timeout=STREAM_TIMEOUT_MS)
    await expect(b.row(user_id)).to_have_attribute("data-flash", "update")
    await expect(b.cell(user_id, "version")).to_have_text("2")

    async with a.page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        await a.row(user_id).get_by_test_id("delete").click()
    assert (await deleted.value).status == 204
    await expect(b.any_row(user_id)).to_have_count(0, timeout=STREAM_TIMEOUT_MS)
    await expect(a.any_row(user_id)).to_have_count(0, timeout=STREAM_TIMEOUT_MS)

    assert await b.page.evaluate("window.__notReloaded") is True
    entries = [entry for entry in await b.logged_changes() if entry["id"] == user_id]
    assert [entry["op"] for entry in entries] == ["INSERT", "UPDATE", "DELETE"]
    assert_once_in_order(await b.logged_changes())


async def test_plain_sql_changes_appear_in_both_pages(
    server: ServerProcess, open_page: OpenPage, db: asyncpg.Connection
) -> None:
    """An insert, update and delete made with plain SQL, not through the API, appear in both open pages."""
    pages = [await open_page(server.base_url, "a"), await open_page(server.base_url, "b")]
    email = unique_email("grace")

    user_id = await insert_user(db, "Grace Hopper", email)
    for page in pages:
        await expect(page.cell(user_id, "email")).to_have_text(email, timeout=STREAM_TIMEOUT_MS)
        await expect(page.cell(user_id, "version")).to_have_text("1")

    await db.execute("UPDATE users SET name = 'Rear Admiral Hopper' WHERE id = $1", user_id)
    for page in pages:
        await expect(page.cell(user_id, "name")).to_have_text("Rear Admiral Hopper", timeout=STREAM_TIMEOUT_MS)
        await expect(page.cell(user_id, "version")).to_have_text("2")

    await db.execute("DELETE FROM users WHERE id = $1", user_id)
    for page in pages:
        await expect(page.any_row(user_id)).to_have_count(0, timeout=STREAM_TIMEOUT_MS)


async def test_killed_listener_page_shows_every_change_once(
    private_server: Callable[..., Awaitable[ServerProcess]],
    server: ServerProcess,
    open_page: OpenPage,
    db: asyncpg.Connection,
) -> None:
    """Killing the server's listener three times amid SQL and REST writes: the page shows every change, none twice."""
    own = await private_server(env=FAST_RECOVERY)
    page = await open_page(own.base_url, "page")
    start = await page.seq()
    assert start is not None
    kept: dict[int, str] = {}
    deleted: list[int] = []

    async with httpx.AsyncClient(base_url=own.base_url, timeout=10.0) as http:
        for round_ in range(3):
            before = (await listener_status(own))["reconnects"]
            listeners = await listener_pids(db)
            assert listeners, "no listener backend to kill"
            for pid in listeners:
                await db.execute("SELECT pg_terminate_backend($1)", pid)
            # Written while the listener is down or catching up: one SQL transaction with two rows, a REST
            # create, an SQL update and a REST delete.
            async with db.transaction():
                first = await insert_user(db, f"Outage {round_} a", unique_email(f"outage{round_}a"))
                second = await insert_user(db, f"Outage {round_} b", unique_email(f"outage{round_}b"))
            response = await http.post("/users", json={"name": f"Outage {round_} c", "email": unique_email("c")})
            assert response.status_code == 201, response.text
            kept[response.json()["id"]] = f"Outage {round_} c"
            await db.execute("UPDATE users SET name = name || ' (edited)' WHERE id = $1", first)
            kept[first] = f"Outage {round_} a (edited)"
            assert (await http.delete(f"/users/{second}")).status_code == 204
            deleted.append(second)

            async def recovered(before: int = before) -> bool:
                status = await listener_status(own)
                return bool(status["state"] == "live" and status["reconnects"] > before)

            await eventually(recovered, 15, f"listener back after kill {round_ + 1}")

    truth = await users_seqs(db, start)
    assert len(truth) == 15
    await page.wait_seq_at_least(truth[-1])
    logged = await page.logged_changes()
    assert [entry["seq"] for entry in logged] == truth
    for user_id, name in kept.items():
        await expect(page.row(user_id)).to_have_count(1)
        await expect(page.cell(user_id, "name")).to_have_text(name)
    for user_id in deleted:
        await expect(page.any_row(user_id)).to_have_count(0, timeout=STREAM_TIMEOUT_MS)

    # The kill also hit the shared server's listener: leave it live for the tests after this one.
    await asyncio.to_thread(server.wait_ready, 15.0)


async def test_server_restart_page_reconnects_and_resumes(
    private_server: Callable[..., Awaitable[ServerProcess]], open_page: OpenPage, db: asyncpg.Connection
) -> None:
    """Across a server restart the page shows reconnecting, then live, and resumes a user inserted meanwhile, once."""
    first = await private_server()
    page = await open_page(first.base_url, "page")

    assert await asyncio.to_thread(first.terminate) == 0
    await expect(page.status).to_have_text("reconnecting", timeout=10_000)
    seq_before = await page.seq()
    email = unique_email("while-down")
    user_id = await insert_user(db, "Written while down", email)
    seq = await db.fetchval(
        "SELECT seq FROM realtime.changes WHERE table_name = 'users' AND op = 'INSERT'"
        " AND (new_row->>'id')::bigint = $1",
        user_id,
    )
    await expect(page.status).to_have_text("reconnecting")
    await expect(page.any_row(user_id)).to_have_count(0)

    await private_server(port=first.port)
    # The client's reconnect delay is jittered and grows while the server is away (capped at 15 s).
    await expect(page.status).to_have_text("live", timeout=30_000)
    await expect(page.row(user_id)).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    await expect(page.cell(user_id, "email")).to_have_text(email)
    await page.wait_seq_at_least(seq)

    logged = await page.logged_changes()
    assert [entry for entry in logged if entry["id"] == user_id] == [{"seq": seq, "op": "INSERT", "id": user_id}]
    assert_once_in_order(logged)
    await expect(page.any_row(user_id)).to_have_count(1)
    # Resumed, not reloaded: every subscribe after the first asked for the changes after the page's position.
    # (Under load a first attempt on the new server can be refused or cut, so there may be more than one.)
    subscribes = page.subscribes()
    assert len(subscribes) >= 2, subscribes
    assert subscribes[0].get("snapshot") is True
    for resumed in subscribes[1:]:
        assert resumed.get("since", -1) >= seq_before, subscribes
        assert "snapshot" not in resumed
    notes = page.page.locator('[data-testid="event-log-entry"]')
    await expect(notes.filter(has_text="Snapshot:")).to_have_count(1)
    await expect(notes.filter(has_text="reconnecting")).not_to_have_count(0)


async def test_errors_show_inline(server: ServerProcess, open_page: OpenPage, db: asyncpg.Connection) -> None:
    """422 errors show next to name and email, a duplicate email's 409 by the email, a stale save's 412 in the row."""
    page = await open_page(server.base_url, "page")
    form = page.page.get_by_test_id("create-form")
    error_name = form.get_by_test_id("error-name")
    error_email = form.get_by_test_id("error-email")

    problem = await page.create_user("   ", "not-an-email", expect_status=422)
    assert {error["field"] for error in problem["errors"]} == {"name", "email"}
    await expect(error_name).to_have_text(NOT_EMPTY)
    await expect(error_email).to_have_text(NOT_EMPTY)
    await expect(form.get_by_test_id("create-name")).to_have_attribute("aria-invalid", "true")
    await expect(form.get_by_test_id("create-email")).to_have_attribute("aria-invalid", "true")

    email = unique_email("taken")
    existing = await insert_user(db, "First owner", email)
    problem = await page.create_user("Second owner", email.upper(), expect_status=409)
    await expect(error_email).to_have_text(problem["detail"])
    await expect(error_name).to_have_text("")
    await expect(form.get_by_test_id("create-email")).to_be_focused()

    await expect(page.row(existing)).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    row = page.row(existing)
    await row.get_by_test_id("edit").click()
    await db.execute("UPDATE users SET name = 'Changed elsewhere' WHERE id = $1", existing)
    # Wait for the stream to bring version 2, so the save below surely races nothing.
    await expect(page.cell(existing, "version")).to_have_text("2", timeout=STREAM_TIMEOUT_MS)
    assert await page.save_edit(existing, "My edit") == 412
    message = row.get_by_test_id("row-message")
    await expect(message).to_contain_text("changed this user after you started editing")
    await expect(row.get_by_test_id("edit-name")).to_have_value("My edit")

    await message.get_by_test_id("reload").click()
    await expect(message).to_contain_text("Loaded version 2")
    assert await page.save_edit(existing, "My edit") == 200
    await expect(page.cell(existing, "name")).to_have_text("My edit", timeout=STREAM_TIMEOUT_MS)


async def test_markup_in_a_name_is_shown_literally(
    server: ServerProcess, open_page: OpenPage, db: asyncpg.Connection
) -> None:
    """A name holding HTML (`<img src=x onerror=...>`) is displayed as text: no element, no script run."""
    page = await open_page(server.base_url, "page")
    requested: list[str] = []
    page.page.on("request", lambda req: requested.append(req.url))
    name = "<img src=x onerror=window.__xss=1>"

    created = await page.create_user(name, unique_email("xss"))
    user_id = created["id"]
    cell = page.cell(user_id, "name")
    await expect(cell).to_have_text(name, timeout=STREAM_TIMEOUT_MS)
    assert await cell.evaluate("td => td.textContent") == name
    await expect(cell.locator("img")).to_have_count(0)
    await expect(page.page.locator("main img")).to_have_count(0)
    log_name = page.page.locator(f'[data-testid="event-log-entry"][data-id="{user_id}"] .log-name')
    assert await log_name.evaluate("span => span.textContent") == name

    # The editor shows it as an input value, still inert.
    await page.row(user_id).get_by_test_id("edit").click()
    await expect(page.row(user_id).get_by_test_id("edit-name")).to_have_value(name)
    await page.row(user_id).get_by_test_id("cancel").click()

    # A later change arriving proves the page has kept processing since the markup arrived.
    later = await insert_user(db, "After the markup", unique_email("after"))
    await expect(page.row(later)).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    assert await page.page.evaluate("typeof window.__xss") == "undefined"
    assert not [url for url in requested if url.rstrip("/").endswith("/x")], requested


async def test_screenshot_with_data(
    server: ServerProcess, open_page: OpenPage, http: httpx.AsyncClient, artifacts_dir: Path
) -> None:
    """The page with a few users and log entries is saved as a screenshot among the run's artifacts."""
    page = await open_page(server.base_url, "page")
    token = secrets.token_hex(2)
    people = ["Ada Lovelace", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Ken Thompson"]
    users = []
    for person in people:
        email = f"{person.split()[0].lower()}.{token}@example.com"
        response = await http.post("/users", json={"name": person, "email": email})
        assert response.status_code == 201, response.text
        users.append(response.json())
    grace, ken = users[1], users[4]
    response = await http.patch(f"/users/{grace['id']}", json={"name": "Grace Brewster Hopper"})
    assert response.status_code == 200, response.text
    assert (await http.delete(f"/users/{ken['id']}")).status_code == 204

    await expect(page.any_row(ken["id"])).to_have_count(0, timeout=STREAM_TIMEOUT_MS)
    await expect(page.cell(grace["id"], "name")).to_have_text("Grace Brewster Hopper")
    for user in users[:4]:
        await expect(page.row(user["id"])).to_have_count(1)
    await expect(page.page.locator('[data-testid="event-log-entry"][data-kind="change"]')).not_to_have_count(0)

    path = artifacts_dir / "web_demo.png"
    await page.page.screenshot(path=path, animations="disabled")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000, "suspiciously small screenshot"


async def test_phone_width_has_no_horizontal_scroll(server: ServerProcess, open_page: OpenPage) -> None:
    """At 375 px wide the document never scrolls sideways, even with long unbroken values, and the form works."""
    page = await open_page(server.base_url, "phone", viewport=PHONE)
    view: Page = page.page

    async def scroll_width() -> int:
        width: int = await view.evaluate("document.documentElement.scrollWidth")
        return width

    assert await scroll_width() <= PHONE["width"]
    form = view.get_by_test_id("create-form")
    for testid in ("create-name", "create-email", "create-submit"):
        box = await form.get_by_test_id(testid).bounding_box()
        assert box is not None, f"{testid} is not displayed"
        assert box["x"] >= 0, f"{testid} sticks out on the left: {box}"
        assert box["x"] + box["width"] <= PHONE["width"], f"{testid} sticks out on the right: {box}"

    long_name = "Wolfeschlegelsteinhausenbergerdorff" * 3
    long_email = f"{'a' * 60}.{secrets.token_hex(4)}@an-unusually-long-domain-name.example.com"
    await form.get_by_test_id("create-name").tap()
    created = await page.create_user(long_name, long_email)
    await expect(page.cell(created["id"], "name")).to_have_text(long_name, timeout=STREAM_TIMEOUT_MS)
    await expect(form.get_by_test_id("create-status")).to_contain_text(f"Added user {created['id']}")
    assert await scroll_width() <= PHONE["width"]
