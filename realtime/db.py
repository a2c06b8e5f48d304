"""The SQLAlchemy engine of a process and the per-request connection dependencies.

A writing request's transaction commits when the route returns and rolls back when it raises, so routes never
commit; a reading request gets an autocommit connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError
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


def create_engine(settings: Settings, url: Dsn) -> AsyncEngine:
    """An asyncpg-backed engine whose pool is sized by settings and named `realtime` in pg_stat_activity."""
    # UTC: snapshot rows are rendered by PostgreSQL in the session's TimeZone and must read as change rows do.
    server_settings = {"application_name": POOL_APPLICATION_NAME, "TimeZone": "UTC"}
    # A connection that cannot be opened (server frozen, SYN answered but no start-up reply) fails within the
    # pool timeout instead of asyncpg's default of a minute, so a request is answered 503 in time.
    connect_args: dict[str, Any] = {"server_settings": server_settings, "timeout": settings.pool_timeout}
    if settings.idle_in_transaction_timeout_ms:
        # The last line of defence: a transaction left open by a bug, not by design, is ended by the server.
        server_settings["idle_in_transaction_session_timeout"] = str(settings.idle_in_transaction_timeout_ms)
    if settings.statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
        # The server cancels slow statements; this client-side bound also covers a silently dead connection
        # (half-open TCP), which would otherwise hang the request forever.
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


async def get_transaction(request: Request) -> AsyncIterator[AsyncConnection]:
    """One transaction per request: committed if the route succeeds, rolled back if it raises."""
    engine: AsyncEngine = request.state.engine
    async with engine.begin() as conn:
        yield conn


async def get_read_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """One autocommit connection per read-only request."""
    engine: AsyncEngine = request.state.read_engine
    async with engine.connect() as conn:
        yield conn


# The API speaks SQLAlchemy Core on connections: it maps no ORM classes, so a Session would only add its
# bookkeeping to every request. scope="function": the commit happens before the response is sent, so a
# failed commit is never a 2xx.
TransactionDep = Annotated[AsyncConnection, Depends(get_transaction, scope="function")]
ReadConnectionDep = Annotated[AsyncConnection, Depends(get_read_connection, scope="function")]
