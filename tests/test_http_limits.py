"""Bounds on what an HTTP client can make the server hold: request heads (bytes, headers, time), silent
connections, clients that abort pipelined requests, and whose X-Forwarded-For is believed.

Everything goes over real loopback sockets to a real `realtime serve`; the timeout tests use a server of their
own with a header timeout of one second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from realtime.dsn import Dsn
from tests.support.server import ServerProcess, running_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(60)

HEADER_TIMEOUT_S = 1.0
# How long a test waits for the server to act on a one-second timeout before calling it stuck.
CLOSE_DEADLINE_S = 10.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/problem+json"
        problem: dict[str, Any] = json.loads(self.body)
        assert problem["status"] == self.status
        return problem


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset after its answer counts as closing)."""
    received = b""
    while True:
        try:
            chunk = await reader.read(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


async def connect(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def head(*headers: str, target: str = "/healthz") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def log_path(artifacts_dir: Path, request: pytest.FixtureRequest) -> Path:
    return artifacts_dir / f"{request.node.name}.log"


@pytest.fixture(scope="module")
async def strict_server(database_url: Dsn, artifacts_dir: Path) -> AsyncIterator[ServerProcess]:
    """A server with a one-second header timeout that trusts X-Forwarded-For from loopback."""
    env = {"HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "FORWARDED_ALLOW_IPS": "127.0.0.1"}
    async with running_server(database_url, artifacts_dir / "http-limits-strict.log", env=env) as server:
        yield server


async def test_oversized_head_is_refused_at_once_while_healthz_stays_fast(server: ServerProcess) -> None:
    """1 MB request heads get 431 problem+json in well under a second, and /healthz answers fast meanwhile."""
    oversized = head("X-Big: " + "a" * 1_000_000)
    attacks_done = asyncio.Event()
    probe_seconds: list[float] = []

    async def attack() -> tuple[Answer, float]:
        reader, writer = await connect(server)
        started = time.monotonic()
        writer.write(oversized)
        try:
            raw = await asyncio.wait_for(read_to_end(reader), 10)
        finally:
            await close(writer)
        return parse(raw), time.monotonic() - started

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            while not attacks_done.is_set() or not probe_seconds:
                started = time.monotonic()
                assert (await client.get("/healthz")).status_code == 200
                probe_seconds.append(time.monotonic() - started)

    probing = asyncio.create_task(probe())
    try:
        results = await asyncio.gather(*(attack() for _ in range(20)))
    finally:
        attacks_done.set()
        await asyncio.wait_for(probing, 10)
    for answer, seconds in results:
        assert answer.status == 431
        assert answer.problem()["type"] == "/problems/headers-too-large"
        assert answer.headers["connection"] == "close"
        assert seconds < 1.0
    assert max(probe_seconds) < 1.0


async def test_head_bound_counts_the_head_not_the_body(server: ServerProcess) -> None:
    """A head one byte over 32 KiB gets 431; a small head followed in the same write by a 200 KB body is served."""
    line = "X-Pad: "
    request = head(line)
    over = head(line + "a" * (32_768 - len(request) + 1))
    reader, writer = await connect(server)
    writer.write(over)
    answer = parse(await asyncio.wait_for(read_to_end(reader), 10))
    await close(writer)
    assert answer.status == 431

    body = json.dumps({"name": "Pad", "email": "pad@example.com", "pad": "p" * 200_000}).encode()
    post = (
        b"POST /users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    reader, writer = await connect(server)
    writer.write(post + body)
    answer = parse(await asyncio.wait_for(read_to_end(reader), 10))
    await close(writer)
    assert answer.status == 422  # read whole and validated: `pad` is not a field of a user
    assert answer.problem()["errors"][0]["field"] == "pad"


async def test_too_many_headers_are_refused(server: ServerProcess) -> None:
    """A request with more than HTTP_MAX_HEADERS (100) headers gets 431; one with exactly 100 is served."""
    answers = []
    for count in (100, 101):
        extra = [f"X-H{i}: v" for i in range(count - 2)]  # plus Host and Connection
        reader, writer = await connect(server)
        writer.write(head("Connection: close", *extra))
        answers.append(parse(await asyncio.wait_for(read_to_end(reader), 10)))
        await close(writer)
    served, refused = answers
    assert served.status == 200
    assert refused.status == 431
    assert refused.problem()["type"] == "/problems/too-many-headers"


async def test_trickled_head_is_cut_by_the_header_timeout(strict_server: ServerProcess) -> None:
    """A head sent one header line every half second gets 408 and is closed after HTTP_HEADER_TIMEOUT_S."""
    reader, writer = await connect(strict_server)

    async def trickle() -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for number in range(1000):
            await asyncio.sleep(HEADER_TIMEOUT_S / 2)  # the pace of the slow client, not a wait for the server
            writer.write(b"X-Slow-%d: v\r\n" % number)

    trickling = asyncio.create_task(trickle())
    try:
        raw = await asyncio.wait_for(read_to_end(reader), CLOSE_DEADLINE_S)
    finally:
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)
        await close(writer)
    answer = parse(raw)
    assert answer.status == 408
    assert answer.problem()["type"] == "/problems/request-timeout"


async def test_stalled_head_after_a_response_is_cut_by_the_header_timeout(strict_server: ServerProcess) -> None:
    """On a keep-alive connection, the next request's head has HTTP_HEADER_TIMEOUT_S from its first bytes: 408."""
    reader, writer = await connect(strict_server)
    writer.write(head())
    first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 10)
    assert parse(first).status == 200
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
    try:
        answer = parse(await asyncio.wait_for(read_to_end(reader), CLOSE_DEADLINE_S))
    finally:
        await close(writer)
    assert answer.status == 408


async def test_silent_connection_is_closed_without_an_answer(strict_server: ServerProcess) -> None:
    """A connection that sends nothing is closed after HTTP_HEADER_TIMEOUT_S, with nothing written to it."""
    reader, writer = await connect(strict_server)
    try:
        received = await asyncio.wait_for(read_to_end(reader), CLOSE_DEADLINE_S)
    finally:
        await close(writer)
    assert received == b""


def abort_pipelined(port: int, connections: int, requests: int) -> None:
    """Send `requests` pipelined GETs of the demo page on each connection, then reset it without reading."""
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head(target="/") * requests)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_client_aborting_pipelined_requests_logs_no_error(database_url: Dsn, log_path: Path) -> None:
    """Resetting a connection with pipelined requests unanswered is routine: no ERROR and no traceback."""
    async with running_server(database_url, log_path) as server:
        # The demo page is answered from a worker thread, so the resets land while responses are being written.
        await asyncio.to_thread(abort_pipelined, server.port, 30, 10)
        # Answered after the aborted connections' requests were read (they were sent before it connected).
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
    # Stopped, and uvicorn's graceful shutdown waits for requests under way: what they log is in the file now.
    log = await asyncio.to_thread(log_path.read_text, errors="replace")
    assert "ERROR" not in log
    assert "Traceback" not in log


async def forwarded_request_logged_as(server: ServerProcess) -> str:
    """The client address the access log gives a request sent with a forged X-Forwarded-For."""
    marker = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        response = await client.get("/healthz", params={"probe": marker}, headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status_code == 200

    async def access_line() -> str | None:
        lines = (await asyncio.to_thread(server.log_text)).splitlines()
        return next((line for line in lines if marker in line), None)

    line: str = await eventually(access_line, 10, "the request's access log line")
    return line.split(" - ")[0].split()[-1]


async def test_forwarded_for_is_ignored_by_default(server: ServerProcess) -> None:
    """With FORWARDED_ALLOW_IPS unset, X-Forwarded-For from loopback is not believed: the socket peer is logged."""
    assert (await forwarded_request_logged_as(server)).startswith("127.0.0.1:")


async def test_forwarded_for_is_believed_from_configured_proxies(strict_server: ServerProcess) -> None:
    """With FORWARDED_ALLOW_IPS=127.0.0.1, X-Forwarded-For from loopback names the client in the access log."""
    assert (await forwarded_request_logged_as(strict_server)).startswith("203.0.113.9:")
