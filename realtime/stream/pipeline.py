"""The stream pipeline of one process, owned by the app's lifespan.

Lifecycle:
    start   listener task (connects, catches up, goes live), stuck-send watchdog, retention pruner; a chained
            SIGTERM/SIGINT handler so WebSockets are closed with 1012 and their resume position before the
            server starts tearing connections down
    run     endpoint sessions register subscriptions with the hub and read history through `reads`
    died    a background task that ends on its own (they run until cancelled) is a fault: `failure` says which
            and of what, /readyz answers 503 from then on, and the process shuts down to be restarted
            (realtime/supervision.py)
    stop    every WebSocket closed with 1012 (bounded by SHUTDOWN_TIMEOUT_S), then background tasks cancelled;
            what a task died of (or raised while being cancelled) is raised again once all is stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from realtime import supervision
from realtime.auth.policy import Policy
from realtime.config import Settings
from realtime.db import DATABASE_ERRORS, bounded_connection, pool_waiting
from realtime.dsn import Dsn
from realtime.metrics import Metrics
from realtime.origins import Guard
from realtime.stream import changelog
from realtime.stream.admission import Admission
from realtime.stream.catalog import Catalog
from realtime.stream.hub import Hub
from realtime.stream.listener import Listener, ListenerSettings
from realtime.stream.outbox import CLOSE_RESTARTING, Flusher
from realtime.stream.reads import MemoryBudget, ReadSlots

_log = logging.getLogger(__name__)
_WATCHDOG_INTERVAL_S = 1.0
# Read budget when STATEMENT_TIMEOUT_MS=0 disables the statement bound; pruning a large changelog may take long.
_NO_STATEMENT_TIMEOUT_MS = 60_000
_PRUNE_BUDGET_S = 300.0


class StreamPipeline:
    def __init__(
        self, settings: Settings, url: Dsn, engine: AsyncEngine, guard: Guard, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics.off()
        # The app's Host and Origin rule, the one its HTTP middleware applies; /ws applies it to every upgrade.
        self.guard = guard
        # The row-level policy (bound to the database at start-up), or None: every identity may read everything.
        self.policy: Policy | None = None
        self._engine = engine
        self.hub = Hub(self.metrics)
        self.reads = ReadSlots(self.connection, settings.stream_max_concurrent_reads, settings.stream_read_wait_s)
        self.snapshot_memory = MemoryBudget(settings.stream_snapshot_budget_bytes)
        self.catalog = Catalog(self.reads.connection)
        self.admission = Admission(settings.ws_max_connections, settings.ws_max_connections_per_client)
        self.listener = Listener(
            url,
            self.hub,
            ListenerSettings(
                batch_size=settings.listener_batch_size,
                heartbeat_s=settings.listener_heartbeat_s,
                heartbeat_timeout_s=settings.listener_heartbeat_timeout_s,
                backoff_initial_s=settings.listener_backoff_initial_s,
                backoff_max_s=settings.listener_backoff_max_s,
            ),
            self.metrics,
        )
        self.flusher = Flusher()
        self._tasks: list[asyncio.Task[None]] = []
        self._previous_handlers: dict[int, Any] = {}
        # Which task died and of what ("realtime-pruner: TypeError: ..."), for /readyz; None while all run.
        self.failure: str | None = None
        self._death: Exception | None = None
        self._stopping = False

    @contextlib.asynccontextmanager
    async def connection(self, seconds: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A pooled asyncpg connection, got, used and given back within `seconds` (default: one read's budget,
        POOL_TIMEOUT to get it plus a statement's time), so a frozen database frees a read slot in bounded time.
        Client-driven reads take it through `reads`, which bounds how many run at once."""
        settings = self.settings
        budget = seconds or settings.pool_timeout + (settings.statement_timeout_ms or _NO_STATEMENT_TIMEOUT_MS) / 1000
        async with bounded_connection(self._engine, budget) as conn:
            raw = await conn.get_raw_connection()
            driver: asyncpg.Connection = raw.driver_connection
            try:
                yield driver
            except asyncio.CancelledError:
                # Cancelled mid-statement (its client left): asyncpg would only ask the server to cancel, and the
                # connection could go back to the pool still running it, or holding a lock it was just granted.
                driver.terminate()
                raise

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.listener.run(), name="realtime-listener"),
            asyncio.create_task(self._watchdog(), name="realtime-watchdog"),
            asyncio.create_task(self._pruner(), name="realtime-pruner"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._supervise)
        self._chain_signal_handlers()

    async def stop(self) -> None:
        self._stopping = True
        self._restore_signal_handlers()
        self.hub.close_all(CLOSE_RESTARTING, "restarting", self.settings.shutdown_timeout_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_timeout_s):
                await self.hub.no_connections.wait()
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        # Gathered so that every task is finished before anything is raised; then nothing is swallowed: the
        # lifespan ends in error and the server reports a failed shutdown instead of a clean one.
        errors = [result for result in results if isinstance(result, Exception)]
        if not errors and self._death is not None:
            errors = [self._death]  # a task that returned: nothing to gather, but it died all the same
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup("stream pipeline tasks failed", errors)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """A task ended other than by stop()'s cancel: without it the process would go on serving broken (no
        changes delivered, stuck sends never cut, the changelog never pruned), so it is ended to be restarted."""
        if task.cancelled() or self._stopping:
            return
        error = task.exception()
        if error is None:
            error = RuntimeError(f"{task.get_name()} returned, and it must run until stopped")
        elif not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: the loop itself is ending
            return
        _log.critical(
            "background task %s died; /readyz answers 503 and the process shuts down to be restarted",
            task.get_name(),
            exc_info=error,
        )
        if self._death is None:
            self._death = error
            self.failure = f"{task.get_name()}: {type(error).__name__}: {error}"
            supervision.task_died(self.failure)

    def _chain_signal_handlers(self) -> None:
        """Close WebSockets with 1012 + last seq the moment a stop signal arrives, then let the server's own
        handler run. Without this the server would cut them with a bare 1012 before the lifespan ends."""
        loop = asyncio.get_running_loop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def handler(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(
                    self.hub.close_all, CLOSE_RESTARTING, "restarting", self.settings.shutdown_timeout_s
                )
                previous(sig, frame)

            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread (e.g. an in-process test server): nothing to chain
                return
            self._previous_handlers[signum] = previous

    def _restore_signal_handlers(self) -> None:
        for signum, previous in self._previous_handlers.items():
            with contextlib.suppress(ValueError):
                signal.signal(signum, previous)
        self._previous_handlers.clear()

    async def _watchdog(self) -> None:
        """Every second: cut the sends stuck too long, and bring the metrics' counts up to date."""
        loop = asyncio.get_running_loop()
        pool = self._engine.pool
        while True:
            await asyncio.sleep(_WATCHDOG_INTERVAL_S)
            stuck = self.hub.expire_stuck_sends(loop.time(), self.settings.ws_send_timeout_s)
            if stuck:
                self.metrics.stuck(stuck)
            self.metrics.sample(pool.checkedout(), pool_waiting())  # type: ignore[attr-defined]

    async def _pruner(self) -> None:
        settings = self.settings
        while True:
            await asyncio.sleep(settings.retention_interval_s)
            try:
                async with self.connection(_PRUNE_BUDGET_S) as conn:
                    deleted = await changelog.prune(
                        conn, settings.retention_max_age_s, settings.retention_max_rows, _PRUNE_BUDGET_S
                    )
            except DATABASE_ERRORS as error:
                _log.warning("changelog pruning failed (%s); will retry", error)
                self.metrics.pruned(None)
                continue
            self.metrics.pruned(deleted)
            if deleted:
                _log.info("pruned %d changelog rows", deleted)
