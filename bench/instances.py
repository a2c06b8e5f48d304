"""`python -m bench.instances`: what each realtime instance costs PostgreSQL, and whether it slows the writers.

Instances share nothing but the database: each one's listener reads every change from the changelog on its own
connection, so PostgreSQL is the bus and every added instance adds a reader of the whole stream. This measures
that reader's price. Per round (the counts in alternating order) and per count N, on the harness's database
`bench_realtime`:

    users reset to ids 1..--rows (as the harness does)
    -> N `realtime serve` processes (one worker each), started one after the other; each is ready when /readyz
       says its listener is live, and its listener backend is the `realtime-listener` that appeared meanwhile
    -> optionally --subscribers loadgen subscribers of `users` per instance
    -> --writers connections (bench/writers.py, mixed INSERT/UPDATE/UPDATE/DELETE) open; their backends are the
       client backends that appeared meanwhile
    -> warm-up: --warmup s of writes, unmeasured, every listener caught up
    -> window opens: CPU of every backend, of PostgreSQL as a whole and of each instance
    -> --rate changes/s for --seconds, open loop
    -> every instance's listener at the changelog's head (and every subscriber has every change)
    -> window closes -> writers close -> instances stop (SIGTERM to their process groups, SIGKILL after 10 s)

CPU is utime + stime from /proc (bench/proc.py), split by backend: each listener's, the writers', every other
backend of the database (the instances' pools, autovacuum workers alive at the end), and backends of other
databases. PostgreSQL's total is the postmaster's process tree plus the children it reaped inside the window
(its cutime/cstime), so backends and workers that ended mid-window still count; what the total holds beyond
the backends named above is the server's own processes (WAL writer, checkpointer, autovacuum) and ended ones.
Everything is divided by the changes committed in the window.

Reported per N, median (lowest-highest) over the rounds: PostgreSQL CPU per change and its increase per added
instance, one listener backend's CPU per change (the median instance), the writers' backends per change, the
rest of PostgreSQL per change, one instance's own CPU per change, the commits/s achieved and the writers' worst
slip behind schedule; then a least-squares line through every run, PostgreSQL µs/change = a + b x N.

PostgreSQL must run on this machine (its /proc is read) at BENCH_PG, as for `python -m bench`; do not run this
beside the harness, which resets the same database. Results go to results/instances.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench import db
from bench.config import FULL
from bench.httpload import http_get
from bench.loop import run_fast
from bench.proc import CpuWindow, cpu_seconds, process_tree, raise_nofile_limit
from bench.report import ScenarioResult, machine_info, render, write_json
from bench.scenarios.common import alternate, require_open
from bench.servers import BENCH_DIR, REALTIME, RunningServer, running
from bench.shards import SubscriberPool
from bench.writers import ChangeWriters, WriteStats

LISTENER_APPLICATION = "realtime-listener"
PROBE_APPLICATION = "bench-instances"
READY_TIMEOUT_S = 30.0
CAUGHT_UP_TIMEOUT_S = 15.0
POLL_S = 0.02
# /readyz shows the listener's position only to callers allowed the details; the bench's servers have no token key,
# so "public" changes nothing else.
SERVER_ENV = {"HEALTH_DETAILS": "public"}
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Options:
    counts: tuple[int, ...]
    rate: float
    seconds: float
    warmup: float
    writers: int
    rows: int
    subscribers: int  # per instance
    rounds: int
    results: Path


# --- PostgreSQL's processes --------------------------------------------------------------------------------------


def _stat_after_name(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode()
    # The command name may hold spaces and parentheses; the fields after the last ')' are fixed-format.
    return raw[raw.rindex(")") + 2 :].split()


def parent_pid(pid: int) -> int:
    return int(_stat_after_name(pid)[1])


def reaped_cpu_seconds(pid: int) -> float:
    """cutime + cstime (fields 16 and 17): the CPU of the children `pid` has waited for, over its lifetime."""
    fields = _stat_after_name(pid)
    return (int(fields[13]) + int(fields[14])) / _TICK


@dataclass(frozen=True)
class Backend:
    pid: int
    database: str | None
    application: str
    kind: str  # pg_stat_activity.backend_type


class Probe:
    """One connection to the bench database, open for the whole run: it lists the backends of the whole server,
    reads the changelog's head and finds the postmaster (its own backend's parent). Opening a connection per
    reading would fork a backend each time, inside the window being measured."""

    def __init__(self) -> None:
        self._conn: asyncpg.Connection | None = None
        self.pid = 0
        self.postmaster = 0

    async def __aenter__(self) -> Probe:
        self._conn = await asyncpg.connect(
            db.dsn(db.REALTIME_DB), server_settings={"application_name": PROBE_APPLICATION}
        )
        self.pid = self._conn.get_server_pid()
        try:
            self.postmaster = parent_pid(self.pid)
            reaped_cpu_seconds(self.postmaster)
        except (FileNotFoundError, PermissionError) as error:
            await self._conn.close()
            raise RuntimeError(
                f"backend {self.pid} is not readable in /proc: PostgreSQL must run on this machine ({error})"
            ) from error
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    @property
    def conn(self) -> asyncpg.Connection:
        assert self._conn is not None
        return self._conn

    async def backends(self) -> dict[int, Backend]:
        rows = await self.conn.fetch(
            "SELECT pid, datname, coalesce(application_name, '') AS app, coalesce(backend_type, '') AS kind"
            " FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        )
        return {int(r["pid"]): Backend(int(r["pid"]), r["datname"], r["app"], r["kind"]) for r in rows}

    async def pids(self, *, application: str, database: str = db.REALTIME_DB) -> set[int]:
        """Client backends of `database` with this application_name."""
        return {
            b.pid
            for b in (await self.backends()).values()
            if b.database == database and b.application == application and b.kind == "client backend"
        }

    async def head(self) -> int:
        """The changelog's last position: where every listener stands once it has read everything committed."""
        head = await self.conn.fetchval("SELECT coalesce(max(seq), 0) FROM realtime.changes")
        return int(head)

    def total_cpu_seconds(self) -> float:
        """Every PostgreSQL process alive now, plus every one that has ended (the postmaster reaps them all)."""
        return cpu_seconds(process_tree(self.postmaster)) + reaped_cpu_seconds(self.postmaster)


@dataclass
class Snapshot:
    backends: dict[int, Backend]
    cpu: dict[int, float]  # per backend
    total: float

    @classmethod
    async def take(cls, probe: Probe) -> Snapshot:
        backends = await probe.backends()
        return cls(backends, {pid: cpu_seconds([pid]) for pid in backends}, probe.total_cpu_seconds())

    def spent_since(self, start: Snapshot, pids: set[int]) -> float:
        """CPU the given backends spent since `start`; one that connected meanwhile counts from zero."""
        return sum(self.cpu[pid] - start.cpu.get(pid, 0.0) for pid in pids if pid in self.cpu)


# --- the instances ------------------------------------------------------------------------------------------------


@dataclass
class Instance:
    server: RunningServer
    listener_pid: int
    pool: SubscriberPool | None = None


async def readyz(server: RunningServer) -> dict[str, Any] | None:
    """/readyz's body when it answers 200, else None."""
    try:
        status, body = await http_get("127.0.0.1", server.port, "/readyz", timeout=2.0)
    except (OSError, TimeoutError, ValueError):
        return None
    if status != 200:
        return None
    parsed: dict[str, Any] = orjson.loads(body)
    return parsed


async def wait_ready(server: RunningServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while await readyz(server) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"instance on port {server.port} not ready after {READY_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.1)


async def start_instances(
    stack: contextlib.AsyncExitStack, probe: Probe, count: int, subscribers: int, log_dir: Path
) -> list[Instance]:
    """Start `count` instances one after the other, so each new `realtime-listener` backend is known to be its."""
    instances: list[Instance] = []
    for _ in range(count):
        before = await probe.pids(application=LISTENER_APPLICATION)
        server = await stack.enter_async_context(running(REALTIME, log_dir, 1, env=SERVER_ENV))
        await wait_ready(server)
        new = await probe.pids(application=LISTENER_APPLICATION) - before
        if len(new) != 1:
            raise RuntimeError(f"instance on port {server.port}: {len(new)} new listener backends, expected 1")
        instance = Instance(server, new.pop())
        if subscribers:
            instance.pool = await stack.enter_async_context(SubscriberPool(server, 1))
            require_open(REALTIME, subscribers, await instance.pool.open(subscribers))
        instances.append(instance)
    return instances


async def open_writers(stack: contextlib.AsyncExitStack, probe: Probe, count: int) -> tuple[ChangeWriters, set[int]]:
    """The writers' connections and their backends: the unnamed client backends that appeared while they opened."""
    before = await probe.pids(application="")
    writers = await stack.enter_async_context(ChangeWriters(db.REALTIME_DB, count))
    pids = await probe.pids(application="") - before
    if len(pids) != count:
        raise RuntimeError(f"{len(pids)} new unnamed backends while {count} writers connected: is something else here?")
    return writers, pids


async def until_caught_up(probe: Probe, instances: Sequence[Instance]) -> float:
    """Seconds until every listener's position reaches the changelog's head (bounded by CAUGHT_UP_TIMEOUT_S)."""
    began = time.monotonic()
    head = await probe.head()
    pending = list(instances)
    while pending and time.monotonic() - began < CAUGHT_UP_TIMEOUT_S:
        states = await asyncio.gather(*(readyz(i.server) for i in pending))
        pending = [
            i for i, state in zip(pending, states, strict=True) if state is None or state["listener"]["position"] < head
        ]
        if pending:
            await asyncio.sleep(POLL_S)
    if pending:
        raise RuntimeError(f"{len(pending)} listener(s) short of position {head} after {CAUGHT_UP_TIMEOUT_S:.0f} s")
    return time.monotonic() - began


async def delivered(instances: Sequence[Instance], changes: int) -> int:
    """Wait for every subscriber to have `changes` changes; returns the changes they lost, summed."""
    pools = [i.pool for i in instances if i.pool is not None]
    windows = await asyncio.gather(*(p.collect(expected_per_sub=changes, quiet_s=1.0, deadline_s=30.0) for p in pools))
    return sum(w.lost for w in windows)


async def mark(instances: Sequence[Instance]) -> None:
    await asyncio.gather(*(i.pool.mark() for i in instances if i.pool is not None))


# --- one count, one round --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Writes:
    offered: int
    committed: int
    failed: int
    seconds: float
    max_lag_s: float

    @classmethod
    def of(cls, stats: WriteStats) -> Writes:
        return cls(stats.offered, stats.committed, stats.failed, stats.seconds, stats.max_lag_s)

    @property
    def rate(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0


@dataclass
class Run:
    instances: int
    round: int
    subscribers: int  # per instance
    writes: Writes
    window_s: float
    catch_up_s: float  # from the last commit to every listener at the head
    pg_total_s: float
    listeners_s: list[float | None]  # per instance; None when its backend changed inside the window
    writers_s: float
    database_other_s: float  # the database's other backends: the instances' pools, autovacuum workers
    other_databases_s: float
    servers_s: list[float]  # each instance's process tree
    lost: int
    notes: list[str] = field(default_factory=list)

    def per_change(self, seconds: float | None) -> float:
        if seconds is None or not self.writes.committed:
            return math.nan
        return seconds / self.writes.committed * 1e6

    @property
    def pg_us(self) -> float:
        return self.per_change(self.pg_total_s)

    @property
    def listener_us(self) -> float:
        """The median instance's listener backend, per change."""
        known = [s for s in self.listeners_s if s is not None]
        return self.per_change(statistics.median(known)) if known else math.nan

    @property
    def writers_us(self) -> float:
        return self.per_change(self.writers_s)

    @property
    def rest_us(self) -> float:
        """PostgreSQL beyond the listeners and the writers: the database's other backends, the server's own
        processes, ended backends, and other databases."""
        listeners = sum(s for s in self.listeners_s if s is not None)
        return self.per_change(self.pg_total_s - listeners - self.writers_s)

    @property
    def server_us(self) -> float:
        """The median instance's own CPU, per change."""
        return self.per_change(statistics.median(self.servers_s))

    @property
    def commits_per_s(self) -> float:
        return self.writes.rate

    @property
    def worst_slip_ms(self) -> float:
        return self.writes.max_lag_s * 1000


async def run_count(options: Options, probe: Probe, count: int, round_number: int) -> Run:
    await db.reset_users(db.REALTIME_DB, options.rows)
    ids = list(range(1, options.rows + 1))
    async with contextlib.AsyncExitStack() as stack:
        instances = await start_instances(stack, probe, count, options.subscribers, options.results / "logs")
        listener_pids = [i.listener_pid for i in instances]
        writers, writer_pids = await open_writers(stack, probe, options.writers)

        await mark(instances)
        warm = await writers.run(rate=options.rate, seconds=options.warmup, ids=ids, mode="mixed")
        await until_caught_up(probe, instances)
        await delivered(instances, warm.committed)

        await mark(instances)
        servers = [CpuWindow(i.server.pid) for i in instances]
        start = await Snapshot.take(probe)
        for window in servers:
            window.start()
        began = time.monotonic()
        stats = await writers.run(rate=options.rate, seconds=options.seconds, ids=ids, mode="mixed")
        catch_up = await until_caught_up(probe, instances)
        lost = await delivered(instances, stats.committed)
        for window in servers:
            window.stop()
        end = await Snapshot.take(probe)
        window_s = time.monotonic() - began

    notes = []
    listeners: list[float | None] = []
    for number, pid in enumerate(listener_pids, 1):
        if pid in start.backends and pid in end.backends:
            listeners.append(end.spent_since(start, {pid}))
        else:
            notes.append(f"the listener of instance {number} reconnected inside the window")
            listeners.append(None)
    lost_writers = writer_pids - end.backends.keys()
    if lost_writers:
        notes.append(f"{len(lost_writers)} writer backend(s) ended inside the window")
    ours = {probe.pid, *listener_pids, *writer_pids}
    # Every listener backend of the database is one of ours unless one reconnected; a new one counts as "other".
    database_other = {pid for pid, b in end.backends.items() if b.database == db.REALTIME_DB and pid not in ours}
    other_databases = {
        pid for pid, b in end.backends.items() if b.database is not None and b.database != db.REALTIME_DB
    }
    return Run(
        instances=count,
        round=round_number,
        subscribers=options.subscribers,
        writes=Writes.of(stats),
        window_s=window_s,
        catch_up_s=catch_up,
        pg_total_s=end.total - start.total,
        listeners_s=listeners,
        writers_s=end.spent_since(start, writer_pids),
        database_other_s=end.spent_since(start, database_other),
        other_databases_s=end.spent_since(start, other_databases),
        servers_s=[w.seconds for w in servers],
        lost=lost,
        notes=notes,
    )


def describe(run: Run) -> str:
    w = run.writes
    return (
        f"round {run.round + 1}, {run.instances} instance(s): PostgreSQL {run.pg_us:.1f} µs/change"
        f" ({run.pg_total_s:.2f} s for {w.committed:,} changes over {run.window_s:.1f} s);"
        f" listener {run.listener_us:.1f}, writers {run.writers_us:.1f}, rest {run.rest_us:.1f} µs/change;"
        f" instance {run.server_us:.1f} µs/change; writes {w.committed}/{w.offered} at {w.rate:,.0f}/s"
        f" (worst slip {w.max_lag_s * 1000:.0f} ms); caught up {run.catch_up_s * 1000:.0f} ms after the last"
        + (f"; lost {run.lost}" if run.subscribers else "")
        + "".join(f"; {note}" for note in run.notes)
    )


# --- the report -------------------------------------------------------------------------------------------------


def _present(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]  # NaN marks a figure a run could not measure


def _spread(values: list[float], digits: int = 1) -> str:
    present = _present(values)
    if not present:
        return "-"
    return f"{statistics.median(present):,.{digits}f} ({min(present):,.{digits}f}-{max(present):,.{digits}f})"


def _median(values: list[float]) -> float:
    present = _present(values)
    return statistics.median(present) if present else math.nan


FIGURES = {
    "pg_us": "PostgreSQL µs/change",
    "listener_us": "one listener backend µs/change",
    "writers_us": "writers' backends µs/change",
    "rest_us": "rest of PostgreSQL µs/change",
    "server_us": "one instance µs/change",
    "commits_per_s": "commits/s",
    "worst_slip_ms": "writers' worst slip ms",
}

COLUMNS = [
    "instances",
    "PG µs/change",
    "+PG per instance",
    "listener µs/change",
    "writers µs/change",
    "rest µs/change",
    "instance µs/change",
    "commits/s",
    "worst slip ms",
]


def _figures(run: Run) -> dict[str, float]:
    return {name: float(getattr(run, name)) for name in FIGURES}


def summarize(options: Options, runs: list[Run]) -> ScenarioResult:
    result = ScenarioResult(
        name="instances",
        title=(
            f"PostgreSQL CPU per change with N realtime instances: {options.writers} writers, {options.rate:,.0f}"
            f" changes/s (mixed) for {options.seconds:g} s, {options.subscribers} subscriber(s) per instance;"
            f" median (lowest-highest) over {options.rounds} round(s)"
        ),
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        columns=COLUMNS,
    )
    medians: dict[int, dict[str, float]] = {}
    previous: int | None = None
    for count in sorted({r.instances for r in runs}):
        mine = [r for r in runs if r.instances == count]
        by_name = {name: [_figures(r)[name] for r in mine] for name in FIGURES}
        medians[count] = {name: _median(values) for name, values in by_name.items()}
        pg = medians[count]["pg_us"]
        step = (pg - medians[previous]["pg_us"]) / (count - previous) if previous is not None else math.nan
        previous = count
        result.rows.append(
            [
                count,
                _spread(by_name["pg_us"]),
                step,
                _spread(by_name["listener_us"]),
                _spread(by_name["writers_us"]),
                _spread(by_name["rest_us"]),
                _spread(by_name["server_us"]),
                _spread(by_name["commits_per_s"], 0),
                _spread(by_name["worst_slip_ms"], 0),
            ]
        )
        result.summary[str(count)] = {
            name: {
                "median": medians[count][name],
                "min": min(_present(values), default=math.nan),
                "max": max(_present(values), default=math.nan),
            }
            for name, values in by_name.items()
        } | {"pg_us_per_added_instance": step, "lost": sum(r.lost for r in mine)}
    fit = [(float(r.instances), r.pg_us) for r in runs if not math.isnan(r.pg_us)]
    if len({x for x, _ in fit}) >= 2:
        line = statistics.linear_regression([x for x, _ in fit], [y for _, y in fit])
        result.ratios["PG µs/change per added instance (least squares over every run)"] = line.slope
        result.ratios["PG µs/change with no instance (intercept)"] = line.intercept
        result.notes.append(
            f"PostgreSQL µs/change = {line.intercept:.1f} + {line.slope:.1f} x instances (least squares over"
            f" {len(fit)} runs); one listener backend: {_median([r.listener_us for r in runs]):.1f} µs/change"
        )
    if len(medians) >= 2:
        # Whether instances slow the writers: their backends' cost per change and their rate, most against fewest.
        low, high = min(medians), max(medians)
        for name in ("writers_us", "commits_per_s"):
            result.ratios[f"{FIGURES[name]} at {high} / at {low} instance(s)"] = (
                medians[high][name] / medians[low][name]
            )
    for run in runs:
        problems = list(run.notes)
        if run.writes.failed:
            problems.append(f"{run.writes.failed} writes failed")
        if run.lost:
            problems.append(f"subscribers lost {run.lost} changes")
        if run.other_databases_s > 0.05 * run.pg_total_s:
            problems.append(
                f"other databases took {run.other_databases_s:.2f} of PostgreSQL's {run.pg_total_s:.2f} CPU s"
            )
        for problem in problems:
            result.notes.append(f"round {run.round + 1}, {run.instances} instance(s): {problem}")
    result.runs = [asdict(run) | _figures(run) for run in runs]
    return result


# --- the command ------------------------------------------------------------------------------------------------


async def prepare() -> None:
    """bench_realtime as the harness prepares it: created, migrated by this checkout, `users` streamed."""
    await db.setup_realtime_db()
    await db.set_realtime_stream(True)


async def measure(options: Options) -> list[Run]:
    await prepare()
    runs: list[Run] = []
    async with Probe() as probe:
        for round_number in range(options.rounds):
            began = time.monotonic()
            for count in alternate(list(options.counts), round_number):
                run = await run_count(options, probe, count, round_number)
                print(describe(run), flush=True)
                runs.append(run)
            print(f"round {round_number + 1} took {time.monotonic() - began:.0f} s", flush=True)
    return runs


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.instances", description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,2,4,8", help="instance counts, comma-separated (default 1,2,4,8)")
    parser.add_argument("--rate", type=float, default=500, help="changes committed per second (default 500)")
    parser.add_argument("--seconds", type=float, default=15, help="measured seconds of writes (default 15)")
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured seconds of writes first (default 2)")
    parser.add_argument("--writers", type=int, default=8, help="writer connections (default 8)")
    parser.add_argument(
        "--rows", type=int, default=FULL.seed_rows, help=f"users rows at the start (default {FULL.seed_rows:,})"
    )
    parser.add_argument(
        "--subscribers", type=int, default=0, help="loadgen subscribers of `users` per instance (default 0)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each count once per round (default 3)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="where the JSON goes")
    args = parser.parse_args(argv)
    try:
        counts = tuple(int(c) for c in args.counts.split(",") if c.strip())
    except ValueError:
        parser.error(f"--counts must be whole numbers: {args.counts}")
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        parser.error("--counts must be distinct counts of at least 1")
    for name in ("writers", "rows", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.subscribers < 0:
        parser.error("--subscribers must not be negative")
    for name in ("rate", "seconds", "warmup"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    return Options(
        counts=counts,
        rate=args.rate,
        seconds=args.seconds,
        warmup=args.warmup,
        writers=args.writers,
        rows=args.rows,
        subscribers=args.subscribers,
        rounds=args.rounds,
        results=args.results,
    )


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    raise_nofile_limit()
    machine = machine_info()
    print(f"machine: {machine['cores']} cores, load {machine['loadavg']}", flush=True)
    started = time.monotonic()
    runs = run_fast(measure(options))
    result = summarize(options, runs)
    print(render(result))
    print(f"   ({time.monotonic() - started:.0f} s, {write_json(result, options.results, machine, quick=False)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
