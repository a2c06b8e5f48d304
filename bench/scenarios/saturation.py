"""Scenario 2: the highest delivery rate a server holds with p99 under 100 ms, at 100 and 1,000 subscribers.

Per server and subscriber count, on one server process and one set of subscribers:

    rate = start / subscribers -> measured step -> held? (p99 <= 100 ms, nothing lost, no slow-client
    closes, writers on schedule; one retry) -> rate *= factor -> ... until a rate fails twice, the writers
    or the load generator become the limit, or the step budget ends

The result is the best deliveries/s of a held step, with the reason the climb stopped. A climb stopped by
the writers or the load generator is a lower bound for that server, and the report says so.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import db, proc
from bench.config import MAX_RATE_VS_NODE, SATURATION_P99_MS
from bench.report import ScenarioResult, Target
from bench.scenarios.common import Context, StreamRun, alternate, attempt, measure, prepare, require_open
from bench.servers import ServerSpec, running
from bench.shards import SubscriberPool
from bench.stats import median, ratio
from bench.writers import ChangeWriters

COLUMNS = [
    "server",
    "subs",
    "steps",
    "held deliv/s",
    "p99 ms @held",
    "cpu ms/1k @held",
    "commits/s @held",
    "steal % max",
    "stopped by",
    "next deliv/s",
    "next p99 ms",
]


def judge(run: StreamRun) -> tuple[bool, str | None]:
    """(did the server hold this step, why the climb stops here or None to go on)."""
    s = run.summary()
    if run.window.closes:
        return False, "slow-client closes"
    if s["lost"]:
        return False, "lost deliveries"
    if not s["latency_ms"]["p99"] <= SATURATION_P99_MS:
        return False, "p99"
    if run.writes.max_lag_s > 1.0:
        # The database could not take more changes, so the server cannot be pushed harder from here.
        return True, "writers"
    if run.window.max_shard_busy > 0.95:
        # Past this point the load generator's own delays would be charged to the server.
        return True, "loadgen"
    return True, None


async def climb(ctx: Context, spec: ServerSpec, subscribers: int) -> dict[str, Any]:
    sz = ctx.sizes
    await db.reset_users(spec.database, sz.seed_rows)
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    stopped = "step budget"
    async with (
        running(spec, ctx.log_dir, ctx.workers) as server,
        SubscriberPool(server, ctx.shards or (2 if subscribers >= 2 else 1)) as pool,
        ChangeWriters(spec.database, sz.saturation_writers) as writers,
    ):
        opened = await pool.open(subscribers)
        require_open(spec, subscribers, opened)
        await asyncio.sleep(1.0)
        target = sz.saturation_start
        for step in range(sz.saturation_max_steps):
            # On a shared machine one stall of another process can sink a p99: a step gets a second try,
            # and only a rate that fails twice ends the climb.
            for attempt in (1, 2):
                before = await db.background_counts(spec.database)
                ticks = proc.machine_ticks()
                one = await measure(
                    spec,
                    server.pid,
                    pool,
                    opened,
                    writers,
                    rate=target / subscribers,
                    seconds=sz.saturation_step_seconds,
                    ids=list(range(1, sz.seed_rows + 1)),
                    warmup_s=2.0 if step == 0 and attempt == 1 else 0.0,
                )
                steal = proc.steal_percent(ticks, proc.machine_ticks())
                after = await db.background_counts(spec.database)
                background: dict[str, float] = {
                    key: after[key] - before[key] for key in after if after[key] != before[key]
                }
                if steal >= 0.5:
                    background["steal_pct"] = round(steal, 1)
                summary = one.summary()
                held, why = judge(one)
                summary.update(held=held, stopped_by=why, attempt=attempt, background=background, steal_pct=steal)
                steps.append(summary)
                print(
                    f"   {spec.name} {subscribers} subs: {one.deliveries_per_s:,.0f} deliv/s "
                    f"({one.writes.achieved_rate:,.0f} commits/s) p99 {summary['latency_ms']['p99']:.1f} ms "
                    f"max {summary['latency_ms']['max']:.1f} ms {'held' if held else 'not held'}"
                    + (f", stop: {why}" if why else "")
                    + (f", meanwhile {background}" if background else ""),
                    flush=True,
                )
                # Let queues and socket buffers empty so one step does not bleed into the next.
                await asyncio.sleep(0.5)
                if held:
                    break
            if held and (best is None or summary["deliveries_per_s"] > best["deliveries_per_s"]):
                best = summary
            if why is not None:
                stopped = why
                break
            target *= sz.saturation_factor
    failed = steps[-1] if steps and not steps[-1]["held"] else None
    return {
        "server": spec.name,
        "subscribers": subscribers,
        "steps": steps,
        "held_deliveries_per_s": best["deliveries_per_s"] if best else None,
        "held_p99_ms": best["latency_ms"]["p99"] if best else None,
        "held_cpu_ms_per_1k_frames": best["server_cpu_ms_per_1k_frames"] if best else None,
        # The writers' own commit rate at the held step: at 100 subscribers it is what ends most climbs.
        "held_commits_per_s": best["write_rate_achieved"] if best else None,
        # CPU taken by the hypervisor during the worst step: above a few percent, the climb measured the host.
        "steal_pct_max": max((step["steal_pct"] for step in steps), default=0.0),
        "stopped_by": stopped,
        "next_deliveries_per_s": failed["deliveries_per_s"] if failed else None,
        "next_p99_ms": failed["latency_ms"]["p99"] if failed else None,
    }


async def run(ctx: Context) -> ScenarioResult:
    sz = ctx.sizes
    result = ScenarioResult(
        name="saturation",
        title=f"saturation: highest deliveries/s with p99 <= {SATURATION_P99_MS:g} ms",
        params={
            "subscribers": list(sz.saturation_subscribers),
            "start_deliveries_per_s": sz.saturation_start,
            "factor": sz.saturation_factor,
            "step_seconds": sz.saturation_step_seconds,
            "max_steps": sz.saturation_max_steps,
            "writers": sz.saturation_writers,
            "workers": ctx.workers,
        },
        columns=COLUMNS,
    )
    order = 0
    for _ in range(ctx.round_count(sz.saturation_rounds)):
        for subscribers in sz.saturation_subscribers:
            for spec in alternate(ctx.contenders("realtime", "node", "tutorial"), order):
                if not await prepare(ctx, spec):
                    continue
                one = await attempt(result, f"{spec.name} at {subscribers} subscribers", climb(ctx, spec, subscribers))
                if one is None:
                    continue
                result.runs.append(one)
                result.rows.append(
                    [
                        spec.name,
                        subscribers,
                        len(one["steps"]),
                        one["held_deliveries_per_s"],
                        one["held_p99_ms"],
                        one["held_cpu_ms_per_1k_frames"],
                        one["held_commits_per_s"],
                        round(one["steal_pct_max"], 1),
                        one["stopped_by"],
                        one["next_deliveries_per_s"],
                        one["next_p99_ms"],
                    ]
                )
            order += 1
    summarize(result)
    return result


def summarize(result: ScenarioResult) -> None:
    for subscribers in result.params["subscribers"]:
        per_server: dict[str, dict[str, Any]] = {}
        for r in result.runs:
            if r["subscribers"] != subscribers:
                continue
            per_server.setdefault(r["server"], {"held": [], "cpu": [], "commits": [], "stopped_by": []})
            per_server[r["server"]]["held"].append(r["held_deliveries_per_s"])
            per_server[r["server"]]["cpu"].append(r["held_cpu_ms_per_1k_frames"])
            per_server[r["server"]]["commits"].append(r.get("held_commits_per_s"))
            per_server[r["server"]]["stopped_by"].append(r["stopped_by"])
        for name, d in per_server.items():
            held = [value for value in d["held"] if value is not None]
            result.summary.setdefault(name, {})[str(subscribers)] = {
                "held_deliveries_per_s": median(d["held"]),
                # A climb ends at the first rate that fails twice, so one stall moves it a whole step or more:
                # the spread of the climbs is part of the figure.
                "held_min": min(held) if held else None,
                "held_max": max(held) if held else None,
                "held_commits_per_s": median(d["commits"]),
                "cpu_ms_per_1k_frames": median(d["cpu"]),
                "stopped_by": d["stopped_by"],
            }
        rt = result.summary.get("realtime", {}).get(str(subscribers), {})
        for peer in ("node", "tutorial"):
            other = result.summary.get(peer, {}).get(str(subscribers))
            if other:
                result.ratios[f"held deliveries/s realtime/{peer} @{subscribers}"] = ratio(
                    rt.get("held_deliveries_per_s"), other["held_deliveries_per_s"]
                )
        key = f"held deliveries/s realtime/node @{subscribers}"
        if key in result.ratios:
            result.targets.append(Target(key, result.ratios[key], ">=", MAX_RATE_VS_NODE))
    if any(
        "writers" in d.get("stopped_by", []) or "loadgen" in d.get("stopped_by", [])
        for per in result.summary.values()
        for d in per.values()
    ):
        result.notes.append("a climb stopped by 'writers' or 'loadgen' is a lower bound for that server")
