"""Row-level policies on /ws against a real server: what a role may not read never reaches it, live, in a
snapshot or in a replay; DELETEs are checked on the old row; a row moving out arrives as its key only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from realtime.dsn import Dsn
from tests.support.server import ServerProcess, running_server
from tests.support.tables import create_streamed_table, head
from tests.support.ws import Frame, StreamClient
from tests.test_auth import AUDIENCE, SECRET, make_token


def policy_text(table: str) -> str:
    return f"""
[[rule]]
table = "{table}"
roles = ["admin"]
actions = ["read"]

[[rule]]
table = "{table}"
roles = ["member"]
actions = ["read"]
where = [{{ column = "k", op = "eq", claim = "team" }}]
columns = ["id", "k", "v"]

[[rule]]
table = "{table}"
roles = ["mixed"]
actions = ["read"]
where = [{{ column = "k", op = "eq", value = 1 }}]
columns = ["id", "k"]

[[rule]]
table = "{table}"
roles = ["mixed"]
actions = ["read"]
where = [{{ column = "v", op = "eq", value = "x" }}]
columns = ["id", "v"]
"""


@pytest.fixture(scope="module")
async def table(database_url: Dsn) -> str:
    conn = await asyncpg.connect(database_url.asyncpg())
    try:
        return await create_streamed_table(conn, "policy")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def guarded(database_url: Dsn, artifacts_dir: Path, table: str) -> AsyncIterator[ServerProcess]:
    policy = artifacts_dir / f"{table}.toml"
    policy.write_text(policy_text(table))
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE, "AUTH_POLICY_FILE": str(policy)}
    async with running_server(database_url, artifacts_dir / "policy-stream.log", env=env) as server:
        yield server


async def signed_in(server: ServerProcess, role: str, sub: str = "1", **claims: Any) -> StreamClient:
    client = await StreamClient.open(server.ws_url)
    reply = await client.request({"type": "auth", "token": make_token(sub=sub, role=role, **claims)})
    assert reply["type"] == "authenticated", reply
    return client


async def insert(db: asyncpg.Connection, table: str, k: int, v: str, flag: bool = True) -> int:
    return int(await db.fetchval(f"INSERT INTO {table} (k, v, flag) VALUES ($1, $2, $3) RETURNING id", k, v, flag))


async def fence(db: asyncpg.Connection, table: str, client: StreamClient, sub_id: str) -> list[Frame]:
    """Every change frame of `sub_id` up to a change the admin-like fence row makes visible to it: k=3, v=fence."""
    fence_id = await insert(db, table, 3, "fence")
    frames: list[Frame] = []
    while True:
        frame = await client.recv_until(lambda f: f["type"] == "change" and f["id"] == sub_id)
        if frame.get("row", {}).get("id") == fence_id:
            return frames
        frames.append(frame)


async def test_a_role_without_a_rule_or_filtering_on_a_hidden_column_is_forbidden(
    guarded: ServerProcess, table: str
) -> None:
    client = await signed_in(guarded, "visitor")
    try:
        reply = await client.request({"type": "subscribe", "id": "a", "table": table})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "forbidden", "a"), reply
        assert "'visitor' may not read" in reply["message"]
        # A table the policy does not name is closed to every role, the admin's included.
        admin = await signed_in(guarded, "admin")
        reply = await admin.request({"type": "subscribe", "id": "u", "table": "users"})
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply
        await admin.close()
    finally:
        await client.close()
    member = await signed_in(guarded, "member", team="3")
    try:
        filtered = {
            "type": "subscribe",
            "id": "f",
            "table": table,
            "filter": [{"column": "flag", "op": "is", "value": True}],
        }
        reply = await member.request(filtered)
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply
        assert "flag" in reply["message"]
    finally:
        await member.close()


async def test_live_changes_are_limited_to_the_rule_and_trimmed(
    guarded: ServerProcess, table: str, db: asyncpg.Connection
) -> None:
    """A member of team 3 (the claim is the string "3"; k is a number) sees team 3's rows only, without `flag`;
    a DELETE is judged on the row it removed."""
    member = await signed_in(guarded, "member", team="3")
    try:
        await member.subscribe("m", table)
        mine = await insert(db, table, 3, "mine")
        await insert(db, table, 4, "theirs")
        await db.execute(f"DELETE FROM {table} WHERE k = 4")
        await db.execute(f"DELETE FROM {table} WHERE id = $1", mine)
        frames = await fence(db, table, member, "m")
    finally:
        await member.close()
    assert [(f["op"], (f.get("row") or f["old"])["id"]) for f in frames] == [("INSERT", mine), ("DELETE", mine)]
    assert frames[0]["row"] == {"id": mine, "k": 3, "v": "mine"}
    assert frames[1]["old"] == {"id": mine, "k": 3, "v": "mine"}


async def test_a_row_moving_out_arrives_as_its_key_and_one_moving_in_without_its_old_values(
    guarded: ServerProcess, table: str, db: asyncpg.Connection
) -> None:
    member = await signed_in(guarded, "member", team="3")
    try:
        await member.subscribe("m", table)
        row_id = await insert(db, table, 3, "before")
        await db.execute(f"UPDATE {table} SET k = 4, v = 'secret-after' WHERE id = $1", row_id)
        await db.execute(f"UPDATE {table} SET v = 'unseen' WHERE id = $1", row_id)  # outside: nothing
        await db.execute(f"UPDATE {table} SET k = 3, v = 'back' WHERE id = $1", row_id)
        frames = await fence(db, table, member, "m")
    finally:
        await member.close()
    inserted, moved_out, moved_in = frames
    assert inserted["op"] == "INSERT"
    assert moved_out == {
        "type": "change",
        "id": "m",
        "seq": moved_out["seq"],
        "table": table,
        "op": "UPDATE",
        "view": "removed",
        "key": {"id": row_id},
        "old": {"id": row_id},
        "ts": moved_out["ts"],
        "tx": moved_out["tx"],
        "tx_end": True,
    }
    assert moved_in["row"] == {"id": row_id, "k": 3, "v": "back"}
    assert "old" not in moved_in  # it held k = 4 before: not this member's to read


async def test_rules_of_a_role_add_up_and_show_the_columns_of_the_rules_that_hold(
    guarded: ServerProcess, table: str, db: asyncpg.Connection
) -> None:
    client = await signed_in(guarded, "mixed")
    try:
        await client.subscribe("x", table, events=["INSERT"])
        both = await insert(db, table, 1, "x")
        only_k = await insert(db, table, 1, "y")
        only_v = await insert(db, table, 2, "x")
        await insert(db, table, 2, "y")
        last = await insert(db, table, 1, "last")
        rows: list[dict[str, Any]] = []
        while not rows or rows[-1]["id"] != last:
            rows.append((await client.changes(1))[0]["row"])
    finally:
        await client.close()
    assert rows == [
        {"id": both, "k": 1, "v": "x"},
        {"id": only_k, "k": 1},
        {"id": only_v, "v": "x"},
        {"id": last, "k": 1},
    ]


async def test_snapshot_and_replay_show_what_live_delivery_showed(
    guarded: ServerProcess, table: str, db: asyncpg.Connection
) -> None:
    start = await head(db)
    member = await signed_in(guarded, "member", team="7")
    try:
        await member.subscribe("live", table)
        kept = await insert(db, table, 7, "kept")
        gone = await insert(db, table, 7, "gone")
        await insert(db, table, 8, "other")
        await db.execute(f"UPDATE {table} SET k = 8 WHERE id = $1", gone)
        await db.execute(f"UPDATE {table} SET v = 'kept2' WHERE id = $1", kept)
        last = await insert(db, table, 7, "last")
        live: list[Frame] = []
        while not live or (live[-1].get("row") or {}).get("id") != last:
            live.extend(await member.changes(1))
        _, replayed = await member.subscribe("again", table, since=start)
        _, snapshot = await member.subscribe("snap", table, snapshot=True)
    finally:
        await member.close()
    strip = [{k: v for k, v in f.items() if k != "id"} for f in live]
    assert [{k: v for k, v in f.items() if k != "id"} for f in replayed] == strip
    rows = [row for frame in snapshot for row in frame["rows"]]
    assert rows == [{"id": kept, "k": 7, "v": "kept2"}, {"id": last, "k": 7, "v": "last"}]


async def test_a_refresh_ends_the_subscriptions_the_new_claims_change(guarded: ServerProcess, table: str) -> None:
    member = await signed_in(guarded, "member", sub="5", team="3")
    try:
        await member.subscribe("a", table)
        same = await member.request({"type": "auth", "token": make_token(sub="5", role="member", team="3")})
        assert same["type"] == "authenticated"
        assert (await member.request({"type": "unsubscribe", "id": "a"}))["type"] == "unsubscribed"
        await member.subscribe("a", table)
        moved = await member.request({"type": "auth", "token": make_token(sub="5", role="member", team="4")})
        assert moved["type"] == "authenticated"
        ended = await member.recv_until(lambda f: f["type"] == "error")
        assert (ended["code"], ended["id"]) == ("forbidden", "a"), ended
        assert (await member.request({"type": "unsubscribe", "id": "a"}))["code"] == "not_subscribed"
        demoted = await member.request({"type": "auth", "token": make_token(sub="5", role="visitor")})
        assert demoted["type"] == "authenticated"
        refused = await member.request({"type": "subscribe", "id": "b", "table": table})
        assert (refused["type"], refused["code"]) == ("error", "forbidden"), refused
    finally:
        await member.close()
