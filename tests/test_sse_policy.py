"""Tokens, tickets and row-level policies on `GET /sse/{table}` against a real server: a stream gets exactly
the frames a WebSocket subscription with the same token gets (rows and columns outside the grant never sent),
a forbidden table is refused as problem+json, a ticket opens one stream once, and token expiry ends the stream
with the position to resume from."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from realtime.dsn import Dsn
from tests.support.server import ServerProcess, running_server
from tests.support.sse import EventReader, open_stream
from tests.support.tables import create_streamed_table, head
from tests.support.ws import Frame, StreamClient
from tests.test_auth import AUDIENCE, SECRET, bearer, make_token
from tests.test_policy_stream import insert, policy_text

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def table(database_url: Dsn) -> str:
    conn = await asyncpg.connect(database_url.asyncpg())
    try:
        return await create_streamed_table(conn, "ssepolicy")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def guarded(database_url: Dsn, artifacts_dir: Path, table: str) -> AsyncIterator[ServerProcess]:
    policy = artifacts_dir / f"{table}.toml"
    policy.write_text(policy_text(table))
    env = {
        "AUTH_JWT_SECRET": SECRET,
        "AUTH_AUDIENCE": AUDIENCE,
        "AUTH_POLICY_FILE": str(policy),
        "AUTH_LEEWAY_S": "0",
    }
    async with running_server(database_url, artifacts_dir / "sse-policy.log", env=env) as server:
        yield server


@pytest.fixture
async def http(guarded: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.base_url, timeout=10.0) as client:
        yield client


async def signed_in(server: ServerProcess, token: str) -> StreamClient:
    client = await StreamClient.open(server.ws_url)
    reply = await client.request({"type": "auth", "token": token})
    assert reply["type"] == "authenticated", reply
    return client


async def sse_until(reader: EventReader, row_id: int) -> list[dict[str, Any]]:
    """The change payloads up to the one whose row is `row_id` (a fence the subscriber may read)."""
    got: list[dict[str, Any]] = []
    while not got or (got[-1].get("row") or {}).get("id") != row_id:
        event = await reader.next()
        assert event is not None, got
        if event.kind == "change":
            got.append(event.json)
    return got


async def ws_until(client: StreamClient, row_id: int) -> list[Frame]:
    got: list[Frame] = []
    while not got or (got[-1].get("row") or {}).get("id") != row_id:
        got.append(await client.recv_until(lambda f: f["type"] == "change"))
    return got


async def test_forbidden_tables_hidden_filter_columns_and_missing_tokens_are_refused(
    http: httpx.AsyncClient, table: str
) -> None:
    """No rule for the role, a table outside the policy, a filter on a hidden column: 403 `forbidden`, as the
    WebSocket's `error` frame says it; no token or a bad one: 401 with the reason."""
    cases = [
        (f"/sse/{table}", make_token(role="visitor"), 403, "forbidden", "'visitor' may not read"),
        ("/sse/users", make_token(role="admin"), 403, "forbidden", "may not read 'users'"),
        (f"/sse/{table}?filter=flag=is:true", make_token(role="member", team="3"), 403, "forbidden", "flag"),
        (f"/sse/{table}", make_token(role="admin", ttl=-60), 401, "unauthorized", "token expired"),
        (f"/sse/{table}", make_token(b"another secret" * 3, role="admin"), 401, "unauthorized", "bad signature"),
    ]
    for path, token, status, code, words in cases:
        response = await http.get(path, headers=bearer(token))
        assert (response.status_code, response.json()["code"]) == (status, code), (path, response.text)
        assert words in response.json()["detail"], response.json()
    response = await http.get(f"/sse/{table}")
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert "ticket" in response.json()["detail"]


@pytest.mark.parametrize(
    ("claims", "visible"),
    [({"role": "member", "team": "3"}, (3, "fence")), ({"role": "mixed"}, (1, "x"))],
)
async def test_a_stream_gets_exactly_the_frames_a_websocket_with_the_same_token_gets(
    guarded: ServerProcess,
    http: httpx.AsyncClient,
    db: asyncpg.Connection,
    table: str,
    claims: dict[str, Any],
    visible: tuple[int, str],
) -> None:
    """Rows outside the grant are never sent, columns outside it never shown, a row moving out is its key only:
    every SSE payload equals the WebSocket frame of a subscription with the same id and token."""
    token = make_token(**claims)
    ws = await signed_in(guarded, token)
    try:
        async with open_stream(http, f"/sse/{table}", headers=bearer(token)) as reader:
            assert reader.response.status_code == 200, reader.response.text
            subscribed, _ = await reader.until(lambda e: e.kind == "subscribed")
            await ws.subscribe("sse", table, since=subscribed.json["seq"])
            mine = await insert(db, table, 3, "mine")
            await insert(db, table, 4, "theirs")
            await insert(db, table, 1, "y")
            await insert(db, table, 2, "x")
            await db.execute(f"UPDATE {table} SET k = 4, v = 'secret-after' WHERE id = $1", mine)
            await db.execute(f"UPDATE {table} SET v = 'unseen' WHERE id = $1", mine)
            await db.execute(f"UPDATE {table} SET k = 3, v = 'back' WHERE id = $1", mine)
            await db.execute(f"DELETE FROM {table} WHERE k = 4")
            fence = await insert(db, table, *visible)
            streamed = await sse_until(reader, fence)
            framed = await ws_until(ws, fence)
    finally:
        await ws.close()
    assert streamed == framed
    shown = [frame.get("row") or frame.get("old") or {} for frame in streamed]
    assert all("flag" not in row for row in shown)
    assert not any("secret-after" in str(frame) or "unseen" in str(frame) for frame in streamed)
    if claims["role"] == "member":
        assert all(row.get("k") in (3, None) for row in shown)
        assert [(f["op"], f["view"]) for f in streamed] == [
            ("INSERT", "added"),
            ("UPDATE", "removed"),
            ("UPDATE", "added"),
            ("INSERT", "added"),
        ]
        assert streamed[1]["old"] == {"id": mine}
    else:
        assert {"id": mine, "k": 3, "v": "mine"} not in shown


async def test_snapshot_and_replay_on_a_stream_show_what_live_showed(
    http: httpx.AsyncClient, db: asyncpg.Connection, table: str
) -> None:
    """A snapshot holds the visible rows, trimmed; a `since` replay repeats the live stream's payloads."""
    start = await head(db)
    headers = bearer(make_token(role="member", team="7"))
    async with open_stream(http, f"/sse/{table}", headers=headers) as reader:
        await reader.until(lambda e: e.kind == "subscribed")
        kept = await insert(db, table, 7, "kept")
        gone = await insert(db, table, 7, "gone")
        await insert(db, table, 8, "other")
        await db.execute(f"UPDATE {table} SET k = 8 WHERE id = $1", gone)
        last = await insert(db, table, 7, "last")
        live = await sse_until(reader, last)
    async with open_stream(http, f"/sse/{table}", params={"since": start}, headers=headers) as reader:
        _, replayed = await reader.until(lambda e: e.kind == "subscribed")
    assert [e.json for e in replayed] == live
    async with open_stream(http, f"/sse/{table}", params={"snapshot": "true"}, headers=headers) as reader:
        _, snapshot = await reader.until(lambda e: e.kind == "subscribed")
    rows = [row for e in snapshot for row in e.json["rows"] if row["k"] == 7 and row["id"] >= kept]
    assert rows == [{"id": kept, "k": 7, "v": "kept"}, {"id": last, "k": 7, "v": "last"}]
    assert all(set(row) == {"id", "k", "v"} and row["k"] == 7 for e in snapshot for row in e.json["rows"])


async def test_a_ticket_opens_one_stream_once_for_its_identity(
    http: httpx.AsyncClient, db: asyncpg.Connection, table: str
) -> None:
    """POST /sse/tickets needs the token; its ticket opens a stream under that token's grant, and only once."""
    refused = await http.post("/sse/tickets")
    assert refused.status_code == 401
    issued = await http.post("/sse/tickets", headers=bearer(make_token(role="member", team="3")))
    assert issued.status_code == 201, issued.text
    ticket = issued.json()["ticket"]
    assert issued.json()["expires_in"] == 30
    async with open_stream(http, f"/sse/{table}", params={"ticket": ticket}) as reader:
        assert reader.response.status_code == 200, reader.response.text
        await reader.until(lambda e: e.kind == "subscribed")
        await insert(db, table, 4, "theirs")
        mine = await insert(db, table, 3, "mine")
        (change,) = await sse_until(reader, mine)
        assert change["row"] == {"id": mine, "k": 3, "v": "mine"}
        again = await http.get(f"/sse/{table}", params={"ticket": ticket})
        assert (again.status_code, again.json()["code"]) == (401, "unauthorized")
        assert "already used" in again.json()["detail"]
    visitor = (await http.post("/sse/tickets", headers=bearer(make_token(role="visitor")))).json()["ticket"]
    response = await http.get(f"/sse/{table}", params={"ticket": visitor})
    assert (response.status_code, response.json()["code"]) == (403, "forbidden")
    both = (await http.post("/sse/tickets", headers=bearer(make_token(role="admin")))).json()["ticket"]
    response = await http.get(f"/sse/{table}", params={"ticket": both}, headers=bearer(make_token(role="admin")))
    assert (response.status_code, response.json()["code"]) == (400, "bad_message")


async def test_token_expiry_ends_the_stream_with_the_position_to_resume_from(
    http: httpx.AsyncClient, db: asyncpg.Connection, table: str
) -> None:
    """At the token's `exp` the stream ends with `end` `token_expired` and its last position; a new token resumes
    from there with nothing lost."""
    short = make_token(role="admin", ttl=2)
    async with open_stream(http, f"/sse/{table}", headers=bearer(short)) as reader:
        await reader.until(lambda e: e.kind == "subscribed")
        first = await insert(db, table, 5, "before expiry")
        await sse_until(reader, first)
        end, between = await reader.until(lambda e: e.kind == "end", timeout=10)
        assert time.time() >= jwt.decode(short, options={"verify_signature": False})["exp"]  # not before exp
    assert (end.json["code"], end.json["seq"], between) == ("token_expired", await head(db), [])
    after = await insert(db, table, 5, "after expiry")
    fresh = bearer(make_token(role="admin"))
    async with open_stream(http, f"/sse/{table}", params={"since": end.json["seq"]}, headers=fresh) as reader:
        resumed = await sse_until(reader, after)  # replayed, or live if it was published after the subscribe
    assert [c["row"]["id"] for c in resumed] == [after]
    assert [c["seq"] for c in resumed] == [await head(db)]


async def test_a_ticket_from_one_process_opens_a_stream_on_another_once(
    guarded: ServerProcess, http: httpx.AsyncClient, database_url: Dsn, artifacts_dir: Path, table: str
) -> None:
    """Tickets are kept in the database: one issued by one server process opens a stream on another (as behind a
    balancer or with --workers), and then on neither."""
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE}
    async with (
        running_server(database_url, artifacts_dir / "sse-policy-other.log", env=env) as other,
        httpx.AsyncClient(base_url=other.base_url, timeout=10.0) as elsewhere,
    ):
        issued = await http.post("/sse/tickets", headers=bearer(make_token(role="admin")))
        ticket = issued.json()["ticket"]
        async with open_stream(elsewhere, f"/sse/{table}", params={"ticket": ticket}) as reader:
            assert reader.response.status_code == 200, reader.response.text
            await reader.until(lambda e: e.kind == "subscribed")
        for client in (elsewhere, http):
            again = await client.get(f"/sse/{table}", params={"ticket": ticket})
            assert (again.status_code, again.json()["code"]) == (401, "unauthorized")
