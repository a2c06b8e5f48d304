"""A small HTTP/1.1 keep-alive load client on asyncio streams.

It parses only the status line, Content-Length (or chunked framing) and the body bytes: at the request rates
the servers reach on this machine that costs a fraction of the server's CPU, so the client is not the limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# (connection index, request number on that connection) -> the raw request bytes.
RequestFactory = Callable[[int, int], bytes]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Returns (status, body, server_keeps_connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = -1
    chunked = False
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif key == b"connection" and b"close" in value.lower():
            keep = False
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        return status, b"".join(parts), keep
    if length < 0:
        if keep:
            raise ValueError("response without Content-Length on a keep-alive connection")
        return status, await reader.read(), keep
    return status, await reader.readexactly(length), keep


async def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            status, body, _ = await _read_response(reader)
            return status, body
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


def get_request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def json_request(method: str, host: str, path: str, body: bytes) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class HttpResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


async def run_http_load(
    host: str,
    port: int,
    factory: RequestFactory,
    *,
    connections: int,
    duration: float,
    warmup: float,
) -> HttpResult:
    """Closed loop: each connection sends its next request as soon as the previous answer is read.

    Requests that start during the first `warmup` seconds are sent but not counted, so connection set-up
    and the servers' lazy initialisation stay out of the figures.
    """
    result = HttpResult()
    start = time.perf_counter()
    counted_from = start + warmup
    end = counted_from + duration

    async def one(conn_index: int) -> None:
        n = 0
        while time.perf_counter() < end:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                result.errors += 1
                await asyncio.sleep(0.05)
                continue
            try:
                while time.perf_counter() < end:
                    request = factory(conn_index, n)
                    n += 1
                    t0 = time.perf_counter()
                    writer.write(request)
                    status, _, keep = await _read_response(reader)
                    t1 = time.perf_counter()
                    if t0 >= counted_from:
                        result.requests += 1
                        result.statuses[status] += 1
                        result.latencies.append(t1 - t0)
                        if not 200 <= status < 300:
                            result.errors += 1
                    if not keep:
                        break
            except (OSError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
            finally:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))
    result.seconds = duration
    return result
