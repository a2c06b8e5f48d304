"""The SQLAlchemy engine of a process and the per-request connection dependencies.

A writing request's transaction commits when the route returns and rolls back when it raises, so routes never
commit; a reading request gets an autocommit connection.

Every request's use of the database has one deadline, POOL_TIMEOUT after it asks for a connection:
    checkout   waiting for a pool slot, closing a stale connection, opening a new one: cancelled at the deadline
    use        statements, commit or rollback: at the deadline a timer aborts the connection's socket, so the
               operation in flight fails at once with a connection error (no task is cancelled mid-statement)
    return     a connection that outlived the deadline, or whose statement timed out, is discarded, never pooled
so a database that stops answering costs a request POOL_TIMEOUT, after which it gets `DatabaseTimeout` (503).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from realtime.config import Settings
from realtime.dsn import Dsn

POOL_APPLICATION_NAME = "realtime"
# What "the database failed us" looks like, for code that retries or answers "unavailable" instead of crashing.
# InternalClientError belongs here: when a backend is terminated while the connection is idle, asyncpg can take
# in the FATAL before it notices the socket closing, and the next query then fails with "another operation is
# in progress" instead of a connection error.
DATABASE_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    SQLAlchemyError,
)


def failure_chain(error: BaseException) -> Iterator[BaseException]:
    """The error and what it was raised from: SQLAlchemy keeps the driver's error in `.orig`, whose `__cause__` is
    asyncpg's own."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__


def describe_failure(error: BaseException) -> str:
    """One line saying why the database could not be used, from the error at the root of the chain: its message
    (asyncpg's and PostgreSQL's never contain the password), or its class when it has none."""
    for link in failure_chain(error):
        if isinstance(link, DatabaseTimeout):
            return str(link)
        if isinstance(link, PoolTimeout):
            return "no pool connection free in time"
    *_, root = failure_chain(error)
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, TimeoutError):
        return "timed out"
    message = " ".join(str(root).split())
    return f"{type(root).__name__}: {message}" if message else type(root).__name__


class _PoolConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg ships no type information
    """asyncpg's connection, closed without waiting for the server to close its end.

    `terminate()` still sends PostgreSQL the Terminate message, so the server ends the session just as after a
    graceful close; it only skips the wait, which a frozen server never ends. The pool closes connections one at
    a time (all of them at shutdown, stale ones when a request recycles them), and each wait would last up to the
    command timeout.
    """

    async def close(self, *, timeout: float | None = None) -> None:
        self.terminate()


def create_engine(settings: Settings, url: Dsn) -> AsyncEngine:
    """An asyncpg-backed engine whose pool is sized by settings and named `realtime` in pg_stat_activity."""
    # UTC: snapshot rows are rendered by PostgreSQL in the session's TimeZone and must read as change rows do.
    server_settings = {"application_name": POOL_APPLICATION_NAME, "TimeZone": "UTC"}
    # A connection that cannot be opened (server frozen, SYN answered but no start-up reply) fails within the
    # pool timeout instead of asyncpg's default of a minute, so a request is answered 503 in time.
    connect_args: dict[str, Any] = {
        "server_settings": server_settings,
        "timeout": settings.pool_timeout,
        "connection_class": _PoolConnection,
    }
    if settings.idle_in_transaction_timeout_ms:
        # The last line of defence: a transaction left open by a bug, not by design, is ended by the server.
        server_settings["idle_in_transaction_session_timeout"] = str(settings.idle_in_transaction_timeout_ms)
    if settings.statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
        # The server cancels slow statements; this client-side bound also covers a silently dead connection
        # (half-open TCP) for the stream's reads. REST requests have a shorter deadline (`bounded_connection`).
        connect_args["command_timeout"] = settings.statement_timeout_ms / 1000 + 5
    return create_async_engine(
        url.sqlalchemy(),
        pool_size=settings.pool_size,
        max_overflow=settings.pool_max_overflow,
        pool_timeout=settings.pool_timeout,
        # No pre-ping: it costs a round trip per request. A connection found dead mid-request fails that request
        # with 503 and is discarded by the pool, so the next request gets a fresh one.
        connect_args=connect_args,
    )


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, with connections handed out in autocommit: a single-statement read costs one round trip
    (not BEGIN, SELECT, ROLLBACK), and each statement sees the latest committed state."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


class DatabaseTimeout(TimeoutError):
    """The database did not answer within the deadline of the work that needed it."""


_waiting = 0  # tasks of this process waiting for a pool connection now (see pool_waiting)


def pool_waiting() -> int:
    """How many callers wait for the pool to hand them a connection (or open one) right now, in this process."""
    return _waiting


class bounded_connection:
    """A pooled connection that is got, used and given back within `seconds`, or DatabaseTimeout is raised.

    One timer covers both phases. While the connection is being got, the deadline cancels the waiting task (and
    the cancellation becomes DatabaseTimeout); once it is held, the deadline aborts its socket instead, so that
    whatever is in flight fails with a connection error and SQLAlchemy's own error path invalidates it. A task
    cancelled in the middle of a statement would have SQLAlchemy close the connection politely, which waits on the
    silent server. A class rather than a generator-based context manager, and no asyncio.timeout: this runs on
    every REST request, and each of those layers cost a timer or a generator round trip more.
    """

    __slots__ = ("_connecting", "_driver", "_overran", "_seconds", "_task", "_timer", "conn")

    def __init__(self, engine: AsyncEngine, seconds: float) -> None:
        self._connecting = engine.connect()
        self._seconds = seconds
        self._driver: asyncpg.Connection | None = None
        self._overran = False
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> AsyncConnection:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._timer = loop.call_at(loop.time() + self._seconds, self._deadline)
        global _waiting
        _waiting += 1
        try:
            conn = await self._connecting.__aenter__()
        except asyncio.CancelledError:
            if self._overran and self._task is not None and self._task.uncancel() == 0:
                raise DatabaseTimeout(f"no answer within {self._seconds:g}s") from None
            self._timer.cancel()
            raise
        except BaseException:
            self._timer.cancel()
            raise
        finally:
            _waiting -= 1
        if self._overran:  # the deadline came as the connection arrived: this task was cancelled, then not
            self._task.uncancel()  # type: ignore[union-attr]
            await self._connecting.__aexit__(None, None, None)
            raise DatabaseTimeout(f"no answer within {self._seconds:g}s")
        # Looked up now: once SQLAlchemy has invalidated the connection, asking for it would try to reconnect.
        assert conn.sync_connection is not None
        self._driver = conn.sync_connection.connection.driver_connection
        self.conn = conn
        return conn

    def _deadline(self) -> None:
        self._overran = True
        if self._driver is None:
            assert self._task is not None
            self._task.cancel()
        else:
            self._driver.terminate()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        assert self._timer is not None
        assert self._driver is not None
        self._timer.cancel()
        driver, conn = self._driver, self.conn
        try:
            if error is not None and isinstance(error, DATABASE_ERRORS):
                if isinstance(error, TimeoutError) and not self._overran:
                    # asyncpg's own command timeout: the connection is left waiting on a cancel request that a
                    # silent server does not answer either, so it is not fit to be used again.
                    driver.terminate()
                if driver.is_closed():
                    await conn.invalidate()  # the pool would otherwise hand out the closed connection again
                if self._overran:
                    raise DatabaseTimeout(f"no answer within {self._seconds:g}s") from error
            # Closed by the deadline after the work ended without noticing, or by a cancelled reader that dropped
            # it mid-statement (the stream's reads do): never pool it again.
            elif (self._overran or driver.is_closed()) and not conn.invalidated:
                await conn.invalidate()
        finally:
            await self._connecting.__aexit__(None, None, None)


# The lifespan state is read from the scope's dict rather than through `request.state`, whose attributes each
# cost a failed normal lookup first (about 1 µs); these run on every request.


async def get_transaction(request: Request) -> AsyncIterator[AsyncConnection]:
    """One transaction per request: committed if the route succeeds, rolled back if it raises."""
    state = request.scope["state"]
    engine: AsyncEngine = state["engine"]
    settings: Settings = state["settings"]
    async with bounded_connection(engine, settings.pool_timeout) as conn, conn.begin():
        yield conn


async def get_read_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """One autocommit connection per read-only request."""
    state = request.scope["state"]
    engine: AsyncEngine = state["read_engine"]
    settings: Settings = state["settings"]
    async with bounded_connection(engine, settings.pool_timeout) as conn:
        yield conn


# The API speaks SQLAlchemy Core on connections: it maps no ORM classes, so a Session would only add its
# bookkeeping to every request. scope="function": the commit happens before the response is sent, so a
# failed commit is never a 2xx.
TransactionDep = Annotated[AsyncConnection, Depends(get_transaction, scope="function")]
ReadConnectionDep = Annotated[AsyncConnection, Depends(get_read_connection, scope="function")]
