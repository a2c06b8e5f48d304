"""What the process counts for Prometheus (`/metrics`, metrics_endpoint.py), and the one place that names metrics.

Each event of the service is one method here (`connection_opened`, `read`, `http_request`...), so the code that
serves never touches prometheus-client; `Metrics.off()` (METRICS_ENABLED=false) does nothing in each of them.

Cost on the delivery path: frames and bytes are tallied in plain integers (`Tally`) and added to the counters once
a second by the pipeline's sampler (`sample`). The hub tallies a change's frames to subscribers that see whole
rows once per change, from counts it keeps as subscriptions come and go (hub.py), so broadcasting costs nothing
per frame; frames with a work of their own (filtered, restricted, held, merged) and the connection's replies and
history are tallied one by one. The listener records one observation per read of the changelog, not per change.
Events per connection, subscription or request (opened, closed, a snapshot) update their metrics at once.

Under `realtime serve` every worker writes its values to files in the directory serve prepares
(PROMETHEUS_MULTIPROC_DIR, metrics_directory.py) and a scrape answered by any worker adds them up: gauges of the
processes alive (`livesum`), counters and histograms of every process that ever ran, so totals never drop when a
worker is restarted. Without that directory (the app hosted some other way) each process counts on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Histogram

# Seconds from a commit to its change being read, or handed to the sockets: milliseconds normally, seconds when
# the database or the process is overloaded.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_HISTORY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LISTENER_STATES = ("connecting", "live", "reconnecting", "stopped")
# Label values a client chooses are bounded, or one client could make series without end: a WebSocket client may
# close with any code from 3000 to 4999, and a request may carry any method the HTTP parser knows.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CLOSE_CODES = frozenset(
    {"1000", "1001", "1005", "1006", "1008", "1011", "1012", "4000", "4001", "4008", "client", "refused"}
)


def close_label(code: int | str) -> str:
    """The `code` label of a close: the codes the server sends or a client commonly does, else `other`."""
    text = str(code)
    return text if text in _CLOSE_CODES else "other"


MULTIPROCESS_ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"


def forget_process(directory: Path, pid: int) -> None:
    """Remove the live gauges (`livesum` and the like) a process left in `directory`, as prometheus-client's
    mark_process_dead does, but without failing when another worker removed them first."""
    for path in directory.glob(f"gauge_live*_{pid}.db"):
        path.unlink(missing_ok=True)


@dataclass(slots=True)
class Tally:
    """Frames and bytes sent since the sampler last took them."""

    frames: int = 0
    byte_count: int = 0

    def add(self, frame: bytes) -> None:
        self.frames += 1
        self.byte_count += len(frame)

    def take(self) -> tuple[int, int]:
        taken = self.frames, self.byte_count
        self.frames = self.byte_count = 0
        return taken


class Metrics:
    """The metrics of one app, registered in a registry of its own (two apps in one process never collide)."""

    enabled = True

    def __init__(self) -> None:
        # Imported here, not with this module: prometheus-client decides at its import whether values go to
        # files (multiprocess) or memory, so it must come after `serve` has prepared the directory.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # Where prometheus-client writes this process's values, if anywhere: it read the environment at import.
        directory = os.environ.get(MULTIPROCESS_ENVIRONMENT)
        self.directory = Path(directory) if directory else None
        if self.directory is not None:
            # A process id may come back after a killed worker's: its live gauges must not start from the dead one's.
            forget_process(self.directory, os.getpid())
        self.registry: CollectorRegistry = CollectorRegistry()
        registry = self.registry
        self.tally = Tally()
        self.connections = Gauge(
            "realtime_connections",
            "Open WebSockets (transport=ws) and SSE streams (transport=sse).",
            ["transport"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.subscriptions = Gauge(
            "realtime_subscriptions",
            "Live subscriptions, by table.",
            ["table"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.frames = Counter(
            "realtime_frames_sent",
            "Frames sent to clients, WebSocket and SSE: changes, snapshot chunks, replies.",
            registry=registry,
        )
        self.sent_bytes = Counter(
            "realtime_sent_bytes", "Bytes of those frames, as WebSocket frames.", registry=registry
        )
        self.closes = Counter(
            "realtime_closes",
            "Streams ended, by close code: 4008 too slow, 1008 rate abuse, 1012 restarting, 4001 authentication;"
            " the client's own code (1000, 1001, 1006...) when it closed first.",
            ["transport", "code"],
            registry=registry,
        )
        self.stuck_sends = Counter(
            "realtime_stuck_sends",
            "Connections cut (4008) because a send stayed blocked longer than WS_SEND_TIMEOUT_S.",
            registry=registry,
        )
        self.changes_read = Counter(
            "realtime_changes_read", "Changes the listener read from the changelog.", registry=registry
        )
        self.commit_to_read = Histogram(
            "realtime_commit_to_read_seconds",
            "From the commit of the oldest change of a listener read to the end of that read (one per read).",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.commit_to_send = Histogram(
            "realtime_commit_to_send_seconds",
            "From the commit of the oldest change of a listener read to its frames being handed to every"
            " subscriber's socket (one per read while the process had subscribers).",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.listeners = Gauge(
            "realtime_listeners",
            "Change listeners (one per worker process) by state.",
            ["state"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.listener_reconnects = Counter(
            "realtime_listener_reconnects",
            "Times a listener lost its database connection and started reconnecting.",
            registry=registry,
        )
        self.snapshot_seconds = Histogram(
            "realtime_snapshot_seconds",
            "Time to read and send a subscription's snapshot.",
            buckets=_HISTORY_BUCKETS,
            registry=registry,
        )
        self.snapshot_rows = Counter("realtime_snapshot_rows", "Rows sent in snapshots.", registry=registry)
        self.replay_seconds = Histogram(
            "realtime_replay_seconds",
            "Time to read and send the changes a subscription asked for with `since`.",
            buckets=_HISTORY_BUCKETS,
            registry=registry,
        )
        self.replay_changes = Counter("realtime_replay_changes", "Changes sent by `since` replays.", registry=registry)
        self.http_seconds = Histogram(
            "realtime_http_request_duration_seconds",
            "HTTP requests answered, by method, route template and status, and the time from their arrival to the end"
            " of the answer (an SSE stream's lasts as long as the stream); `_count` counts the requests.",
            ["method", "route", "status"],
            buckets=_HTTP_BUCKETS,
            registry=registry,
        )
        # One histogram rather than a counter beside it: each observation under `serve` is a locked write to a
        # file, and a request's count is the histogram's `_count` already.
        self._http_children: dict[tuple[str, str, int], Histogram] = {}
        self.pool = Gauge(
            "realtime_db_pool_connections",
            "Database pool connections in use (state=in_use) and callers waiting for one (state=waiting).",
            ["state"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.pruned_rows = Counter(
            "realtime_retention_pruned_rows", "Changelog rows deleted by retention pruning.", registry=registry
        )
        self.prune_runs = Counter(
            "realtime_retention_runs",
            "Retention pruning runs, by outcome (ok, failed).",
            ["outcome"],
            registry=registry,
        )
        for state in LISTENER_STATES:
            self.listeners.labels(state)  # every state shows, at 0 when no listener is in it
        self._listener_state: str | None = None

    @staticmethod
    def off() -> Metrics:
        """Metrics that record nothing (METRICS_ENABLED=false)."""
        return _Off()

    def sample(self, pool_in_use: int, pool_waiting: int) -> None:
        """Called about once a second: move the tallies into their counters and read the pool's levels."""
        frames, sent = self.tally.take()
        if frames:
            self.frames.inc(frames)
            self.sent_bytes.inc(sent)
        self.pool.labels("in_use").set(pool_in_use)
        self.pool.labels("waiting").set(pool_waiting)

    def connection_opened(self, transport: str) -> None:
        self.connections.labels(transport).inc()

    def connection_closed(self, transport: str, code: int | str) -> None:
        self.connections.labels(transport).dec()
        self.closes.labels(transport, close_label(code)).inc()

    def subscription_added(self, table: str) -> None:
        self.subscriptions.labels(table).inc()

    def subscription_removed(self, table: str) -> None:
        self.subscriptions.labels(table).dec()

    def stuck(self, connections: int) -> None:
        self.stuck_sends.inc(connections)

    def read(self, changes: int, oldest_commit: float, read_at: float, sent_at: float | None) -> None:
        """One listener read: `changes` read, the oldest committed at `oldest_commit` (epoch seconds); `sent_at`
        when the read's frames were handed to the sockets, None when nobody was subscribed."""
        self.changes_read.inc(changes)
        self.commit_to_read.observe(max(0.0, read_at - oldest_commit))
        if sent_at is not None:
            self.commit_to_send.observe(max(0.0, sent_at - oldest_commit))

    def listener_state(self, state: str) -> None:
        if state == self._listener_state:
            return
        if self._listener_state is not None:
            self.listeners.labels(self._listener_state).dec()
        self.listeners.labels(state).inc()
        self._listener_state = state

    def listener_reconnecting(self) -> None:
        self.listener_reconnects.inc()

    def snapshot(self, seconds: float, rows: int) -> None:
        self.snapshot_seconds.observe(seconds)
        self.snapshot_rows.inc(rows)

    def replay(self, seconds: float, changes: int) -> None:
        self.replay_seconds.observe(seconds)
        self.replay_changes.inc(changes)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "other"
        key = (method, route, status)
        child = self._http_children.get(key)
        if child is None:  # labels() costs more than the observation itself: looked up once per combination
            child = self._http_children[key] = self.http_seconds.labels(method, route, str(status))
        child.observe(seconds)

    def pruned(self, rows: int | None) -> None:
        """A retention run deleted `rows`; None: it failed."""
        if rows is None:
            self.prune_runs.labels("failed").inc()
            return
        self.prune_runs.labels("ok").inc()
        self.pruned_rows.inc(rows)


class _Off(Metrics):
    """Every event ignored; the tallies still count (plain additions) but nothing reads them."""

    enabled = False

    def __init__(self) -> None:  # no metric objects at all
        self.tally = Tally()
        self.directory = None

    def sample(self, pool_in_use: int, pool_waiting: int) -> None:
        pass

    def connection_opened(self, transport: str) -> None:
        pass

    def connection_closed(self, transport: str, code: int | str) -> None:
        pass

    def subscription_added(self, table: str) -> None:
        pass

    def subscription_removed(self, table: str) -> None:
        pass

    def stuck(self, connections: int) -> None:
        pass

    def read(self, changes: int, oldest_commit: float, read_at: float, sent_at: float | None) -> None:
        pass

    def listener_state(self, state: str) -> None:
        pass

    def listener_reconnecting(self) -> None:
        pass

    def snapshot(self, seconds: float, rows: int) -> None:
        pass

    def replay(self, seconds: float, changes: int) -> None:
        pass

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        pass

    def pruned(self, rows: int | None) -> None:
        pass
