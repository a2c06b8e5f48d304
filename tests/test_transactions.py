"""Transaction boundaries: every change frame names its transaction (`tx`), and a subscription's last frame of a
transaction says so (`tx_end`), live and replayed, for transactions that commit together and for one larger than
a listener read. The segment rules themselves are tested as pure logic first."""

from __future__ import annotations

import asyncio

import asyncpg

from realtime.dsn import Dsn
from realtime.stream.changes import Change, TableKey
from realtime.stream.transactions import Lookbehind, Segmenter
from tests.support.tables import create_streamed_table, head, transaction_groups
from tests.support.ws import StreamClient

# --- the rules, as pure logic ------------------------------------------------------------------------------------


def changes(*txs: str | None) -> list[Change]:
    return [Change(seq, TableKey("public", "t"), "INSERT", "{}", None, "", tx) for seq, tx in enumerate(txs, 1)]


def test_a_segment_ends_where_no_transaction_begun_in_it_goes_on() -> None:
    marks = Segmenter().mark(changes("a", "a", "b", "c", "b", "d", None))
    # a a | b c b (c inside b's span) | d | a change without a transaction stands alone
    assert marks.ends == [False, True, False, False, True, True, True]
    assert marks.segments == [0, 0, 1, 1, 1, 2, 3]
    assert marks.open_segment is None


def test_a_transaction_continuing_after_a_read_keeps_its_segment_open_into_the_next() -> None:
    segmenter = Segmenter()
    first = segmenter.mark(changes("x", "big", "big"), continuing=frozenset({"big"}))
    assert first.ends == [True, False, False]
    assert first.open_segment == 1
    assert segmenter.is_open
    second = segmenter.mark(changes("big", "y"))
    assert second.segments == [1, 2]
    assert second.ends == [True, True]
    assert not segmenter.is_open


def test_lookbehind_marks_the_last_frame_of_each_segment_a_subscriber_receives() -> None:
    lookbehind = Lookbehind()
    sent: list[tuple[int, bool]] = []

    def push(seq: int, segment: int, ends: bool) -> None:
        sent.extend((held.seq, tx_end) for held, tx_end in lookbehind.push(seq, segment, ends, None))

    push(1, 0, False)  # held: another frame of segment 0 may follow
    push(2, 0, False)  # 1 is not the last
    push(5, 1, True)  # segment 0's later changes were not for this subscriber: 2 was its last
    push(6, 2, False)
    assert sent == [(1, False), (2, True), (5, True)]
    assert lookbehind.settle(open_segment=2) is None  # still open: 6 waits for the next read
    settled = lookbehind.settle(open_segment=None)
    assert settled is not None
    assert settled.seq == 6


# --- over a real server ------------------------------------------------------------------------------------------


async def interleaved_commits(url: Dsn, table: str) -> tuple[str, str]:
    """Two transactions whose positions interleave (a1 b1 a2 b2): each takes its positions statement by statement
    (SET CONSTRAINTS ALL IMMEDIATE), alternating, and both commit. Returns their ids."""
    a, b = await asyncpg.connect(url.asyncpg()), await asyncpg.connect(url.asyncpg())
    try:
        ids = []
        for conn in (a, b):
            await conn.execute("BEGIN; SET CONSTRAINTS ALL IMMEDIATE")
            ids.append(str(await conn.fetchval("SELECT pg_current_xact_id()")))
        for k in (1, 2):
            await a.execute(f"INSERT INTO {table} (k, v) VALUES ({k}, 'a')")
            await b.execute(f"INSERT INTO {table} (k, v) VALUES ({k}, 'b')")
        await asyncio.gather(a.execute("COMMIT"), b.execute("COMMIT"))
        return ids[0], ids[1]
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_transactions_committing_together_end_together(
    client: StreamClient, db: asyncpg.Connection, database_url: Dsn
) -> None:
    table = await create_streamed_table(db)
    start = await head(db)
    await client.subscribe("all", table=table)
    await client.subscribe("a", table=table, filter=[{"column": "v", "op": "eq", "value": "a"}])
    tx_a, tx_b = await interleaved_commits(database_url, table)
    received = await client.changes(6)
    everything = [f for f in received if f["id"] == "all"]
    only_a = [f for f in received if f["id"] == "a"]
    assert [(f["row"]["v"], f["tx"]) for f in everything] == [("a", tx_a), ("b", tx_b), ("a", tx_a), ("b", tx_b)]
    # Applying up to A's last change would show half of B: the two end together, after B's last.
    assert [f.get("tx_end", False) for f in everything] == [False, False, False, True]
    # A subscriber that sees only A's rows sees A whole, and its end.
    assert [(f["tx"], f.get("tx_end", False)) for f in only_a] == [(tx_a, False), (tx_a, True)]

    _, replayed = await client.subscribe("again", table=table, since=start)
    assert [{**f, "id": "all"} for f in replayed] == everything


async def test_a_transaction_larger_than_a_listener_read_gets_its_end(
    client: StreamClient, db: asyncpg.Connection
) -> None:
    """5,000 rows in one transaction, read by the listener in pieces of 1,000 (LISTENER_BATCH_SIZE's default)."""
    table = await create_streamed_table(db)
    start = await head(db)
    await client.subscribe("all", table=table)
    await client.subscribe("one", table=table, filter=[{"column": "k", "op": "eq", "value": 2500}])
    await db.execute(f"INSERT INTO {table} (k) SELECT g FROM generate_series(1, 5000) g")
    await db.execute(f"INSERT INTO {table} (k) VALUES (-1)")  # a transaction of its own after it
    received = await client.changes(5000 + 1 + 1, timeout=30)
    everything = [f for f in received if f["id"] == "all"]
    big, after = everything[:5000], everything[5000]
    assert len({f["tx"] for f in big}) == 1
    assert [i for i, f in enumerate(big) if f.get("tx_end")] == [4999]
    assert after["tx"] != big[0]["tx"]
    assert after["tx_end"] is True
    assert [(f["row"]["k"], f["tx"], f["tx_end"]) for f in received if f["id"] == "one"] == [(2500, big[0]["tx"], True)]

    _, replayed = await client.subscribe("again", table=table, since=start)
    assert [{**f, "id": "all"} for f in replayed] == everything


async def test_every_change_of_a_transaction_names_it_and_groups_never_split_one(
    client: StreamClient, db: asyncpg.Connection, database_url: Dsn
) -> None:
    """Four writers at once, transactions of one to four rows: each group a client would apply at once holds
    whole transactions only, and all of a transaction's frames carry its id."""
    table = await create_streamed_table(db)
    await client.subscribe("all", table=table)

    async def writer(pool: asyncpg.Pool) -> int:
        written = 0
        async with pool.acquire() as conn:
            for i in range(25):
                size = 1 + i % 4
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} (k) SELECT g FROM generate_series(1, {size}) g")
                written += size
        return written

    async with asyncpg.create_pool(database_url.asyncpg(), min_size=4, max_size=4) as pool:
        counts = await asyncio.gather(*(writer(pool) for _ in range(4)))
    frames = await client.changes(sum(counts), timeout=30)
    group_of: dict[str, int] = {}
    for index, group in enumerate(transaction_groups(frames)):
        for frame in group:
            assert group_of.setdefault(frame["tx"], index) == index, f"transaction {frame['tx']} split by tx_end"
    assert frames[-1]["tx_end"] is True
    assert len(group_of) == 100
