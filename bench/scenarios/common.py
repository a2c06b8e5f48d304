"""What the streaming scenarios share: the run context, database preparation and one measured window.

A measured window, as every streaming scenario uses it:

    subscribers open and settled -> [optional idle CPU sample] -> mark: zero loadgen counters,
    start server/db CPU -> writers commit rate x seconds changes -> collect: wait for every expected
    delivery (or quiet / deadline) -> stop CPU -> StreamRun
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from bench import db
from bench.config import SHARD_THRESHOLD, Sizes
from bench.proc import CpuWindow, self_cpu_seconds, tree_cpu_seconds
from bench.report import ScenarioResult
from bench.servers import ServerSpec
from bench.shards import OpenReport, SubscriberPool, Window
from bench.stats import first_and_spread, median, per_thousand, percentiles
from bench.writers import ChangeWriters, Mode, WriteStats

T = TypeVar("T")


@dataclass
class Context:
    sizes: Sizes
    quick: bool
    servers: list[ServerSpec]  # the contenders chosen on the command line, realtime first
    results_dir: Path
    log_dir: Path
    workers: int = 1
    shards: int = 0  # 0: decide from the expected delivery rate
    rounds: int | None = None  # overrides Sizes.rounds
    done: dict[str, ScenarioResult] = field(default_factory=dict)
    prepared: set[str] = field(default_factory=set)
    unavailable: dict[str, str] = field(default_factory=dict)  # server -> why it cannot run

    def contenders(self, *names: str) -> list[ServerSpec]:
        return [s for s in self.servers if s.name in names and s.name not in self.unavailable]

    def round_count(self, default: int | None = None) -> int:
        return self.rounds or default or self.sizes.rounds

    def shards_for(self, subscribers: int, deliveries_per_s: float) -> int:
        if self.shards:
            return self.shards
        return 2 if subscribers >= 2 and deliveries_per_s >= SHARD_THRESHOLD else 1


def alternate(servers: list[T], round_index: int) -> list[T]:
    """Odd rounds run the servers (or variants) in reverse, so drift on a shared machine hits every one alike."""
    return list(reversed(servers)) if round_index % 2 else list(servers)


async def attempt(result: ScenarioResult, what: str, run: Awaitable[T]) -> T | None:
    """Await one contender's run; a failure becomes a note (`<what> failed: ...`) instead of ending the scenario."""
    try:
        return await run
    except Exception as exc:
        result.notes.append(f"{what} failed: {exc}")
        return None


async def prepare(ctx: Context, spec: ServerSpec, *, streaming: bool = True) -> bool:
    """Create/migrate the server's database once per invocation and set its capture on or off.

    Returns False (and records why) when the server cannot run, so a scenario carries on with the rest.
    """
    if spec.name in ctx.unavailable:
        return False
    try:
        if spec.database not in ctx.prepared:
            if spec.kind == "realtime":
                await db.setup_realtime_db()
            else:
                await db.setup_peers_db()
            ctx.prepared.add(spec.database)
        if spec.kind == "realtime":
            await db.set_realtime_stream(streaming)
        else:
            await db.set_notify_trigger(streaming)
    except Exception as exc:  # a missing CLI, a failed migration: report it, bench the others
        ctx.unavailable[spec.name] = f"{type(exc).__name__}: {exc}".strip()[:500]
        print(f"   {spec.name}: unavailable ({ctx.unavailable[spec.name].splitlines()[0]})", flush=True)
        return False
    return True


@dataclass
class StreamRun:
    server: str
    subscribers: int
    rate: float
    opened: OpenReport
    writes: WriteStats
    window: Window
    server_cpu_s: float
    db_cpu_s: float
    loadgen_cpu_s: float
    span_s: float  # first scheduled write to last delivery
    idle_cpu_per_s: float | None = None

    @cached_property
    def latency_ms(self) -> dict[str, float]:
        return {k: v * 1000 for k, v in percentiles(self.window.latencies, (50, 95, 99)).items()}

    def first_and_spread_ms(self) -> dict[str, float | None]:
        """Medians over the changes of the first delivery's latency and of the first-to-last spread.

        Groups every delivery by its change: only the latency scenario reports it (saturation runs hold millions).
        """
        firsts, spreads = first_and_spread(self.window.commits, self.window.latencies)
        first, spread = median(firsts), median(spreads)
        return {
            "first_p50": None if first is None else first * 1000,
            "spread_p50": None if spread is None else spread * 1000,
        }

    @property
    def deliveries_per_s(self) -> float:
        return self.window.deliveries / self.span_s if self.span_s > 0 else 0.0

    @property
    def net_server_cpu_s(self) -> float:
        """Server CPU minus what it burns doing nothing for as long (timers, keepalive pings)."""
        idle = (self.idle_cpu_per_s or 0.0) * self.span_s
        return max(0.0, self.server_cpu_s - idle)

    def summary(self) -> dict[str, Any]:
        w = self.window
        return {
            "server": self.server,
            "subscribers": self.subscribers,
            "opened": self.opened.opened,
            "open_failed": self.opened.failed,
            "open_error": self.opened.error,
            "rate_offered": self.rate,
            "changes_committed": self.writes.committed,
            "write_failures": self.writes.failed,
            "writer_max_lag_s": self.writes.max_lag_s,
            "write_rate_achieved": self.writes.achieved_rate,
            "frames": w.frames,
            "deliveries": w.deliveries,
            "deliveries_per_s": self.deliveries_per_s,
            "latency_ms": self.latency_ms,
            "lost": w.lost,
            "duplicates": w.duplicates,
            "out_of_order": w.out_of_order,
            "unexpected": w.unexpected,
            "error_frames": w.errors,
            "closes": w.closes,
            "drain_s": w.drain_s,
            "span_s": self.span_s,
            "server_cpu_s": self.server_cpu_s,
            "server_idle_cpu_per_s": self.idle_cpu_per_s,
            "server_cpu_ms_per_1k_frames": _ms(per_thousand(self.server_cpu_s, w.frames)),
            "db_cpu_s": self.db_cpu_s,
            "db_cpu_ms_per_1k_changes": _ms(per_thousand(self.db_cpu_s, self.writes.committed)),
            "loadgen_cpu_s": self.loadgen_cpu_s,
            "loadgen_busiest_shard": w.max_shard_busy,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


async def measure(
    spec: ServerSpec,
    server_pid: int,
    pool: SubscriberPool,
    opened: OpenReport,
    writers: ChangeWriters,
    *,
    rate: float,
    seconds: float,
    ids: list[int],
    mode: Mode = "mixed",
    idle_s: float = 0.0,
    warmup_s: float = 0.0,
    per_key: bool = False,
    rows_per_commit: int = 1,
) -> StreamRun:
    """One measured window on an already running server with subscribers already open.

    `warmup_s` first runs the same load unmeasured, so JIT compilation, lazy imports and first-use
    allocations in the server are not charged to the measured window.
    """
    if warmup_s > 0:
        await pool.mark()
        warm = await writers.run(rate=rate, seconds=warmup_s, ids=ids, mode=mode, rows_per_commit=rows_per_commit)
        await pool.collect(
            expected_per_sub=None if per_key else warm.committed,
            expected_by_key=dict(warm.by_key) if per_key else None,
            frames_per_sub=warm.committed if spec.broadcasts else None,
            quiet_s=1.0,
            deadline_s=10.0,
        )
    idle_rate = None
    if idle_s > 0:
        before = tree_cpu_seconds(server_pid)
        await asyncio.sleep(idle_s)
        idle_rate = (tree_cpu_seconds(server_pid) - before) / idle_s
    server_cpu = CpuWindow(server_pid)
    db_cpu = db.DbCpu(spec.database)
    await pool.mark()
    await db_cpu.start()
    own_cpu = self_cpu_seconds()
    server_cpu.start()
    started = time.time()
    writes = await writers.run(rate=rate, seconds=seconds, ids=ids, mode=mode, rows_per_commit=rows_per_commit)
    window = await pool.collect(
        expected_per_sub=None if per_key else writes.committed,
        expected_by_key=dict(writes.by_key) if per_key else None,
        # A broadcaster sends every change to every subscriber, matching or not: wait for all of it.
        frames_per_sub=writes.committed if spec.broadcasts else None,
        quiet_s=3.0,
        deadline_s=max(30.0, 3 * seconds),
    )
    server_cpu.stop()
    await db_cpu.stop()
    own = self_cpu_seconds() - own_cpu
    span = max(writes.seconds, (window.last - started) if window.last else 0.0)
    return StreamRun(
        server=spec.name,
        subscribers=window.subscribers,
        rate=rate,
        opened=opened,
        writes=writes,
        window=window,
        server_cpu_s=server_cpu.seconds,
        db_cpu_s=db_cpu.seconds,
        loadgen_cpu_s=window.cpu_s + own,
        span_s=span,
        idle_cpu_per_s=idle_rate,
    )


def require_open(spec: ServerSpec, wanted: int, report: OpenReport) -> None:
    """A run with missing subscribers measures something else: stop it with the first error seen."""
    if report.opened < wanted:
        raise RuntimeError(
            f"{spec.name}: opened {report.opened}/{wanted} subscribers in {report.seconds:.1f}s; "
            f"first error: {report.error}"
        )
