"""Delivery guarantees over a real server: every committed change once, in position order, resumable."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from asyncpg.transaction import Transaction

from realtime.dsn import Dsn
from tests.support.faults import listener_pids
from tests.support.server import ServerProcess, running_server
from tests.support.tables import apply_changes, committed_changes, create_streamed_table, head, table_rows
from tests.support.waiting import eventually
from tests.support.ws import StreamClient


async def test_rest_writes_arrive_with_row_and_old(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Create, update and delete over REST arrive as INSERT/UPDATE/DELETE frames with the right row and old."""
    email = f"stream-{random.getrandbits(48)}@example.com"
    client = await StreamClient.open(server.ws_url)
    try:
        await client.subscribe("u", filter=[{"column": "email", "op": "eq", "value": email}])
        created = (await http.post("/users", json={"name": "Grace", "email": email})).json()
        updated = (await http.patch(f"/users/{created['id']}", json={"name": "Grace H."})).json()
        assert (await http.delete(f"/users/{created['id']}")).status_code == 204
        insert, update, delete = await client.changes(3)
    finally:
        await client.close()
    assert insert["op"] == "INSERT"
    assert insert["table"] == "users"
    assert "old" not in insert
    assert _same_user(insert["row"], created)
    assert update["op"] == "UPDATE"
    assert _same_user(update["old"], created)
    assert _same_user(update["row"], updated)
    assert update["row"]["version"] == 2
    assert delete["op"] == "DELETE"
    assert "row" not in delete
    assert _same_user(delete["old"], updated)
    assert insert["seq"] < update["seq"] < delete["seq"]
    assert all(frame["ts"].endswith("+00:00") for frame in (insert, update, delete))


def _same_user(streamed: dict[str, Any], rest: dict[str, Any]) -> bool:
    """Every field reads the same, timestamps included, character for character."""
    keys = ("id", "name", "email", "version", "created_at", "updated_at")
    return all(streamed[key] == rest[key] for key in keys)


async def test_rows_read_the_same_in_every_time_zone(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A row written by a session in another TimeZone streams in UTC, as its snapshot and REST show it."""
    email = f"zone-{random.getrandbits(48)}@example.com"
    created = (await http.post("/users", json={"name": "Zoned", "email": email})).json()
    client = await StreamClient.open(server.ws_url)
    try:
        await client.subscribe("u", filter=[{"column": "id", "op": "eq", "value": created["id"]}])
        async with db.transaction():
            await db.execute("SET LOCAL TimeZone = 'America/New_York'")
            await db.execute("UPDATE users SET name = 'Zoned too' WHERE id = $1", created["id"])
        (update,) = await client.changes(1)
        _, snapshot = await client.subscribe(
            "snap", filter=[{"column": "id", "op": "eq", "value": created["id"]}], snapshot=True
        )
    finally:
        await client.close()
    current = (await http.get(f"/users/{created['id']}")).json()
    (snapshot_row,) = [row for frame in snapshot for row in frame["rows"]]
    assert update["row"]["updated_at"].endswith("+00:00")
    assert _same_user(update["old"], created)
    assert _same_user(update["row"], current)
    assert _same_user(snapshot_row, current)


async def test_plain_sql_writes_arrive_and_rollbacks_never_do(server: ServerProcess, db: asyncpg.Connection) -> None:
    """Writes by any SQL client stream, a multi-row transaction arrives in order, a rolled-back one never does."""
    table = await create_streamed_table(db)
    client = await StreamClient.open(server.ws_url)
    try:
        await client.subscribe("t", table=table)
        with_rollback = db.transaction()
        await with_rollback.start()
        await db.execute(f"INSERT INTO {table} (k, v) VALUES (1, 'never')")
        await with_rollback.rollback()
        async with db.transaction():
            await db.execute(f"INSERT INTO {table} (k, v) VALUES (2, 'a'), (3, 'b')")
            await db.execute(f"UPDATE {table} SET v = 'c' WHERE k = 2")
        await db.execute(f"DELETE FROM {table} WHERE k = 3")
        frames = await client.changes(4)
    finally:
        await client.close()
    assert [(f["op"], (f.get("row") or f["old"])["k"]) for f in frames] == [
        ("INSERT", 2),
        ("INSERT", 3),
        ("UPDATE", 2),
        ("DELETE", 3),
    ]
    assert frames[2]["old"]["v"] == "a"
    assert frames[2]["row"]["v"] == "c"
    assert [f["seq"] for f in frames] == sorted({f["seq"] for f in frames})
    assert all(f["row"]["v"] != "never" for f in frames if "row" in f)


async def test_a_one_mebibyte_value_streams_intact(server: ServerProcess, db: asyncpg.Connection) -> None:
    """Rows far beyond NOTIFY's 8000-byte payload limit stream whole (the notification carries no row)."""
    table = await create_streamed_table(db)
    big = "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=1 << 20))
    client = await StreamClient.open(server.ws_url)
    try:
        await client.subscribe("t", table=table)
        await db.execute(f"INSERT INTO {table} (k, v) VALUES (1, $1)", big)
        (frame,) = await client.changes(1)
    finally:
        await client.close()
    assert frame["row"]["v"] == big


async def test_a_later_commit_never_overtakes_an_open_position(
    server: ServerProcess, database_url: Dsn, db: asyncpg.Connection
) -> None:
    """An open position holds back later commits' delivery, not their commit; late committers get later positions."""
    table = await create_streamed_table(db)
    early_writer = await asyncpg.connect(database_url.asyncpg())
    late_writer = await asyncpg.connect(database_url.asyncpg())
    client = await StreamClient.open(server.ws_url)
    try:
        await client.subscribe("t", table=table)
        # T1 writes first and even takes its position first...
        t1 = await _hold_a_position(early_writer, table, 1)
        # ...then T2 writes and commits while T1 is still open: writers do not wait for one another...
        await asyncio.wait_for(late_writer.execute(f"INSERT INTO {table} (k) VALUES (2)"), 10)
        # ...but the server may not publish T2 before T1 ends: its read waits for T1's position to be final.
        await db.execute("NOTIFY realtime_changes")
        (listener_pid,) = await listener_pids(db)
        await _wait_until_blocked(db, listener_pid)
        await t1.commit()
        first, second = await client.changes(2)
        assert (first["row"]["k"], second["row"]["k"]) == (1, 2)
        assert first["seq"] < second["seq"]

        # The classic trap: T3 writes, T4 writes and commits; a reader sees T4 and disconnects; T3 commits.
        t3 = early_writer.transaction()
        await t3.start()
        await early_writer.execute(f"INSERT INTO {table} (k) VALUES (3)")
        await late_writer.execute(f"INSERT INTO {table} (k) VALUES (4)")
        (seen,) = await client.changes(1)
        assert seen["row"]["k"] == 4
        await client.close()
        await t3.commit()
        client = await StreamClient.open(server.ws_url)
        _, replayed = await client.subscribe("t", table=table, since=seen["seq"])
        # Depending on whether this server had published T3 yet, it comes as replay or live: either way, once.
        resumed = replayed or await client.changes(1)
        assert [(f["row"]["k"], f["seq"] > seen["seq"]) for f in resumed] == [(3, True)]
    finally:
        await client.close()
        await early_writer.close()
        await late_writer.close()


async def test_a_rolled_back_position_holder_delays_nothing_for_long(
    server: ServerProcess, database_url: Dsn, db: asyncpg.Connection
) -> None:
    """Writers that skipped their wake-up because T1 would send it are still delivered when T1 rolls back."""
    table = await create_streamed_table(db)
    holder = await asyncpg.connect(database_url.asyncpg())
    client = await StreamClient.open(server.ws_url)
    try:
        await client.subscribe("t", table=table)
        t1 = await _hold_a_position(holder, table, 1)  # and the notify token: it is the only writer yet
        for k in (2, 3):
            await db.execute(f"INSERT INTO {table} (k) VALUES ($1)", k)
        await t1.rollback()
        # No NOTIFY came for 2 and 3 (T1 was to send it); the listener's periodic read finds them.
        frames = await client.changes(2)
        assert [f["row"]["k"] for f in frames] == [2, 3]
    finally:
        await client.close()
        await holder.close()


async def _hold_a_position(conn: asyncpg.Connection, table: str, k: int) -> Transaction:
    """An open transaction that has inserted a row and already taken its position (IMMEDIATE fires capture now)."""
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute(f"INSERT INTO {table} (k) VALUES ($1)", k)
    await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
    return transaction


async def _wait_until_blocked(db: asyncpg.Connection, pid: int) -> None:
    """Until the backend waits on a lock (no event announces it)."""

    async def blocked() -> bool:
        return bool(await db.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", pid))

    await eventually(blocked, 10, f"backend {pid} waiting on a lock", interval=0.01)


async def test_resume_with_since_delivers_exactly_the_missed_changes(
    server: ServerProcess, db: asyncpg.Connection
) -> None:
    """Disconnect mid-stream, write more, reconnect with since: the missed changes arrive, none twice."""
    table = await create_streamed_table(db)
    start = await head(db)
    client = await StreamClient.open(server.ws_url)
    await client.subscribe("t", table=table)
    for k in range(10):
        await db.execute(f"INSERT INTO {table} (k) VALUES ($1)", k)
    received = await client.changes(6)
    await client.close()
    for k in range(10, 20):
        await db.execute(f"UPDATE {table} SET k = $1 WHERE k = $2", k, k - 10)
    client = await StreamClient.open(server.ws_url)
    try:
        subscribed, replayed = await client.subscribe("t", table=table, since=received[-1]["seq"])
        await db.execute(f"DELETE FROM {table}")
        truth = await committed_changes(db, table, after=start)
        live: list[dict[str, Any]] = []
        while not live or live[-1]["seq"] < truth[-1]["seq"]:
            live += await client.changes(1)
    finally:
        await client.close()
    frames = received + replayed + live
    assert [f["seq"] for f in frames] == [c["seq"] for c in truth]
    # Replay covers what this server had published when the subscription began; the rest follows live.
    assert replayed
    assert subscribed["seq"] >= replayed[-1]["seq"]
    assert all(frame["seq"] > subscribed["seq"] for frame in live)


async def test_resume_from_a_pruned_position_is_refused(server: ServerProcess, db: asyncpg.Connection) -> None:
    """A since older than what retention kept gets cursor_expired instead of a silent gap."""
    table = await create_streamed_table(db)
    await db.execute(f"INSERT INTO {table} (k) VALUES (1)")
    pruned_through = await db.fetchval("SELECT pruned_through FROM realtime.retention")
    await db.execute("UPDATE realtime.retention SET pruned_through = $1", await head(db) - 1)
    client = await StreamClient.open(server.ws_url)
    try:
        reply = await client.request({"type": "subscribe", "id": "t", "table": table, "since": 0})
        ahead = await client.request({"type": "subscribe", "id": "t", "table": table, "since": 2**62})
    finally:
        await client.close()
        await db.execute("UPDATE realtime.retention SET pruned_through = $1", pruned_through)
    assert reply["code"] == "cursor_expired"
    assert ahead["code"] == "cursor_expired"


async def _mixed_writer(url: Dsn, table: str, writer: int, changes: int, hot_ids: list[int]) -> None:
    """Inserts, deletes and updates, many of them to a few hot rows shared by every writer."""
    rng = random.Random(writer)
    conn = await asyncpg.connect(url.asyncpg())
    own: list[int] = []
    try:
        done = 0
        while done < changes:
            roll = rng.random()
            if roll < 0.45:
                await conn.execute(
                    f"UPDATE {table} SET k = k + 1, v = $2 WHERE id = $1", rng.choice(hot_ids), str(writer)
                )
                done += 1
            elif roll < 0.75 or not own:
                own.append(await conn.fetchval(f"INSERT INTO {table} (k, v) VALUES ($1, 'w') RETURNING id", writer))
                done += 1
            elif roll < 0.9:
                await conn.execute(f"DELETE FROM {table} WHERE id = $1", own.pop(rng.randrange(len(own))))
                done += 1
            else:  # a transaction of several changes, touching a hot row too
                async with conn.transaction():
                    await conn.execute(f"UPDATE {table} SET k = k - 1 WHERE id = $1", rng.choice(hot_ids))
                    own.append(await conn.fetchval(f"INSERT INTO {table} (k) VALUES ($1) RETURNING id", writer))
                done += 2
    finally:
        await conn.close()


MARKER = -1


async def _collect_until_marker(client: StreamClient, out: list[dict[str, Any]]) -> None:
    """Receive change frames until the marker row (written after every writer finished) arrives."""
    async for raw in client.connection:
        frame = orjson.loads(raw)
        if frame["type"] == "change":
            out.append(frame)
            if frame["op"] == "INSERT" and frame["row"]["k"] == MARKER:
                return


async def test_concurrent_writers_reach_every_subscriber_exactly_once_in_order(
    server: ServerProcess, database_url: Dsn, db: asyncpg.Connection
) -> None:
    """8 writers x 2,000 changes on hot rows, 50 subscribers: each gets exactly the committed changes, in order."""
    table = await create_streamed_table(db)
    hot_ids = [await db.fetchval(f"INSERT INTO {table} (k) VALUES (0) RETURNING id") for _ in range(4)]
    initial = await table_rows(db, table)
    start = await head(db)
    clients = [await StreamClient.open(server.ws_url) for _ in range(50)]
    try:
        for index, client in enumerate(clients):
            await client.subscribe(f"s{index}", table=table)
        received: list[list[dict[str, Any]]] = [[] for _ in clients]
        readers = [
            asyncio.ensure_future(_collect_until_marker(c, out)) for c, out in zip(clients, received, strict=True)
        ]
        await asyncio.gather(*(_mixed_writer(database_url, table, w, 2000, hot_ids) for w in range(8)))
        await db.execute(f"INSERT INTO {table} (k) VALUES ($1)", MARKER)
        async with asyncio.timeout(90):
            await asyncio.gather(*readers)
        truth = await committed_changes(db, table, after=start)
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    expected = [c["seq"] for c in truth]
    assert len(expected) >= 16_000
    final_rows = await table_rows(db, table)
    for frames in received:
        assert [f["seq"] for f in frames] == expected
    assert apply_changes(initial, received[0]) == final_rows


async def test_snapshot_then_live_has_no_gap_and_no_duplicate(
    server: ServerProcess, database_url: Dsn, db: asyncpg.Connection
) -> None:
    """A snapshot taken under concurrent writes plus the changes after it reproduce the table exactly."""
    table = await create_streamed_table(db)
    hot_ids = [await db.fetchval(f"INSERT INTO {table} (k) VALUES (0) RETURNING id") for _ in range(4)]
    writers = asyncio.gather(*(_mixed_writer(database_url, table, w, 600, hot_ids) for w in range(4)))
    clients = [await StreamClient.open(server.ws_url) for _ in range(3)]
    try:
        snapshots = []
        for index, client in enumerate(clients):
            await asyncio.sleep(0)  # let writers interleave between the subscriptions
            _, before = await client.subscribe(f"s{index}", table=table, snapshot=True)
            snapshots.append(before)
        await writers
        last = (await committed_changes(db, table))[-1]["seq"]
        for client, before in zip(clients, snapshots, strict=True):
            assert before[-1]["last"] is True
            position = before[0]["seq"]
            assert all(chunk["seq"] == position for chunk in before)
            rows = {row["id"]: row for chunk in before for row in chunk["rows"]}
            changes: list[dict[str, Any]] = []
            while not changes or changes[-1]["seq"] < last:
                frame = await client.recv()
                if frame["type"] == "change":
                    changes.append(frame)
            seqs = [f["seq"] for f in changes]
            assert seqs == sorted(set(seqs))
            assert seqs[0] > position
            assert seqs == [c["seq"] for c in await committed_changes(db, table, after=position)]
            assert apply_changes(rows, changes) == await table_rows(db, table)
    finally:
        await asyncio.gather(*(client.close() for client in clients))


async def test_compressed_connections_stream_through_the_per_message_path(
    database_url: Dsn, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """With WS_COMPRESSION=true a client that negotiates permessage-deflate gets every change, in order."""
    table = await create_streamed_table(db)
    env = {"WS_COMPRESSION": "true"}
    async with running_server(database_url, tmp_path / "server.log", env=env) as server:
        client = await StreamClient.open(server.ws_url, compression="deflate")
        try:
            assert client.connection.protocol.extensions, "permessage-deflate was not negotiated"
            await client.subscribe("t", table=table)
            for k in range(20):
                await db.execute(f"INSERT INTO {table} (k, v) VALUES ($1, $2)", k, "z" * 2000)
            frames = await client.changes(20)
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                ready = (await http.get("/readyz")).json()
        finally:
            await client.close()
    assert [f["row"]["k"] for f in frames] == list(range(20))
    assert ready["listener"]["connections"] == {"direct": 0, "asgi": 1}


async def test_plain_connections_are_written_straight_to_the_transport(
    database_url: Dsn, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Without compression a connection gets the direct sink: the server's own send reaches the endpoint."""
    table = await create_streamed_table(db)
    async with running_server(database_url, tmp_path / "server.log") as server:
        client = await StreamClient.open(server.ws_url)
        try:
            await client.subscribe("t", table=table)
            await db.execute(f"INSERT INTO {table} (k, v) VALUES (1, 'a')")
            frames = await client.changes(1)
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                ready = (await http.get("/readyz")).json()
        finally:
            await client.close()
    assert [f["row"]["k"] for f in frames] == [1]
    assert ready["listener"]["connections"] == {"direct": 1, "asgi": 0}
