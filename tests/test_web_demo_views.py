"""The demo page applies a change's `view` (docs/protocol.md, "change") through its live view (realtime.js
`LiveView`): an update that takes a row out of the page's filter removes it and one that brings it back adds it; a
TRUNCATE of `users` empties the table of every page, filtered or not, and rows inserted after it show as usual; an
UPDATE of 20 rows in one transaction is drawn in one step, the table going from before to after with nothing in
between.

The browser is Debian's Chromium driven by playwright (tests/support/browser.py); the pages talk to a server of
this module's own on the suite's shared database. The TRUNCATE empties the shared `users` table for good: the
tests after this module make their own users and assume nothing about what the table already holds, so nothing
is put back, and the test inserts the users it needs after the TRUNCATE.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.async_api import expect

from realtime.dsn import Dsn
from tests.support.browser import STREAM_TIMEOUT_MS, DemoPage, OpenDemo
from tests.support.server import ServerProcess, running_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)


def unique_email(label: str) -> str:
    return f"{label}.{secrets.token_hex(4)}@example.com"


async def insert_user(db: asyncpg.Connection, name: str, email: str) -> int:
    user_id: int = await db.fetchval("INSERT INTO users (name, email) VALUES ($1, $2) RETURNING id", name, email)
    return user_id


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def views_server(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server of this module's own, so no other module's pages or clients see its TRUNCATE."""
    async with running_server(database_url, artifacts_dir / "web-demo-views.log") as server:
        yield server


@pytest.fixture
async def http(views_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=views_server.base_url, timeout=10.0) as client:
        yield client


# ---------------------------------------------------------------------------------------------- helpers


async def apply_filter(page: DemoPage, column: str, op: str, value: str) -> None:
    """Filter the table through the page's form and wait until the filtered snapshot is shown."""
    form = page.page.get_by_test_id("filter-form")
    await form.get_by_test_id("filter-column").select_option(column)
    await form.get_by_test_id("filter-op").select_option(op)
    await form.get_by_test_id("filter-value").fill(value)
    await form.get_by_test_id("filter-apply").click()
    await expect(page.page.get_by_test_id("filter-active")).to_have_text(f'where {column} {op} "{value}"')
    # Applying clears the seq display; it shows a number again once the new subscription's snapshot is in.
    await page.wait_ready()
    await expect(page.page.get_by_test_id("subscription")).to_have_text("live", timeout=STREAM_TIMEOUT_MS)


async def set_email(http: httpx.AsyncClient, user_id: int, email: str) -> dict[str, Any]:
    """Change a user's email over REST, conditional on the version a GET just returned."""
    current = await http.get(f"/users/{user_id}")
    assert current.status_code == 200, current.text
    response = await http.patch(
        f"/users/{user_id}", json={"email": email}, headers={"If-Match": current.headers["ETag"]}
    )
    assert response.status_code == 200, response.text
    user: dict[str, Any] = response.json()
    return user


async def changes_received(page: DemoPage, since: int, count: int) -> list[dict[str, Any]]:
    """The change frames the page received from its `since`-th frame on, in order, once there are `count`."""

    async def received() -> list[dict[str, Any]]:
        frames = [frame for _, frame in page.received_frames[since:] if frame.get("type") == "change"]
        return frames if len(frames) >= count else []

    frames: list[dict[str, Any]] = await eventually(
        received, STREAM_TIMEOUT_MS / 1000, f"{count} changes on {page.name}"
    )
    return frames


# ------------------------------------------------------------------------------------------------- tests


async def test_update_out_of_the_filter_removes_the_row_and_back_adds_it(
    demo_page: OpenDemo, views_server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Filtered on `email eq X`, an update of the email away from X removes the row and one back to X re-adds it."""
    email = unique_email("filtered")
    user_id = await insert_user(db, "Filtered Fiona", email)
    other = await insert_user(db, "Other Otto", unique_email("other"))
    page = await demo_page("page", views_server.base_url)
    await page.page.evaluate("window.__notReloaded = true")
    await expect(page.row(other)).to_have_count(1, timeout=STREAM_TIMEOUT_MS)

    await apply_filter(page, "email", "eq", email)
    rows = page.page.get_by_test_id("user-row")
    await expect(rows).to_have_count(1)
    await expect(page.cell(user_id, "email")).to_have_text(email)
    await expect(page.page.get_by_test_id("user-count")).to_have_text("1 user")
    start = len(page.received_frames)

    renders = await page.renders()

    moved = await set_email(http, user_id, unique_email("moved"))
    await expect(page.any_row(user_id)).to_have_count(0, timeout=STREAM_TIMEOUT_MS)
    await expect(page.page.get_by_test_id("user-count")).to_have_text("0 users")
    assert await page.renders() == renders + 1
    removed = await changes_received(page, start, 1)
    assert [(f["op"], f["view"], f["key"]) for f in removed] == [("UPDATE", "removed", {"id": user_id})], removed
    assert "row" not in removed[0]

    back = await set_email(http, user_id, email)
    assert back["version"] == moved["version"] + 1
    await expect(page.cell(user_id, "email")).to_have_text(email, timeout=STREAM_TIMEOUT_MS)
    await expect(page.cell(user_id, "version")).to_have_text(str(back["version"]))
    await expect(rows).to_have_count(1)
    await expect(page.page.get_by_test_id("user-count")).to_have_text("1 user")
    assert await page.renders() == renders + 2
    added = (await changes_received(page, start, 2))[1:]
    assert [(f["op"], f["view"], f["key"]) for f in added] == [("UPDATE", "added", {"id": user_id})], added
    assert "old" not in added[0]

    # The filter stayed in force throughout, and the other user never came back into this view.
    await expect(page.page.get_by_test_id("filter-active")).to_have_text(f'where email eq "{email}"')
    await expect(page.row(other)).to_have_count(0)
    assert await page.page.evaluate("window.__notReloaded") is True


async def test_truncate_empties_every_page_and_later_inserts_show(
    demo_page: OpenDemo, views_server: ServerProcess, db: asyncpg.Connection
) -> None:
    """A TRUNCATE of `users` empties a plain and a filtered page alike; a user inserted after it shows in both."""
    email = unique_email("truncated")
    kept_before = [
        await insert_user(db, "Before Bea", email),
        await insert_user(db, "Before Bo", unique_email("before")),
    ]
    everything = await demo_page("all", views_server.base_url)
    filtered = await demo_page("filtered", views_server.base_url)
    await apply_filter(filtered, "email", "eq", email)
    for user_id in kept_before:
        await expect(everything.row(user_id)).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    await expect(filtered.page.get_by_test_id("user-row")).to_have_count(1)
    await expect(filtered.row(kept_before[0])).to_have_count(1)
    starts = {page.name: len(page.received_frames) for page in (everything, filtered)}
    renders = {page.name: await page.renders() for page in (everything, filtered)}

    await db.execute("TRUNCATE users", timeout=10)
    for page in (everything, filtered):
        await expect(page.page.get_by_test_id("users-body").locator("tr")).to_have_count(0, timeout=STREAM_TIMEOUT_MS)
        await expect(page.page.get_by_test_id("user-count")).to_have_text("0 users")
        assert await page.renders() == renders[page.name] + 1, page.name
        resets = await changes_received(page, starts[page.name], 1)
        assert [(f["op"], f["view"]) for f in resets] == [("TRUNCATE", "reset")], (page.name, resets)
        assert not {"key", "row", "old"} & resets[0].keys(), resets
        await expect(page.page.get_by_test_id("seq")).to_have_text(str(resets[0]["seq"]))

    # The email is free again; the new owner matches the filtered page's filter too.
    newcomer = await insert_user(db, "After Ada", email)
    for page in (everything, filtered):
        await expect(page.cell(newcomer, "email")).to_have_text(email, timeout=STREAM_TIMEOUT_MS)
        await expect(page.page.get_by_test_id("user-row")).to_have_count(1)
        await expect(page.page.get_by_test_id("user-count")).to_have_text("1 user")
        added = (await changes_received(page, starts[page.name], 2))[1:]
        assert [(f["op"], f["view"], f["key"]) for f in added] == [("INSERT", "added", {"id": newcomer})], added


# Records, after every batch of DOM mutations in the table body, the emails the table shows, in order: the states a
# user could have seen. A page that drew each change of a transaction on its own would leave one per change.
_RECORD_TABLE_STATES = """
() => {
  const body = document.querySelector('[data-testid="users-body"]');
  const emails = () => [...body.querySelectorAll('[data-testid="user-row"] [data-testid="user-email"]')]
    .map((cell) => cell.textContent);
  window.__tableStates = [emails()];
  new MutationObserver(() => window.__tableStates.push(emails()))
    .observe(body, { subtree: true, childList: true, characterData: true, attributes: true });
}
"""


async def test_an_update_of_20_rows_in_one_transaction_is_drawn_in_one_step(
    demo_page: OpenDemo, views_server: ServerProcess, db: asyncpg.Connection
) -> None:
    """UPDATE of the 20 rows a filtered page shows, in one transaction: 20 frames of one `tx`, the last with
    `tx_end`, drawn in one render; the table was never seen with some rows changed and others not."""
    name = f"Batch {secrets.token_hex(4)}"
    async with db.transaction():
        ids = [await insert_user(db, name, unique_email(f"batch{n}")) for n in range(20)]
    page = await demo_page("page", views_server.base_url)
    await apply_filter(page, "name", "eq", name)
    await expect(page.page.get_by_test_id("user-row")).to_have_count(20, timeout=STREAM_TIMEOUT_MS)
    before: list[str] = [await page.cell(user_id, "email").inner_text() for user_id in sorted(ids, reverse=True)]
    after = [f"moved.{email}" for email in before]
    await page.page.evaluate(_RECORD_TABLE_STATES)
    renders = await page.renders()
    start = len(page.received_frames)

    async with db.transaction():
        await db.execute("UPDATE users SET email = 'moved.' || email WHERE name = $1", name)
    await expect(page.cell(min(ids), "email")).to_have_text(after[-1], timeout=STREAM_TIMEOUT_MS)

    frames = await changes_received(page, start, 20)
    assert len(frames) == 20, frames
    assert {(f["op"], f["view"]) for f in frames} == {("UPDATE", "modified")}
    assert len({f["tx"] for f in frames}) == 1, frames
    assert [f.get("tx_end", False) for f in frames] == [False] * 19 + [True]
    assert await page.renders() == renders + 1
    states: list[list[str]] = await page.page.evaluate("window.__tableStates")
    assert states[0] == before
    assert states[-1] == after
    between = [state for state in states if state not in (before, after)]
    assert not between, f"the table showed {len(between)} states between before and after, e.g. {between[0]}"
    await expect(page.page.get_by_test_id("seq")).to_have_text(str(frames[-1]["seq"]))
