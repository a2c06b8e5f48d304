"""Every per-client and per-process bound of the stream, hit on purpose against a real server: what the client
sees, and that the server and other clients carry on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from realtime.dsn import Dsn
from tests.support.server import ServerProcess, running_server
from tests.support.tables import create_streamed_table
from tests.support.waiting import eventually
from tests.support.ws import StreamClient


@pytest.fixture(scope="module")
async def limited(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server with small subscription, filter, snapshot and history-read bounds."""
    env = {
        "WS_MAX_SUBSCRIPTIONS_TOTAL": "3",
        "WS_MAX_FILTER_VALUES": "50",
        "STREAM_SNAPSHOT_MAX_BYTES": "65536",
        "STREAM_MAX_CONCURRENT_READS": "1",
        "STREAM_READ_WAIT_S": "0.3",
    }
    async with running_server(database_url, artifacts_dir / "limited.log", env=env) as server:
        yield server


async def _open(url: str, **kwargs: Any) -> ClientConnection:
    return await connect(url, max_size=None, **kwargs)


async def _refused(url: str, **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as refused:
        await _open(url, **kwargs)
    return refused.value


async def test_connections_beyond_the_limits_are_refused_before_the_upgrade(
    database_url: Dsn, artifacts_dir: Path
) -> None:
    """Past WS_MAX_CONNECTIONS_PER_CLIENT an upgrade gets 429, past WS_MAX_CONNECTIONS 503, both with Retry-After."""
    env = {"WS_MAX_CONNECTIONS": "3", "WS_MAX_CONNECTIONS_PER_CLIENT": "2"}
    async with running_server(database_url, artifacts_dir / "connections.log", env=env) as server:
        first, second = await _open(server.ws_url), await _open(server.ws_url)
        per_client = await _refused(server.ws_url)
        assert per_client.response.status_code == 429
        assert int(per_client.response.headers["Retry-After"]) > 0
        problem = orjson.loads(per_client.response.body)
        assert problem["status"] == 429
        assert problem["type"] == "/problems/too-many-connections-from-client"
        assert per_client.response.headers["Content-Type"] == "application/problem+json"

        other_address = await _open(server.ws_url, local_addr=("127.0.0.2", 0))
        total = await _refused(server.ws_url, local_addr=("127.0.0.3", 0))
        assert total.response.status_code == 503
        assert int(total.response.headers["Retry-After"]) > 0

        # The connections admitted work, and a closed one frees its place.
        client = StreamClient(first)
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        await second.close()
        await other_address.close()
        reopened = await eventually(lambda: _try_open(server.ws_url), 10, "a place freed by a closed connection")
        await reopened.close()
        await first.close()


async def _try_open(url: str, **kwargs: Any) -> ClientConnection | None:
    try:
        return await _open(url, **kwargs)
    except InvalidStatus:
        return None


async def test_the_client_address_comes_from_x_forwarded_for_only_behind_a_trusted_proxy(
    database_url: Dsn, artifacts_dir: Path
) -> None:
    """Per-client counting uses X-Forwarded-For when FORWARDED_ALLOW_IPS trusts the peer, and ignores it otherwise."""
    for trusted in (True, False):
        env = {"WS_MAX_CONNECTIONS_PER_CLIENT": "1", **({"FORWARDED_ALLOW_IPS": "127.0.0.1"} if trusted else {})}
        async with running_server(database_url, artifacts_dir / f"forwarded-{trusted}.log", env=env) as server:
            first = await _open(server.ws_url, additional_headers={"X-Forwarded-For": "203.0.113.1"})
            try:
                other = await _try_open(server.ws_url, additional_headers={"X-Forwarded-For": "203.0.113.2"})
                assert (other is not None) == trusted
                if other is not None:
                    await other.close()
                same = await _try_open(server.ws_url, additional_headers={"X-Forwarded-For": "203.0.113.1"})
                assert same is None
            finally:
                await first.close()


async def test_a_client_over_its_frame_rate_is_refused_then_closed(database_url: Dsn, artifacts_dir: Path) -> None:
    """Frames past the burst get `rate_limited` with retry_after_ms; a client that keeps pushing is closed 1008."""
    env = {"WS_MESSAGES_PER_S": "2", "WS_MESSAGE_BURST": "5", "WS_RATE_LIMIT_CLOSE_AFTER": "10"}
    async with running_server(database_url, artifacts_dir / "rate.log", env=env) as server:
        client = await StreamClient.open(server.ws_url)
        try:
            for ref in range(6):
                await client.send({"type": "ping", "ref": ref})
            replies = [await client.recv() for _ in range(6)]
            assert [reply["type"] for reply in replies] == ["pong"] * 5 + ["error"]
            assert replies[5]["code"] == "rate_limited"
            assert replies[5]["ref"] == 5  # the client knows which frame to send again
            assert replies[5]["retry_after_ms"] > 0
            # Waiting as told is enough: the next frame is served.
            await asyncio.sleep(replies[5]["retry_after_ms"] / 1000)
            assert (await client.request({"type": "ping"}))["type"] == "pong"

            for ref in range(30):
                await client.send({"type": "ping", "ref": ref})
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv_until(lambda _: False)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason.startswith("rate limit exceeded; last_seq=")
        finally:
            await client.close()
        other = await StreamClient.open(server.ws_url)
        assert (await other.request({"type": "ping"}))["type"] == "pong"
        await other.close()


async def test_filters_share_one_budget_of_values_per_connection(
    limited: ServerProcess, db: asyncpg.Connection
) -> None:
    """`in` values count against WS_MAX_FILTER_VALUES; a subscribe past it is refused until others are dropped."""
    table = await create_streamed_table(db)
    client = await StreamClient.open(limited.ws_url)
    try:
        await client.subscribe("a", table=table, filter=[{"column": "k", "op": "in", "value": list(range(40))}])
        wide = {
            "type": "subscribe",
            "id": "b",
            "table": table,
            "filter": [{"column": "k", "op": "in", "value": list(range(20))}],
        }
        refused = await client.request(wide)
        assert refused["code"] == "filter_budget_exceeded"
        assert refused["id"] == "b"
        assert (await client.request({"type": "unsubscribe", "id": "a"}))["type"] == "unsubscribed"
        assert (await client.request(wide))["type"] == "subscribed"
    finally:
        await client.close()


async def test_subscriptions_per_process_are_bounded(limited: ServerProcess, db: asyncpg.Connection) -> None:
    """Past WS_MAX_SUBSCRIPTIONS_TOTAL across connections a subscribe gets `too_many_subscriptions` with a hint."""
    table = await create_streamed_table(db)
    first, second = await StreamClient.open(limited.ws_url), await StreamClient.open(limited.ws_url)
    try:
        await first.subscribe("a", table=table)
        await first.subscribe("b", table=table)
        await second.subscribe("c", table=table)
        refused = await second.request({"type": "subscribe", "id": "d", "table": table})
        assert refused["code"] == "too_many_subscriptions"
        assert refused["retry_after_ms"] > 0
        await first.close()

        async def subscribed() -> bool:
            reply = await second.request({"type": "subscribe", "id": "d", "table": table})
            return bool(reply["type"] == "subscribed")

        await eventually(subscribed, 10, "a subscription freed by a closed connection")
    finally:
        await first.close()
        await second.close()


async def test_a_snapshot_over_its_bound_is_refused_and_a_narrower_one_served(
    limited: ServerProcess, db: asyncpg.Connection
) -> None:
    """A snapshot heavier than STREAM_SNAPSHOT_MAX_BYTES gets `snapshot_too_large`; a filtered one still works."""
    table = await create_streamed_table(db)
    await db.execute(f"INSERT INTO {table} (k, v) SELECT g, repeat('x', 1000) FROM generate_series(1, 100) g")
    client = await StreamClient.open(limited.ws_url)
    try:
        refused = await client.request({"type": "subscribe", "id": "all", "table": table, "snapshot": True})
        assert refused["code"] == "snapshot_too_large"
        assert refused["id"] == "all"
        narrow = [{"column": "k", "op": "lte", "value": 10}]
        _, before = await client.subscribe("some", table=table, snapshot=True, filter=narrow)
        assert sorted(row["k"] for frame in before for row in frame["rows"]) == list(range(1, 11))
    finally:
        await client.close()


async def test_a_subscribe_that_finds_every_read_slot_busy_is_told_when_to_retry(
    limited: ServerProcess, database_url: Dsn, db: asyncpg.Connection
) -> None:
    """With the one read slot taken past STREAM_READ_WAIT_S, a replay gets `unavailable` with retry_after_ms."""
    table = await create_streamed_table(db)
    holder = await asyncpg.connect(database_url.asyncpg())
    waiting, refused_client = await StreamClient.open(limited.ws_url), await StreamClient.open(limited.ws_url)
    try:
        # A writer's open position makes a snapshot wait for it, holding the only read slot meanwhile.
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(f"INSERT INTO {table} (k) VALUES (1)")
        await holder.execute("SET CONSTRAINTS ALL IMMEDIATE")
        await waiting.send({"type": "subscribe", "ref": "w", "id": "w", "table": table, "snapshot": True})
        await eventually(lambda: _snapshot_waiting(db), 10, "the snapshot waits for the open position")

        refused = await refused_client.request({"type": "subscribe", "id": "r", "table": table, "since": 0})
        assert refused["code"] == "unavailable"
        assert refused["retry_after_ms"] > 0

        await transaction.commit()
        reply = await waiting.recv_until(lambda frame: frame.get("ref") == "w")
        assert reply["type"] in ("subscribed", "error")  # the writer held the lock for the snapshot's whole wait
        assert (await refused_client.request({"type": "subscribe", "id": "r", "table": table, "since": 0}))[
            "type"
        ] == "subscribed"
    finally:
        await holder.close()
        await waiting.close()
        await refused_client.close()


async def _snapshot_waiting(db: asyncpg.Connection) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'realtime'"
            " AND wait_event_type = 'Lock' AND query LIKE '%hold_position%'"
        )
    )


async def test_a_table_name_holding_nul_is_unknown(client: StreamClient) -> None:
    """`users\\u0000` is answered `unknown_table` (it never reaches the database, which would refuse it)."""
    reply = await client.request({"type": "subscribe", "id": "nul", "table": "users\u0000"})
    assert reply["code"] == "unknown_table"


async def test_a_long_ref_is_refused_without_being_echoed(client: StreamClient) -> None:
    """A ref string over 128 characters gets `bad_message`, and the reply does not carry it back."""
    await client.send({"type": "ping", "ref": "r" * 129})
    reply = await client.recv()
    assert reply["code"] == "bad_message"
    assert "ref" not in reply
    assert (await client.request({"type": "ping"}))["type"] == "pong"
