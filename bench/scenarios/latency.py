"""Scenario 1: delivery latency at a steady, realistic load (1,000 subscribers x 20 changes/s)."""

from __future__ import annotations

import asyncio
from typing import Any

from bench import db
from bench.config import P50_LIMIT_MS, P99_LIMIT_MS
from bench.report import ScenarioResult, Target
from bench.scenarios.common import Context, StreamRun, alternate, attempt, measure, prepare, require_open
from bench.servers import running
from bench.shards import SubscriberPool
from bench.stats import median, ratio
from bench.writers import ChangeWriters

WARMUP_S = 2.0

COLUMNS = [
    "server",
    "round",
    "subs",
    "changes",
    "deliv/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "first ms",
    "spread ms",
    "lost",
    "dup",
    "ooo",
    "cpu ms/1k",
    "srv cpu s",
    "db cpu s",
    "loadgen cpu s",
]


async def run_one(
    ctx: Context, spec_name: str, subscribers: int, rate: float, seconds: float, writers: int
) -> StreamRun:
    spec = next(s for s in ctx.servers if s.name == spec_name)
    await db.reset_users(spec.database, ctx.sizes.seed_rows)
    shards = ctx.shards_for(subscribers, subscribers * rate)
    async with (
        running(spec, ctx.log_dir, ctx.workers) as server,
        SubscriberPool(server, shards) as pool,
        ChangeWriters(spec.database, writers) as change_writers,
    ):
        opened = await pool.open(subscribers)
        require_open(spec, subscribers, opened)
        await asyncio.sleep(1.0)  # let accept/subscribe bursts settle before the clock starts
        return await measure(
            spec,
            server.pid,
            pool,
            opened,
            change_writers,
            rate=rate,
            seconds=seconds,
            ids=list(range(1, ctx.sizes.seed_rows + 1)),
            warmup_s=WARMUP_S,
        )


def row(record: dict[str, Any]) -> list[Any]:
    lat = record["latency_ms"]
    per_change = record["per_change_ms"]
    return [
        record["server"],
        record["round"],
        record["subscribers"],
        record["changes_committed"],
        record["deliveries_per_s"],
        lat["p50"],
        lat["p95"],
        lat["p99"],
        lat["max"],
        per_change["first_p50"],
        per_change["spread_p50"],
        record["lost"],
        record["duplicates"],
        record["out_of_order"],
        record["server_cpu_ms_per_1k_frames"],
        record["server_cpu_s"],
        record["db_cpu_s"],
        record["loadgen_cpu_s"],
    ]


async def run(ctx: Context) -> ScenarioResult:
    sz = ctx.sizes
    result = ScenarioResult(
        name="latency",
        title=f"latency: {sz.latency_subscribers} subscribers x {sz.latency_rate:g} changes/s "
        f"for {sz.latency_seconds:g}s",
        params={
            "subscribers": sz.latency_subscribers,
            "rate": sz.latency_rate,
            "seconds": sz.latency_seconds,
            "writers": sz.latency_writers,
            "workers": ctx.workers,
        },
        columns=COLUMNS,
    )
    for round_index in range(ctx.round_count()):
        for spec in alternate(ctx.contenders("realtime", "node", "tutorial"), round_index):
            if not await prepare(ctx, spec):
                continue
            one = await attempt(
                result,
                f"{spec.name} round {round_index + 1}",
                run_one(
                    ctx, spec.name, sz.latency_subscribers, sz.latency_rate, sz.latency_seconds, sz.latency_writers
                ),
            )
            if one is None:
                continue
            record = {"round": round_index + 1, **one.summary(), "per_change_ms": one.first_and_spread_ms()}
            result.rows.append(row(record))
            result.runs.append(record)
            print(f"   {spec.name} round {round_index + 1}: p99 {one.latency_ms['p99']:.2f} ms", flush=True)
    summarize(result)
    return result


def summarize(result: ScenarioResult) -> None:
    by_server: dict[str, list[dict[str, Any]]] = {}
    for r in result.runs:
        by_server.setdefault(r["server"], []).append(r)
    for name, runs in by_server.items():
        result.summary[name] = {
            "p50_ms": median(r["latency_ms"]["p50"] for r in runs),
            "p95_ms": median(r["latency_ms"]["p95"] for r in runs),
            "p99_ms": median(r["latency_ms"]["p99"] for r in runs),
            "max_ms": max((r["latency_ms"]["max"] for r in runs), default=None),
            "first_delivery_p50_ms": median(r["per_change_ms"]["first_p50"] for r in runs),
            "spread_p50_ms": median(r["per_change_ms"]["spread_p50"] for r in runs),
            "deliveries_per_s": median(r["deliveries_per_s"] for r in runs),
            "server_cpu_ms_per_1k_frames": median(r["server_cpu_ms_per_1k_frames"] for r in runs),
            "lost": sum(r["lost"] for r in runs),
            "duplicates": sum(r["duplicates"] for r in runs),
            "out_of_order": sum(r["out_of_order"] for r in runs),
        }
    rt = result.summary.get("realtime", {})
    for peer in ("node", "tutorial"):
        other = result.summary.get(peer)
        if other:
            result.ratios[f"p99 realtime/{peer}"] = ratio(rt.get("p99_ms"), other["p99_ms"])
            result.ratios[f"cpu per frame realtime/{peer}"] = ratio(
                rt.get("server_cpu_ms_per_1k_frames"), other["server_cpu_ms_per_1k_frames"]
            )
    if rt:
        result.targets.append(Target("realtime p50 ms", rt["p50_ms"], "<=", P50_LIMIT_MS))
        result.targets.append(Target("realtime p99 ms", rt["p99_ms"], "<=", P99_LIMIT_MS))
        lossless = rt["lost"] + rt["duplicates"] + rt["out_of_order"]
        result.targets.append(Target("realtime lost+dup+ooo", float(lossless), "<=", 0))
