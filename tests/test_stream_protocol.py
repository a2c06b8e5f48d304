"""The /ws protocol over a real server: replies, errors for every bad frame, filters, events, unsubscribe."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.server import ServerProcess
from tests.support.tables import create_streamed_table
from tests.support.ws import StreamClient


@pytest.fixture
async def table(db: asyncpg.Connection) -> str:
    return await create_streamed_table(db)


async def test_ping_is_answered_with_pong_and_ref(client: StreamClient) -> None:
    """ping gets a pong that echoes the ref."""
    await client.send({"type": "ping", "ref": "abc"})
    assert await client.recv() == {"type": "pong", "ref": "abc"}


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_message"),
        ("[1, 2]", "bad_message"),
        ('{"ref": 1}', "bad_message"),
        ('{"type": "explode", "ref": 1}', "unknown_type"),
        ('{"type": "ping", "ref": 1, "extra": true}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "table": "users"}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "id": "", "table": "users"}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "no_such_table"}', "unknown_table"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "realtime.changes"}', "unknown_table"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "users", "events": ["TRUNCATE"]}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "users", "events": []}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "users", "since": -1}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "users", "since": "5"}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "users", "snapshot": "yes"}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "users", "since": 1, "snapshot": true}', "bad_message"),
        ('{"type": "subscribe", "ref": 1, "id": "a", "table": "users", "filter": {}}', "invalid_filter"),
        (
            '{"type": "subscribe", "ref": 1, "id": "a", "table": "users",'
            ' "filter": [{"column": "id", "op": "like", "value": 1}]}',
            "invalid_filter",
        ),
        (
            '{"type": "subscribe", "ref": 1, "id": "a", "table": "users",'
            ' "filter": [{"column": "id", "op": "in", "value": 1}]}',
            "invalid_filter",
        ),
        (
            '{"type": "subscribe", "ref": 1, "id": "a", "table": "users",'
            ' "filter": [{"column": "nope", "op": "eq", "value": 1}]}',
            "unknown_column",
        ),
        ('{"type": "unsubscribe", "ref": 1, "id": "never"}', "not_subscribed"),
    ],
)
async def test_bad_frames_get_precise_errors_and_the_connection_stays_usable(
    client: StreamClient, frame: str, code: str
) -> None:
    """Every malformed or invalid frame gets an error frame with its code, and the connection keeps working."""
    await client.send(frame)
    reply = await client.recv()
    assert reply["type"] == "error"
    assert reply["code"] == code, reply
    assert reply["message"]
    if '"ref": 1' in frame:
        assert reply.get("ref") == 1
    assert await client.request({"type": "ping"}) == {"type": "pong", "ref": client._ref}


async def test_binary_and_oversized_frames_are_refused(client: StreamClient) -> None:
    """A binary frame gets bad_message and a frame over the size limit gets frame_too_large."""
    await client.connection.send(b'{"type": "ping"}')
    assert (await client.recv())["code"] == "bad_message"
    await client.send('{"type": "ping", "ref": "' + "x" * 70_000 + '"}')
    assert (await client.recv())["code"] == "frame_too_large"
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_websockets_on_other_paths_are_refused(server: ServerProcess) -> None:
    """Only /ws serves the stream: the upgrade to any other path is answered 403."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws_url + "x"):
            pass
    assert refused.value.response.status_code == 403


async def test_duplicate_subscription_id_is_refused(client: StreamClient, table: str) -> None:
    """A second subscribe with an id already open gets duplicate_id; the first keeps working."""
    await client.subscribe("dup", table=table)
    reply = await client.request({"type": "subscribe", "id": "dup", "table": table})
    assert reply["code"] == "duplicate_id"
    assert reply["id"] == "dup"


async def test_too_many_subscriptions_is_refused(client: StreamClient, table: str) -> None:
    """The per-connection subscription limit (100 by default) is enforced with too_many_subscriptions."""
    for index in range(100):
        await client.subscribe(f"s{index}", table=table)
    reply = await client.request({"type": "subscribe", "id": "one-more", "table": table})
    assert reply["code"] == "too_many_subscriptions"


async def _insert(db: asyncpg.Connection, table: str, k: int, v: str = "x", flag: bool | None = None) -> int:
    return int(await db.fetchval(f"INSERT INTO {table} (k, v, flag) VALUES ($1, $2, $3) RETURNING id", k, v, flag))


async def _frames_until_marker(client: StreamClient, sub_id: str, marker_k: int) -> list[dict[str, Any]]:
    """Change frames for `sub_id` received before the unfiltered `all` subscription saw the marker row.

    One connection's frames arrive in seq order, so once `all` has the marker, `sub_id` has had its chance at
    every earlier change.
    """
    collected: list[dict[str, Any]] = []
    while True:
        frame = await client.recv()
        if frame["type"] != "change":
            continue
        if frame["id"] == sub_id:
            collected.append(frame)
        row = frame.get("row") or frame["old"]
        if frame["id"] == "all" and row["k"] == marker_k:
            return collected


MARKER = 999


@pytest.mark.parametrize(
    ("condition", "expected_ks"),
    [
        ({"column": "k", "op": "eq", "value": 2}, [2]),
        ({"column": "k", "op": "neq", "value": 2}, [1, 3, 4]),
        ({"column": "k", "op": "lt", "value": 3}, [1, 2]),
        ({"column": "k", "op": "lte", "value": 3}, [1, 2, 3]),
        ({"column": "k", "op": "gt", "value": 3}, [4]),
        ({"column": "k", "op": "gte", "value": 3}, [3, 4]),
        ({"column": "k", "op": "in", "value": [1, 4]}, [1, 4]),
        ({"column": "flag", "op": "is", "value": None}, [1, 3]),
        ({"column": "flag", "op": "is", "value": True}, [2]),
        ({"column": "v", "op": "eq", "value": "four"}, [4]),
    ],
)
async def test_filter_ops_select_matching_rows(
    client: StreamClient, db: asyncpg.Connection, table: str, condition: dict[str, Any], expected_ks: list[int]
) -> None:
    """Each filter op delivers exactly the inserted rows that satisfy it."""
    await client.subscribe("f", table=table, filter=[condition, {"column": "k", "op": "neq", "value": MARKER}])
    await client.subscribe("all", table=table)
    await _insert(db, table, 1, "one")
    await _insert(db, table, 2, "two", True)
    await _insert(db, table, 3, "three")
    await _insert(db, table, 4, "four", False)
    await _insert(db, table, MARKER)
    frames = await _frames_until_marker(client, "f", MARKER)
    assert [f["row"]["k"] for f in frames] == expected_ks


async def test_a_filtered_view_sees_rows_move_in_and_out(
    client: StreamClient, db: asyncpg.Connection, table: str
) -> None:
    """A row entering the filter is `added` (without its old values), one leaving it `removed` (without its new
    values), one staying in it `modified`; a DELETE is judged on the row it removed; every frame has the key."""
    row_id = await _insert(db, table, 1)
    await client.subscribe("f", table=table, filter=[{"column": "k", "op": "eq", "value": 2}])
    await client.subscribe("all", table=table)
    await db.execute(f"UPDATE {table} SET k = 2 WHERE id = $1", row_id)  # moves in
    await db.execute(f"UPDATE {table} SET v = 'x' WHERE id = $1", row_id)  # stays in
    await db.execute(f"UPDATE {table} SET k = 3 WHERE id = $1", row_id)  # moves out
    await db.execute(f"UPDATE {table} SET v = 'y' WHERE id = $1", row_id)  # stays out: nothing
    await db.execute(f"UPDATE {table} SET k = 2 WHERE id = $1", row_id)  # back in
    await db.execute(f"DELETE FROM {table} WHERE id = $1", row_id)  # old row matches
    await _insert(db, table, MARKER)
    frames = await _frames_until_marker(client, "f", MARKER)
    summary = [(f["op"], f["view"], f["key"], "row" in f, "old" in f) for f in frames]
    key = {"id": row_id}
    assert summary == [
        ("UPDATE", "added", key, True, False),
        ("UPDATE", "modified", key, True, True),
        ("UPDATE", "removed", key, False, True),
        ("UPDATE", "added", key, True, False),
        ("DELETE", "removed", key, False, True),
    ]
    assert frames[2]["old"]["k"] == 2  # what the subscriber had; k = 3 never reaches it


async def test_events_select_which_operations_arrive(client: StreamClient, db: asyncpg.Connection, table: str) -> None:
    """A subscription receives only the event types it asked for."""
    await client.subscribe("ins", table=table, events=["INSERT"])
    await client.subscribe("upd_del", table=table, events=["UPDATE", "DELETE"])
    await client.subscribe("all", table=table)
    row_id = await _insert(db, table, 1)
    await db.execute(f"UPDATE {table} SET v = 'y' WHERE id = $1", row_id)
    await db.execute(f"DELETE FROM {table} WHERE id = $1", row_id)
    await _insert(db, table, MARKER)
    seen: dict[str, list[str]] = {"ins": [], "upd_del": []}
    while True:
        frame = await client.recv()
        if frame["type"] != "change":
            continue
        if frame["id"] in seen:
            seen[frame["id"]].append(frame["op"])
        if frame["id"] == "all" and frame["op"] == "INSERT" and frame["row"]["k"] == MARKER:
            break
    assert seen == {"ins": ["INSERT", "INSERT"], "upd_del": ["UPDATE", "DELETE"]}


async def test_unsubscribe_stops_delivery(client: StreamClient, db: asyncpg.Connection, table: str) -> None:
    """After `unsubscribed`, no change frame for that id arrives; other subscriptions carry on."""
    await client.subscribe("gone", table=table)
    await client.subscribe("all", table=table)
    await _insert(db, table, 1)
    reply = await client.request({"type": "unsubscribe", "id": "gone"})
    assert reply["type"] == "unsubscribed"
    assert reply["id"] == "gone"
    await _insert(db, table, 2)
    await _insert(db, table, MARKER)
    frames = await _frames_until_marker(client, "gone", MARKER)
    assert frames == []
    again = await client.request({"type": "unsubscribe", "id": "gone"})
    assert again["code"] == "not_subscribed"


async def test_several_subscriptions_on_one_connection_each_get_their_frames(
    client: StreamClient, db: asyncpg.Connection, table: str
) -> None:
    """Two matching subscriptions on one connection each get one frame per change, tagged with their id."""
    await client.subscribe("a", table=table)
    await client.subscribe("b", table=table, filter=[{"column": "k", "op": "gte", "value": 0}])
    await _insert(db, table, 5)
    frames = [await client.recv(), await client.recv()]
    assert sorted(f["id"] for f in frames) == ["a", "b"]
    assert frames[0]["seq"] == frames[1]["seq"]
    assert {f["table"] for f in frames} == {table}


async def test_a_dropped_and_recreated_table_is_not_offered(client: StreamClient, db: asyncpg.Connection) -> None:
    """A table re-created under a streamed name has no capture trigger, so subscribing says unknown_table."""
    name = await create_streamed_table(db)
    await db.execute(f"DROP TABLE {name}")
    await db.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY)")
    reply = await client.request({"type": "subscribe", "id": "after", "table": name})
    assert reply["code"] == "unknown_table"
