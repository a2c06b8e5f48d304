"""The SQLAlchemy engine of a process and the per-request session dependency.

A request's session commits when the route returns and rolls back when it raises, so routes never commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

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
    server_settings = {"application_name": POOL_APPLICATION_NAME}
    connect_args: dict[str, Any] = {"server_settings": server_settings}
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


def sessionmaker_for(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def read_sessionmaker_for(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for single-statement reads: autocommit, so a GET costs one round trip, not BEGIN/SELECT/ROLLBACK."""
    return async_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed if the route succeeds, rolled back if it raises."""
    factory: async_sessionmaker[AsyncSession] = request.state.sessionmaker
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def get_read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One autocommit session per read-only request: each statement reads the latest committed state."""
    factory: async_sessionmaker[AsyncSession] = request.state.read_sessionmaker
    async with factory() as session:
        yield session


# scope="function": the commit happens before the response is sent, so a failed commit is never a 2xx.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session, scope="function")]
