"""Fixtures: one real PostgreSQL database per test run, migrated, and one real server process on it."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from realtime import migrate
from realtime.dsn import Dsn
from tests.support.databases import (
    ADMIN_URL_VARIABLE,
    EmbeddedPostgres,
    create_database,
    drop_database,
    private_directory,
)
from tests.support.server import ServerProcess
from tests.support.ws import StreamClient

# The browser fixtures (`browser`, `demo_page`) live beside the helpers they use, for every browser test module.
pytest_plugins = ["tests.support.browser"]


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dsn]:
    """The server the run uses: REALTIME_TEST_ADMIN_URL, or an embedded PostgreSQL started for the run."""
    configured = os.environ.get(ADMIN_URL_VARIABLE)
    if configured:
        yield Dsn.parse(configured)
        return
    directory = private_directory("realtime-tests-")
    embedded = EmbeddedPostgres.start(directory / "data")
    try:
        yield embedded.admin_url
    finally:
        embedded.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(admin_url: Dsn) -> Iterator[Dsn]:
    """A fresh database for this run, migrated to head."""
    url = create_database(admin_url)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        drop_database(admin_url, url)


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests leave files worth looking at (server logs, screenshots)."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def server(database_url: Dsn, artifacts_dir: Path) -> Iterator[ServerProcess]:
    """One `realtime serve` process shared by the tests that do not stop or break it."""
    process = ServerProcess(database=database_url, log_path=artifacts_dir / "server.log")
    process.start()
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:
        yield client


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[StreamClient]:
    """A WebSocket client of the shared server (modules that need another kind of `client` define their own)."""
    ws = await StreamClient.open(server.ws_url)
    try:
        yield ws
    finally:
        await ws.close()


@pytest.fixture
async def db(database_url: Dsn) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection for arranging data and checking what the database holds."""
    conn = await asyncpg.connect(database_url.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(autouse=True)
async def _fail_on_loop_errors() -> AsyncIterator[None]:
    """Anything that reaches the event loop's exception handler (an unretrieved task error) fails the test."""
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    loop.set_exception_handler(None)
    assert not errors, f"errors reached the event loop: {errors}"
