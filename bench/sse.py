"""`python -m bench.sse`: what a Server-Sent Events stream costs the server against a WebSocket.

Both transports carry the same change frames from the same hub (docs/sse.md); an SSE stream turns each frame into
an event and writes it as one chunk of an HTTP response, where a WebSocket writes the frame itself. This measures
what that costs per delivered change and per idle connection. Per round (transports alternating, the order
flipping every round), per transport, one fresh `realtime serve` on the database bench_sse:

    server ready -> RSS settles -> --idle clients subscribe to `users` -> RSS settles -> they close
    -> --subscribers clients subscribe to `users`
    -> warm-up: --warmup s of writes, every client has every change
    -> measured: CPU window opens, --rate single-row UPDATEs/s for --seconds (a child process, open loop),
       every client has every change (or --drain-timeout passes), CPU window closes
    -> clients close, server stops

Reported per transport, median (lowest-highest) over the rounds: server CPU (utime + stime of the server's
process tree from /proc, over writes and drain) per delivered event; the server's RSS (VmRSS) with the idle
connections open minus before they opened, per connection; the clients' own CPU per event; and the changes lost
(a client short of the changes committed). Then SSE / WebSocket for each figure.

The clients are alike on purpose, so that only the server's side differs: asyncio Protocols on raw sockets in
this process, each sending one request and then reading only framing. A WebSocket client sends the handshake and
one subscribe frame, then walks frame headers, counting text frames (pings are answered); an SSE client sends
`GET /sse/users` with `Accept: text/event-stream`, then walks the chunked encoding's size lines, counting `id:`
lines. Neither decodes JSON. Each checks only that its first message is `subscribed`. The writers run in a child
process so the clients' loop cannot bunch their commits (bunched changes reach a socket in fewer writes, which
would favour the WebSocket, whose sink joins a batch into one write).

Uses its own database, `bench_sse`, recreated at the start and seeded with --rows users; PostgreSQL at BENCH_PG
as for `python -m bench`. Results go to results/sse.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, cast

from bench import db
from bench.instructions import recreate_database
from bench.loop import run_fast
from bench.proc import CpuWindow, process_tree, raise_nofile_limit, self_cpu_seconds
from bench.report import ScenarioResult, machine_info, render, write_json
from bench.servers import BENCH_DIR, ServerSpec, running
from bench.writers import ChangeWriters

DATABASE = "bench_sse"
SPEC = ServerSpec("realtime", "realtime", DATABASE, "healthz", broadcasts=False)
Transport = Literal["ws", "sse"]
TRANSPORTS: tuple[Transport, Transport] = ("ws", "sse")
NAMES = {"ws": "WebSocket", "sse": "SSE"}
CONNECT_CONCURRENCY = 50  # clients opening at once: enough to be quick, few enough for the accept backlog
SUBSCRIBE_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 10.0
# RSS counts as settled when five readings 0.2 s apart lie within this: 64 bytes per connection at 1,000.
SETTLE_BYTES = 64 * 1024
SETTLE_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 16 * 1024

_OP_TEXT, _OP_CLOSE, _OP_PING, _OP_PONG = 0x1, 0x8, 0x9, 0xA
_SUBSCRIBE = b'{"type":"subscribe","id":"b","table":"users"}'


@dataclass(frozen=True)
class Options:
    subscribers: int
    idle: int
    rate: float
    seconds: float
    warmup: float
    writers: int
    rows: int
    rounds: int
    drain_timeout: float
    results: Path


# --- the clients -------------------------------------------------------------------------------------------------


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame with a zero mask key (payloads here are under 126 bytes): the masked bytes are the
    payload itself, so sending costs no XOR pass."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class StreamClient(asyncio.Protocol):
    """One subscriber of the whole `users` table; counts what it is sent by reading only the transport's framing.

    `messages` counts every positioned message, the `subscribed` answer included; `events` are the changes.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.subscribed: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.messages = 0
        self.error: str | None = None
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._in_body = False
        self._closing = False

    @property
    def events(self) -> int:
        return max(0, self.messages - 1)

    def request(self) -> bytes:
        raise NotImplementedError

    def accept(self, head: bytes) -> bool:
        raise NotImplementedError

    def body(self, data: bytes) -> None:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but offer the same methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request())

    def data_received(self, data: bytes) -> None:
        if self._in_body:
            self.body(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self.fail("response head too large")
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        if not self.accept(head):
            status_line = head.split(b"\r\n", 1)[0]
            self.fail(f"refused: {status_line.decode(errors='replace')}")
            return
        self._in_body = True
        if rest:
            self.body(rest)

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def mark_subscribed(self) -> None:
        if not self.subscribed.done():
            self.subscribed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None and not self._closing:
            # Ended by the server or the network, not by the bench: the changes it misses count as lost.
            self.error = f"connection lost ({exc!r})" if exc else "closed by the server"
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"connection lost before subscribed: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()


class WsClient(StreamClient):
    """Handshake, one subscribe frame, then frame headers: a text frame after `subscribed` is a change."""

    def __init__(self) -> None:
        super().__init__()
        self._skip = 0  # payload bytes of a counted frame still to come
        self._rest = b""  # an incomplete frame header, or a frame whose payload is read

    def request(self) -> bytes:
        key = base64.b64encode(os.urandom(16))
        return (
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def accept(self, head: bytes) -> bool:
        if not head.startswith(b"HTTP/1.1 101"):
            return False
        assert self.transport is not None
        self.transport.write(_client_frame(_OP_TEXT, _SUBSCRIBE))
        return True

    def body(self, data: bytes) -> None:
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        if self._rest:
            data = self._rest + data
            self._rest = b""
        pos, size = 0, len(data)
        while size - pos >= 2:
            opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length, start = int.from_bytes(data[pos + 2 : pos + 4]), pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, start = int.from_bytes(data[pos + 2 : pos + 10]), pos + 10
            end = start + length
            if opcode == _OP_TEXT and self.messages:
                # A change: its header is all that is read; the payload is skipped, here or in the next reads.
                self.messages += 1
                if end > size:
                    self._skip = end - size
                    return
                pos = end
                continue
            if end > size:
                break  # the subscribe answer or a control frame: its payload is read, so wait for all of it
            payload = data[start:end]
            pos = end
            if opcode == _OP_TEXT:
                if not payload.startswith(b'{"type":"subscribed"'):
                    self.fail(f"answer to subscribe: {payload[:200].decode(errors='replace')}")
                    return
                self.messages = 1
                self.mark_subscribed()
            elif opcode == _OP_PING:
                assert self.transport is not None
                self.transport.write(_client_frame(_OP_PONG, payload))
            elif opcode == _OP_CLOSE:
                self.fail(f"closed by the server: {int.from_bytes(payload[:2]) if payload else 1005}")
                return
        self._rest = data[pos:]


class SseClient(StreamClient):
    """`GET /sse/users`, then the chunked encoding's size lines; each `id:` line is a positioned event."""

    def __init__(self) -> None:
        super().__init__()
        self._left = 0  # bytes of the current chunk still to come
        self._crlf = 0  # bytes of the line break closing a chunk still to come
        self._rest = b""  # an incomplete size line
        self._tail = b""  # the last 3 bytes of the event stream, for an `\nid:` split between reads
        self._early = b""  # the stream up to `subscribed`, which is checked once

    def request(self) -> bytes:
        return b"GET /sse/users HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"

    def accept(self, head: bytes) -> bool:
        return head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()

    def body(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
            self._rest = b""
        pos, size = 0, len(data)
        while pos < size:
            if self._left:
                end = min(size, pos + self._left)
                self._stream(data[pos:end])
                self._left -= end - pos
                pos = end
                if not self._left:
                    self._crlf = 2
            elif self._crlf:
                step = min(self._crlf, size - pos)
                pos += step
                self._crlf -= step
            else:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    self._rest = data[pos:]
                    return
                length = int(data[pos:line_end].split(b";", 1)[0], 16)
                pos = line_end + 2
                if not length:
                    self.fail("the server ended the stream")
                    return
                self._left = length

    def _stream(self, piece: bytes) -> None:
        # A match across the previous piece and this one starts in the 3-byte tail; one inside the piece does not.
        self.messages += (self._tail + piece[:3]).count(b"\nid:") + piece.count(b"\nid:")
        self._tail = (self._tail + piece)[-3:]
        if self.subscribed.done():
            return
        self._early += piece
        if b"event: subscribed\n" in self._early:
            self._early = b""
            self.mark_subscribed()
        elif b"event: end\n" in self._early or len(self._early) > MAX_HEAD_BYTES:
            self.fail(f"stream before subscribed: {self._early[:200].decode(errors='replace')}")


async def open_clients(transport: Transport, port: int, count: int) -> list[StreamClient]:
    """`count` clients, each subscribed; all are closed again if any fails."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    factory = WsClient if transport == "ws" else SseClient

    async def one() -> StreamClient:
        async with gate:
            _, client = await loop.create_connection(factory, "127.0.0.1", port)
            try:
                await asyncio.wait_for(asyncio.shield(client.subscribed), SUBSCRIBE_TIMEOUT_S)
            except BaseException:
                client.close()
                raise
            return client

    outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    clients = [o for o in outcomes if isinstance(o, StreamClient)]
    errors = [o for o in outcomes if not isinstance(o, StreamClient)]
    if errors:
        await close_clients(clients)
        raise RuntimeError(f"{len(errors)} of {count} {NAMES[transport]} clients did not subscribe: {errors[0]!r}")
    return clients


async def close_clients(clients: list[StreamClient]) -> None:
    for client in clients:
        client.close()
    if clients:
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), CLOSE_TIMEOUT_S)


async def until_delivered(clients: list[StreamClient], expected: int, timeout: float) -> None:
    """Until every client has `expected` changes, one has lost its connection, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.events >= expected or c.closed.done() for c in clients):
            return
        await asyncio.sleep(0.02)


# --- the server's memory ---------------------------------------------------------------------------------------


def vm_rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and its descendants, from /proc/<pid>/status."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except FileNotFoundError:
            continue
    return total


async def settled_rss(pid: int) -> int:
    """RSS once five readings 0.2 s apart agree within SETTLE_BYTES (or after SETTLE_TIMEOUT_S)."""
    readings: list[int] = []
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        readings.append(vm_rss_bytes(pid))
        last = readings[-5:]
        if (len(last) == 5 and max(last) - min(last) <= SETTLE_BYTES) or time.monotonic() > deadline:
            return readings[-1]
        await asyncio.sleep(0.2)


# --- the writers (in a child process) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Writes:
    offered: int
    committed: int
    failed: int
    seconds: float
    max_lag_s: float

    @property
    def rate(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0


def write_updates(rate: float, seconds: float, rows: int, writers: int) -> Writes:
    """Single-row UPDATEs of ids 1..rows in turn, `rate` per second for `seconds`, open loop."""
    return asyncio.run(_write_updates(rate, seconds, rows, writers))


async def _write_updates(rate: float, seconds: float, rows: int, writers: int) -> Writes:
    async with ChangeWriters(DATABASE, writers) as source:
        stats = await source.run(rate=rate, seconds=seconds, ids=range(1, rows + 1), mode="updates")
    return Writes(stats.offered, stats.committed, stats.failed, stats.seconds, stats.max_lag_s)


# --- one transport, one round ----------------------------------------------------------------------------------


@dataclass
class Run:
    transport: Transport
    round: int
    rss_before: int
    rss_idle: int
    warmup: Writes
    writes: Writes
    expected: int  # changes every client should have: warm-up and measured
    delivered: int  # events the clients received in the measured window
    lost: int  # changes committed that a client never received, summed over the clients
    extra: int  # events beyond the changes committed
    closed: list[str]  # clients whose connection ended early, and why (the first few)
    server_cpu_s: float
    client_cpu_s: float
    window_s: float
    idle: int

    @property
    def idle_kib_per_connection(self) -> float:
        return (self.rss_idle - self.rss_before) / 1024 / self.idle

    @property
    def server_us_per_event(self) -> float:
        return self.server_cpu_s / self.delivered * 1e6 if self.delivered else float("nan")

    @property
    def client_us_per_event(self) -> float:
        return self.client_cpu_s / self.delivered * 1e6 if self.delivered else float("nan")


async def run_transport(options: Options, transport: Transport, round_number: int, pool: ProcessPoolExecutor) -> Run:
    loop = asyncio.get_running_loop()

    async def write(seconds: float) -> Writes:
        return await loop.run_in_executor(pool, write_updates, options.rate, seconds, options.rows, options.writers)

    async with running(SPEC, options.results / "logs") as server:
        rss_before = await settled_rss(server.pid)
        idle = await open_clients(transport, server.port, options.idle)
        try:
            rss_idle = await settled_rss(server.pid)
        finally:
            await close_clients(idle)
        clients = await open_clients(transport, server.port, options.subscribers)
        try:
            warmup = await write(options.warmup)
            await until_delivered(clients, warmup.committed, options.drain_timeout)
            before = [c.events for c in clients]
            cpu = CpuWindow(server.pid)
            cpu.start()
            client_cpu = self_cpu_seconds()
            began = time.monotonic()
            writes = await write(options.seconds)
            expected = warmup.committed + writes.committed
            await until_delivered(clients, expected, options.drain_timeout)
            cpu.stop()
            window = time.monotonic() - began
            client_cpu = self_cpu_seconds() - client_cpu
            counts = [c.events for c in clients]
            closed = [c.error or "closed" for c in clients if c.closed.done()]
        finally:
            await close_clients(clients)
    return Run(
        transport=transport,
        round=round_number,
        rss_before=rss_before,
        rss_idle=rss_idle,
        warmup=warmup,
        writes=writes,
        expected=expected,
        delivered=sum(n - b for n, b in zip(counts, before, strict=True)),
        lost=sum(max(0, expected - n) for n in counts),
        extra=sum(max(0, n - expected) for n in counts),
        closed=closed[:5],
        server_cpu_s=cpu.seconds,
        client_cpu_s=client_cpu,
        window_s=window,
        idle=options.idle,
    )


def describe(run: Run) -> str:
    w = run.writes
    return (
        f"round {run.round + 1} {NAMES[run.transport]:9}: server {run.server_us_per_event:.2f} µs/event"
        f" ({run.server_cpu_s:.2f} s for {run.delivered:,} events over {run.window_s:.1f} s);"
        f" idle {run.idle_kib_per_connection:.1f} KiB/conn ({run.rss_before / 2**20:.1f} ->"
        f" {run.rss_idle / 2**20:.1f} MiB with {run.idle:,});"
        f" clients {run.client_us_per_event:.2f} µs/event; lost {run.lost}, extra {run.extra},"
        f" closed {len(run.closed)}; writes {w.committed}/{w.offered} at {w.rate:,.0f}/s"
        f" (worst slip {w.max_lag_s * 1000:.0f} ms)"
    )


# --- the report -------------------------------------------------------------------------------------------------


def _spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def _figures(run: Run) -> dict[str, float]:
    return {
        "server_us_per_event": run.server_us_per_event,
        "idle_kib_per_connection": run.idle_kib_per_connection,
        "client_us_per_event": run.client_us_per_event,
    }


COLUMNS = [
    "transport",
    "server µs/event",
    "idle KiB/conn",
    "client µs/event",
    "events/round",
    "lost",
    "writes/s",
    "worst slip ms",
]


def summarize(options: Options, runs: list[Run]) -> ScenarioResult:
    result = ScenarioResult(
        name="sse",
        title=(
            f"SSE against WebSocket: {options.subscribers} subscribers of `users`, {options.rate:,.0f} UPDATEs/s"
            f" for {options.seconds:g} s; idle memory at {options.idle:,} connections;"
            f" median (lowest-highest) over {options.rounds} round(s)"
        ),
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        columns=COLUMNS,
    )
    medians: dict[Transport, dict[str, float]] = {}
    for transport in TRANSPORTS:
        mine = [r for r in runs if r.transport == transport]
        figures = [_figures(r) for r in mine]
        by_name = {name: [f[name] for f in figures] for name in figures[0]}
        medians[transport] = {name: statistics.median(values) for name, values in by_name.items()}
        result.rows.append(
            [
                NAMES[transport],
                _spread(by_name["server_us_per_event"]),
                _spread(by_name["idle_kib_per_connection"], 1),
                _spread(by_name["client_us_per_event"]),
                _spread([float(r.delivered) for r in mine], 0),
                str(sum(r.lost for r in mine)),
                _spread([r.writes.rate for r in mine], 0),
                _spread([r.writes.max_lag_s * 1000 for r in mine], 0),
            ]
        )
        result.summary[transport] = {
            name: {"median": statistics.median(values), "min": min(values), "max": max(values)}
            for name, values in by_name.items()
        } | {"lost": sum(r.lost for r in mine), "extra": sum(r.extra for r in mine)}
    for name in ("server_us_per_event", "idle_kib_per_connection", "client_us_per_event"):
        result.ratios[f"{name} sse/ws (medians)"] = medians["sse"][name] / medians["ws"][name]
        # The two transports of one round ran minutes apart under the same neighbours: their ratio drifts less.
        per_round = [
            _figures(s)[name] / _figures(w)[name]
            for w in runs
            if w.transport == "ws"
            for s in runs
            if s.transport == "sse" and s.round == w.round
        ]
        result.summary.setdefault("ratios_per_round", {})[name] = per_round
        result.notes.append(f"{name} sse/ws round by round: {_spread(per_round)}")
    for run in runs:
        problems = []
        if run.lost or run.extra:
            problems.append(f"lost {run.lost}, extra {run.extra}")
        if run.closed:
            problems.append(f"connections ended early: {'; '.join(run.closed)}")
        if run.writes.failed or run.warmup.failed:
            problems.append(f"{run.writes.failed + run.warmup.failed} writes failed")
        for problem in problems:
            result.notes.append(f"round {run.round + 1} {NAMES[run.transport]}: {problem}")
    result.runs = [
        {
            **asdict(run),
            "server_us_per_event": run.server_us_per_event,
            "client_us_per_event": run.client_us_per_event,
            "idle_kib_per_connection": run.idle_kib_per_connection,
        }
        for run in runs
    ]
    return result


# --- the command ------------------------------------------------------------------------------------------------


def prepare_database(rows: int) -> None:
    """A fresh bench_sse migrated by this checkout's `realtime` (which streams `users`), holding `rows` users."""
    url = recreate_database(db.dsn("postgres"), DATABASE)
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "warning"}
    subprocess.run([str(db.realtime_cli()), "migrate"], env=env, check=True, capture_output=True, timeout=300)
    asyncio.run(db.reset_users(DATABASE, rows))


async def measure(options: Options) -> list[Run]:
    runs: list[Run] = []
    # Spawned, not forked: a fork of a process running an event loop with a thousand sockets shares too much.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for round_number in range(options.rounds):
            began = time.monotonic()
            order = TRANSPORTS if round_number % 2 == 0 else TRANSPORTS[::-1]
            for transport in order:
                run = await run_transport(options, transport, round_number, pool)
                print(describe(run), flush=True)
                runs.append(run)
            print(f"round {round_number + 1} took {time.monotonic() - began:.0f} s", flush=True)
    return runs


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.sse", description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=200, help="clients of `users` per run (default 200)")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure (default 1000)")
    parser.add_argument("--rate", type=float, default=200, help="single-row UPDATEs per second (default 200)")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds of writes (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured seconds of writes first (default 2)")
    parser.add_argument("--writers", type=int, default=4, help="writer connections (default 4)")
    parser.add_argument("--rows", type=int, default=1000, help="users rows, updated in turn (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each transport once per round (default 3)")
    parser.add_argument(
        "--drain-timeout", type=float, default=30, help="seconds the clients get to receive every change (default 30)"
    )
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="where the JSON goes")
    args = parser.parse_args(argv)
    for name in ("subscribers", "idle", "writers", "rows", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("rate", "seconds", "warmup", "drain_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return Options(
        subscribers=args.subscribers,
        idle=args.idle,
        rate=args.rate,
        seconds=args.seconds,
        warmup=args.warmup,
        writers=args.writers,
        rows=args.rows,
        rounds=args.rounds,
        drain_timeout=args.drain_timeout,
        results=args.results,
    )


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    raise_nofile_limit()
    machine = machine_info()
    print(f"machine: {machine['cores']} cores, load {machine['loadavg']}", flush=True)
    started = time.monotonic()
    prepare_database(options.rows)
    runs = run_fast(measure(options))
    result = summarize(options, runs)
    print(render(result))
    print(f"   ({time.monotonic() - started:.0f} s, {write_json(result, options.results, machine, quick=False)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
