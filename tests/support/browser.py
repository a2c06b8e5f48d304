"""Driving the demo page, and the client library on its own, in Debian's Chromium through playwright's async API.

The browser is the system one (/usr/bin/chromium); nothing is downloaded. The fixtures `browser` (one Chromium per
test module) and `demo_page` (demo tabs of a test's own) are shared by the browser test modules, which load this
module as a pytest plugin (tests/conftest.py). `DemoPage` wraps one tab on the demo and knows its `data-testid`
hooks (listed at the top of web_demo/app.js). `ClientTab` runs `realtime.js` as served
by the server under test, in a tab of that server's origin, with the options a test chooses, and records what it
reports. Every wait has a deadline: playwright's `expect` and `wait_for_function` poll a condition until their
timeout, and nothing here sleeps to let something happen.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    ViewportSize,
    WebSocket,
    async_playwright,
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
        raise RuntimeError(f"{CHROMIUM} not found; `make system-packages` (apt-get install chromium) installs it")
    return await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the test module."""
    async with async_playwright() as playwright:
        chromium = await launch(playwright)
        try:
            yield chromium
        finally:
            await chromium.close()


# `demo_page(name, base_url=None)`: a new tab on the demo, loaded and live when `base_url` is given.
OpenDemo = Callable[..., Awaitable["DemoPage"]]


@pytest.fixture
async def demo_page(browser: Browser, artifacts_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[OpenDemo]:
    """Open demo tabs, each in a browser context of its own (its own identity and network state); each tab's
    console is saved among the run's artifacts, and no tab may throw."""
    contexts: list[BrowserContext] = []
    pages: list[DemoPage] = []

    async def open_(name: str, base_url: str | None = None) -> DemoPage:
        context = await browser.new_context()
        contexts.append(context)
        page = await DemoPage.new(context, name)
        pages.append(page)  # before loading, so a page that never gets ready still leaves its console log
        if base_url is not None:
            await page.load(base_url)
        return page

    try:
        yield open_
    finally:
        for page in pages:
            page.save_console(artifacts_dir / f"{request.node.name}-{page.name}-console.log")
        for context in contexts:
            await context.close()
    errors = {page.name: page.page_errors for page in pages if page.page_errors}
    assert not errors, f"uncaught errors in the page: {errors}"


@dataclass
class DemoPage:
    """One tab on the demo page, with what it reported (uncaught exceptions, console output) and every frame it
    sent on its WebSockets."""

    page: Page
    name: str
    page_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    sent_frames: list[dict[str, Any]] = field(default_factory=list)
    # Every frame the page received, as (time.monotonic() on arrival here, frame).
    received_frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

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
        socket.on("framereceived", lambda payload: self.received_frames.append((time.monotonic(), json.loads(payload))))

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

    async def renders(self) -> int:
        """How many steps of its live view the page has drawn (its snapshot, then one per transaction)."""
        count: str | None = await self.page.get_by_test_id("users-body").get_attribute("data-renders")
        return int(count or 0)

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

    def errors_received(self) -> list[dict[str, Any]]:
        """The `error` frames the page received, in order."""
        return [frame for _, frame in self.received_frames if frame.get("type") == "error"]

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


# ------------------------------------------------------------------------------------------ the client alone

# The tab shows the library's own source, as the server under test serves it: a document of the server's origin
# with no script of its own, so that `/realtime.js` and `/ws` resolve against that server. (A page the test made
# up itself, e.g. with `page.route`, has no network address, and Chromium's local-network checks then refuse its
# WebSocket to 127.0.0.1.)
CLIENT_PAGE_PATH = "/realtime.js"

# Builds one RealtimeClient in the page and records, in `window.__rt.log`, everything it reports (status,
# disconnect and error events, every handler call) and every frame it sends and receives, each with the
# page's own clock (`t`, performance.now() in ms). The socket is the browser's WebSocket; the subclass only
# records frames (with the number of the socket, 1 for the first) before the client sees them, including
# frames that reach a socket the client has already given up on, and each socket it creates (`socket`).
#
# `window.__rt.view(spec)` builds a `LiveView` instead, recording each `render` (cause, seq, transactions, what each
# change did, the number of rows after it, frames still held) and each frame as it arrives; its rows stay readable
# in `window.__rt.views`. `window.__rt.dropWhen`, a predicate on received frames, makes the socket deaf at the
# first frame it accepts: that frame still reaches the client, later ones on that socket do not (recorded with
# `deaf: true`), and the socket is closed, as when a connection is lost between two frames.
#
# With `withToken: 'async'` (or `'sync'`) in the options the client gets a `getToken` that logs each call (`token`,
# with the page's wall clock in `wall`) and answers the token the test last gave with `setToken`; a token given
# with `thenHold` is answered once, and every later call waits until the test gives the next one.
_SET_UP_CLIENT = """
async (options) => {
  const { RealtimeClient, LiveView } = await import('/realtime.js');
  const log = [];
  const note = (entry) => log.push({ t: performance.now(), ...entry });
  const { withToken, ...clientOptions } = options;
  const tokens = { value: null, holdAfterNext: false, held: false, waiters: [] };
  if (withToken) {
    clientOptions.getToken = () => {
      note({ kind: 'token', wall: Date.now() });
      if (tokens.held) return new Promise((resolve) => tokens.waiters.push(resolve));
      if (tokens.holdAfterNext) tokens.held = true;
      return withToken === 'sync' ? tokens.value : Promise.resolve(tokens.value);
    };
  }
  let sockets = 0;
  class RecordingWebSocket extends WebSocket {
    constructor(url) {
      super(url);
      this.number = ++sockets;
      note({ kind: 'socket', socket: this.number });
      this.addEventListener('message', (event) => {
        const frame = JSON.parse(event.data);
        note({ kind: 'received', socket: this.number, frame, deaf: this.deaf === true });
        // Runs before the client's own handler: a socket made deaf passes nothing more on to it.
        if (this.deaf) {
          event.stopImmediatePropagation();
          return;
        }
        if (window.__rt.dropWhen?.(frame)) {
          window.__rt.dropWhen = null;
          this.deaf = true;
          note({ kind: 'drop', socket: this.number, seq: frame.seq });
          this.close();
        }
      });
    }
    send(data) {
      note({ kind: 'sent', socket: this.number, frame: JSON.parse(data) });
      super.send(data);
    }
  }
  const client = new RealtimeClient('/ws', { ...clientOptions, WebSocket: RecordingWebSocket });
  client.on('status', (status) => note({ kind: 'status', status }));
  client.on('disconnect', ({ code, reason }) => note({ kind: 'disconnect', code, reason }));
  client.on('error', (err) => note({ kind: 'client-error', code: err.code, message: err.message }));
  client.on('authenticated', ({ sub, role, exp }) => note({ kind: 'authenticated', sub, role, exp }));
  const subs = new Map();
  const views = new Map();
  window.__rt = {
    client,
    log,
    subs,
    views,
    dropWhen: null,
    setToken(value, thenHold) {
      tokens.value = value;
      tokens.held = false;
      tokens.holdAfterNext = false;
      const waiting = tokens.waiters.splice(0);
      for (const resolve of waiting) resolve(value);
      if (thenHold) {
        if (waiting.length) tokens.held = true;
        else tokens.holdAfterNext = true;
      }
    },
    subscribe(spec) {
      let sub;
      sub = client.subscribe(spec, {
        snapshot: (rows, seq) => note({ kind: 'snapshot', id: sub.id, seq, rows: rows.length }),
        subscribed: (seq) => note({ kind: 'subscribed', id: sub.id, seq, state: sub.state }),
        change: (frame) => note({ kind: 'change', id: sub.id, seq: frame.seq, op: frame.op }),
        reset: () => note({ kind: 'reset', id: sub.id }),
        retry: (err, delay) => note({
          kind: 'retry', id: sub.id, code: err.code, retryAfter: err.retryAfter, delay, state: sub.state,
        }),
        error: (err) => note({ kind: 'error', id: sub.id, code: err.code, state: sub.state }),
      });
      subs.set(sub.id, sub);
      return sub.id;
    },
    view(spec) {
      let view;
      const id = () => view.subscription.id;
      view = new LiveView(client, spec, {
        render: (update) => note({
          kind: 'render', id: id(), cause: update.cause, seq: update.seq, transactions: update.transactions,
          changes: update.changes.map((change) => change.view), size: update.rows.size, held: view.held,
        }),
        subscribed: (seq) => note({ kind: 'subscribed', id: id(), seq, state: view.subscription.state }),
        change: (frame) => note({
          kind: 'change', id: id(), seq: frame.seq, op: frame.op, tx: frame.tx ?? null, txEnd: frame.tx_end === true,
        }),
        reset: () => note({ kind: 'reset', id: id() }),
        error: (err) => note({ kind: 'error', id: id(), code: err.code, state: view.subscription.state }),
      });
      views.set(id(), view);
      return id();
    },
  };
}
"""


@dataclass
class ClientTab:
    """One tab running a `RealtimeClient` of the test's own against a real server (see `_SET_UP_CLIENT`)."""

    page: Page
    page_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    @classmethod
    async def open(cls, context: BrowserContext, base_url: str, options: dict[str, Any]) -> ClientTab:
        """A blank tab on `base_url`'s origin with a client built from `options`, not yet connected."""
        page = await context.new_page()
        tab = cls(page=page)
        page.on("pageerror", lambda error: tab.page_errors.append(str(error)))
        page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
        await page.goto(base_url + CLIENT_PAGE_PATH)
        await page.evaluate(_SET_UP_CLIENT, options)
        return tab

    async def subscribe(self, spec: dict[str, Any]) -> str:
        """`client.subscribe(spec)` with recording handlers; returns the subscription id."""
        sub_id: str = await self.page.evaluate("spec => window.__rt.subscribe(spec)", spec)
        return sub_id

    async def view(self, spec: dict[str, Any]) -> str:
        """`new LiveView(client, spec)` with recording handlers; returns its subscription's id."""
        sub_id: str = await self.page.evaluate("spec => window.__rt.view(spec)", spec)
        return sub_id

    async def view_rows(self, sub_id: str) -> dict[str, dict[str, Any]]:
        """The rows a view holds, by its keys."""
        rows: dict[str, dict[str, Any]] = await self.page.evaluate(
            "id => Object.fromEntries(window.__rt.views.get(id).rows)", sub_id
        )
        return rows

    async def drop_socket_when(self, predicate: str) -> None:
        """Lose the connection right after the first received frame for which the JavaScript `predicate` holds."""
        await self.page.evaluate(f"() => {{ window.__rt.dropWhen = {predicate}; }}")

    async def connect(self) -> None:
        await self.page.evaluate("() => { window.__rt.client.connect(); }")

    async def close(self) -> None:
        await self.page.evaluate("() => { window.__rt.client.close(); }")

    async def set_token(self, token: str, then_hold: bool = False) -> None:
        """What the client's `getToken` answers from now on (a tab opened with `withToken`); with `then_hold`,
        only its next call, the ones after it waiting until the next `set_token`. Calls already waiting get it."""
        await self.page.evaluate("([token, hold]) => window.__rt.setToken(token, hold)", [token, then_hold])

    async def status(self) -> str:
        status: str = await self.page.evaluate("() => window.__rt.client.status")
        return status

    async def state(self, sub_id: str) -> str:
        state: str = await self.page.evaluate("id => window.__rt.subs.get(id).state", sub_id)
        return state

    async def log(self, kind: str | None = None) -> list[dict[str, Any]]:
        """What the client reported so far, oldest first; only entries of `kind` if given."""
        entries: list[dict[str, Any]] = await self.page.evaluate(
            "kind => window.__rt.log.filter(e => kind === null || e.kind === kind)", kind
        )
        return entries

    async def changes(self, sub_id: str) -> list[int]:
        """The positions of the changes delivered to a subscription's `change` handler, in order."""
        return [entry["seq"] for entry in await self.log("change") if entry["id"] == sub_id]

    async def sent(self, frame_type: str) -> list[dict[str, Any]]:
        return [entry["frame"] for entry in await self.log("sent") if entry["frame"]["type"] == frame_type]

    async def wait_for(self, kind: str, timeout_ms: float = STREAM_TIMEOUT_MS, after: int = 0, **match: Any) -> int:
        """Wait until the log holds an entry of `kind` with the given fields, at index `after` or later; returns
        its index."""
        try:
            handle = await self.page.wait_for_function(
                """({ kind, match, after }) => {
                  const log = window.__rt.log;
                  for (let i = after; i < log.length; i++) {
                    const e = log[i];
                    if (e.kind === kind && Object.entries(match).every(([k, v]) => e[k] === v)) return i + 1;
                  }
                  return 0;
                }""",
                arg={"kind": kind, "match": match, "after": after},
                timeout=timeout_ms,
            )
        except PlaywrightTimeoutError:
            tail = (await self.log())[-8:]
            raise AssertionError(f"no {kind} {match} within {timeout_ms} ms; last entries: {tail}") from None
        index: int = await handle.json_value()
        return index - 1

    async def expect_none(self, kind: str, within_ms: float, after: int = 0, **match: Any) -> None:
        """Fail if the log gains an entry of `kind` with the given fields (at index `after` or later) within
        `within_ms`: a wait with a deadline for something that must not happen."""
        try:
            found = await self.wait_for(kind, timeout_ms=within_ms, after=after, **match)
        except AssertionError:
            return
        raise AssertionError(f"unexpected {kind} {match}: {(await self.log())[found:]}")

    async def wait_change_at_least(self, sub_id: str, seq: int, timeout_ms: float = STREAM_TIMEOUT_MS) -> None:
        """Wait until the subscription has delivered a change at `seq` or later."""
        try:
            await self.page.wait_for_function(
                """({ id, seq }) => window.__rt.log.some(e => e.kind === 'change' && e.id === id && e.seq >= seq)""",
                arg={"id": sub_id, "seq": seq},
                timeout=timeout_ms,
            )
        except PlaywrightTimeoutError:
            delivered = await self.changes(sub_id)
            raise AssertionError(f"{sub_id} did not reach seq {seq} within {timeout_ms} ms: {delivered}") from None

    def save_console(self, path: Path) -> None:
        path.write_text("\n".join([*self.console, *(f"pageerror: {error}" for error in self.page_errors)]) + "\n")
