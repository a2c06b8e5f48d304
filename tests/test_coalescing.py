"""Coalescing (`"coalesce": true`): a subscriber that falls behind gets one merged frame per row instead of a 4008
close, and its view is exact once it catches up; past WS_COALESCE_MAX_KEYS rows it is closed with 4008 as without
the option, and resumes without loss. The merge rules are tested as pure logic first."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import pytest

from realtime.dsn import Dsn
from realtime.stream.changes import TableKey
from realtime.stream.coalescing import Coalescer, Pending, merge
from realtime.stream.filters import RowFilter
from realtime.stream.hub import Hub, Subscription
from realtime.stream.outbox import Outbox
from realtime.stream.views import Parts
from tests.support.faults import Recorder
from tests.support.server import ServerProcess, running_server
from tests.support.tables import apply_changes, committed_changes, head, table_rows

# --- the merge rules ---------------------------------------------------------------------------------------------


def pending(seq: int, view: str, row: str | None = None, old: str | None = None, key: str = '{"id":1}') -> Pending:
    parts: Parts = (view, key, row, old)
    return Pending(seq, "UPDATE", "ts", str(seq), parts)


@pytest.mark.parametrize(
    ("first", "then", "merged"),
    [
        (pending(1, "added", "r1"), pending(2, "modified", "r2", "r1"), ("added", '{"id":1}', "r2", None)),
        (pending(1, "added", "r1"), pending(2, "removed", None, "r1"), None),
        (pending(1, "modified", "r1", "r0"), pending(2, "modified", "r2", "r1"), ("modified", '{"id":1}', "r2", "r0")),
        (pending(1, "modified", "r1", "r0"), pending(2, "removed", None, "r1"), ("removed", '{"id":1}', None, "r0")),
        (pending(1, "removed", None, "r0"), pending(2, "added", "r2"), ("modified", '{"id":1}', "r2", "r0")),
    ],
)
def test_merged_frame_keeps_the_view_the_frames_give(first: Pending, then: Pending, merged: Parts | None) -> None:
    result = merge(first, then)
    assert (result.parts if result is not None else None) == merged
    if result is not None:
        assert (result.seq, result.tx) == (2, "2")  # the newest change's position and transaction


def test_frames_leave_in_the_order_of_their_newest_change_and_only_the_last_ends_the_transaction() -> None:
    coalescer = Coalescer("s", "t", max_keys=2)
    assert coalescer.add(pending(1, "modified", '"a1"', '"a0"', key='{"id":1}'))
    assert coalescer.add(pending(2, "modified", '"b1"', '"b0"', key='{"id":2}'))
    assert coalescer.add(pending(3, "modified", '"a2"', '"a1"', key='{"id":1}'))  # row 1 now behind row 2
    texts = []
    while coalescer:
        text, seq, last = coalescer.peek()
        coalescer.pop()
        texts.append((orjson.loads(text), seq, last))
    assert [(frame["key"], frame["row"], seq, last) for frame, seq, last in texts] == [
        ({"id": 2}, "b1", 2, False),
        ({"id": 1}, "a2", 3, True),
    ]
    assert "tx_end" not in texts[0][0]
    assert texts[1][0]["tx_end"] is True
    assert all(frame["coalesced"] is True for frame, _, _ in texts)
    assert coalescer.add(pending(4, "added", '"c"', key='{"id":3}'))
    assert coalescer.add(pending(5, "added", '"d"', key='{"id":4}'))
    assert not coalescer.add(pending(6, "added", '"e"', key='{"id":5}'))  # a third key is over the bound
    assert coalescer.add(pending(7, "reset", key=""))  # a reset replaces everything pending
    assert len(coalescer) == 1


def test_an_unsubscribed_coalescing_subscription_has_nothing_left_to_send() -> None:
    """A write of the backlog may already be scheduled when the subscription goes: it must find nothing."""
    hub = Hub()
    coalescer = Coalescer("s", "t", max_keys=10)
    sub = Subscription(
        id="s",
        table=TableKey("public", "t"),
        events=frozenset({"UPDATE"}),
        filter=RowFilter(()),
        outbox=cast(Outbox, None),
        max_pending=10,
        max_pending_bytes=1000,
        coalescer=coalescer,
    )
    hub.add(sub)
    assert coalescer.add(pending(1, "modified", '"a1"', '"a0"'))
    hub.remove(sub)
    assert not coalescer


# --- over a real server ------------------------------------------------------------------------------------------

HOT_ROWS = 20
BODY = 64 * 1024  # a few rounds of updates to HOT_ROWS rows fill any socket buffer


@pytest.fixture
async def hot_table(database_url: Dsn) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    conn = await asyncpg.connect(database_url.asyncpg())
    table = f"hot_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, k integer, v text)")
    await conn.execute("SELECT realtime.enable_stream($1::text::regclass)", table)
    try:
        yield conn, table
    finally:
        await conn.close()


@pytest.fixture
async def server_of(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server whose queues overflow soon and whose sends wait long: slowness, not a stalled send, is tested."""
    env = {"WS_QUEUE_SIZE": "50", "WS_SEND_TIMEOUT_S": "60", "WS_COALESCE_MAX_KEYS": str(HOT_ROWS + 5)}
    async with running_server(database_url, artifacts_dir / "coalescing.log", env=env) as server:
        yield server


async def subscribe_unread(recorder: Recorder, sub_id: str, **fields: Any) -> tuple[dict[int, dict[str, Any]], int]:
    """Subscribe on a recorder that is not reading, and leave it so: from the reply on, nothing reads the socket
    (max_queue=1: the client library stops reading it too). Returns the snapshot's rows by id and its position."""
    ref = await recorder.send({"type": "subscribe", "id": sub_id, **fields})
    rows: dict[int, dict[str, Any]] = {}
    while True:
        frame = orjson.loads(await asyncio.wait_for(recorder.connection.recv(), 10))
        if frame.get("ref") == ref:
            assert frame["type"] == "subscribed", frame
            return rows, frame["seq"]
        rows.update((row["id"], row) for row in frame.get("rows", []))


# A subscriber of one row that no write touches but the fence: frames of large rows would overflow its queue.
FENCE_ONLY = [{"column": "id", "op": "eq", "value": -1}]


async def wait_read_through(conn: asyncpg.Connection, table: str, fence: Recorder) -> None:
    """Commit the fence row and wait until its frame arrives: the server has read every change before it."""
    await conn.execute(f"INSERT INTO {table} VALUES (-1, -1, 'fence')")
    await fence.wait_through(await head(conn), timeout=60)


async def write_rounds(conn: asyncpg.Connection, table: str, rows: int, rounds: int) -> None:
    """`rounds` UPDATEs of every hot row with a large value, then moves that exercise every merge: rows deleted,
    re-inserted, moved out of the filter (k < 0) and in again."""
    await conn.execute(f"INSERT INTO {table} SELECT g, g, '' FROM generate_series(1, $1) g", rows)
    for round_number in range(rounds):
        await conn.execute(f"UPDATE {table} SET v = $1 || repeat('x', $2)", str(round_number), BODY)
    await conn.execute(f"DELETE FROM {table} WHERE id <= 3")
    await conn.execute(f"INSERT INTO {table} VALUES (1, 1, 'back'), (2, -2, 'outside')")
    await conn.execute(f"UPDATE {table} SET k = -k WHERE id IN (4, 5)")
    await conn.execute(f"UPDATE {table} SET k = 5, v = 'in again' WHERE id = 5")


async def test_a_coalescing_subscriber_that_falls_behind_catches_up_to_the_exact_view(
    server_of: ServerProcess, hot_table: tuple[asyncpg.Connection, str]
) -> None:
    conn, table = hot_table
    in_view = [{"column": "k", "op": "gte", "value": 0}]
    merged = await Recorder.open(server_of.ws_url, max_queue=1, start=False)
    plain = await Recorder.open(server_of.ws_url, max_queue=1, start=False)
    fence = await Recorder.open(server_of.ws_url)
    try:
        snapshot, _ = await subscribe_unread(merged, "m", table=table, filter=in_view, snapshot=True, coalesce=True)
        await subscribe_unread(plain, "p", table=table, filter=in_view)
        await fence.subscribe("f", table=table, filter=FENCE_ONLY)
        start = await head(conn)
        await write_rounds(conn, table, HOT_ROWS, rounds=20)
        last = await head(conn)
        written = len(await committed_changes(conn, table, start))
        await wait_read_through(conn, table, fence)

        plain.start()
        code, reason = await plain.wait_closed(timeout=60)
        assert (code, (reason or "").split(";")[0]) == (4008, "too slow")

        merged.start()
        await merged.wait_through(last, timeout=60)
        frames = merged.changes("m")
        assert merged.close_code is None
        assert len(frames) < written, "nothing was merged: the subscriber never fell behind"
        assert [f["seq"] for f in frames] == sorted({f["seq"] for f in frames})
        assert frames[-1]["tx_end"] is True
        assert frames[-1]["coalesced"] is True
        expected = {row_id: row for row_id, row in (await table_rows(conn, table)).items() if row["k"] >= 0}
        assert apply_changes(snapshot, frames) == expected
    finally:
        for recorder in (merged, plain, fence):
            await recorder.aclose()


async def test_more_rows_behind_than_the_bound_close_4008_and_resume_loses_nothing(
    server_of: ServerProcess, hot_table: tuple[asyncpg.Connection, str]
) -> None:
    conn, table = hot_table
    merged = await Recorder.open(server_of.ws_url, max_queue=1, start=False)
    fence = await Recorder.open(server_of.ws_url)
    try:
        received, position = await subscribe_unread(merged, "m", table=table, snapshot=True, coalesce=True)
        await fence.subscribe("f", table=table, filter=FENCE_ONLY)
        await write_rounds(conn, table, 2 * HOT_ROWS, rounds=10)  # 40 rows behind: over the bound of 25
        await wait_read_through(conn, table, fence)
        merged.start()
        code, reason = await merged.wait_closed(timeout=60)
        assert code == 4008
        assert reason is not None
        assert int(reason.rsplit("last_seq=", 1)[1]) >= position
        # A merged frame without tx_end is no resume point (an older change of another row may still have been
        # pending): the client resumes after the last frame that is not merged or ends the merged backlog.
        frames = merged.changes("m")
        safe = [f["seq"] for f in frames if not f.get("coalesced") or f.get("tx_end")]
        last_seq = safe[-1] if safe else position
        received = apply_changes(received, [f for f in frames if f["seq"] <= last_seq])

        resumed = await Recorder.open(server_of.ws_url)
        try:
            await resumed.subscribe("m", table=table, since=last_seq)
            await resumed.barrier()
            assert apply_changes(received, resumed.changes("m")) == await table_rows(conn, table)
        finally:
            await resumed.aclose()
    finally:
        await merged.aclose()
        await fence.aclose()
