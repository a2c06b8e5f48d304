"""Careless and hostile clients under load: none of them can take REST or the database pool from the others.

One database and one server for the module, with tables big enough that a replay or a snapshot cannot hide in
the kernel's socket buffers. REST is measured from a thread of its own while the clients misbehave.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from realtime.dsn import Dsn
from tests.support.faults import stream_database
from tests.support.server import ServerProcess, running_server
from tests.support.waiting import eventually

REPLAY_ROWS = 20_000  # of about 1 KB each: a replay of about 20 MB
SNAPSHOT_ROWS = 2_000
SMALL_CHANGES = 20_000


@dataclass
class LoadSetup:
    server: ServerProcess
    url: Dsn
    user_path: str
    log_path: Path


@pytest.fixture(scope="module")
async def load(admin_url: Dsn, artifacts_dir: Path) -> AsyncIterator[LoadSetup]:
    """A server on a database holding a 20 MB replay (`docs`), a 2,000-row table (`snap`) and 20,000 small
    changes (`ticks`)."""
    async with stream_database(admin_url) as url:
        conn = await asyncpg.connect(url.asyncpg())
        try:
            await conn.execute(
                f"""
                INSERT INTO docs (body) SELECT repeat(md5(g::text), 32) FROM generate_series(1, {REPLAY_ROWS}) g;
                CREATE TABLE snap (id bigint PRIMARY KEY, label text NOT NULL);
                SELECT realtime.enable_stream('snap');
                INSERT INTO snap SELECT g, 'row ' || md5(g::text) FROM generate_series(1, {SNAPSHOT_ROWS}) g;
                INSERT INTO ticks (writer, n) SELECT 0, g FROM generate_series(1, {SMALL_CHANGES}) g;
                """
            )
        finally:
            await conn.close()
        log_path = artifacts_dir / "load-server.log"
        env = {"WS_MAX_CONNECTIONS_PER_CLIENT": "1000"}
        async with running_server(url, log_path, env=env) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                created = await http.post("/users", json={"name": "Probe", "email": "probe@example.com"})
                assert created.status_code == 201, created.text
            yield LoadSetup(server, url, f"/users/{created.json()['id']}", log_path)


@dataclass
class RestProbe:
    """GETs one user over and over from a thread of its own, so the test's own event loop never delays it."""

    base_url: str
    path: str
    results: list[tuple[int, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RestProbe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30.0) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(self.path).status_code
                except httpx.HTTPError:
                    status = 0
                self.results.append((status, time.perf_counter() - started))
                self._stop.wait(0.05)  # pacing between probes, not a wait for anything

    def slowest(self) -> float:
        return max(seconds for _, seconds in self.results)

    def statuses(self) -> set[int]:
        return {status for status, _ in self.results}


async def _stuck_transactions(url: Dsn) -> list[str]:
    conn = await asyncpg.connect(url.asyncpg())
    try:
        rows = await conn.fetch(
            "SELECT state FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'realtime' AND state LIKE 'idle in transaction%'"
        )
    finally:
        await conn.close()
    return [row[0] for row in rows]


def _text(frame: dict[str, object]) -> str:
    return orjson.dumps(frame).decode()


def _reset(connection: ClientConnection) -> None:
    """Drop the TCP connection with a reset, as a killed process or a vanished network does: no close frame."""
    sock = connection.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.transport.abort()


async def test_clients_reset_mid_replay_leave_no_connection_behind(load: LoadSetup) -> None:
    """25 clients reset in the middle of a 20 MB replay hold no pool connection, and REST answers at once."""
    clients = [await connect(load.server.ws_url, max_size=None, max_queue=1) for _ in range(25)]
    try:
        for index, client in enumerate(clients):
            await client.send(_text({"type": "subscribe", "id": f"r{index}", "table": "docs", "since": 0}))
        for client in clients:
            first = orjson.loads(await asyncio.wait_for(client.recv(), 30))
            assert first["type"] == "change", first  # the replay is under way, and far from done: it cannot fit
    finally:
        for client in clients:
            _reset(client)

    await eventually(lambda: _no_stuck_transactions(load.url), 10, "no transaction left open by a replay")
    async with httpx.AsyncClient(base_url=load.server.base_url, timeout=2.0) as http:
        answers = await asyncio.gather(*(http.get(load.user_path) for _ in range(25)))
    assert {answer.status_code for answer in answers} == {200}
    assert "Traceback" not in load.log_path.read_text(errors="replace")


async def _no_stuck_transactions(url: Dsn) -> bool:
    return not await _stuck_transactions(url)


async def _snapshot_subscriber(url: str, index: int) -> str:
    """Subscribe with a snapshot and read it all: 'served', 'retry' (unavailable with a hint) or what went wrong."""
    async with connect(url, max_size=None) as client:
        await client.send(_text({"type": "subscribe", "ref": 1, "id": f"s{index}", "table": "snap", "snapshot": True}))
        rows = 0
        async with asyncio.timeout(60):
            while True:
                frame = orjson.loads(await client.recv())
                if frame["type"] == "snapshot":
                    rows += len(frame["rows"])
                elif frame["type"] == "subscribed":
                    return "served" if rows == SNAPSHOT_ROWS else f"served {rows} rows"
                elif frame["type"] == "error" and frame["code"] == "unavailable" and frame["retry_after_ms"] > 0:
                    return "retry"
                else:
                    return f"unexpected {frame}"


async def test_a_snapshot_storm_leaves_rest_fast(load: LoadSetup) -> None:
    """300 snapshot subscribes of 2,000 rows at once: every GET stays under 1 s, every subscriber is answered."""
    with RestProbe(load.server.base_url, load.user_path) as probe:
        outcomes = await asyncio.gather(
            *(_snapshot_subscriber(load.server.ws_url, index) for index in range(300)), return_exceptions=True
        )
    cut = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert not cut, f"{len(cut)} subscribers cut without a frame: {cut[:3]}"
    assert set(outcomes) <= {"served", "retry"}, {o for o in outcomes if o not in ("served", "retry")}
    assert probe.statuses() == {200}
    assert probe.slowest() < 1.0, f"slowest GET took {probe.slowest():.2f}s"


async def _replay_loop(url: str, index: int, until: float) -> int:
    """Re-subscribe with `since: 0` to all of `ticks`, over and over until `until`; returns the rounds done."""
    rounds = 0
    async with connect(url, max_size=None) as client:
        while time.monotonic() < until:
            sub_id = f"loop{index}-{rounds}"
            await client.send(_text({"type": "subscribe", "id": sub_id, "table": "ticks", "since": 0}))
            async with asyncio.timeout(60):
                while True:
                    raw = await client.recv()
                    assert isinstance(raw, str)
                    if raw.startswith('{"type":"change"'):
                        continue
                    frame = orjson.loads(raw)
                    if frame["type"] in ("subscribed", "error"):
                        break
            if frame["type"] == "subscribed":
                await client.send(_text({"type": "unsubscribe", "id": sub_id}))
            rounds += 1
    return rounds


async def test_looping_replays_never_starve_rest(load: LoadSetup) -> None:
    """25 sockets replaying 20,000 changes from 0 in a loop for 30 s: no REST 503 and no GET slower than 2 s."""
    until = time.monotonic() + 30
    with RestProbe(load.server.base_url, load.user_path) as probe:
        rounds = await asyncio.gather(*(_replay_loop(load.server.ws_url, index, until) for index in range(25)))
    assert min(rounds) >= 1
    assert probe.statuses() == {200}
    assert probe.slowest() < 2.0, f"slowest GET took {probe.slowest():.2f}s"


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _flood_with_pings(url: str, count: int, ref: str) -> None:
    """Send large pings and never read a reply, until sending blocks (the server stopped reading) or it closes."""
    client = await connect(url, max_size=None, max_queue=1)
    try:
        async with asyncio.timeout(20):
            for _ in range(count):
                await client.send(_text({"type": "ping", "ref": ref}))
    except (TimeoutError, ConnectionClosed):
        pass
    finally:
        _reset(client)


async def test_never_reading_sockets_flooded_with_pings_hold_bounded_memory(
    admin_url: Dsn, artifacts_dir: Path
) -> None:
    """10 sockets sending 60 KB pings and reading nothing grow the server by less than 10 x WS_QUEUE_BYTES + 16 MiB."""
    queue_bytes = 1 << 20
    env = {"WS_QUEUE_BYTES": str(queue_bytes), "WS_MESSAGES_PER_S": "100000", "WS_MESSAGE_BURST": "100000"}
    async with stream_database(admin_url) as url, running_server(url, artifacts_dir / "flood.log", env=env) as server:
        assert server.process is not None
        pid = server.process.pid
        before = _rss_bytes(pid)
        peak = before
        flooding = asyncio.gather(*(_flood_with_pings(server.ws_url, 300, "x" * 60_000) for _ in range(10)))
        while not flooding.done():
            peak = max(peak, _rss_bytes(pid))
            await asyncio.wait((flooding,), timeout=0.05)
        await flooding
        peak = max(peak, _rss_bytes(pid))
        async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as http:
            assert (await http.get("/healthz")).status_code == 200
    assert peak - before < 10 * queue_bytes + (16 << 20), f"grew by {(peak - before) / 2**20:.1f} MiB"
