"""`GET /sse/{table}` against real servers: events as curl and httpx read them, problem+json for every bad
request, resuming by `since` and `Last-Event-ID` with nothing lost or repeated, the shared connection limits, a
slow reader cut with the position to resume from, and SIGTERM ending streams with theirs."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from realtime.auth.tickets import TicketError, Tickets, TicketsFull
from realtime.auth.tokens import Identity
from realtime.dsn import Dsn
from realtime.stream.sse import STATUS
from realtime.stream.sse_wire import RETRY_MS, event, event_from_frame
from realtime.stream.wire import encode_text_frame
from tests.support.server import ServerProcess, running_server
from tests.support.sse import EventReader, open_stream, seqs
from tests.support.tables import committed_changes, create_streamed_table, head
from tests.support.waiting import eventually
from tests.support.ws import StreamClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def sse_server(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """An open server whose streams send a heartbeat every 0.3 s."""
    env = {"SSE_HEARTBEAT_S": "0.3"}
    async with running_server(database_url, artifacts_dir / "sse.log", env=env) as server:
        yield server


@pytest.fixture
async def sse_http(sse_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sse_server.base_url, timeout=10.0) as client:
        yield client


@pytest.fixture
async def table(db: asyncpg.Connection) -> str:
    return await create_streamed_table(db, "sse")


async def insert(db: asyncpg.Connection, table: str, k: int, v: str = "x") -> int:
    return int(await db.fetchval(f"INSERT INTO {table} (k, v, flag) VALUES ($1, $2, true) RETURNING id", k, v))


async def changes_until(reader: EventReader, seq: int) -> list[dict[str, object]]:
    """The change events' payloads up to and including position `seq`."""
    got: list[dict[str, object]] = []
    while not got or int(str(got[-1]["seq"])) < seq:
        event_ = await reader.next()
        assert event_ is not None, f"the stream ended before {seq}; got {got}"
        if event_.kind == "change":
            assert event_.id == str(event_.json["seq"])  # every change is a resume position
            got.append(event_.json)
    return got


# ---------------------------------------------------------------------------------------------- the wire


def test_a_change_frame_becomes_an_event_with_its_position_and_a_snapshot_one_without() -> None:
    """The hub's WebSocket frame turns into `id:`, `event:` and its JSON payload unchanged; snapshots carry no id."""
    change = '{"type":"change","id":"sse","seq":7,"table":"t","op":"INSERT"}'
    data, event_id = event_from_frame(encode_text_frame(change), 7)
    assert (data, event_id) == (b"id: 7\nevent: change\ndata: " + change.encode() + b"\n\n", 7)
    snapshot = '{"type":"snapshot","id":"sse","seq":7,"rows":[],"last":true}'
    data, event_id = event_from_frame(encode_text_frame(snapshot), 7)
    assert (data, event_id) == (b"event: snapshot\ndata: " + snapshot.encode() + b"\n\n", None)
    large = '{"type":"change","id":"sse","seq":9,"row":"' + "y" * 70_000 + '"}'
    assert (
        event_from_frame(encode_text_frame(large), 9)[0] == b"id: 9\nevent: change\ndata: " + large.encode() + b"\n\n"
    )
    # A line break in the data, should one ever occur, becomes a data line of its own.
    assert event(b"end", b'{"a":\n1}') == b'event: end\ndata: {"a":\ndata: 1}\n\n'


async def test_a_ticket_opens_once_and_not_after_its_time(db: asyncpg.Connection) -> None:
    """A ticket is redeemed once, for the identity it was issued for; a second use, one past its deadline and one
    never issued are refused alike; past MAX_OUTSTANDING waiting tickets, issuing is refused."""

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[asyncpg.Connection]:
        yield db

    await db.execute("DELETE FROM realtime.sse_tickets")
    identity = Identity(sub="7", role="member", exp=2_000_000_000, claims={"sub": "7", "team": ["a", 1]})
    tickets = Tickets(connect, ttl_s=30.0)
    ticket = await tickets.issue(identity)
    assert await db.fetchval("SELECT count(*) FROM realtime.sse_tickets WHERE digest = $1", ticket.encode()) == 0
    assert await tickets.redeem(ticket) == identity
    with pytest.raises(TicketError):
        await tickets.redeem(ticket)
    assert await tickets.redeem(await tickets.issue(None)) is None
    with pytest.raises(TicketError):
        await tickets.redeem("never-issued")
    stale = await Tickets(connect, ttl_s=1e-9).issue(identity)
    with pytest.raises(TicketError):
        await tickets.redeem(stale)
    full = Tickets(connect, ttl_s=30.0, max_outstanding=1)
    await full.issue(None)
    with pytest.raises(TicketsFull):
        await full.issue(None)
    await db.execute("DELETE FROM realtime.sse_tickets")


# ---------------------------------------------------------------------------------------------- streaming


async def test_curl_reads_live_changes_as_events(sse_server: ServerProcess, db: asyncpg.Connection, table: str) -> None:
    """`curl -N` gets `text/event-stream`, `retry:`, `subscribed` with its position, then each change as an event."""
    curl = shutil.which("curl")
    assert curl is not None
    process = await asyncio.create_subprocess_exec(
        curl, "-N", "-s", "-i", f"{sse_server.base_url}/sse/{table}?events=INSERT", stdout=asyncio.subprocess.PIPE
    )
    stdout = process.stdout
    assert stdout is not None
    lines: list[str] = []

    async def line_matching(prefix: str) -> str:
        async with asyncio.timeout(10):
            while True:
                line = (await stdout.readline()).decode().rstrip("\r\n")
                lines.append(line)
                if line.startswith(prefix):
                    return line

    try:
        assert (await line_matching("HTTP/1.1")).startswith("HTTP/1.1 200")
        assert (await line_matching("content-type")).lower() == "content-type: text/event-stream; charset=utf-8"
        assert await line_matching("retry:") == f"retry: {RETRY_MS}"
        subscribed_id = await line_matching("id:")
        assert await line_matching("event:") == "event: subscribed"
        first = await insert(db, table, 1, "curl")
        change_id = await line_matching("id:")
        assert int(change_id[4:]) > int(subscribed_id[4:])
        assert await line_matching("event:") == "event: change"
        data = orjson.loads((await line_matching("data:"))[6:])
        assert (data["op"], data["view"], data["row"]["id"], data["row"]["v"]) == ("INSERT", "added", first, "curl")
        assert data["seq"] == int(change_id[4:])
        assert isinstance(data["tx"], str)  # the transaction fields come through as on /ws
        assert data["tx_end"] is True
        assert await line_matching(": keep-alive") == ": keep-alive"  # the heartbeat comes while nothing changes
    finally:
        process.kill()
        await process.wait()


async def test_snapshot_then_live_and_a_filter_as_the_websocket_sends_them(
    sse_server: ServerProcess, sse_http: httpx.AsyncClient, db: asyncpg.Connection, table: str
) -> None:
    """A filtered snapshot arrives as `snapshot` events without ids, then `subscribed`, then changes; each payload
    is byte for byte the frame a WebSocket subscription of the same id, filter and position gets."""
    await insert(db, table, 1, "a")
    await insert(db, table, 2, "b")
    params = {"snapshot": "true", "filter": ["k=in:[1,3]", "v=neq:zzz"]}
    ws = await StreamClient.open(sse_server.ws_url)
    try:
        async with open_stream(sse_http, f"/sse/{table}", params=params) as reader:
            assert reader.response.status_code == 200, reader.response.text
            subscribed, before = await reader.until(lambda e: e.kind == "subscribed")
            assert [e.kind for e in before] == ["snapshot"] * len(before)
            assert all(e.id is None for e in before)
            assert [row["v"] for e in before for row in e.json["rows"]] == ["a"]
            assert before[-1].json["last"] is True
            assert subscribed.id == str(subscribed.json["seq"])
            assert reader.retry == [RETRY_MS]
            await ws.subscribe(
                "sse",
                table,
                since=subscribed.json["seq"],
                filter=[{"column": "k", "op": "in", "value": [1, 3]}, {"column": "v", "op": "neq", "value": "zzz"}],
            )
            row = await insert(db, table, 3, "c")
            await insert(db, table, 2, "not in the filter")
            await db.execute(f"UPDATE {table} SET k = 2 WHERE id = $1", row)
            last = await head(db)
            got = await changes_until(reader, last)
            frames = [await ws.recv_until(lambda f: f["type"] == "change") for _ in got]
            assert [(c["view"], c["op"]) for c in got] == [("added", "INSERT"), ("removed", "UPDATE")]
            assert got == frames
    finally:
        await ws.close()


async def test_since_and_last_event_id_resume_exactly_once(
    sse_http: httpx.AsyncClient, db: asyncpg.Connection, table: str
) -> None:
    """`since` replays every change after it, then goes live; `Last-Event-ID` resumes the same way and wins over
    `since` and `snapshot` in the URL."""
    start = await head(db)
    for k in range(5):
        await insert(db, table, k)
    truth = [c["seq"] for c in await committed_changes(db, table, start)]
    async with open_stream(sse_http, f"/sse/{table}", params={"since": start}) as reader:
        got = await changes_until(reader, truth[-1])  # replayed before `subscribed`, the rest live after it
    assert [c["seq"] for c in got] == truth
    middle = truth[1]
    for k in range(2):
        await insert(db, table, 10 + k)
    truth = [c["seq"] for c in await committed_changes(db, table, start)]
    resume = {"Last-Event-ID": str(middle)}
    for params in ({"since": 0, "snapshot": "false"}, {"snapshot": "true"}):
        async with open_stream(sse_http, f"/sse/{table}", params=params, headers=resume) as reader:
            first = await reader.next()
            assert first is not None
            assert first.kind != "snapshot"
            got = [first.json] if first.kind == "change" else []
            got += await changes_until(reader, truth[-1]) if not got or got[-1]["seq"] != truth[-1] else []
        assert [c["seq"] for c in got] == truth[2:]


@pytest.mark.parametrize(
    ("query", "status", "code", "words"),
    [
        ("", 404, "unknown_table", "does not exist"),
        ("?filter=nope=eq:1", 400, "unknown_column", "nope"),
        ("?filter=k=like:1", 400, "invalid_filter", "unknown op 'like'"),
        ("?filter=k-eq-1", 400, "invalid_filter", "column=op:value"),
        ("?filter=k=in:5", 400, "invalid_filter", "non-empty list"),
        ("?filter=k=is:7", 400, "invalid_filter", "null, true or false"),
        ("?filter=k=lt:[1]", 400, "invalid_filter", "scalar"),
        ("?" + "&".join(["filter=k=eq:1"] * 21), 400, "invalid_filter", "at most 20"),
        ("?events=INSERT,TRUNCATE", 400, "bad_message", "'events'"),
        ("?events=", 400, "bad_message", "'events'"),
        ("?events=INSERT&events=DELETE", 400, "bad_message", "'events' may be given once"),
        ("?since=-1", 400, "bad_message", "'since'"),
        ("?since=1e3", 400, "bad_message", "'since'"),
        ("?since=99999999999999999999", 400, "bad_message", "'since'"),
        ("?snapshot=yes", 400, "bad_message", "'snapshot'"),
        ("?snapshot=true&since=1", 400, "bad_message", "mutually exclusive"),
        ("?table=x", 400, "bad_message", "unknown query parameter(s) table"),
        ("?since=999999999999", 410, "cursor_expired", "ahead of the changelog"),
    ],
)
async def test_every_bad_request_is_problem_json_with_the_websocket_code(
    sse_http: httpx.AsyncClient, table: str, query: str, status: int, code: str, words: str
) -> None:
    """A request the stream cannot serve gets problem+json before any event: status, the error code, and why."""
    path = "/sse/no_such_table" if code == "unknown_table" else f"/sse/{table}"
    response = await sse_http.get(path + query)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["status"], problem["code"], problem["type"]) == (
        status,
        code,
        f"/problems/{code.replace('_', '-')}",
    )
    assert words in problem["detail"], problem


def test_the_sse_doc_lists_every_refusal_code() -> None:
    """docs/sse.md names every error code a refused stream can carry."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "sse.md").read_text()
    assert [code for code in STATUS if f"`{code}`" not in doc] == []


async def test_a_bad_last_event_id_and_a_foreign_origin_are_refused(sse_http: httpx.AsyncClient, table: str) -> None:
    """`Last-Event-ID` must be a position; a page of another site may not open a stream (as on /ws)."""
    response = await sse_http.get(f"/sse/{table}", headers={"Last-Event-ID": "abc"})
    assert (response.status_code, response.json()["code"]) == (400, "bad_message")
    assert "Last-Event-ID" in response.json()["detail"]
    response = await sse_http.get(f"/sse/{table}", headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert response.json()["type"] == "/problems/origin-not-allowed"
    own = str(sse_http.base_url).rstrip("/")
    async with open_stream(sse_http, f"/sse/{table}", headers={"Origin": own}) as reader:
        assert reader.response.status_code == 200  # the server's own page may, and may read it
        assert reader.response.headers["access-control-allow-origin"] == own


# ---------------------------------------------------------------------------------------------- limits, shutdown


async def test_streams_count_against_the_websocket_connection_limits(
    database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection, table: str
) -> None:
    """SSE streams and WebSockets share WS_MAX_CONNECTIONS_PER_CLIENT: past it both get 429 problem+json."""
    env = {"WS_MAX_CONNECTIONS_PER_CLIENT": "2"}
    async with (
        running_server(database_url, artifacts_dir / "sse-limits.log", env=env) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http,
    ):
        ws = await StreamClient.open(server.ws_url)
        try:
            async with open_stream(http, f"/sse/{table}") as first:
                await first.until(lambda e: e.kind == "subscribed")
                async with open_stream(http, f"/sse/{table}") as refused:
                    assert refused.response.status_code == 429
                    problem = orjson.loads(await refused.response.aread())
                    assert problem["type"] == "/problems/too-many-connections-from-client"
                    assert int(refused.response.headers["Retry-After"]) > 0

            async def reopened() -> bool:
                async with open_stream(http, f"/sse/{table}") as again:
                    return again.response.status_code == 200

            await eventually(reopened, 10, "the place of the stream that ended, given back")
        finally:
            await ws.close()


async def test_the_process_bounds_refuse_a_stream_as_they_refuse_a_subscribe(
    database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection, table: str
) -> None:
    """WS_MAX_FILTER_VALUES, STREAM_SNAPSHOT_MAX_BYTES and WS_MAX_SUBSCRIPTIONS_TOTAL refuse a stream with the
    subscribe's codes, as problem+json; the last with Retry-After, and a freed place is taken again."""
    env = {"WS_MAX_FILTER_VALUES": "3", "STREAM_SNAPSHOT_MAX_BYTES": "65536", "WS_MAX_SUBSCRIPTIONS_TOTAL": "1"}
    await db.execute(f"INSERT INTO {table} (k, v) SELECT g, repeat('x', 1000) FROM generate_series(1, 100) g")
    async with (
        running_server(database_url, artifacts_dir / "sse-bounds.log", env=env) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http,
    ):
        response = await http.get(f"/sse/{table}", params={"filter": "k=in:[1,2,3,4]"})
        assert (response.status_code, response.json()["code"]) == (400, "filter_budget_exceeded")
        response = await http.get(f"/sse/{table}", params={"snapshot": "true"})
        assert (response.status_code, response.json()["code"]) == (400, "snapshot_too_large")
        async with open_stream(http, f"/sse/{table}") as held:
            await held.until(lambda e: e.kind == "subscribed")
            response = await http.get(f"/sse/{table}")
            assert (response.status_code, response.json()["code"]) == (503, "too_many_subscriptions")
            assert response.json()["retry_after_ms"] > 0
            assert int(response.headers["Retry-After"]) >= 1

        async def reopened() -> list[int] | None:
            """The snapshot of a narrower stream, once the closed one's place is free (None until then)."""
            async with open_stream(http, f"/sse/{table}", params={"snapshot": "true", "filter": "k=lte:10"}) as again:
                if again.response.status_code != 200:
                    return None
                _, snapshot = await again.until(lambda e: e.kind == "subscribed")
            return sorted(row["k"] for e in snapshot for row in e.json["rows"])

        assert await eventually(reopened, 10, "a stream in the place the closed one freed") == list(range(1, 11))


BIG = 100 * 1024


async def test_a_slow_reader_is_cut_with_its_position_and_resumes_with_nothing_lost(
    database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection, table: str
) -> None:
    """A reader that stops reading while far more than its buffers is written is cut: its stream ends with `end`
    `too_slow` naming the last position it was sent, and resuming from there gets the rest, none twice."""
    env = {"WS_QUEUE_SIZE": "50", "WS_SEND_TIMEOUT_S": "60"}
    async with (
        running_server(database_url, artifacts_dir / "sse-slow.log", env=env) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as http,
    ):
        start = await head(db)
        async with open_stream(http, f"/sse/{table}") as slow:
            await slow.until(lambda e: e.kind == "subscribed")
            # One change read before the reader stops: otherwise, on a busy machine, the listener may read several
            # of the big transactions at once, more than WS_QUEUE_BYTES, and the cut comes before any is sent.
            await db.execute(f"INSERT INTO {table} (k, v) VALUES (0, 'first')")
            first, _ = await slow.until(lambda e: e.kind == "change")
            # Nothing reads the stream from here: ~30 MiB, far beyond the socket buffers and the queue.
            for _ in range(30):
                await db.execute(
                    f"INSERT INTO {table} (k, v) SELECT g, repeat('x', $1) FROM generate_series(1, 10) g", BIG
                )
            truth = [c["seq"] for c in await committed_changes(db, table, start)]
            end, got = await slow.until(lambda e: e.kind == "end", timeout=30)
        cut = seqs([first, *got])
        assert 0 < len(cut) < len(truth), "the slow reader's queue never overflowed"
        assert cut == truth[: len(cut)]
        assert (end.json["code"], end.json["seq"], end.id) == ("too_slow", cut[-1], None)
        async with open_stream(http, f"/sse/{table}", headers={"Last-Event-ID": str(end.json["seq"])}) as resumed:
            rest = await changes_until(resumed, truth[-1])  # replayed, then live for any not yet published
        assert [c["seq"] for c in rest] == truth[len(cut) :]


async def test_sigterm_ends_streams_at_once_with_the_position_to_resume_from(
    database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection, table: str
) -> None:
    """On SIGTERM every stream gets `end` `restarting` with its last position, then the response ends."""
    server = ServerProcess(database=database_url, log_path=artifacts_dir / "sse-sigterm.log")
    await asyncio.to_thread(server.start)
    try:
        async with (
            httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http,
            open_stream(http, f"/sse/{table}") as reader,
        ):
            await reader.until(lambda e: e.kind == "subscribed")
            await insert(db, table, 1)
            last = await head(db)
            await changes_until(reader, last)
            stopping = asyncio.ensure_future(asyncio.to_thread(server.terminate))
            end, between = await reader.until(lambda e: e.kind == "end", timeout=5)
            assert (end.json["code"], end.json["seq"], between) == ("restarting", last, [])
            assert await reader.next() is None
            assert await stopping == 0
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(server.terminate)


def _server_side_socket(server_port: int, client_port: int) -> str | None:
    """The inode of the server's socket to `client_port` in /proc/net/tcp ("0" once no process holds it), or
    None when the kernel has no such connection any more."""
    wanted = (f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}")
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == wanted:
            return fields[9]
    return None


async def test_a_reader_that_takes_nothing_is_dropped_not_left_holding_its_connection(
    database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection, table: str
) -> None:
    """A stream whose reader takes nothing for WS_SEND_TIMEOUT_S has its connection dropped by the server, as a
    WebSocket's is: the server no longer holds the socket, however much it had left to send."""
    env = {"WS_QUEUE_SIZE": "50", "WS_SEND_TIMEOUT_S": "1"}
    async with running_server(database_url, artifacts_dir / "sse-stuck.log", env=env) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            request = f"GET /sse/{table} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n"
            writer.write(request.encode())
            received = b""
            async with asyncio.timeout(10):
                while b"event: subscribed" not in received:
                    received += await reader.read(4096)
            client_port = writer.get_extra_info("sockname")[1]
            assert _server_side_socket(server.port, client_port) not in (None, "0")
            # From here nothing is read: ~15 MiB, far beyond the socket buffers and the queue.
            for _ in range(15):
                await db.execute(
                    f"INSERT INTO {table} (k, v) SELECT g, repeat('x', $1) FROM generate_series(1, 10) g", BIG
                )

            async def dropped() -> bool:
                return _server_side_socket(server.port, client_port) in (None, "0")

            await eventually(dropped, 20, "the server dropped the stuck stream's connection")
            assert "SSE stream closed" in server.log_text()
            assert "without completing response" not in server.log_text()
        finally:
            writer.close()
