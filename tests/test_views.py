"""Views over a real server: each change frame's view effect and key, composite keys, TRUNCATE live, replayed
and snapshotted, and a property: a snapshot plus the frames after it, applied by the view's two rules, equal the
subscription's query at the last position, whatever the filter and the writes."""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime.auth.policy import condition_sql
from realtime.dsn import Dsn
from realtime.stream.filters import compile_condition
from tests.support.tables import create_streamed_table, head, transaction_groups
from tests.support.ws import Frame, StreamClient

Rows = dict[Any, dict[str, Any]]


def apply(rows: Rows, frames: list[Frame], key_of: Any = lambda key: key["id"]) -> Rows:
    """The two rules of a view (and reset): upsert `row` by `key`, delete `key`, empty on TRUNCATE."""
    state = dict(rows)
    for frame in frames:
        if frame["view"] == "reset":
            state.clear()
        elif frame["view"] == "removed":
            del state[key_of(frame["key"])]
        else:
            state[key_of(frame["key"])] = frame["row"]
    return state


async def collect(client: StreamClient, fence_id: str, after: int) -> dict[str, list[Frame]]:
    """Every change frame by subscription id, until the unfiltered `fence_id` receives a change past `after`
    (frames leave one connection in seq order, so by then each subscription has had all of its earlier ones)."""
    frames: dict[str, list[Frame]] = {}
    while True:
        frame = await client.recv_until(lambda f: f["type"] == "change")
        if frame["id"] == fence_id and frame["seq"] > after:
            return frames
        frames.setdefault(frame["id"], []).append(frame)


async def test_a_composite_key_has_every_column(client: StreamClient, db: asyncpg.Connection) -> None:
    name = f"pairs_{secrets.token_hex(4)}"
    await db.execute(f"CREATE TABLE {name} (a integer, b text, v integer, PRIMARY KEY (b, a))")
    await db.execute("SELECT realtime.enable_stream($1::text::regclass)", name)
    await client.subscribe("p", table=name, filter=[{"column": "v", "op": "gt", "value": 0}])
    await db.execute(f"INSERT INTO {name} VALUES (1, 'x', 5)")
    await db.execute(f"UPDATE {name} SET v = 0 WHERE a = 1")
    frames = await client.changes(2)
    assert [(f["view"], f["key"]) for f in frames] == [("added", {"b": "x", "a": 1}), ("removed", {"b": "x", "a": 1})]
    assert list(frames[0]["key"]) == ["b", "a"]  # in the primary key's column order


async def test_truncate_resets_every_view_live_in_a_replay_and_in_a_snapshot(
    client: StreamClient, db: asyncpg.Connection
) -> None:
    table = await create_streamed_table(db)
    start = await head(db)
    await client.subscribe("all", table=table)
    await client.subscribe("none", table=table, filter=[{"column": "k", "op": "eq", "value": -1}])
    await client.subscribe("inserts", table=table, events=["INSERT"])
    await db.execute(f"INSERT INTO {table} (k) VALUES (1), (2)")
    await db.execute(f"TRUNCATE {table}")
    await db.execute(f"INSERT INTO {table} (k) VALUES (3)")
    last = await head(db)
    await db.execute(f"INSERT INTO {table} (k) VALUES (4)")  # the fence
    frames = await collect(client, "all", last)
    live = frames["all"]
    assert [f["view"] for f in live] == ["added", "added", "reset", "added"]
    reset = live[2]
    assert reset == {"type": "change", "id": "all", "seq": reset["seq"], "table": table, "op": "TRUNCATE",
                     "view": "reset", "ts": reset["ts"], "tx": reset["tx"], "tx_end": True}  # fmt: skip
    # A filter that matches nothing and an events list without it still get the reset: it empties every view.
    assert [f["view"] for f in frames["none"]] == ["reset"]
    assert [f["view"] for f in frames["inserts"]] == ["added", "added", "reset", "added"]
    await db.execute(f"DELETE FROM {table} WHERE k = 4")

    _, replayed = await client.subscribe("again", table=table, since=start)
    assert [{**f, "id": "all"} for f in replayed if f["id"] == "again"][:4] == live
    _, snapshot = await client.subscribe("snap", table=table, snapshot=True)
    snapshot = [f for f in snapshot if f["type"] == "snapshot"]
    assert [row["k"] for f in snapshot for row in f["rows"]] == [3]
    assert apply({}, live) == {row["id"]: row for f in snapshot for row in f["rows"]}


# --- the property ----------------------------------------------------------------------------------------------

COLUMN_VALUES: dict[str, list[object]] = {"k": [0, 1, 2, 3], "v": ["a", "b", "B", ""], "flag": [True, False]}
conditions = st.sampled_from(["k", "v", "flag"]).flatmap(
    lambda column: st.tuples(
        st.just(column),
        st.sampled_from(["is"] if column == "flag" else ["eq", "neq", "lt", "lte", "gt", "gte", "in"]),
        st.sampled_from(COLUMN_VALUES[column]),
        st.lists(st.sampled_from(COLUMN_VALUES[column]), min_size=1, max_size=3),
    )
)
insert = st.tuples(
    st.just("insert"), st.sampled_from(COLUMN_VALUES["k"]), st.sampled_from(["a", "b", "B"]), st.booleans()
)
update = st.tuples(
    st.just("update"), st.integers(0, 7), st.sampled_from(COLUMN_VALUES["k"]), st.sampled_from(["a", "b"])
)
delete = st.tuples(st.just("delete"), st.integers(0, 7))
truncate = st.tuples(st.just("truncate"))
# Transactions of a few writes; updates most often (they move rows in and out), a TRUNCATE now and then.
writes = st.lists(
    st.lists(st.one_of(insert, update, update, update, delete, truncate), min_size=1, max_size=6),
    min_size=1,
    max_size=5,
)


def wire_condition(column: str, op: str, value: Any, options: list[Any]) -> dict[str, Any]:
    return {"column": column, "op": op, "value": options if op == "in" else value}


async def query(db: asyncpg.Connection, table: str, filter_: list[dict[str, Any]]) -> Rows:
    """`SELECT ... WHERE filter` as PostgreSQL evaluates the filter language (jsonb comparisons)."""
    params: dict[str, Any] = {}
    row = "realtime.utc_jsonb(t)"
    tests = [condition_sql(compile_condition(c["column"], c["op"], c["value"]), row, params) for c in filter_]
    sql = f"SELECT {row}::text FROM {table} t WHERE " + " AND ".join(tests or ["true"])
    names = list(dict.fromkeys(re.findall(r":(p\d+)", sql)))
    sql = re.sub(r":(p\d+)", lambda m: f"${names.index(m[1]) + 1}", sql)
    rows = [orjson.loads(r[0]) for r in await db.fetch(sql, *[params[n] for n in names])]
    return {row["id"]: row for row in rows}


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(filter_=st.lists(conditions, min_size=0, max_size=2), transactions=writes)
async def test_snapshot_and_frames_equal_the_query(
    client: StreamClient, db: asyncpg.Connection, filter_: list[tuple[Any, ...]], transactions: list[list[Any]]
) -> None:
    table = await create_streamed_table(db, "view")
    await db.execute(f"INSERT INTO {table} (k, v, flag) VALUES (1, 'a', true), (2, 'b', false), (3, 'B', null)")
    wire = [wire_condition(*c) for c in filter_]
    sub_id = secrets.token_hex(4)
    _, snapshot = await client.subscribe(sub_id, table=table, snapshot=True, filter=wire)
    rows = {row["id"]: row for frame in snapshot for row in frame["rows"]}
    # Unfiltered, on the same connection: once it has seen the last position, so has the filtered one.
    everything = secrets.token_hex(4)
    await client.subscribe(everything, table=table)
    try:
        ids = [r["id"] for r in await db.fetch(f"SELECT id FROM {table}")]
        committed = [rows]  # the view's query after each transaction
        for statements in transactions:
            committed.extend(await run_transaction(db, table, statements, ids, wire))
        last = await head(db)
        await db.execute(f"INSERT INTO {table} (k, v) VALUES (9, 'fence')")
        # The fence's own frame may reach the filtered subscription first: only what came before it counts.
        frames = [f for f in (await collect(client, everything, last)).get(sub_id, []) if f["seq"] <= last]
        assert apply(rows, frames) == committed[-1], (wire, transactions)
        assert [f["seq"] for f in frames] == sorted({f["seq"] for f in frames})
        # Applied a transaction at a time (up to each `tx_end`), the view passes only through committed states,
        # in the order they were committed.
        state, reached = rows, 0
        for group in transaction_groups(frames):
            state = apply(state, group)
            assert state in committed[reached:], (wire, transactions, group)
            reached = committed.index(state, reached)
    finally:
        await client.request({"type": "unsubscribe", "id": sub_id})
        await client.request({"type": "unsubscribe", "id": everything})


async def run_transaction(
    db: asyncpg.Connection, table: str, statements: list[Any], ids: list[int], wire: list[dict[str, Any]]
) -> list[Rows]:
    """Commit the writes (a TRUNCATE ends the transaction and commits on its own); the query after each commit."""
    after: list[Rows] = []
    truncate = False
    async with db.transaction():
        for write in statements:
            if write[0] == "insert":
                sql = f"INSERT INTO {table} (k, v, flag) VALUES ($1, $2, $3) RETURNING id"
                ids.append(await db.fetchval(sql, *write[1:]))
            elif write[0] == "update" and ids:
                sql = f"UPDATE {table} SET k = $2, v = $3 WHERE id = $1"
                await db.execute(sql, ids[write[1] % len(ids)], *write[2:])
            elif write[0] == "delete" and ids:
                await db.execute(f"DELETE FROM {table} WHERE id = $1", ids.pop(write[1] % len(ids)))
            elif write[0] == "truncate":
                # PostgreSQL refuses a TRUNCATE after rows were written in the same transaction (their
                # commit-time capture is pending), so a TRUNCATE starts its own.
                truncate = True
                break
    after.append(await query(db, table, wire))
    if truncate:
        await db.execute(f"TRUNCATE {table}")
        ids.clear()
        after.append({})
    return after


# Two writers at once, each on rows of its own (no TRUNCATE: it would wait for the other's open transaction).
concurrent_writes = st.lists(
    st.lists(st.one_of(insert, update, update, delete), min_size=1, max_size=6), min_size=1, max_size=4
)


async def write_own_rows(conn: asyncpg.Connection, table: str, transactions: list[list[Any]]) -> None:
    ids: list[int] = []
    for statements in transactions:
        async with conn.transaction():
            for write in statements:
                if write[0] == "insert":
                    sql = f"INSERT INTO {table} (k, v, flag) VALUES ($1, $2, $3) RETURNING id"
                    ids.append(await conn.fetchval(sql, *write[1:]))
                elif write[0] == "update" and ids:
                    sql = f"UPDATE {table} SET k = $2, v = $3 WHERE id = $1"
                    await conn.execute(sql, ids[write[1] % len(ids)], *write[2:])
                elif write[0] == "delete" and ids:
                    await conn.execute(f"DELETE FROM {table} WHERE id = $1", ids.pop(write[1] % len(ids)))


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(filter_=st.lists(conditions, min_size=0, max_size=2), first=concurrent_writes, second=concurrent_writes)
async def test_concurrent_transactions_arrive_whole_and_the_view_equals_the_query(
    client: StreamClient,
    db: asyncpg.Connection,
    database_url: Dsn,
    filter_: list[tuple[Any, ...]],
    first: list[list[Any]],
    second: list[list[Any]],
) -> None:
    """Transactions of two writers committing at the same time: whatever their positions, no transaction's frames
    are split by a `tx_end`, and the snapshot plus the frames equal the query at the end."""
    table = await create_streamed_table(db, "both")
    wire = [wire_condition(*c) for c in filter_]
    sub_id, everything = secrets.token_hex(4), secrets.token_hex(4)
    _, snapshot = await client.subscribe(sub_id, table=table, snapshot=True, filter=wire)
    await client.subscribe(everything, table=table)
    other = await asyncpg.connect(database_url.asyncpg())
    try:
        await asyncio.gather(write_own_rows(db, table, first), write_own_rows(other, table, second))
        last = await head(db)
        await db.execute(f"INSERT INTO {table} (k, v) VALUES (9, 'fence')")
        collected = await collect(client, everything, last)
        frames = [f for f in collected.get(sub_id, []) if f["seq"] <= last]
        rows = {row["id"]: row for frame in snapshot for row in frame["rows"]}
        await db.execute(f"DELETE FROM {table} WHERE v = 'fence'")
        assert apply(rows, frames) == await query(db, table, wire), (wire, first, second)
        for frames_of_one in (frames, [f for f in collected[everything] if f["seq"] <= last]):
            group_of: dict[str, int] = {}
            for index, group in enumerate(transaction_groups(frames_of_one)):
                for frame in group:
                    assert group_of.setdefault(frame["tx"], index) == index, (wire, first, second)
    finally:
        await other.close()
        await client.request({"type": "unsubscribe", "id": sub_id})
        await client.request({"type": "unsubscribe", "id": everything})
