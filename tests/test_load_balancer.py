"""Several instances behind a real HAProxy: subscribers spread over three `realtime serve` processes keep every
committed change exactly once while one instance is stopped (SIGTERM) and another killed (SIGKILL) under
writers, each reconnecting through the balancer and resuming with `since` on a surviving instance; and the
compose profile's balancer configuration parses and is the one compose mounts.

The ground truth is `realtime.changes`, read at the end: every subscriber must have seen each committed change to
`users` once, in order. PostgreSQL is the only thing the instances share.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import asyncpg
import httpx
import pytest
import yaml

from realtime.client import Change, Client, Disconnect, Event, connect
from realtime.dsn import Dsn
from tests.support.faults import FAST_RECOVERY, stream_database
from tests.support.haproxy import HAProxy, ServerStats, require_haproxy
from tests.support.server import ServerProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SUBSCRIBERS = 200
WRITERS = 8
# Each writer commits at most this often, so that 200 subscribers in one event loop keep up on two cores: the
# pause paces the load, it waits for nothing.
WRITE_PAUSE_S = 0.04
# Commits between the steps of the test, so that each fault lands while the writers are committing.
STEP = 40


class Subscriber:
    """One program: a client of its own (one WebSocket through the balancer) subscribed to `users` from position 0,
    reading on a task of its own and keeping the position of every change and every lost connection."""

    def __init__(self, url: str) -> None:
        self.lost: list[Disconnect] = []
        self.seqs: list[int] = []
        self.others: list[Event] = []  # a Snapshot or Reset would be a lost resume point: none is expected
        self.client: Client = connect(
            url, backoff_initial=0.05, backoff_max=0.5, connect_timeout=5.0, on_disconnect=self.lost.append
        )
        self._stack = contextlib.AsyncExitStack()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        await self._stack.enter_async_context(self.client)
        self.subscription = await self._stack.enter_async_context(self.client.subscribe("users", since=0))
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._stack.aclose()

    async def _read(self) -> None:
        async for event in self.subscription:
            if isinstance(event, Change):
                self.seqs.append(event.seq)
            else:
                self.others.append(event)

    @property
    def live(self) -> bool:
        return self.client.status == "live" and self.subscription.state == "live"

    def cut_with(self, code: int) -> bool:
        return any(disconnect.code == code for disconnect in self.lost)


class RestWriters:
    """`count` writers creating users through the balancer (POST /users), each on a keep-alive connection of its
    own, until stopped.

    A request that an instance's death cuts (a 502 or 503 from the balancer, a dropped connection) is sent again
    with a fresh email; whether the cut one committed does not matter, because subscribers are compared with
    `realtime.changes`, not with this count.
    """

    def __init__(self, base_url: str, count: int) -> None:
        self.base_url = base_url
        self.count = count
        self.committed = 0
        self.failures = 0
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RestWriters]:
        tasks = [asyncio.create_task(self._write(number)) for number in range(self.count)]
        try:
            yield self
        finally:
            self._stop.set()
            async with asyncio.timeout(15):
                await asyncio.gather(*tasks)

    async def wait_committed(self, count: int, timeout: float = 20.0) -> None:
        """Wait until at least `count` users have been created."""
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: self.committed >= count)

    async def _write(self, number: int) -> None:
        attempt = 0
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5.0) as http:
            while not self._stop.is_set():
                attempt += 1
                body = {"name": f"writer {number}", "email": f"w{number}-{attempt}@example.com"}
                try:
                    response = await http.post("/users", json=body)
                except httpx.TransportError:
                    self.failures += 1
                else:
                    if response.status_code == 201:
                        async with self._progress:
                            self.committed += 1
                            self._progress.notify_all()
                    elif response.status_code >= 500:
                        self.failures += 1
                    else:
                        raise AssertionError(f"POST /users: {response.status_code} {response.text}")
                await asyncio.sleep(WRITE_PAUSE_S)


@pytest.fixture
async def balanced_db(admin_url: Dsn) -> AsyncIterator[Dsn]:
    """A database of the test's own: its `users` changes are the only ones."""
    async with stream_database(admin_url) as url:
        yield url


async def users_seqs(conn: asyncpg.Connection) -> list[int]:
    rows = await conn.fetch("SELECT seq FROM realtime.changes WHERE table_name = 'users' ORDER BY seq")
    return [row[0] for row in rows]


async def test_subscribers_behind_haproxy_keep_every_change_once_when_two_of_three_instances_die(
    balanced_db: Dsn, artifacts_dir: Path, tmp_path: Path
) -> None:
    """200 subscribers spread by HAProxy over three instances; under 8 REST writers one instance is SIGTERMed
    (1012) and another SIGKILLed (1006); every subscriber resumes through the balancer on the survivor and ends
    with every committed change exactly once, in order."""
    names = ("a", "b", "c")
    servers = {
        name: ServerProcess(database=balanced_db, log_path=artifacts_dir / f"balanced-{name}.log", env=FAST_RECOVERY)
        for name in names
    }
    balancer = HAProxy({name: server.port for name, server in servers.items()}, tmp_path)
    conn = await asyncpg.connect(balanced_db.asyncpg())
    try:
        await asyncio.gather(*(asyncio.to_thread(server.start) for server in servers.values()))
        await asyncio.to_thread(balancer.start)

        async def stats() -> dict[str, ServerStats]:
            return await asyncio.to_thread(balancer.read_stats)

        async with contextlib.AsyncExitStack() as stack:
            subscribers = [await stack.enter_async_context(Subscriber(balancer.ws_url)) for _ in range(SUBSCRIBERS)]

            async def all_live() -> bool:
                return all(subscriber.live for subscriber in subscribers)

            await eventually(all_live, 20, "every subscriber live")
            # The connections really are spread: each instance holds about a third of them, so each fault cuts some.
            spread = {name: server.sessions for name, server in (await stats()).items()}
            assert sum(spread.values()) == SUBSCRIBERS, spread
            assert min(spread.values()) >= SUBSCRIBERS // 4, spread

            stopped, killed = servers["a"], servers["b"]
            async with RestWriters(balancer.base_url, WRITERS).running() as writers:
                await writers.wait_committed(STEP)

                assert await asyncio.to_thread(stopped.terminate) == 0
                await writers.wait_committed(writers.committed + STEP)

                async def stopped_cut_and_back() -> bool:
                    cut = sum(subscriber.cut_with(1012) for subscriber in subscribers)
                    return cut >= spread["a"] and await all_live() and (await stats())["a"].status == "DOWN"

                await eventually(stopped_cut_and_back, 20, "the stopped instance's subscribers resumed elsewhere")

                assert killed.process is not None
                killed.process.kill()
                await asyncio.to_thread(killed.process.wait)
                await writers.wait_committed(writers.committed + STEP)

                async def killed_cut_and_back() -> bool:
                    cut = sum(subscriber.cut_with(1006) for subscriber in subscribers)
                    # Those first on it, and any of the stopped instance's that resumed on it.
                    return cut >= spread["b"] and await all_live() and (await stats())["b"].status == "DOWN"

                await eventually(killed_cut_and_back, 20, "the killed instance's subscribers resumed elsewhere")
                await writers.wait_committed(writers.committed + STEP)

            truth = await users_seqs(conn)
            assert len(truth) >= writers.committed

            async def all_caught_up() -> bool:
                return all(subscriber.seqs and subscriber.seqs[-1] >= truth[-1] for subscriber in subscribers)

            await eventually(all_caught_up, 20, f"every subscriber received seq {truth[-1]}")
            wrong = [index for index, subscriber in enumerate(subscribers) if subscriber.seqs != truth]
            assert not wrong, (
                f"{len(wrong)} of {SUBSCRIBERS} subscribers differ from the {len(truth)} committed changes;"
                f" the first: {sorted(set(truth) ^ set(subscribers[wrong[0]].seqs))[:10]}"
            )
            assert all(not subscriber.others for subscriber in subscribers)
            # The stop cut exactly the stopped instance's share; every subscriber ends on the survivor.
            assert sum(subscriber.cut_with(1012) for subscriber in subscribers) == spread["a"]
            assert (await stats())["c"].sessions == SUBSCRIBERS
    finally:
        await conn.close()
        await asyncio.to_thread(balancer.terminate)
        for server in servers.values():
            await asyncio.to_thread(server.terminate)


def test_the_compose_profile_puts_two_instances_behind_the_checked_haproxy_config() -> None:
    """deploy/haproxy.cfg parses (`haproxy -c`; the instances' names are resolved at run time), checks /readyz and
    keeps tunnels open, and compose.yaml's `balanced` profile mounts it in front of its two app services."""
    config_path = ROOT / "deploy" / "haproxy.cfg"
    checked = subprocess.run(
        [str(require_haproxy()), "-c", "-f", str(config_path)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services: dict[str, dict[str, object]] = compose["services"]
    balanced = {name for name, service in services.items() if "balanced" in list_of(service.get("profiles"))}
    apps = {name for name, service in services.items() if "build" in service}
    assert balanced == {"app-2", "lb"}, balanced
    assert apps == {"app", "app-2"}, apps
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in list_of(services["lb"]["volumes"])
    # The apps believe X-Forwarded-For from the balancer's fixed address, and from nothing else.
    balancer = services["lb"]["networks"]["default"]["ipv4_address"]  # type: ignore[index]
    trusted = services["app"]["environment"]["FORWARDED_ALLOW_IPS"]  # type: ignore[index]
    assert trusted == f"${{FORWARDED_ALLOW_IPS:-{balancer}}}", (trusted, balancer)

    lines = [line.split() for line in config_path.read_text().splitlines() if line.strip()]
    targets = {words[2].rsplit(":", 1)[0] for words in lines if words[0] == "server"}
    assert targets == apps, targets
    check = next(words for words in lines if words[:2] == ["http-check", "send"])
    assert check[2:6] == ["meth", "GET", "uri", "/readyz"], check
    assert any(words[:2] == ["timeout", "tunnel"] for words in lines)


def list_of(value: object) -> list[object]:
    assert value is None or isinstance(value, list), value
    return value or []
