"""Property: under random rules, claims, filters and change sequences, every subscriber receives exactly what a
SQL query over the same rules says it may see, with exactly the columns those rules show and the view effect
(added, modified, removed) the rules and its filter give, no more and no fewer; a replay from the same position
and a snapshot agree with it.

A policy is fixed for a server's life, so the rules are drawn once per run (a seeded generator, below): eight
roles of one or two random rules each, conditions on every column type, literal or claim-bound. Hypothesis draws
the rest per example: which roles subscribe with which claims and filters, and what is written.

The oracle evaluates each rule's conditions in PostgreSQL (`Grant.where_sql`, jsonb comparisons) over the rows
the changelog recorded; the server evaluates them in Python in the hub. The decision of what a change means for a
subscriber (docs/protocol.md, "Row-level policies") is restated here from those SQL verdicts.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime.auth.policy import Grant, Policy, condition_sql, load_policy, read_schemas
from realtime.auth.tokens import Identity
from realtime.dsn import Dsn
from realtime.stream.changes import TableKey
from realtime.stream.filters import Condition
from tests.support.server import ServerProcess, running_server
from tests.support.tables import create_streamed_table, head
from tests.support.ws import Frame, StreamClient
from tests.test_auth import AUDIENCE, SECRET, make_token

ROLES = [f"r{n}" for n in range(8)]
KS = [0, 1, 2, 3]
VS = ["a", "b", "x", "B", ""]
_OPS = ["eq", "neq", "lt", "lte", "gt", "gte", "in"]


def random_condition(rng: random.Random) -> str:
    column = rng.choice(["k", "v", "flag"])
    if column == "flag":
        return f'{{ column = "flag", op = "is", value = {rng.choice(["true", "false"])} }}'
    op = rng.choice(_OPS)
    values = KS if column == "k" else VS
    if op != "in" and rng.random() < 0.4:
        return f'{{ column = "{column}", op = "{op}", claim = "{"ck" if column == "k" else "cv"}" }}'
    if op == "in":
        return f'{{ column = "{column}", op = "in", value = {orjson.dumps(rng.sample(values, 2)).decode()} }}'
    return f'{{ column = "{column}", op = "{op}", value = {orjson.dumps(rng.choice(values)).decode()} }}'


def random_policy(table: str, fence: str, seed: int) -> str:
    rng = random.Random(seed)
    rules = []
    for role in ROLES:
        for _ in range(rng.choice([1, 2])):
            where = ", ".join(random_condition(rng) for _ in range(rng.choice([0, 1, 1, 1, 2])))
            columns = ""
            if rng.random() < 0.5:
                shown = ["id", *rng.sample(["k", "v", "flag"], rng.choice([0, 1, 2]))]
                columns = f"columns = {orjson.dumps(shown).decode()}\n"
            rules.append(
                f'[[rule]]\ntable = "{table}"\nroles = ["{role}"]\nactions = ["read"]\nwhere = [{where}]\n{columns}'
            )
        rules.append(f'[[rule]]\ntable = "{fence}"\nroles = ["{role}"]\nactions = ["read"]\n')
    return "\n".join(rules)


class World:
    def __init__(self, server: ServerProcess, policy: Policy, table: str, fence: str) -> None:
        self.server = server
        self.policy = policy
        self.table = table
        self.fence = fence


@pytest.fixture(scope="module")
async def world(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[World]:
    conn = await asyncpg.connect(database_url.asyncpg())
    try:
        table = await create_streamed_table(conn, "prop")
        fence = await create_streamed_table(conn, "fence")
        path = artifacts_dir / f"{table}.toml"
        path.write_text(random_policy(table, fence, seed=20261205))
        policy = load_policy(path).bind(
            await read_schemas(conn, [TableKey("public", table), TableKey("public", fence)])
        )
    finally:
        await conn.close()
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE, "AUTH_POLICY_FILE": str(path)}
    async with running_server(database_url, artifacts_dir / "policy-properties.log", env=env) as server:
        yield World(server, policy, table, fence)


# --- the oracle ---------------------------------------------------------------------------------------------------


def to_asyncpg(sql: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    """Named parameters (`:p0`) as asyncpg's positional ones, passing only those the statement uses."""
    names = list(dict.fromkeys(re.findall(r":(p\d+)", sql)))
    return re.sub(r":(p\d+)", lambda m: f"${names.index(m[1]) + 1}", sql), [params[n] for n in names]


async def verdicts(db: asyncpg.Connection, tests: list[list[Condition]], row: str) -> list[bool]:
    """Whether each AND of conditions holds for `row` (a jsonb SQL value), as PostgreSQL evaluates it."""
    params: dict[str, Any] = {"p0": row}
    parts = []
    for conditions in tests:
        rendered = [condition_sql(c, "(CAST(:p0 AS jsonb))", params) for c in conditions]
        parts.append("(" + " AND ".join(rendered or ["true"]) + ")")
    sql, args = to_asyncpg("SELECT " + ", ".join(parts), params)
    record = await db.fetchrow(sql, *args)
    return [bool(value) for value in record]


async def sql_view(db: asyncpg.Connection, grant: Grant, row: str) -> bool | frozenset[str]:
    held = await verdicts(db, [list(b.filter.conditions) for b in grant.branches], row) if grant.branches else []
    shown: set[str] = set()
    for branch, holds in zip(grant.branches, held, strict=True):
        if holds:
            if branch.columns is None:
                return True
            shown |= branch.columns
    return frozenset(shown) if shown else False


def trimmed(row: dict[str, Any], view: bool | frozenset[str]) -> dict[str, Any]:
    return row if view is True else {k: v for k, v in row.items() if view and k in view}


async def expected_frames(
    db: asyncpg.Connection, grant: Grant | None, conditions: list[Condition], table: str, after: int
) -> list[dict[str, Any]]:
    records = await db.fetch(
        "SELECT seq, op, new_row::text AS new, old_row::text AS old FROM realtime.changes"
        " WHERE table_schema = 'public' AND table_name = $1 AND seq > $2 ORDER BY seq",
        table,
        after,
    )
    expected = []
    for record in records:
        op, new, old = record["op"], record["new"], record["old"]
        new_view = await sql_view(db, grant, new) if grant and new else bool(new)
        old_view = await sql_view(db, grant, old) if grant and old else bool(old)
        matches_new = bool(new) and (await verdicts(db, [conditions], new))[0]
        matches_old = bool(old) and (await verdicts(db, [conditions], old))[0]
        in_new = new_view if new_view and matches_new else False
        in_old = old_view if old_view and matches_old else False
        key = {"id": orjson.loads(new or old)["id"]}
        frame: dict[str, Any] = {"seq": record["seq"], "op": op, "key": key}
        if in_new and in_old:
            frame.update(
                view="modified", row=trimmed(orjson.loads(new), in_new), old=trimmed(orjson.loads(old), in_old)
            )
        elif in_new:
            frame.update(view="added", row=trimmed(orjson.loads(new), in_new))
        elif in_old:
            # Out of the filter but still readable: the old values; out of reach of the rules: the key only.
            readable = op == "DELETE" or new_view
            frame.update(view="removed", old=trimmed(orjson.loads(old), in_old) if readable else key)
        else:
            continue
        expected.append(frame)
    return expected


def essence(frame: Frame) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k not in ("type", "id", "table", "ts", "tx", "tx_end")}


# --- the property -------------------------------------------------------------------------------------------------

subscribers = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(ROLES),
            # Claims as numbers, as strings of numbers (read as the column's type), and now and then unreadable.
            "ck": st.sampled_from([*KS, *(str(k) for k in KS), "nope"]),
            "cv": st.sampled_from(VS),
            "filter": st.one_of(st.none(), st.sampled_from(KS)),
        }
    ),
    min_size=1,
    max_size=4,
)
writes = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.sampled_from(KS), st.sampled_from(VS), st.booleans()),
        st.tuples(st.just("update"), st.integers(0, 5), st.sampled_from(KS), st.sampled_from(VS), st.booleans()),
        st.tuples(st.just("update"), st.integers(0, 5), st.sampled_from(KS), st.sampled_from(VS), st.booleans()),
        st.tuples(st.just("delete"), st.integers(0, 5)),
    ),
    min_size=3,
    max_size=16,
)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(subscribers=subscribers, writes=writes)
async def test_every_subscriber_receives_exactly_what_sql_says_it_may_see(
    world: World, db: asyncpg.Connection, subscribers: list[dict[str, Any]], writes: list[tuple[Any, ...]]
) -> None:
    table, fence = world.table, world.fence
    clients: list[StreamClient] = []
    try:
        start = await head(db)
        grants = []
        for number, who in enumerate(subscribers):
            identity = Identity(str(number), who["role"], 0, {"sub": str(number), "ck": who["ck"], "cv": who["cv"]})
            grant = world.policy.grant(identity, TableKey("public", table), "read")
            assert grant is not None
            grants.append(grant)
            client = await StreamClient.open(world.server.ws_url)
            clients.append(client)
            token = make_token(sub=str(number), role=who["role"], ck=who["ck"], cv=who["cv"])
            assert (await client.request({"type": "auth", "token": token}))["type"] == "authenticated"
            readable = grant.filterable_columns
            if who["filter"] is not None and readable is not None and "k" not in readable:
                refused = await client.request({"type": "subscribe", "id": "t", "table": table, "filter": wire(who)})
                assert refused["code"] == "forbidden", refused  # k is hidden from this role: no probing it
                who["filter"] = None
            await client.subscribe("t", table, filter=wire(who))
            await client.subscribe("fence", fence)
        ids: list[int] = [r["id"] for r in await db.fetch(f"SELECT id FROM {table} ORDER BY id DESC LIMIT 6")]
        async with db.transaction():
            for write in writes:
                if write[0] == "insert":
                    sql = f"INSERT INTO {table} (k, v, flag) VALUES ($1, $2, $3) RETURNING id"
                    ids.append(await db.fetchval(sql, *write[1:]))
                elif ids and write[0] == "update":
                    target = ids[write[1] % len(ids)]
                    await db.execute(f"UPDATE {table} SET k = $2, v = $3, flag = $4 WHERE id = $1", target, *write[2:])
                elif ids:
                    await db.execute(f"DELETE FROM {table} WHERE id = $1", ids.pop(write[1] % len(ids)))
        await db.execute(f"INSERT INTO {fence} (k) VALUES (0)")

        for number, (who, client) in enumerate(zip(subscribers, clients, strict=True)):
            received: list[Frame] = []
            while True:
                frame = await client.recv_until(lambda f: f["type"] == "change")
                if frame["id"] == "fence":
                    break
                received.append(frame)
            grant = grants[number]
            conditions = [] if who["filter"] is None else [Condition("k", "neq", who["filter"])]
            expected = await expected_frames(db, grant, conditions, table, start)
            assert [essence(f) for f in received] == expected, (who, grant)

            if number == 0:  # a replay from the same position, and a snapshot, say the same
                _, replayed = await client.subscribe("replay", table, since=start, filter=wire(who))
                assert [essence(f) for f in replayed] == expected
                _, snapshot = await client.subscribe("snap", table, snapshot=True, filter=wire(who))
                assert [row for f in snapshot for row in f["rows"]] == await expected_rows(db, grant, conditions, table)
    finally:
        for client in clients:
            await client.close()


def wire(who: dict[str, Any]) -> list[dict[str, Any]]:
    return [] if who["filter"] is None else [{"column": "k", "op": "neq", "value": who["filter"]}]


async def expected_rows(
    db: asyncpg.Connection, grant: Grant, conditions: list[Condition], table: str
) -> list[dict[str, Any]]:
    rows = []
    for record in await db.fetch(f"SELECT realtime.utc_jsonb(t)::text AS row FROM {table} t ORDER BY id"):
        view = await sql_view(db, grant, record["row"])
        if view and (await verdicts(db, [conditions], record["row"]))[0]:
            rows.append(trimmed(orjson.loads(record["row"]), view))
    return rows
