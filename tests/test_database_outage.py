"""REST while the database is away: frozen (sockets open, nothing answers), refusing connections, and back.

Each test has a database of its own behind an `OutageProxy`. Most run a `realtime serve` whose every database
connection goes through the proxy and check what it answers and what the database holds afterwards; the last two
check the pool's bookkeeping in-process and which errors count as the database being away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
import sqlalchemy.exc
from sqlalchemy import text

from realtime import migrate
from realtime.config import Settings
from realtime.db import POOL_APPLICATION_NAME, DatabaseTimeout, bounded_connection, create_engine
from realtime.dsn import Dsn
from realtime.errors import _is_unavailable
from tests.support.databases import create_database, drop_database
from tests.support.faults import FAST_RECOVERY, OutageProxy, wait_ready
from tests.support.server import ServerProcess, running_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)
T = TypeVar("T")

POOL_TIMEOUT_S = 1.0
POOL_SIZE = 3
# The promise is "503 within POOL_TIMEOUT". What follows the deadline is aborting a socket and rendering a problem
# document, a few milliseconds on loopback; the rest of the margin is for a CI machine busy with other tests.
MARGIN_S = 0.75
ENV = {
    **FAST_RECOVERY,
    "POOL_TIMEOUT": str(POOL_TIMEOUT_S),
    "POOL_SIZE": str(POOL_SIZE),
    "STREAM_MAX_CONCURRENT_READS": "1",
}
# Long enough to see an answer that comes too late (and fail on the time, not on a client timeout), short enough
# that a request that hangs fails the test quickly.
CLIENT_TIMEOUT_S = 3 * POOL_TIMEOUT_S + 2


@pytest.fixture
async def outage_db(admin_url: Dsn) -> AsyncIterator[Dsn]:
    """A migrated database of this test's own."""
    url = await asyncio.to_thread(create_database, admin_url, "rt_outage")
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        yield url
    finally:
        await asyncio.to_thread(drop_database, admin_url, url)


@pytest.fixture
async def admin(outage_db: Dsn) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection (not through the proxy) for reading what the database really holds."""
    conn = await asyncpg.connect(outage_db.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def proxy(admin_url: Dsn) -> Iterator[OutageProxy]:
    """The proxy through which the server under test reaches PostgreSQL."""
    running = OutageProxy(admin_url)
    running.start()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def log_path(artifacts_dir: Path, request: pytest.FixtureRequest) -> Path:
    return artifacts_dir / f"{request.node.name}.log"


@pytest.fixture
async def server(outage_db: Dsn, proxy: OutageProxy, log_path: Path) -> AsyncIterator[ServerProcess]:
    """A server of this test's own whose pool and listener connect through the proxy, with POOL_TIMEOUT=1."""
    async with running_server(proxy.url(outage_db), log_path, env=ENV) as running:
        yield running


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


def new_user() -> dict[str, str]:
    return {"name": "Grace", "email": f"grace-{uuid.uuid4().hex}@example.com"}


async def timed(request: Awaitable[T]) -> tuple[T, float]:
    """The result of `request` and how many seconds it took; raises what it raises."""
    started = time.monotonic()
    result = await request
    return result, time.monotonic() - started


def wrapped(error: Exception) -> sqlalchemy.exc.DBAPIError:
    """`error` as SQLAlchemy raises an asyncpg error from a statement: in `.orig`, as the driver adapter's cause."""
    adapted = Exception(str(error))
    adapted.__cause__ = error
    return sqlalchemy.exc.DBAPIError("SELECT 1", None, adapted)


def assert_unavailable(response: httpx.Response, elapsed: float) -> None:
    """A 503 `unavailable` problem with a small Retry-After, answered within POOL_TIMEOUT."""
    where = f"{response.request.method} {response.request.url.path}"
    assert response.status_code == 503, f"{where}: {response.status_code} {response.text}"
    assert response.headers["content-type"] == "application/problem+json", where
    problem = response.json()
    assert (problem["type"], problem["status"]) == ("/problems/unavailable", 503), problem
    assert 1 <= int(response.headers["retry-after"]) <= 5, where
    assert elapsed < POOL_TIMEOUT_S + MARGIN_S, f"{where} took {elapsed:.2f}s"


async def every_route_unavailable(http: httpx.AsyncClient, user_id: int) -> None:
    """Every users route, one after the other, answers 503 in time."""
    requests: list[Callable[[], Awaitable[httpx.Response]]] = [
        lambda: http.get(f"/users/{user_id}"),
        lambda: http.get("/users"),
        lambda: http.post("/users", json=new_user()),
        lambda: http.patch(f"/users/{user_id}", json={"name": "Grace H."}),
        lambda: http.delete(f"/users/{user_id}"),
    ]
    for make in requests:
        response, elapsed = await timed(make())
        assert_unavailable(response, elapsed)


async def assert_not_ready(http: httpx.AsyncClient, reason: str) -> str:
    """/readyz answers 503 in time and its `database` member says what is wrong; returns that member."""
    response, elapsed = await timed(http.get("/readyz"))
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "not_ready"
    database: str = body["database"]
    assert reason in database, body
    assert elapsed < POOL_TIMEOUT_S + MARGIN_S, f"/readyz took {elapsed:.2f}s"
    return database


async def serves_again(http: httpx.AsyncClient, server: ServerProcess, created: list[dict[str, Any]]) -> None:
    """Once the database is back the same server process creates and reads users again."""
    await wait_ready(server, timeout=20)
    response = await http.post("/users", json=new_user())
    assert response.status_code == 201, response.text
    created.append(response.json())
    for user in created:
        response = await http.get(f"/users/{user['id']}")
        assert response.status_code == 200, response.text
        assert response.json() == user


async def assert_database_holds(admin: asyncpg.Connection, created: list[dict[str, Any]]) -> None:
    """The table holds exactly the users whose creation was answered 201: none lost, none from a 503."""
    rows = await admin.fetch("SELECT id, email FROM users ORDER BY id")
    assert [(row["id"], row["email"]) for row in rows] == [(user["id"], user["email"]) for user in created]


def assert_clean_log(server: ServerProcess) -> None:
    """The server logged no traceback and answered no request with 500."""
    log = server.log_text()
    assert "Traceback" not in log
    assert "unhandled error" not in log
    assert '" 500' not in log


async def test_frozen_database_gets_503_within_pool_timeout(
    server: ServerProcess, http: httpx.AsyncClient, proxy: OutageProxy, admin: asyncpg.Connection
) -> None:
    """While the database is frozen every users route answers 503 with Retry-After within POOL_TIMEOUT, never 500."""
    created = [(await http.post("/users", json=new_user())).json()]
    proxy.freeze()
    try:
        # The first request meets a pooled connection; once it fails the pool discards the others, so the rest
        # (and the whole second round) open new connections to the frozen server.
        for _ in range(2):
            await every_route_unavailable(http, created[0]["id"])
        assert "no answer" in await assert_not_ready(http, "unreachable")
    finally:
        proxy.restore()
    await serves_again(http, server, created)
    await assert_database_holds(admin, created)
    assert_clean_log(server)


async def test_refused_connections_get_503_promptly(
    server: ServerProcess, http: httpx.AsyncClient, proxy: OutageProxy, admin: asyncpg.Connection
) -> None:
    """While the database refuses connections (and has cut the open ones) every users route answers 503 at once."""
    created = [(await http.post("/users", json=new_user())).json()]
    proxy.refuse()
    try:
        for _ in range(2):
            await every_route_unavailable(http, created[0]["id"])
        assert "refused" in await assert_not_ready(http, "unreachable")
    finally:
        proxy.restore()
    await serves_again(http, server, created)
    await assert_database_holds(admin, created)
    assert_clean_log(server)


async def test_more_requests_than_pool_slots_while_frozen(
    server: ServerProcess, http: httpx.AsyncClient, proxy: OutageProxy, admin: asyncpg.Connection
) -> None:
    """Requests queued behind a frozen pool's connections also get 503 within POOL_TIMEOUT; none is left over."""
    created = [(await http.post("/users", json=new_user())).json()]
    proxy.freeze()
    try:
        requests = [http.get(f"/users/{created[0]['id']}") for _ in range(3 * POOL_SIZE)]
        requests += [http.post("/users", json=new_user()) for _ in range(POOL_SIZE)]
        for response, elapsed in await asyncio.gather(*(timed(request) for request in requests)):
            assert_unavailable(response, elapsed)
    finally:
        proxy.restore()
    await serves_again(http, server, created)

    async def pool_within_size() -> bool:
        # (Backends whose client gave up during the freeze end once they see the held-back bytes and the close.)
        count = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
            POOL_APPLICATION_NAME,
        )
        return bool(count <= POOL_SIZE)

    await eventually(pool_within_size, 10, f"at most {POOL_SIZE} pool connections")
    await assert_database_holds(admin, created)
    assert_clean_log(server)


async def test_sigterm_while_frozen_exits_cleanly(
    server: ServerProcess, http: httpx.AsyncClient, proxy: OutageProxy
) -> None:
    """SIGTERM while the database is frozen: the pool is closed without waiting on it and the server exits 0."""
    await asyncio.gather(*(http.get("/users") for _ in range(2 * POOL_SIZE)))  # the pool holds open connections
    proxy.freeze()
    try:
        code = await asyncio.to_thread(server.terminate)
    finally:
        proxy.restore()
    assert code == 0
    assert_clean_log(server)


async def test_no_pool_slot_is_lost_to_a_frozen_database(outage_db: Dsn, proxy: OutageProxy) -> None:
    """Connections given up at the deadline (while waited for, opened or used) all give their pool slot back."""
    url = proxy.url(outage_db)
    settings = Settings(
        database_url=url.libpq(), pool_size=POOL_SIZE, pool_timeout=POOL_TIMEOUT_S, stream_max_concurrent_reads=1
    )
    engine = create_engine(settings, url)

    async def use(write: bool) -> None:
        async with bounded_connection(engine, POOL_TIMEOUT_S) as conn:
            if write:
                async with conn.begin():
                    await conn.execute(text("SELECT 1"))
            else:
                await conn.execute(text("SELECT 1"))

    try:
        await asyncio.gather(*(use(write=False) for _ in range(POOL_SIZE)))  # the freeze meets idle connections
        proxy.freeze()
        try:
            outcomes = await asyncio.gather(
                *(use(write=n % 2 == 0) for n in range(4 * POOL_SIZE)), return_exceptions=True
            )
        finally:
            proxy.restore()
        assert all(isinstance(outcome, DatabaseTimeout) for outcome in outcomes), outcomes
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        async with contextlib.AsyncExitStack() as stack:  # every slot can be held at the same time again
            held = [await stack.enter_async_context(bounded_connection(engine, 10)) for _ in range(POOL_SIZE)]
            for conn in held:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (TimeoutError(), True),
        (DatabaseTimeout("no answer within 1s"), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
        (asyncpg.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.TooManyConnectionsError("sorry, too many clients already"), True),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), True),
        (sqlalchemy.exc.TimeoutError("QueuePool limit of size 3 overflow 0 reached"), True),
        (wrapped(asyncpg.QueryCanceledError("canceling statement due to statement timeout")), True),
        (wrapped(asyncpg.UniqueViolationError("duplicate key value")), False),
        (wrapped(asyncpg.UndefinedTableError('relation "users" does not exist')), False),
        (ValueError("a bug"), False),
    ],
)
def test_which_errors_mean_the_database_is_away(error: Exception, unavailable: bool) -> None:
    """Connection, timeout, pool and server-state errors, bare or wrapped by SQLAlchemy, are 503; others are not."""
    assert _is_unavailable(error) is unavailable
