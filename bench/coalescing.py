"""`python -m bench.coalescing`: what `"coalesce": true` does for subscribers on slow links, against being cut.

A subscriber that reads more slowly than its table changes falls behind. Without the option its queue overflows
and it is closed with 4008 (or, if even the close frame cannot get through in time, dropped), and it resumes with
`since` only to fall behind again. With the option its backlog is one merged frame per row (docs/protocol.md,
"Coalescing for slow links"). This scenario measures both on the same server, per round (modes alternating):

    fresh `realtime serve` on bench_coalescing (table `hot`, --rows rows with a --payload-byte text column)
      per mode:
        --subscribers WebSockets (8 KiB receive buffer, max_queue=1) subscribe to `hot` with a snapshot
          (and `coalesce`), then read at --read-bytes-per-s each: after each frame, sleep len(frame) / rate
        writers (a child process, so the subscribers' loop cannot delay their schedule) commit --rate
          single-row UPDATEs of random rows per second for --seconds, open loop
        writes stop: every subscriber reads at full speed until it has seen the table's last position
          (a subscriber that was closed resumes with `since` its last seq, slowly while writes run)
        each view (snapshot + frames by the view rules) is compared with the table; a few subscribers
          (--audit) are checked at every frame carrying `tx_end` against the table at that position,
          rebuilt from the changelog

The link's slowness must reach the server, not vanish into its kernel: the server learns it is behind only when
its socket's send buffer is full, and Linux grows that buffer with the segment size. Over loopback (64 KiB
segments) it grew to megabytes per socket (2.7 MB unsent after 5 s here, up to tcp_wmem's 4 MiB), so neither
coalescing nor the 4008 close happened until several seconds of changes sat in the kernel. Each subscriber
therefore offers the segment size of an Ethernet link (--mss 1460, TCP_MAXSEG before connecting), which keeps
the server's buffer near what a real slow link gets; `--mss 0` measures loopback as it is.

Reported per mode: bytes and change frames received per subscriber (median, lowest, highest over every
subscriber of every round), closes with 4008 and other drops, how long after the writes stopped the subscribers
had caught up (the median one and the last one), how many views equal the table, the server's CPU seconds over
writes + catch-up, and what the writers achieved. The subscribers run in this process, the writers in a child;
neither is counted in the server's CPU. Every phase has a deadline, so a run that cannot keep up still ends.

Uses its own database, `bench_coalescing`, recreated at the start; PostgreSQL at BENCH_PG as for `python -m bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench import db
from bench.instructions import recreate_database
from bench.loop import run_fast
from bench.proc import CpuWindow, raise_nofile_limit, self_cpu_seconds
from bench.report import ScenarioResult, machine_info, render, write_json
from bench.servers import BENCH_DIR, RunningServer, ServerSpec, running

DATABASE = "bench_coalescing"
TABLE = "hot"
SPEC = ServerSpec("realtime", "realtime", DATABASE, "healthz", broadcasts=False)
RECEIVE_BUFFER = 8192  # the kernel doubles it; with max_queue=1 this is about all a subscriber holds unread
CONNECT_CONCURRENCY = 50  # subscribers opening and taking their snapshot at once
SETUP_TIMEOUT_S = 180.0
CLOSE_TIMEOUT_S = 5.0

Row = dict[str, Any]


@dataclass(frozen=True)
class Options:
    rows: int
    payload: int
    subscribers: int
    read_bytes_per_s: float
    mss: int
    rate: float
    seconds: float
    writers: int
    rounds: int
    catchup_timeout: float
    audit: int
    server_env: dict[str, str]
    results: Path


# --- the database ----------------------------------------------------------------------------------------------


def prepare_database(rows: int, payload: int) -> None:
    """A fresh bench_coalescing, migrated by this checkout's `realtime`, holding `hot` with `rows` rows, streamed.

    The stream is enabled before the rows are inserted, so the changelog holds the table's whole history and the
    audit can rebuild the table at any position from it.
    """
    url = recreate_database(db.dsn("postgres"), DATABASE)
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "warning"}
    subprocess.run([str(db.realtime_cli()), "migrate"], env=env, check=True, capture_output=True, timeout=300)

    async def create() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, n bigint NOT NULL, v text NOT NULL)")
            await conn.execute("SELECT realtime.enable_stream($1::text::regclass)", TABLE)
            await conn.execute(
                f"INSERT INTO {TABLE} SELECT g, 0, repeat('s', $2) FROM generate_series(1, $1) AS g", rows, payload
            )
        finally:
            await conn.close()

    asyncio.run(create())


async def table_state(conn: asyncpg.Connection) -> dict[int, Row]:
    records = await conn.fetch(f"SELECT to_jsonb(t)::text AS row FROM {TABLE} t")
    state: dict[int, Row] = {}
    for record in records:
        row = orjson.loads(record["row"])
        state[row["id"]] = row
    return state


async def head(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT COALESCE(max(seq), 0) FROM realtime.changes WHERE table_schema = 'public' AND table_name = $1",
            TABLE,
        )
    )


@dataclass(frozen=True)
class Logged:
    """One change of `hot` as the changelog holds it: the ground truth the audit replays."""

    seq: int
    op: str
    row: Row | None
    old: Row | None


async def changelog(conn: asyncpg.Connection) -> list[Logged]:
    records = await conn.fetch(
        "SELECT seq, op, new_row::text AS row, old_row::text AS old FROM realtime.changes"
        " WHERE table_schema = 'public' AND table_name = $1 ORDER BY seq",
        TABLE,
    )
    return [
        Logged(
            int(r["seq"]),
            r["op"],
            orjson.loads(r["row"]) if r["row"] is not None else None,
            orjson.loads(r["old"]) if r["old"] is not None else None,
        )
        for r in records
    ]


# --- the writers (run in a child process) ----------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    offered: int
    committed: int
    failed: int
    started: float  # time.monotonic(), the same clock in every process on Linux
    finished: float  # the last commit
    max_lag_s: float  # the worst slip behind the open-loop schedule

    @property
    def achieved_rate(self) -> float:
        return self.committed / (self.finished - self.started) if self.finished > self.started else 0.0


def write_changes(
    url: str, rows: int, payload: int, rate: float, seconds: float, writers: int, seed: int
) -> WriteResult:
    """Commit rate x seconds single-row UPDATEs of random rows; change i is due at start + i / rate."""
    return asyncio.run(_write_changes(url, rows, payload, rate, seconds, writers, seed))


async def _write_changes(
    url: str, rows: int, payload: int, rate: float, seconds: float, writers: int, seed: int
) -> WriteResult:
    pick = random.Random(seed)
    total = max(1, round(rate * seconds))
    targets = [pick.randint(1, rows) for _ in range(total)]
    filler = "".join(pick.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(payload))
    conns = [await asyncpg.connect(url) for _ in range(writers)]
    committed = failed = 0
    max_lag = 0.0
    start = time.monotonic() + 0.05
    finished = start

    async def writer(w: int, conn: asyncpg.Connection) -> None:
        nonlocal committed, failed, max_lag, finished
        for i in range(w, total, writers):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            # Each value differs from the row's last one, so every merged frame stands for real change.
            value = f"{i:010d}" + filler[: max(0, payload - 10)]
            try:
                status = await conn.execute(f"UPDATE {TABLE} SET n = n + 1, v = $2 WHERE id = $1", targets[i], value)
            except asyncpg.PostgresError:
                failed += 1
                continue
            if status == "UPDATE 1":
                committed += 1
                finished = max(finished, time.monotonic())
            else:
                failed += 1

    try:
        await asyncio.gather(*(writer(w, conn) for w, conn in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    return WriteResult(total, committed, failed, start, finished, max_lag)


# --- the subscribers --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """What every subscriber of one mode reads to know how to behave: slowly until the writes stop, then up to
    `target`, the table's last position."""

    read_bytes_per_s: float
    mss: int  # the largest segment each subscriber offers the server (0: loopback's own, 64 KiB)
    slow: bool = True
    target: int | None = None
    writes_stopped: float = 0.0


@dataclass
class Tally:
    """One subscriber's record: its view of the table, and what reaching it took."""

    index: int
    view: dict[int, Row] = field(default_factory=dict)
    snapshot: dict[int, Row] = field(default_factory=dict)
    snapshot_seq: int = 0
    last_seq: int = 0
    last_tx_end: bool = False
    # Where a resume starts: the last frame that is not merged, or ends a merged backlog (docs/protocol.md,
    # "Resuming a coalescing subscription"); merged frames after it wait in `held` and are applied at its tx_end.
    resume_seq: int = 0
    held: list[Row] = field(default_factory=list)
    bytes: int = 0  # every frame after the first `subscribed`: changes, replays, replies
    frames: int = 0  # change frames
    cuts: int = 0  # closed with 4008
    drops: int = 0  # closed any other way (an abort after a stuck send reaches the client as 1006)
    closes: Counter[str] = field(default_factory=Counter)  # every close, by code and reason
    reason_mismatch: int = 0  # a 4008 whose last_seq is not the last seq this subscriber read
    mismatches: list[str] = field(default_factory=list)  # the first few of them
    disorder: int = 0  # a change frame whose seq is not above the one before
    refused: int = 0  # `unavailable` answers to a subscribe (read slots busy), waited out and retried
    connect_failures: int = 0
    subscribed: bool = False
    caught_up_at: float | None = None
    audit: list[Row] | None = None  # every change frame, kept for the subscribers the audit checks


def apply(view: dict[int, Row], frame: Row) -> None:
    """The two view rules (docs/protocol.md, "change"), and `reset` empties the view."""
    kind = frame["view"]
    if kind == "reset":
        view.clear()
    elif kind == "removed":
        view.pop(frame["key"]["id"], None)
    else:
        view[frame["key"]["id"]] = frame["row"]


def take_change(tally: Tally, frame: Row) -> None:
    seq = int(frame["seq"])
    if seq <= tally.last_seq:
        tally.disorder += 1
    tally.last_seq = seq
    tally.last_tx_end = bool(frame.get("tx_end"))
    tally.frames += 1
    if frame.get("coalesced") and not frame.get("tx_end"):
        tally.held.append(frame)
    else:
        for held in tally.held:
            apply(tally.view, held)
        tally.held.clear()
        apply(tally.view, frame)
        tally.resume_seq = seq
    if tally.audit is not None:
        tally.audit.append(frame)


class Refused(Exception):
    """A subscribe answered with an error other than `unavailable`: the bench, not the link, is wrong."""


async def _open_socket(host: str, port: int, mss: int) -> socket.socket:
    # Both are set before connecting: the window and the segment size the client offers are fixed at the handshake.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    if mss:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _pace(phase: Phase, size: int) -> None:
    if phase.slow:
        await asyncio.sleep(size / phase.read_bytes_per_s)


async def _subscribe(ws: ClientConnection, tally: Tally, coalesce: bool, phase: Phase) -> None:
    """Subscribe (a snapshot the first time, `since` the last seq read after that) and read up to `subscribed`."""
    resuming = tally.subscribed
    request: Row = {"type": "subscribe", "ref": 1, "id": "s", "table": TABLE}
    if resuming:
        request["since"] = tally.resume_seq
        tally.held.clear()  # merged frames past the resume point: the replay sends what they stood for
        tally.last_seq = tally.resume_seq
    else:
        request["snapshot"] = True
    if coalesce:
        request["coalesce"] = True
    await ws.send(orjson.dumps(request).decode())
    snapshot: dict[int, Row] = {}
    while True:
        data = await ws.recv(decode=False)
        if resuming:
            tally.bytes += len(data)
        frame = orjson.loads(data)
        kind = frame["type"]
        if kind == "change":  # a `since` replay
            take_change(tally, frame)
            await _pace(phase, len(data))
        elif kind == "snapshot":
            snapshot.update((row["id"], row) for row in frame["rows"])
            tally.snapshot_seq = int(frame["seq"])
        elif kind == "subscribed":
            if not resuming:
                tally.snapshot = snapshot
                tally.view = dict(snapshot)
                tally.last_seq = tally.resume_seq = int(frame["seq"])
                tally.subscribed = True
            return
        elif kind == "error" and frame.get("code") == "unavailable":
            tally.refused += 1
            await asyncio.sleep(frame.get("retry_after_ms", 1000) / 1000 * random.uniform(1.0, 1.5))
            if resuming:
                # A replay refused midway sent valid frames up to here: ask for what comes after them.
                request["since"] = tally.resume_seq
            await ws.send(orjson.dumps(request).decode())
        else:
            raise Refused(f"subscriber {tally.index}: unexpected answer to subscribe: {frame}")


def _close_name(closed: ConnectionClosed) -> str:
    """`4008 too slow`, `1011 keepalive ping timeout (sent)`, `1006`: who closed, how."""
    if closed.rcvd is not None:
        return f"{closed.rcvd.code} {closed.rcvd.reason.split(';')[0]}".strip()
    if closed.sent is not None:
        return f"{closed.sent.code} {closed.sent.reason} (sent)".strip()
    return "1006 no close frame"


async def follow(tally: Tally, server: RunningServer, coalesce: bool, phase: Phase, gate: asyncio.Semaphore) -> None:
    """One subscriber from its first subscribe until it has read the table's last position, resuming after
    every close with `since` as a client of the protocol does."""
    backoff = 0.1
    while True:
        if phase.target is not None and tally.resume_seq >= phase.target:
            tally.caught_up_at = time.monotonic()
            return
        gated = not tally.subscribed
        if gated:
            await gate.acquire()
        elif tally.audit is not None:
            tally.audit.append({"type": "resume", "since": tally.resume_seq, "tx_end": tally.last_tx_end})
        try:
            sock = await _open_socket("127.0.0.1", server.port, phase.mss)
            async with connect(
                server.ws_url,
                sock=sock,
                max_queue=1,  # the library stops reading the socket as soon as one message waits
                max_size=None,
                compression=None,
                ping_interval=None,  # a ping's answer would wait behind everything unread: the link is slow
                open_timeout=30,
                close_timeout=CLOSE_TIMEOUT_S,
            ) as ws:
                await _subscribe(ws, tally, coalesce, phase)
                if gated:
                    gate.release()
                    gated = False
                backoff = 0.1
                while True:
                    if phase.target is not None and tally.resume_seq >= phase.target:
                        tally.caught_up_at = time.monotonic()
                        return
                    data = await ws.recv(decode=False)
                    tally.bytes += len(data)
                    frame = orjson.loads(data)
                    if frame["type"] == "change":
                        take_change(tally, frame)
                    await _pace(phase, len(data))
        except ConnectionClosed as closed:
            received = closed.rcvd
            tally.closes[_close_name(closed)] += 1
            if received is not None and received.code == 4008:
                tally.cuts += 1
                reported = received.reason.rsplit("last_seq=", 1)[-1]
                if not reported.isdigit() or int(reported) != tally.last_seq:
                    tally.reason_mismatch += 1
                    if len(tally.mismatches) < 3:
                        tally.mismatches.append(f"last_seq={reported} after seq {tally.last_seq}")
            else:
                tally.drops += 1
        except (OSError, InvalidHandshake, TimeoutError):
            tally.connect_failures += 1
            await asyncio.sleep(backoff * random.uniform(1.0, 1.5))
            backoff = min(backoff * 2, 5.0)
        finally:
            if gated:
                gate.release()


# --- one mode, one round ------------------------------------------------------------------------------------------


@dataclass
class ModeRun:
    coalesce: bool
    round: int
    subscribers: int
    write: WriteResult
    target: int
    server_cpu_s: float
    db_cpu_s: float
    client_cpu_s: float
    window_s: float  # writes + catch-up
    bytes: list[int]
    frames: list[int]
    read_while_writing: list[int]  # change frames each subscriber had read when the writes stopped
    cuts: int
    subscribers_cut: int
    drops: int
    closes: dict[str, int]
    reason_mismatch: int
    mismatches: list[str]
    disorder: int
    refused: int
    connect_failures: int
    caught_up: int
    catchup_s: list[float]  # per subscriber that caught up, from the writes' end
    equal: int
    last_tx_end: int  # subscribers whose last frame carried tx_end
    audit_points: int
    audit_wrong: list[str]
    wrong: list[str]  # how the first views that differ from the table differ

    @property
    def mode(self) -> str:
        return "coalesce" if self.coalesce else "plain"


def _diff(view: dict[int, Row], table: dict[int, Row], limit: int = 3) -> str:
    keys = sorted(set(view) | set(table))
    differing = [k for k in keys if view.get(k) != table.get(k)]
    shown = []
    for key in differing[:limit]:
        have, want = view.get(key), table.get(key)
        shown.append(f"id {key}: view n={have and have.get('n')} table n={want and want.get('n')}")
    return f"{len(differing)} rows differ ({'; '.join(shown)})"


def audit(tally: Tally, log: list[Logged]) -> tuple[int, str | None]:
    """Check the subscriber's view at its snapshot and at every frame with `tx_end` against the table at that
    position, rebuilt from the changelog. Returns the points checked and the first wrong one."""
    assert tally.audit is not None
    truth: dict[int, Row] = {}
    index = 0

    def advance(seq: int) -> None:
        nonlocal index
        while index < len(log) and log[index].seq <= seq:
            change = log[index]
            if change.op == "TRUNCATE":
                truth.clear()
            elif change.op == "DELETE":
                assert change.old is not None
                truth.pop(change.old["id"], None)
            else:
                assert change.row is not None
                if change.op == "UPDATE" and change.old is not None:
                    truth.pop(change.old["id"], None)
                truth[change.row["id"]] = change.row
            index += 1

    advance(tally.snapshot_seq)
    if tally.snapshot != truth:
        return 1, f"subscriber {tally.index}: snapshot at seq {tally.snapshot_seq}: {_diff(tally.snapshot, truth)}"
    view = dict(tally.snapshot)
    points = 1
    resumed = "before any resume"
    first: str | None = None
    wrong, last_wrong = 0, 0
    held: list[Row] = []
    for frame in tally.audit:
        if frame["type"] == "resume":
            ended = "with" if frame["tx_end"] else "without"
            resumed = f"after a resume with since={frame['since']} (that frame {ended} tx_end)"
            held.clear()
            continue
        if frame.get("coalesced") and not frame.get("tx_end"):
            held.append(frame)
            continue
        for earlier in held:
            apply(view, earlier)
        held.clear()
        apply(view, frame)
        if frame.get("tx_end"):
            points += 1
            advance(int(frame["seq"]))
            if view != truth:
                wrong += 1
                last_wrong = int(frame["seq"])
                if first is None:
                    first = f"at tx_end seq {frame['seq']} (key {frame['key']}) {resumed}: {_diff(view, truth)}"
    if first is None:
        return points, None
    return points, (
        f"subscriber {tally.index}: view differs from the table at {wrong} of {points} tx_end points, first {first},"
        f" last at seq {last_wrong}"
    )


async def _until(tasks: list[asyncio.Task[None]], done: Callable[[], bool], timeout: float) -> None:
    """Wait until `done()` or the deadline, failing at once if a subscriber's task died of an error."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        for task in tasks:
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None:
                    raise error
        await asyncio.sleep(0.05)


async def run_mode(
    options: Options, server: RunningServer, coalesce: bool, round_number: int, pool: ProcessPoolExecutor
) -> ModeRun:
    phase = Phase(options.read_bytes_per_s, options.mss)
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tallies = [Tally(i, audit=[] if i < options.audit else None) for i in range(options.subscribers)]
    tasks = [asyncio.create_task(follow(t, server, coalesce, phase, gate)) for t in tallies]
    conn = await asyncpg.connect(db.dsn(DATABASE))
    try:
        await _until(tasks, lambda: all(t.subscribed for t in tallies), SETUP_TIMEOUT_S)
        if not all(t.subscribed for t in tallies):
            raise RuntimeError(
                f"only {sum(t.subscribed for t in tallies)} of {len(tallies)} subscribers subscribed"
                f" within {SETUP_TIMEOUT_S:.0f} s"
            )
        db_cpu = db.DbCpu(DATABASE)
        await db_cpu.start()
        server_cpu = CpuWindow(server.pid)
        server_cpu.start()
        client_cpu = self_cpu_seconds()
        began = time.monotonic()
        write = await asyncio.get_running_loop().run_in_executor(
            pool,
            write_changes,
            db.dsn(DATABASE),
            options.rows,
            options.payload,
            options.rate,
            options.seconds,
            options.writers,
            round_number * 2 + coalesce,
        )
        phase.writes_stopped = time.monotonic()
        read_while_writing = [t.frames for t in tallies]
        phase.target = await head(conn)
        phase.slow = False
        await _until(tasks, lambda: all(t.done() for t in tasks), options.catchup_timeout)
        window = time.monotonic() - began
        server_cpu.stop()
        client_cpu = self_cpu_seconds() - client_cpu
        await db_cpu.stop()
        table = await table_state(conn)
        log = await changelog(conn) if options.audit else []
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await conn.close()
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    audit_points, audit_wrong = 0, []
    for tally in tallies:
        if tally.audit is not None:
            points, wrong = audit(tally, log)
            audit_points += points
            if wrong is not None:
                audit_wrong.append(wrong)
    caught = [t for t in tallies if t.caught_up_at is not None]
    return ModeRun(
        coalesce=coalesce,
        round=round_number,
        subscribers=len(tallies),
        write=write,
        target=phase.target,
        server_cpu_s=server_cpu.seconds,
        db_cpu_s=db_cpu.seconds,
        client_cpu_s=client_cpu,
        window_s=window,
        bytes=[t.bytes for t in tallies],
        frames=[t.frames for t in tallies],
        read_while_writing=read_while_writing,
        cuts=sum(t.cuts for t in tallies),
        subscribers_cut=sum(1 for t in tallies if t.cuts),
        drops=sum(t.drops for t in tallies),
        closes=dict(sum((t.closes for t in tallies), Counter[str]())),
        reason_mismatch=sum(t.reason_mismatch for t in tallies),
        mismatches=[m for t in tallies for m in t.mismatches][:5],
        disorder=sum(t.disorder for t in tallies),
        refused=sum(t.refused for t in tallies),
        connect_failures=sum(t.connect_failures for t in tallies),
        caught_up=len(caught),
        catchup_s=[max(0.0, (t.caught_up_at or 0.0) - phase.writes_stopped) for t in caught],
        equal=sum(1 for t in tallies if t.view == table),
        last_tx_end=sum(1 for t in tallies if t.last_tx_end),
        audit_points=audit_points,
        audit_wrong=audit_wrong,
        wrong=[
            f"subscriber {t.index} (last seq {t.last_seq}): {_diff(t.view, table)}" for t in caught if t.view != table
        ][:5],
    )


# --- the report ---------------------------------------------------------------------------------------------------


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "-"
    scaled = [v / scale for v in values]
    return f"{statistics.median(scaled):,.{digits}f} ({min(scaled):,.{digits}f}-{max(scaled):,.{digits}f})"


COLUMNS = [
    "mode",
    "KB/subscriber",
    "frames/subscriber",
    "4008 cuts",
    "other drops",
    "catch-up s, median sub",
    "catch-up s, last sub",
    "caught up",
    "views = table",
    "server CPU s",
    "writes/s achieved",
]


def summarize(options: Options, runs: list[ModeRun]) -> ScenarioResult:
    result = ScenarioResult(
        name="coalescing",
        title=(
            f"coalescing: {options.subscribers} subscribers reading {options.read_bytes_per_s:,.0f} B/s each"
            f" (MSS {options.mss or 'loopback'}), {options.rate:,.0f} UPDATEs/s of {options.rows} rows"
            f" x {options.payload} B for {options.seconds:g} s; median (lowest-highest) over {options.rounds} round(s)"
        ),
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        columns=COLUMNS,
    )
    for coalesce in (True, False):
        mine = [r for r in runs if r.coalesce == coalesce]
        if not mine:
            continue
        every_bytes = [float(b) for r in mine for b in r.bytes]
        every_frames = [float(f) for r in mine for f in r.frames]
        # A subscriber still behind at the deadline counts as catching up at the deadline: a lower bound.
        padded = [r.catchup_s + [options.catchup_timeout] * (r.subscribers - r.caught_up) for r in mine]
        median_catchup = [statistics.median(times) for times in padded]
        last_catchup = [max(times) for times in padded]
        late = "" if all(r.caught_up == r.subscribers for r in mine) else " (deadline)"
        result.rows.append(
            [
                mine[0].mode,
                _spread(every_bytes, 1000),
                _spread(every_frames, digits=0),
                _spread([float(r.cuts) for r in mine], digits=0),
                _spread([float(r.drops) for r in mine], digits=0),
                _spread(median_catchup, digits=2),
                _spread(last_catchup, digits=2) + late,
                f"{sum(r.caught_up for r in mine)}/{sum(r.subscribers for r in mine)}",
                f"{sum(r.equal for r in mine)}/{sum(r.subscribers for r in mine)}",
                _spread([r.server_cpu_s for r in mine]),
                _spread([r.write.achieved_rate for r in mine], digits=0),
            ]
        )
        name = mine[0].mode
        result.summary[name] = {
            "bytes_per_subscriber": {
                "median": statistics.median(every_bytes),
                "min": min(every_bytes),
                "max": max(every_bytes),
            },
            "frames_per_subscriber": {
                "median": statistics.median(every_frames),
                "min": min(every_frames),
                "max": max(every_frames),
            },
            "frames_read_while_writing_median": [statistics.median(r.read_while_writing) for r in mine],
            "cuts_4008": [r.cuts for r in mine],
            "drops": [r.drops for r in mine],
            "catchup_s_median_subscriber": median_catchup,
            "catchup_s_last_subscriber": last_catchup,
            "caught_up": [r.caught_up for r in mine],
            "views_equal": [r.equal for r in mine],
            "server_cpu_s": [r.server_cpu_s for r in mine],
            "achieved_writes_per_s": [r.write.achieved_rate for r in mine],
        }
        for r in mine:
            problems = []
            if r.disorder:
                problems.append(f"{r.disorder} frames out of order")
            if r.reason_mismatch:
                problems.append(
                    f"{r.reason_mismatch} 4008 reasons whose last_seq is not the last seq read"
                    f" (e.g. {'; '.join(r.mismatches)})"
                )
            if r.caught_up == r.subscribers and r.last_tx_end != r.subscribers:
                problems.append(f"{r.subscribers - r.last_tx_end} subscribers whose last frame lacks tx_end")
            problems.extend(r.audit_wrong)
            problems.extend(r.wrong)
            for problem in problems:
                result.notes.append(f"round {r.round + 1} {name}: {problem}")
    result.runs = [
        {
            **{k: v for k, v in asdict(r).items() if k not in ("bytes", "frames", "read_while_writing", "catchup_s")},
            "mode": r.mode,
            "achieved_writes_per_s": r.write.achieved_rate,
            "bytes": _quartiles(r.bytes),
            "frames": _quartiles(r.frames),
            "read_while_writing": _quartiles(r.read_while_writing),
            "catchup_s": _quartiles(r.catchup_s),
        }
        for r in runs
    ]
    return result


def _quartiles(values: list[int] | list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "p25": ordered[len(ordered) // 4],
        "median": statistics.median(ordered),
        "p75": ordered[3 * len(ordered) // 4],
        "max": ordered[-1],
    }


def describe(run: ModeRun) -> str:
    w = run.write
    catch = f"{statistics.median(run.catchup_s):.2f}/{max(run.catchup_s):.2f} s" if run.catchup_s else "-"
    return (
        f"round {run.round + 1} {run.mode:8}: writes {w.committed}/{w.offered} at {w.achieved_rate:,.0f}/s"
        f" (worst slip {w.max_lag_s:.2f} s); KB/sub median {statistics.median(run.bytes) / 1000:,.1f};"
        f" frames/sub median {statistics.median(run.frames):,.0f}"
        f" ({statistics.median(run.read_while_writing):,.0f} while writing);"
        f" 4008 {run.cuts} ({run.subscribers_cut} subs), drops {run.drops}, refused {run.refused};"
        f" closes {run.closes or '-'};"
        f" caught up {run.caught_up}/{run.subscribers}"
        f" (median/last {catch}); views equal {run.equal}/{run.subscribers};"
        f" audit {run.audit_points} points, {len(run.audit_wrong)} wrong;"
        f" CPU server {run.server_cpu_s:.1f} s, db {run.db_cpu_s:.1f} s, subscribers {run.client_cpu_s:.1f} s"
        f" over {run.window_s:.1f} s"
    )


# --- the command --------------------------------------------------------------------------------------------------


async def measure(options: Options) -> list[ModeRun]:
    runs: list[ModeRun] = []
    # Spawned, not forked: a fork of a process running an event loop with a thousand sockets shares too much.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for round_number in range(options.rounds):
            order = (True, False) if round_number % 2 == 0 else (False, True)
            async with running(SPEC, options.results / "logs", env=dict(options.server_env)) as server:
                for coalesce in order:
                    run = await run_mode(options, server, coalesce, round_number, pool)
                    print(describe(run), flush=True)
                    runs.append(run)
    return runs


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.coalescing", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100, help="hot rows the writers update (default 100)")
    parser.add_argument("--payload", type=int, default=512, help="bytes of each row's text column (default 512)")
    parser.add_argument("--subscribers", type=int, default=1000, help="slow subscribers per mode (default 1000)")
    parser.add_argument(
        "--read-bytes-per-s", type=float, default=20_000, help="each subscriber's reading rate (default 20000)"
    )
    parser.add_argument(
        "--mss",
        type=int,
        default=1460,
        help="TCP segment size the subscribers offer (default 1460, an Ethernet link; 0: loopback's 64 KiB)",
    )
    parser.add_argument("--rate", type=float, default=500, help="UPDATEs committed per second (default 500)")
    parser.add_argument("--seconds", type=float, default=20, help="how long the writers write (default 20)")
    parser.add_argument("--writers", type=int, default=4, help="writer connections (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each mode once per round (default 3)")
    parser.add_argument(
        "--catchup-timeout", type=float, default=120, help="seconds the subscribers get to catch up (default 120)"
    )
    parser.add_argument(
        "--audit", type=int, default=5, help="subscribers checked at every tx_end against the changelog (default 5)"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the server (repeatable), e.g. WS_SEND_TIMEOUT_S=60; default: the server's defaults",
    )
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="where the JSON goes")
    args = parser.parse_args(argv)
    for name in ("rows", "payload", "subscribers", "writers", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("read_bytes_per_s", "rate", "seconds", "catchup_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    server_env: dict[str, str] = {}
    for item in args.server_env:
        name, equals, value = item.partition("=")
        if not equals or not name:
            parser.error(f"--server-env takes NAME=VALUE, not {item!r}")
        server_env[name] = value
    if args.audit < 0:
        parser.error("--audit must be at least 0")
    if args.mss and not 88 <= args.mss <= 32767:  # Linux's bounds for TCP_MAXSEG
        parser.error("--mss must be 0 or between 88 and 32767")
    return Options(
        rows=args.rows,
        payload=args.payload,
        subscribers=args.subscribers,
        read_bytes_per_s=args.read_bytes_per_s,
        mss=args.mss,
        rate=args.rate,
        seconds=args.seconds,
        writers=args.writers,
        rounds=args.rounds,
        catchup_timeout=args.catchup_timeout,
        audit=min(args.audit, args.subscribers),
        server_env=server_env,
        results=args.results,
    )


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    raise_nofile_limit()
    machine = machine_info()
    print(f"machine: {machine['cores']} cores, load {machine['loadavg']}", flush=True)
    prepare_database(options.rows, options.payload)
    runs = run_fast(measure(options))
    result = summarize(options, runs)
    print(render(result))
    print(f"   ({write_json(result, options.results, machine, quick=False)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
