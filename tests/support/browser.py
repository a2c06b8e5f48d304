"""Driving the demo page in Debian's Chromium through playwright's async API.

The browser is the system one (/usr/bin/chromium); nothing is downloaded. `DemoPage` wraps one tab on the demo
and knows its `data-testid` hooks (listed at the top of web_demo/app.js). Every wait has a deadline: playwright's
`expect` polls a condition until its timeout, and nothing here sleeps to let something happen.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    ViewportSize,
    WebSocket,
    expect,
)
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

CHROMIUM = "/usr/bin/chromium"
# Quiet, sandbox-free headless Chromium: the tests run as root on a loopback-only machine.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 375, "height": 740}
# How long a change may take to reach a page on a loaded 2-core machine; generous, since it is only a bound.
STREAM_TIMEOUT_MS = 15_000
_A_NUMBER = re.compile(r"^\d+$")


async def launch(playwright: Playwright) -> Browser:
    """Start the system Chromium, headless; fail with a hint when it is missing."""
    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(f"{CHROMIUM} not found; `make browser` (apt-get install chromium) installs it")
    return await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@dataclass
class DemoPage:
    """One tab on the demo page, with what it reported (uncaught exceptions, console output) and every frame it
    sent on its WebSockets."""

    page: Page
    name: str
    page_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    sent_frames: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    async def new(cls, context: BrowserContext, name: str) -> DemoPage:
        """A blank tab that records what it reports from now on; `load` opens the demo in it."""
        page = await context.new_page()
        demo = cls(page=page, name=name)
        page.on("pageerror", lambda error: demo.page_errors.append(str(error)))
        page.on("console", demo._on_console)
        page.on("websocket", demo._on_websocket)
        return demo

    async def load(self, base_url: str) -> None:
        await self.page.goto(base_url + "/")
        await self.wait_ready()

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    def _on_websocket(self, socket: WebSocket) -> None:
        socket.on("framesent", lambda payload: self.sent_frames.append(json.loads(payload)))

    async def wait_ready(self) -> None:
        """The socket is live and the table holds its snapshot (the seq display shows a position)."""
        await expect(self.status).to_have_text("live", timeout=STREAM_TIMEOUT_MS)
        await expect(self.page.get_by_test_id("seq")).to_have_text(_A_NUMBER, timeout=STREAM_TIMEOUT_MS)

    # -- hooks

    @property
    def status(self) -> Locator:
        return self.page.get_by_test_id("status")

    def row(self, user_id: int) -> Locator:
        """The displayed (not fading-out) row of one user."""
        return self.page.locator(f'[data-testid="user-row"][data-id="{user_id}"]')

    def any_row(self, user_id: int) -> Locator:
        """Every table row of one user, including one fading out after a delete."""
        return self.page.locator(f'#users-body tr[data-id="{user_id}"]')

    def cell(self, user_id: int, column: str) -> Locator:
        return self.row(user_id).get_by_test_id(f"user-{column}")

    # -- reading state

    async def seq(self) -> int | None:
        text = (await self.page.get_by_test_id("seq").text_content() or "").strip()
        return int(text) if text.isdigit() else None

    async def logged_changes(self) -> list[dict[str, Any]]:
        """The change entries of the event log, oldest first, as {seq, op, id}."""
        entries: list[dict[str, Any]] = await self.page.eval_on_selector_all(
            '[data-testid="event-log-entry"][data-kind="change"]',
            "nodes => nodes.map(n => ({seq: Number(n.dataset.seq), op: n.dataset.op, id: Number(n.dataset.id)}))",
        )
        entries.reverse()  # the log is newest first
        return entries

    async def wait_seq_at_least(self, seq: int, timeout_ms: float = STREAM_TIMEOUT_MS) -> None:
        """Wait until the table's subscription has received everything up to `seq`."""
        try:
            await self.page.wait_for_function(
                "seq => Number(document.querySelector('[data-testid=\"seq\"]').textContent) >= seq",
                arg=seq,
                timeout=timeout_ms,
            )
        except PlaywrightTimeoutError:
            shown = await self.seq()
            raise AssertionError(
                f"page {self.name} stuck at seq {shown}, expected {seq} within {timeout_ms} ms"
            ) from None

    def subscribes(self) -> list[dict[str, Any]]:
        """The `subscribe` frames the page sent, in order."""
        return [frame for frame in self.sent_frames if frame.get("type") == "subscribe"]

    # -- acting

    async def create_user(self, name: str, email: str, expect_status: int = 201) -> dict[str, Any]:
        """Fill in and submit the create form; returns the REST response body (the user, or a problem)."""
        form = self.page.get_by_test_id("create-form")
        await form.get_by_test_id("create-name").fill(name)
        await form.get_by_test_id("create-email").fill(email)
        async with self.page.expect_response(_is_request("POST", "/users")) as answer:
            await form.get_by_test_id("create-submit").click()
        response = await answer.value
        assert response.status == expect_status, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def save_edit(self, user_id: int, name: str) -> int:
        """Open the inline editor of a row, change the name, save; returns the PATCH response status."""
        row = self.row(user_id)
        if await row.get_by_test_id("save").count() == 0:
            await row.get_by_test_id("edit").click()
        await row.get_by_test_id("edit-name").fill(name)
        async with self.page.expect_response(_is_request("PATCH", f"/users/{user_id}")) as answer:
            await row.get_by_test_id("save").click()
        return (await answer.value).status

    def save_console(self, path: Path) -> None:
        path.write_text("\n".join([*self.console, *(f"pageerror: {error}" for error in self.page_errors)]) + "\n")


def _is_request(method: str, path: str) -> Callable[[Any], bool]:
    def matches(response: Any) -> bool:
        request = response.request
        return bool(request.method == method and request.url.split("?")[0].endswith(path))

    return matches
