"""The listener: one dedicated connection per process that LISTENs and reads the changelog in order.

Lifecycle:
    connecting    open a connection of its own (never pooled: a pool resets connections with UNLISTEN *),
                  named `realtime-listener` in pg_stat_activity
    catching up   LISTEN is registered (and, autocommit, committed) *before* reading, so a change committed
                  meanwhile is either read now or wakes us later; then every change after the hub's position
                  up to the stable position is read in batches and published
    live          each NOTIFY wakes the reader (under a stream of commits, at most one read per 2 ms); every
                  heartbeat interval a self-NOTIFY must come back through this very connection within the
                  timeout, which catches half-open TCP that asyncpg alone would never notice; each heartbeat
                  also reads, so a lost wake-up costs at most one interval
    reconnecting  on any failure the connection is dropped and reopened after a capped, jittered exponential
                  backoff; catching up from the hub's position means subscribers see no gap

The NOTIFY callback only sets an event; all reading happens on the listener's own task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from realtime.db import DATABASE_ERRORS, describe_failure
from realtime.dsn import Dsn
from realtime.metrics import Metrics
from realtime.stream import changelog
from realtime.stream.hub import Hub

_log = logging.getLogger(__name__)

CHANNEL = "realtime_changes"
APPLICATION_NAME = "realtime-listener"
State = Literal["connecting", "live", "reconnecting", "stopped"]
_MIN_READ_INTERVAL_S = 0.002
_SPANS_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ListenerSettings:
    batch_size: int = 1000
    heartbeat_s: float = 2.0
    heartbeat_timeout_s: float = 5.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0


def backoff_delays(initial: float, cap: float, rng: Callable[[], float] = random.random) -> Any:
    """Full-jitter exponential backoff: uniform in [0, min(cap, initial * 2**attempt)]."""
    attempt = 0
    while True:
        yield rng() * min(cap, initial * (2**attempt))
        attempt = min(attempt + 1, 30)


class Listener:
    def __init__(self, url: Dsn, hub: Hub, settings: ListenerSettings, metrics: Metrics | None = None) -> None:
        self._url = url
        self._hub = hub
        self._settings = settings
        self._metrics = metrics or Metrics.off()
        self._wake = asyncio.Event()
        self._heartbeat_back = asyncio.Event()
        self._lost = asyncio.Event()
        self._heartbeat_channel = f"realtime_heartbeat_{os.getpid()}"
        self._state: State = "connecting"
        self._metrics.listener_state(self._state)
        self.connected_once = asyncio.Event()
        self.reconnects = 0
        self.backend_pid: int | None = None
        self._last_change_lag_s: float | None = None

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._state = state
        self._metrics.listener_state(state)

    def status(self) -> dict[str, Any]:
        """For /readyz: state, position, and how far behind the last published change was."""
        return {
            "state": self.state,
            "position": self._hub.position,
            "reconnects": self.reconnects,
            "last_change_lag_ms": None if self._last_change_lag_s is None else round(self._last_change_lag_s * 1000, 1),
            "subscriptions": self._hub.subscription_count,
            "connections": self._hub.connection_counts(),
        }

    async def run(self) -> None:
        """Run until cancelled, reconnecting as needed."""
        settings = self._settings
        delays = backoff_delays(settings.backoff_initial_s, settings.backoff_max_s)
        try:
            while True:
                was_live = False
                try:
                    await self._session()
                except DATABASE_ERRORS as error:
                    was_live = self.state == "live"
                    self._note_lost(error)
                if was_live:  # a link that worked starts its retries from the shortest delay again
                    delays = backoff_delays(settings.backoff_initial_s, settings.backoff_max_s)
                await asyncio.sleep(next(delays))
        finally:
            self.state = "stopped"

    def _note_lost(self, error: BaseException) -> None:
        if self.state != "reconnecting":
            _log.warning("listener connection lost (%s); reconnecting", describe_failure(error))
        self.state = "reconnecting"
        self.reconnects += 1
        self._metrics.listener_reconnecting()

    async def _session(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._url.asyncpg(),
            server_settings={"application_name": APPLICATION_NAME},
            timeout=self._settings.heartbeat_timeout_s,
        )
        self._lost.clear()
        conn.add_termination_listener(lambda _conn: self._on_terminated())
        try:
            timeout = self._settings.heartbeat_timeout_s
            await conn.add_listener(CHANNEL, self._on_notify)
            await conn.add_listener(self._heartbeat_channel, self._on_heartbeat)
            self.backend_pid = conn.get_server_pid()
            if not self.connected_once.is_set():
                # A fresh process starts live from the current head: history is served by `since`/snapshot.
                async with asyncio.timeout(timeout):
                    self._hub.position = await changelog.stable_position(conn)
            await self._read_all(conn)
            if self.state != "live":
                _log.info("listener live at position %d (backend pid %s)", self._hub.position, self.backend_pid)
            self.state = "live"
            self.connected_once.set()
            await self._serve(conn)
        finally:
            conn.terminate()

    async def _serve(self, conn: asyncpg.Connection) -> None:
        heartbeat_s = self._settings.heartbeat_s
        next_heartbeat = time.monotonic() + heartbeat_s
        last_read = 0.0
        while True:
            remaining = next_heartbeat - time.monotonic()
            if remaining <= 0:
                await self._heartbeat(conn)
                await self._read_all(conn)
                next_heartbeat = time.monotonic() + heartbeat_s
                continue
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                continue
            if self._lost.is_set():
                raise ConnectionError("listener connection terminated")
            # Under a stream of commits, reading at most every _MIN_READ_INTERVAL_S gathers more changes per read:
            # fewer stable-position locks for writers to wait behind (one per read, per process) and more frames
            # per socket write. A change that wakes an idle listener is read at once.
            await asyncio.sleep(max(0.0, last_read + _MIN_READ_INTERVAL_S - time.monotonic()))
            self._wake.clear()
            last_read = time.monotonic()
            await self._read_all(conn)

    async def _heartbeat(self, conn: asyncpg.Connection) -> None:
        """A NOTIFY to ourselves must come back through this connection in time, or the link is dead."""
        timeout = self._settings.heartbeat_timeout_s
        self._heartbeat_back.clear()
        async with asyncio.timeout(timeout):
            await conn.execute(f"NOTIFY {self._heartbeat_channel}")
            await self._heartbeat_back.wait()

    async def _read_all(self, conn: asyncpg.Connection) -> None:
        batch_size = self._settings.batch_size
        timeout = self._settings.heartbeat_timeout_s
        try:
            async with asyncio.timeout(timeout):
                through = await changelog.stable_position(conn)
        except asyncpg.LockNotAvailableError:
            # A transaction has held a position for seconds (SET CONSTRAINTS ALL IMMEDIATE in a long transaction):
            # nothing after it can be published before it ends. The link is fine; the next heartbeat tries again.
            _log.info("a transaction holding a stream position is still open; waiting for it")
            return
        if self._hub.position >= through:
            return
        # Grouping a long range's changes by transaction reads it once more, a few seconds' worth for millions of
        # changes: given more time than one piece's read.
        async with asyncio.timeout(max(timeout, _SPANS_TIMEOUT_S)):
            pieces = await changelog.pieces(conn, self._hub.position, through, batch_size)
        for after, until in pieces:
            async with asyncio.timeout(timeout):
                changes = await changelog.read_range(conn, after, until)
            if not changes:
                continue  # only positions of rolled-back transactions here
            read_at = time.time()
            hub = self._hub
            sending = hub.has_subscriptions
            hub.publish(changes, pieces.continuing(changes, until))
            published_at = time.time()
            newest_commit = datetime.fromisoformat(changes[-1].ts).timestamp()
            self._last_change_lag_s = max(0.0, published_at - newest_commit)
            oldest_commit = newest_commit if len(changes) == 1 else datetime.fromisoformat(changes[0].ts).timestamp()
            self._metrics.read(len(changes), oldest_commit, read_at, published_at if sending else None)
        # Everything up to `through` is final and published, holes included: replays may start there.
        self._hub.position = max(self._hub.position, through)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def _on_terminated(self) -> None:
        # Wakes the reader too, so the loop waits on a single event and notices the loss at once.
        self._lost.set()
        self._wake.set()

    def _on_heartbeat(self, *_: object) -> None:
        self._heartbeat_back.set()
