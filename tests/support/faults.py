"""Tools for breaking the stream on purpose: private databases and servers, writers, recording subscribers,
and a PostgreSQL proxy that can cut links silently.

Every wait here is for a condition, with a deadline; the only sleeps are polling intervals and retry pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import asyncpg
import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from realtime import migrate
from realtime.dsn import Dsn
from realtime.stream.listener import APPLICATION_NAME as LISTENER_APPLICATION_NAME
from tests.support.databases import create_database, drop_database
from tests.support.server import ServerProcess
from tests.support.waiting import eventually

Frame = dict[str, Any]
# Settings that make a server notice a lost link and come back quickly (the defaults suit production).
FAST_RECOVERY = {
    "LISTENER_BACKOFF_INITIAL_S": "0.05",
    "LISTENER_BACKOFF_MAX_S": "0.5",
    "LISTENER_HEARTBEAT_S": "0.5",
    "LISTENER_HEARTBEAT_TIMEOUT_S": "1.0",
    "SHUTDOWN_TIMEOUT_S": "3",
}
STREAMED_TABLES = """
CREATE TABLE ticks (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    writer integer NOT NULL,
    n      integer NOT NULL
);
SELECT realtime.enable_stream('ticks');
CREATE TABLE docs (
    id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body text NOT NULL
);
SELECT realtime.enable_stream('docs');
"""


@contextlib.asynccontextmanager
async def stream_database(admin: Dsn) -> AsyncIterator[Dsn]:
    """A fresh database of its own, migrated, with the streamed tables `ticks` and `docs`; dropped after."""
    url = await asyncio.to_thread(create_database, admin, "rt_fault")
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        conn = await asyncpg.connect(url.asyncpg())
        try:
            await conn.execute(STREAMED_TABLES)
        finally:
            await conn.close()
        yield url
    finally:
        await asyncio.to_thread(drop_database, admin, url)


async def committed_seqs(conn: asyncpg.Connection, after: int = 0) -> list[int]:
    """The ground truth: the position of every committed change after `after`, in order."""
    rows = await conn.fetch("SELECT seq FROM realtime.changes WHERE seq > $1 ORDER BY seq", after)
    return [row[0] for row in rows]


async def listener_pids(conn: asyncpg.Connection) -> set[int]:
    """Backend PIDs of the listeners connected to this database."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        LISTENER_APPLICATION_NAME,
    )
    return {row[0] for row in rows}


async def new_listener(conn: asyncpg.Connection, known: set[int], timeout: float = 15.0) -> int:
    """Wait for a listener backend that is not one of `known` (the server reconnected) and return its PID."""

    async def appeared() -> int | None:
        fresh = await listener_pids(conn) - known
        return min(fresh) if fresh else None

    pid: int = await eventually(appeared, timeout, "a new listener backend")
    return pid


async def readyz(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as client:
        response = await client.get("/readyz")
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def wait_ready(server: ServerProcess, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until /readyz answers 200 and return its body."""

    async def ready() -> dict[str, Any] | None:
        try:
            status, body = await readyz(server)
        except httpx.HTTPError:
            return None
        return body if status == 200 else None

    body: dict[str, Any] = await eventually(ready, timeout, "/readyz ready")
    return body


# ------------------------------------------------------------------------------------------------ writers


@dataclass
class Writer:
    """Commits small transactions to `ticks` from several connections until stopped.

    Each transaction inserts a row and sometimes updates or deletes it, so every operation streams. A write that
    fails (the database is restarting) is retried on a new connection; whether an interrupted COMMIT took effect
    does not matter, because tests compare subscribers with `realtime.changes`, not with this count.
    """

    url: Dsn
    connections: int = 2
    max_commits: int = 20_000
    committed: int = 0
    failures: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Writer]:
        tasks = [asyncio.create_task(self._write(number)) for number in range(self.connections)]
        try:
            yield self
        finally:
            self._stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*tasks)

    async def wait_committed(self, count: int, timeout: float = 20.0) -> None:
        """Wait until at least `count` transactions have committed."""
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: self.committed >= count)

    async def _write(self, number: int) -> None:
        conn: asyncpg.Connection | None = None
        i = 0
        try:
            while not self._stop.is_set() and self.committed < self.max_commits:
                try:
                    if conn is None:
                        conn = await asyncpg.connect(self.url.asyncpg(), timeout=5, command_timeout=5)
                    async with conn.transaction():
                        row_id = await conn.fetchval(
                            "INSERT INTO ticks (writer, n) VALUES ($1, $2) RETURNING id", number, i
                        )
                        if i % 3 == 2:
                            await conn.execute("UPDATE ticks SET n = -n WHERE id = $1", row_id)
                        if i % 10 == 9:
                            await conn.execute("DELETE FROM ticks WHERE id = $1", row_id)
                except (
                    OSError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    asyncpg.InternalClientError,
                    TimeoutError,
                ):
                    # (InternalClientError: a FATAL that arrived while the connection sat idle left it unusable.)
                    self.failures += 1
                else:
                    i += 1
                    async with self._progress:
                        self.committed += 1
                        self._progress.notify_all()
                    continue
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(0.05)  # pace retries while the database is away
        finally:
            if conn is not None:
                await conn.close()


# -------------------------------------------------------------------------------------------- subscribers


class Recorder:
    """Reads every frame of one WebSocket on a task of its own and keeps them, plus how the socket closed."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames: list[Frame] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed_at: float | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ref = 0

    @classmethod
    async def open(cls, url: str, *, start: bool = True, **kwargs: Any) -> Recorder:
        recorder = cls(await connect(url, max_size=None, **kwargs))
        if start:
            recorder.start()
        return recorder

    def start(self) -> None:
        """Begin reading (a recorder opened with start=False reads nothing until then)."""
        assert self._task is None
        self._task = asyncio.create_task(self._read())

    async def aclose(self) -> None:
        await self.connection.close()
        if self._task is not None:
            async with asyncio.timeout(10):
                await self._task

    async def send(self, frame: Frame) -> int:
        """Send a frame with a fresh `ref` and return the ref."""
        self._ref += 1
        await self.connection.send(orjson.dumps({**frame, "ref": self._ref}).decode())
        return self._ref

    async def subscribe(self, sub_id: str = "s1", table: str = "ticks", **fields: Any) -> Frame:
        """Subscribe and wait for the `subscribed` reply (frames before it, e.g. a replay, are recorded too)."""
        ref = await self.send({"type": "subscribe", "id": sub_id, "table": table, **fields})
        reply = await self.reply(ref)
        assert reply["type"] == "subscribed", f"subscribe refused: {reply}"
        return reply

    async def reply(self, ref: int, timeout: float = 20.0) -> Frame:
        """The direct reply (`ref` echoed) to a request, whatever its type."""
        frame: Frame = await self.wait_for(lambda: next((f for f in self.frames if f.get("ref") == ref), None), timeout)
        return frame

    def change_seqs(self, sub_id: str | None = None) -> list[int]:
        return [f["seq"] for f in self.changes(sub_id)]

    def changes(self, sub_id: str | None = None) -> list[Frame]:
        return [f for f in self.frames if f["type"] == "change" and (sub_id is None or f["id"] == sub_id)]

    async def wait_through(self, seq: int, timeout: float = 20.0) -> list[int]:
        """Wait until a change with position >= `seq` arrived; returns every change position received."""
        await self.wait_for(lambda: any(f["type"] == "change" and f["seq"] >= seq for f in self.frames), timeout)
        return self.change_seqs()

    async def wait_closed(self, timeout: float = 20.0) -> tuple[int | None, str | None]:
        await self.wait_for(lambda: self.closed_at is not None, timeout)
        return self.close_code, self.close_reason

    async def barrier(self, timeout: float = 10.0) -> None:
        """A ping round trip: every frame the server queued before the pong has been recorded."""
        ref = await self.send({"type": "ping"})
        assert (await self.reply(ref, timeout))["type"] == "pong"

    async def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        try:
            async with asyncio.timeout(timeout), self._changed:
                return await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s; {len(self.frames)} frames, last: {self.frames[-1:]}, "
                f"close: {self.close_code} {self.close_reason!r}"
            ) from None

    async def _read(self) -> None:
        try:
            async for raw in self.connection:
                frame: Frame = orjson.loads(raw)
                async with self._changed:
                    self.frames.append(frame)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        async with self._changed:
            self.close_code = self.connection.close_code
            self.close_reason = self.connection.close_reason
            self.closed_at = time.monotonic()
            self._changed.notify_all()


# -------------------------------------------------------------------------------------------------- proxy

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


@dataclass(eq=False)
class _Link:
    stalled: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class PgProxy:
    """A TCP proxy in front of PostgreSQL, run on a thread (and event loop) of its own.

    It answers SSL/GSS requests with "no" itself, so the startup message passes through in the clear and it can
    tell which application a link belongs to. Faults it can inject:
      stall()   every open link silently stops forwarding in both directions, while both sockets stay open:
                a half-open link, which neither end can notice except by a timeout; new links work normally
      refuse()  new links whose startup message names a given application are closed at once
    """

    def __init__(self, upstream: Dsn) -> None:
        self._upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refused: bytes | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def url(self, database: Dsn) -> Dsn:
        """`database` reached through the proxy."""
        user = database.parts.username or "postgres"
        return Dsn.parse(f"postgresql://{user}@127.0.0.1:{self.port}/{database.database}")

    def stall(self) -> int:
        """Make every open link black-hole its traffic; returns how many links that was."""

        def stall_all() -> int:
            for link in self._links:
                link.stalled = True
            return len(self._links)

        count: int = self._call(stall_all)
        return count

    def refuse(self, application_name: str | None) -> None:
        """Close new links from `application_name` right after their startup message (None: refuse nothing)."""
        marker = None if application_name is None else b"application_name\x00" + application_name.encode() + b"\x00"

        def set_refused() -> None:
            self._refused = marker

        self._call(set_refused)

    def _call(self, function: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            for writer in link.writers:
                writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = self._upstream.parts
        port = parts.port or 5432
        socket_dir = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
        if socket_dir.startswith("/"):
            return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
        return await asyncio.open_connection(socket_dir or "127.0.0.1", port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writers=[writer])
        try:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            while length == 8 and code in (_SSL_REQUEST, _GSSENC_REQUEST):
                writer.write(b"N")
                head = await reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
            startup = head + await reader.readexactly(length - 8)
            if self._refused is not None and self._refused in startup:
                return
            up_reader, up_writer = await self._open_upstream()
            link.writers.append(up_writer)
            up_writer.write(startup)
            self._links.add(link)
            await asyncio.gather(self._pump(reader, up_writer, link), self._pump(up_reader, writer, link))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(link)
            if not link.stalled:
                for each in link.writers:
                    each.close()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, target: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while data := await source.read(65536):
                if link.stalled:
                    continue  # swallowed: the sender believes it was sent
                target.write(data)
                await target.drain()
        except OSError:
            pass
        if not link.stalled:
            target.close()
        else:
            # A half-open link stays open at the other end until the proxy shuts down.
            await asyncio.Event().wait()


# ------------------------------------------------------------------------------------------- outage proxy


async def _open_postgres(upstream: Dsn) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP or Unix-socket connection to the PostgreSQL that `upstream` names."""
    parts = upstream.parts
    port = parts.port or 5432
    socket_dir = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
    if socket_dir.startswith("/"):
        return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
    return await asyncio.open_connection(socket_dir or "127.0.0.1", port)


class OutageProxy:
    """A byte-for-byte TCP proxy in front of PostgreSQL, on a thread (and event loop) of its own, that makes the
    whole database go away and come back, as its clients would see it:

      freeze()   every link, open or new, stops carrying bytes while all sockets stay open: a stopped server or
                 a network that drops every packet. New connections are accepted (as a listening socket's
                 backlog would) and then hear nothing. Bytes already sent are held back, not lost.
      refuse()   every open link is closed and the port refuses new connections: a server that is down
      restore()  back to normal: frozen links carry on with every byte they held, a refused port listens again
    """

    def __init__(self, upstream: Dsn) -> None:
        self._upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="outage-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()  # set: bytes move; cleared: frozen
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        self._call(self._begin)

    def close(self) -> None:
        self._call(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def url(self, database: Dsn) -> Dsn:
        """`database` reached through the proxy."""
        user = database.parts.username or "postgres"
        return Dsn.parse(f"postgresql://{user}@127.0.0.1:{self.port}/{database.database}")

    def freeze(self) -> None:
        """Stop every link, open or new, from carrying bytes; every socket stays open."""

        async def freeze() -> None:
            self._flowing.clear()

        self._call(freeze)

    def refuse(self) -> None:
        """Close every open link and stop listening, so that connecting is refused."""

        async def refuse() -> None:
            assert self._server is not None
            self._server.close()
            await self._close_links()

        self._call(refuse)

    def restore(self) -> None:
        """Let frozen links carry on and listen again (on the same port) if connections were refused."""

        async def restore() -> None:
            assert self._server is not None
            if not self._server.is_serving():
                self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            self._flowing.set()

        self._call(restore)

    def _call(self, function: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(function(), self._loop).result(10)

    async def _begin(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_links(self) -> None:
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_links()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers = [writer]
        self._writers.add(writer)
        try:
            await self._flowing.wait()  # a frozen server does not take new connections in either
            up_reader, up_writer = await _open_postgres(self._upstream)
            writers.append(up_writer)
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except OSError:
            pass
        finally:
            for each in writers:
                self._writers.discard(each)
                each.close()

    async def _pump(self, source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()  # held back while frozen, delivered when restored
                target.write(data)
                await target.drain()
            await self._flowing.wait()  # a frozen end does not see the other end close either
        except OSError:
            pass
        target.close()
