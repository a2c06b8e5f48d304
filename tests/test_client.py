"""realtime.client against real `realtime serve` processes: snapshots and views, every change exactly once across
SIGTERM (1012), SIGKILL, a 4008 cut of a program that stopped reading, and retention (a `Reset`, never a silent
gap), and tokens asked again on every connection and before they expire.

The ground truth is `realtime.changes`, read at the end: a program must have seen each committed change once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from realtime.auth.tokens import issue_token
from realtime.client import (
    AuthenticationError,
    Change,
    Client,
    Disconnect,
    Event,
    Snapshot,
    Subscription,
    SubscriptionError,
    TokenSource,
    View,
    connect,
)
from realtime.config import Settings
from realtime.dsn import Dsn
from tests.support.faults import FAST_RECOVERY, Writer, committed_seqs, readyz, stream_database
from tests.support.server import ServerProcess, running_server
from tests.support.tables import create_streamed_table, head, table_rows
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(60)

SECRET = "client-test-secret-" + "c" * 40


def fast(
    url: str,
    *,
    token: TokenSource | None = None,
    buffer: int = 1000,
    on_disconnect: Callable[[Disconnect], None] | None = None,
    ping_interval: float = 15.0,
) -> Client:
    """A client whose reconnects take milliseconds, not the production defaults' seconds."""
    return connect(
        url,
        token=token,
        buffer=buffer,
        on_disconnect=on_disconnect,
        backoff_initial=0.05,
        backoff_max=0.5,
        ping_interval=ping_interval,
        ping_timeout=ping_interval * 2,
    )


class SilentLinks:
    """A TCP proxy to the server whose `drop()` makes every open link go silent (bytes in either direction are
    swallowed, no socket closes), as a dropped network looks; connections opened afterwards work."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._links: list[asyncio.Event] = []  # set: the link is silent
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> SilentLinks:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def drop(self) -> None:
        for silent in self._links:
            silent.set()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent = asyncio.Event()
        self._links.append(silent)
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers.append(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer, silent), self._pump(up_reader, writer, silent), return_exceptions=True
        )

    @staticmethod
    async def _pump(source: asyncio.StreamReader, target: asyncio.StreamWriter, silent: asyncio.Event) -> None:
        while data := await source.read(65536):
            if not silent.is_set():
                target.write(data)
                await target.drain()
        if not silent.is_set():
            target.close()


class Consumer:
    """A program reading one subscription on a task of its own, keeping every event; it can stop reading."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._reading = asyncio.Event()
        self._reading.set()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            await self._reading.wait()
            try:
                event = await anext(self.subscription)
            except StopAsyncIteration:
                return
            except Exception as error:
                self.error = error
                return
            self.events.append(event)

    def pause(self) -> None:
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def changes(self) -> list[Change]:
        return [event for event in self.events if isinstance(event, Change)]

    def change_seqs(self) -> list[int]:
        return [change.seq for change in self.changes()]

    async def wait_through(self, seq: int, timeout: float = 20.0) -> None:
        async def reached() -> bool:
            if self.error is not None:
                raise self.error
            return any(change.seq >= seq for change in self.changes())

        await eventually(reached, timeout, f"the program received seq {seq}")

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def fault_db(admin_url: Dsn) -> AsyncIterator[Dsn]:
    """A database of the test's own with the streamed tables `ticks` and `docs`."""
    async with stream_database(admin_url) as url:
        yield url


@pytest.fixture
async def admin(fault_db: Dsn) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fault_db.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def own_server(
    fault_db: Dsn, artifacts_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServerProcess]:
    """A server of the test's own that the test may stop, kill and start again on the same port."""
    env = {**FAST_RECOVERY, **getattr(request, "param", {})}
    server = ServerProcess(database=fault_db, log_path=artifacts_dir / f"{request.node.name}.log", env=env)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.terminate)


async def kill(server: ServerProcess) -> None:
    """SIGKILL by PID: no close frame, no shutdown; clients see the TCP connection drop (1006)."""
    assert server.process is not None
    server.process.kill()
    await asyncio.to_thread(server.process.wait)


async def test_a_snapshot_and_its_changes_keep_a_view_equal_to_the_query(
    server: ServerProcess, db: asyncpg.Connection
) -> None:
    """Snapshot rows, then typed changes (moves in and out of the filter, a TRUNCATE) keep a View equal to the query."""
    table = await create_streamed_table(db)
    await db.execute(f"INSERT INTO {table} (k, v) SELECT g, 'v' || g FROM generate_series(1, 5) g")
    view = View()
    async with (
        connect(server.ws_url) as rt,
        rt.subscribe(table, filter=[("k", "lte", 10)], snapshot=True) as sub,
    ):
        snapshot = await asyncio.wait_for(anext(sub), 10)
        assert isinstance(snapshot, Snapshot)
        assert sorted(row["k"] for row in snapshot.rows) == [1, 2, 3, 4, 5]
        view.apply(snapshot)

        async def apply_through(seq: int) -> list[Change]:
            seen: list[Change] = []
            while view.seq is None or view.seq < seq or view.held:
                event = await asyncio.wait_for(anext(sub), 10)
                assert isinstance(event, Change)
                seen.append(event)
                view.apply(event)
            return seen

        async def matching() -> dict[Any, dict[str, Any]]:
            return {key: row for key, row in (await table_rows(db, table)).items() if row["k"] <= 10}

        await db.execute(f"UPDATE {table} SET k = 20 WHERE k = 1")  # leaves the filter
        await db.execute(f"UPDATE {table} SET k = 6 WHERE k = 20")  # comes back
        await db.execute(f"DELETE FROM {table} WHERE k = 2")
        seen = await apply_through(await head(db))
        assert [(c.op, c.view) for c in seen] == [("UPDATE", "removed"), ("UPDATE", "added"), ("DELETE", "removed")]
        assert seen[0].row is None
        assert seen[0].old is not None
        assert seen[0].old["k"] == 1
        assert view.rows == await matching()

        # One statement, three rows: the view shows nothing of it until the frame that ends the transaction.
        await db.execute(f"UPDATE {table} SET v = 'w' WHERE k IN (3, 4, 5)")
        first = await asyncio.wait_for(anext(sub), 10)
        assert isinstance(first, Change)
        assert first.tx is not None
        assert not first.tx_end
        assert view.apply(first) is False
        assert view[first.key["id"] if first.key else None]["v"] != "w"
        seen = await apply_through(await head(db))
        assert [c.tx for c in seen] == [first.tx] * 2
        assert seen[-1].tx_end
        assert view.rows == await matching()

        await db.execute(f"TRUNCATE {table}")
        await db.execute(f"INSERT INTO {table} (k) VALUES (7)")
        seen = await apply_through(await head(db))
        assert [c.view for c in seen] == ["reset", "added"]
        assert view.rows == await matching()


async def test_a_refused_subscription_raises_from_its_iterator(server: ServerProcess) -> None:
    """A subscription the server refuses for good ends with SubscriptionError carrying the protocol's code."""
    async with connect(server.ws_url) as rt, rt.subscribe("no_such_table") as sub:
        with pytest.raises(SubscriptionError) as refused:
            await asyncio.wait_for(anext(sub), 10)
    assert refused.value.code == "unknown_table"


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_every_change_once_across_a_server_stop_and_restart(
    own_server: ServerProcess, fault_db: Dsn, admin: asyncpg.Connection, stop: str
) -> None:
    """Writers commit throughout a SIGTERM (1012) or SIGKILL of the server and its restart on the same port; the
    program sees every committed change exactly once, in order."""
    lost: list[Disconnect] = []
    async with (
        fast(own_server.ws_url, on_disconnect=lost.append) as rt,
        rt.subscribe("ticks", since=0) as sub,
    ):
        consumer = Consumer(sub)
        try:
            async with Writer(fault_db, connections=2).running() as writer:
                await writer.wait_committed(30)
                await consumer.wait_through((await committed_seqs(admin))[0])
                if stop == "sigterm":
                    await asyncio.to_thread(own_server.terminate)
                else:
                    await kill(own_server)
                await writer.wait_committed(writer.committed + 30)  # committed while no server runs
                await asyncio.to_thread(own_server.start)
                await writer.wait_committed(writer.committed + 30)
            truth = await committed_seqs(admin)
            await consumer.wait_through(truth[-1])
            assert consumer.change_seqs() == truth
        finally:
            await consumer.aclose()
    assert lost[0].code == (1012 if stop == "sigterm" else 1006), lost
    if stop == "sigterm":
        assert lost[0].reason.startswith("restarting; last_seq=")


async def test_a_silent_link_is_noticed_by_keepalive_and_resumed(
    own_server: ServerProcess, fault_db: Dsn, admin: asyncpg.Connection
) -> None:
    """A link that stops carrying bytes without closing (a dropped network) is dropped when its pong does not come
    back; the client reconnects and the program still sees every committed change exactly once."""
    lost: list[Disconnect] = []
    async with (
        SilentLinks(own_server.port) as links,
        fast(links.ws_url, on_disconnect=lost.append, ping_interval=0.2) as rt,
        rt.subscribe("ticks", since=0) as sub,
    ):
        consumer = Consumer(sub)
        try:
            async with Writer(fault_db, connections=2).running() as writer:
                await writer.wait_committed(20)
                await consumer.wait_through((await committed_seqs(admin))[0])
                links.drop()
                await writer.wait_committed(writer.committed + 20)
                await eventually(lambda: _true(bool(lost)), 10, "the silent link dropped by the client")
                await writer.wait_committed(writer.committed + 20)
            truth = await committed_seqs(admin)
            await consumer.wait_through(truth[-1])
            assert consumer.change_seqs() == truth
        finally:
            await consumer.aclose()
    assert lost[0].code == 1006, lost  # no close frame came through


async def _true(value: bool) -> bool:
    return value


async def _listener_position(server: ServerProcess) -> int:
    _, body = await readyz(server)
    return int(body["listener"]["position"])


@pytest.mark.parametrize("own_server", [{"WS_QUEUE_SIZE": "50", "WS_SEND_TIMEOUT_S": "60"}], indirect=True)
async def test_a_program_that_stops_reading_is_cut_4008_and_loses_nothing(
    own_server: ServerProcess, fault_db: Dsn, admin: asyncpg.Connection
) -> None:
    """A program that stops reading one subscription fills its buffer, the client stops reading the socket, the
    server cuts it with 4008; once the program reads again the client resumes, and both that subscription and
    another one, whose writer commits throughout, get every change exactly once."""
    lost: list[Disconnect] = []
    async with (
        fast(own_server.ws_url, buffer=5, on_disconnect=lost.append) as rt,
        rt.subscribe("docs", since=0) as docs,
        rt.subscribe("ticks", since=0) as ticks,
    ):
        slow, steady = Consumer(docs), Consumer(ticks)
        try:
            async with Writer(fault_db, connections=1).running() as writer:
                await writer.wait_committed(10)
                slow.pause()
                # ~30 MiB of rows, far beyond the socket buffers and the server's queue of 50 frames.
                for _ in range(30):
                    await admin.execute(
                        "INSERT INTO docs (body)"
                        " SELECT g || ':' || repeat('x', 100 * 1024) FROM generate_series(1, 10) g"
                    )
                written = await table_seqs(admin, "docs")
                # Once the server has published the last change it has offered every frame: the overflow is decided.
                await eventually(
                    lambda: _at_least(_listener_position(own_server), written[-1]), 20, "the server published it all"
                )
                assert len(slow.events) <= 5 + 1
                slow.resume()
                await slow.wait_through(written[-1], timeout=40)
                await writer.wait_committed(writer.committed + 10)
            for consumer, table in ((slow, "docs"), (steady, "ticks")):
                truth = await table_seqs(admin, table)
                await consumer.wait_through(truth[-1])
                assert consumer.change_seqs() == truth, table
            assert len(written) == 300
        finally:
            await slow.aclose()
            await steady.aclose()
    assert 4008 in [disconnect.code for disconnect in lost], lost
    assert rt.disconnects == len(lost)


async def table_seqs(conn: asyncpg.Connection, table: str) -> list[int]:
    """The ground truth for one table: the position of each of its committed changes, in order."""
    rows = await conn.fetch("SELECT seq FROM realtime.changes WHERE table_name = $1 ORDER BY seq", table)
    return [row[0] for row in rows]


async def _at_least(value: Any, floor: int) -> bool:
    return bool(await value >= floor)


async def test_an_expired_resume_point_shows_as_a_reset_and_a_fresh_snapshot(
    own_server: ServerProcess, fault_db: Dsn, admin: asyncpg.Connection
) -> None:
    """Changes pruned while the program was away are never a silent gap: with writers committing throughout, the
    program gets a Reset, then a Snapshot of the table as it is, then every later change once; a View applying
    everything equals the table."""
    view = View()
    async with fast(own_server.ws_url) as rt, rt.subscribe("ticks", snapshot=True) as sub:
        consumer = Consumer(sub)
        try:
            await eventually(lambda: _has(consumer, Snapshot), 10, "the first snapshot")
            async with Writer(fault_db, connections=2).running() as writer:
                await writer.wait_committed(20)
                await consumer.wait_through((await table_seqs(admin, "ticks"))[0])
                await asyncio.to_thread(own_server.terminate)
                await writer.wait_committed(writer.committed + 20)
                before_prune = await table_seqs(admin, "ticks")
                # Retention keeps only the newest change: the program's position is gone.
                assert await admin.fetchval("SELECT realtime.prune(interval '1 day', 1, $1)", before_prune[-1]) > 0
                await asyncio.to_thread(own_server.start)
                await eventually(lambda: _count(consumer, Snapshot, 2), 20, "a Reset and a second snapshot")
                await writer.wait_committed(writer.committed + 20)
            truth = await table_seqs(admin, "ticks")
            await consumer.wait_through(truth[-1])
        finally:
            await consumer.aclose()
    kinds = [type(event).__name__ for event in consumer.events]
    reset_at = kinds.index("Reset")
    assert kinds.count("Reset") == 1
    assert kinds[0] == "Snapshot"
    assert kinds[reset_at + 1] == "Snapshot"
    assert set(kinds[1:reset_at] + kinds[reset_at + 2 :]) == {"Change"}
    fresh = consumer.events[reset_at + 1]
    assert isinstance(fresh, Snapshot)
    # Before the loss: every change once, from the start. After the snapshot: every change after it, once.
    seqs = consumer.change_seqs()
    gone = seqs[: reset_at - 1]
    assert gone == before_prune[: len(gone)]
    assert seqs[len(gone) :] == [seq for seq in truth if seq > fresh.seq]
    for event in consumer.events:
        view.apply(event)
    assert view.rows == await table_rows(admin, "ticks")


async def _has(consumer: Consumer, kind: type) -> bool:
    return await _count(consumer, kind, 1)


async def _count(consumer: Consumer, kind: type, count: int) -> bool:
    if consumer.error is not None:
        raise consumer.error
    return sum(isinstance(event, kind) for event in consumer.events) >= count


class Tokens:
    """A token source that counts how often it is asked; each answer is a fresh token living `ttl` seconds."""

    def __init__(self, ttl: int) -> None:
        self.settings = Settings(auth_jwt_secret=SECRET)
        self.ttl = ttl
        self.asked: list[float] = []

    async def __call__(self) -> str:
        self.asked.append(time.monotonic())
        return issue_token(self.settings, sub="1", role="member", ttl_s=self.ttl, claims={})


@pytest.fixture
async def secured(
    database_url: Dsn, artifacts_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServerProcess]:
    """A server verifying tokens signed with SECRET, closing a connection the moment its token expires."""
    env = {**FAST_RECOVERY, "AUTH_JWT_SECRET": SECRET, "AUTH_LEEWAY_S": "0"}
    async with running_server(database_url, artifacts_dir / f"{request.node.name}.log", env=env) as server:
        yield server


async def test_a_token_is_asked_again_before_it_expires_and_on_every_reconnect(
    secured: ServerProcess, db: asyncpg.Connection
) -> None:
    """The token source is asked before `exp` (the connection outlives its first token, no change is missed) and
    again when a restart of the server makes the client reconnect."""
    table = await create_streamed_table(db)
    tokens = Tokens(ttl=3)
    lost: list[Disconnect] = []
    async with (
        fast(secured.ws_url, token=tokens, on_disconnect=lost.append) as rt,
        rt.subscribe(table, since=await head(db)) as sub,
    ):
        consumer = Consumer(sub)
        try:
            await db.execute(f"INSERT INTO {table} (k) VALUES (1)")
            await consumer.wait_through(await head(db))
            opened = tokens.asked[0]
            # Past the first token's exp (3 s, no leeway): refreshed on the open connection, never cut with 4001.
            await eventually(lambda: _later_than(tokens, opened + 4), 10, "a refresh after the first token's exp")
            assert lost == [], lost
            await db.execute(f"INSERT INTO {table} (k) VALUES (2)")
            await consumer.wait_through(await head(db))
            assert rt.status == "live"

            asked = len(tokens.asked)
            await asyncio.to_thread(secured.terminate)
            await db.execute(f"INSERT INTO {table} (k) VALUES (3)")
            await asyncio.to_thread(secured.start)
            await db.execute(f"INSERT INTO {table} (k) VALUES (4)")
            await consumer.wait_through(await head(db))
            assert len(tokens.asked) > asked
            # (A reconnect may reach the server while it is still shutting down, and be closed 1012 again.)
            assert {disconnect.code for disconnect in lost} == {1012}, lost
            truth = [change["seq"] for change in await _changes_of(db, table)]
            assert consumer.change_seqs() == truth
            assert [change.row["k"] for change in consumer.changes() if change.row] == [1, 2, 3, 4]
        finally:
            await consumer.aclose()


async def _later_than(tokens: Tokens, moment: float) -> bool:
    return bool(tokens.asked) and tokens.asked[-1] > moment


async def _changes_of(db: asyncpg.Connection, table: str) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT seq FROM realtime.changes WHERE table_name = $1 ORDER BY seq", table)
    return [dict(row) for row in rows]


async def test_a_refused_token_stops_the_client(secured: ServerProcess) -> None:
    """A token the server refuses ends every subscription with AuthenticationError; the client does not retry."""
    async with fast(secured.ws_url, token="not-a-token") as rt, rt.subscribe("users") as sub:
        with pytest.raises(AuthenticationError) as refused:
            await asyncio.wait_for(anext(sub), 10)
        assert refused.value.code == "unauthorized"
        assert rt.status == "failed"
