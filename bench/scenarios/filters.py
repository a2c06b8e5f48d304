"""Scenario 7: fan-out with filters: does server CPU per change stay flat as non-matching subscribers grow?

N subscribers (100, 1,000, 10,000), subscriber i filtering on `id = i + 1`; the writers update a handful of
those rows, so each change matches exactly one subscriber and N - 1 must be skipped cheaply.

realtime filters server-side. The broadcasting peers have no filters: they send every change to every
socket and the client drops what it did not ask for (counted as frames, not deliveries). For them the run
is capped by a frame budget, so at large N they commit fewer changes; CPU is reported per change either way.
Idle CPU (timers, pings) is sampled before the window and subtracted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import db
from bench.config import FILTER_CPU_GROWTH
from bench.report import ScenarioResult, Target
from bench.scenarios.common import Context, StreamRun, alternate, attempt, measure, prepare, require_open
from bench.servers import ServerSpec, running
from bench.shards import SubscriberPool
from bench.stats import median, ratio
from bench.writers import ChangeWriters

WRITERS = 2


def _changed_ids(subscribers: int, how_many: int) -> list[int]:
    """Evenly spaced rows among the subscribed ids 1..subscribers."""
    how_many = max(1, min(how_many, subscribers))
    step = subscribers / how_many
    return sorted({int(i * step) + 1 for i in range(how_many)})


async def one(ctx: Context, spec: ServerSpec, subscribers: int) -> StreamRun:
    sz = ctx.sizes
    await db.reset_users(spec.database, max(sz.seed_rows, subscribers))
    changes = round(sz.filter_rate * sz.filter_seconds)
    if spec.broadcasts:
        changes = min(changes, max(10, sz.filter_frame_budget // subscribers))
    seconds = changes / sz.filter_rate
    frames_per_s = sz.filter_rate * (subscribers if spec.broadcasts else 1)
    async with (
        running(spec, ctx.log_dir, ctx.workers) as server,
        SubscriberPool(server, ctx.shards_for(subscribers, frames_per_s), filter_base=1) as pool,
        ChangeWriters(spec.database, WRITERS) as writers,
    ):
        opened = await pool.open(subscribers)
        require_open(spec, subscribers, opened)
        await asyncio.sleep(1.0)
        return await measure(
            spec,
            server.pid,
            pool,
            opened,
            writers,
            rate=sz.filter_rate,
            seconds=seconds,
            ids=_changed_ids(subscribers, sz.filter_rows_changed),
            mode="updates",
            idle_s=sz.filter_idle_seconds,
            warmup_s=1.0,
            per_key=True,
        )


def _cpu_per_change_ms(run: StreamRun) -> float | None:
    if not run.writes.committed:
        return None
    return run.net_server_cpu_s / run.writes.committed * 1000


async def run(ctx: Context) -> ScenarioResult:
    sz = ctx.sizes
    result = ScenarioResult(
        name="filters",
        title="fan-out with filters: server CPU per change as non-matching subscribers grow",
        params={
            "subscribers": list(sz.filter_counts),
            "rate": sz.filter_rate,
            "seconds": sz.filter_seconds,
            "rows_changed": sz.filter_rows_changed,
            "frame_budget_for_broadcasters": sz.filter_frame_budget,
            "workers": ctx.workers,
        },
        columns=[
            "server",
            "round",
            "subs",
            "changes",
            "frames",
            "deliveries",
            "lost",
            "wrong",
            "p99 ms",
            "cpu ms/change",
            "idle cpu %",
        ],
    )
    order = 0
    for round_index in range(ctx.round_count()):
        for subscribers in sz.filter_counts:
            for spec in alternate(ctx.contenders("realtime", "node", "tutorial"), order):
                if not await prepare(ctx, spec):
                    continue
                one_run = await attempt(result, f"{spec.name} at {subscribers}", one(ctx, spec, subscribers))
                if one_run is None:
                    continue
                s = one_run.summary()
                cpu_ms = _cpu_per_change_ms(one_run)
                result.runs.append({"round": round_index + 1, "cpu_ms_per_change": cpu_ms, **s})
                result.rows.append(
                    [
                        spec.name,
                        round_index + 1,
                        subscribers,
                        one_run.writes.committed,
                        s["frames"],
                        s["deliveries"],
                        s["lost"],
                        s["unexpected"],
                        s["latency_ms"]["p99"],
                        cpu_ms,
                        (one_run.idle_cpu_per_s or 0.0) * 100,
                    ]
                )
                print(f"   {spec.name} {subscribers} filtered subs: {cpu_ms or 0:.3f} ms CPU/change", flush=True)
            order += 1
    summarize(result, sz.filter_counts)
    return result


def summarize(result: ScenarioResult, counts: tuple[int, ...]) -> None:
    per_server: dict[str, dict[str, Any]] = {}
    for r in result.runs:
        per = per_server.setdefault(r["server"], {})
        per.setdefault(str(r["subscribers"]), []).append(r["cpu_ms_per_change"])
    for name, per in per_server.items():
        result.summary[name] = {count: {"cpu_ms_per_change": median(v)} for count, v in per.items()}
    smallest, largest = str(counts[0]), str(counts[-1])
    for name, per in result.summary.items():
        low = per.get(smallest, {}).get("cpu_ms_per_change")
        high = per.get(largest, {}).get("cpu_ms_per_change")
        result.ratios[f"{name} cpu/change @{largest} vs @{smallest}"] = ratio(high, low)
    key = f"realtime cpu/change @{largest} vs @{smallest}"
    if result.ratios.get(key) is not None:
        result.targets.append(Target(key, result.ratios[key], "<=", FILTER_CPU_GROWTH))
    rt_wrong = sum(r["unexpected"] + r["lost"] for r in result.runs if r["server"] == "realtime")
    if any(r["server"] == "realtime" for r in result.runs):
        result.targets.append(Target("realtime wrong+lost deliveries", float(rt_wrong), "<=", 0))
