"""Alembic environment: runs migrations over asyncpg against the URL `realtime.migrate` passes in."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from realtime.config import get_settings
from realtime.dsn import Dsn


def _url() -> str:
    configured = context.config.get_main_option("sqlalchemy.url")
    if configured:
        return configured
    settings = get_settings()
    if settings.database_url is None:
        raise SystemExit("DATABASE_URL is not set; use `realtime migrate`, which also handles embedded mode")
    return Dsn.parse(str(settings.database_url)).sqlalchemy()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")
asyncio.run(_run_async())
