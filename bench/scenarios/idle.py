"""Scenario 4: memory per idle connection (RSS growth / connections) at 1,000 and 10,000 subscribers.

    start server -> open a few connections (first-use allocations land here) -> baseline RSS
    -> open up to each count (realtime ones subscribed) -> settle -> RSS and idle CPU -> next count

RSS is the server's whole process tree; the baseline is subtracted, so with several workers their fixed
cost cancels out and only what the connections added remains.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.config import IDLE_KIB_PER_CONN
from bench.proc import tree_cpu_seconds, tree_rss_bytes
from bench.report import ScenarioResult, Target
from bench.scenarios.common import Context, alternate, attempt, prepare, require_open
from bench.servers import ServerSpec, running
from bench.shards import SubscriberPool
from bench.stats import median, ratio

WARM_CONNECTIONS = 10


async def one(ctx: Context, spec: ServerSpec) -> dict[str, Any]:
    settle = ctx.sizes.idle_settle_seconds
    points: list[dict[str, Any]] = []
    async with running(spec, ctx.log_dir, ctx.workers) as server, SubscriberPool(server, 1) as pool:
        warm = await pool.open(WARM_CONNECTIONS)
        require_open(spec, WARM_CONNECTIONS, warm)
        await asyncio.sleep(settle)
        base_rss = tree_rss_bytes(server.pid)
        for count in ctx.sizes.idle_counts:
            more = count - pool.opened
            opened = await pool.open(more)
            require_open(spec, more, opened)
            await asyncio.sleep(settle)
            cpu_before = tree_cpu_seconds(server.pid)
            await asyncio.sleep(settle)
            idle_cpu = (tree_cpu_seconds(server.pid) - cpu_before) / settle
            rss = tree_rss_bytes(server.pid)
            live = await pool.live()
            points.append(
                {
                    "connections": count,
                    "live": live,
                    "open_seconds": opened.seconds,
                    "rss_bytes": rss,
                    "base_rss_bytes": base_rss,
                    "kib_per_connection": (rss - base_rss) / 1024 / max(1, count - WARM_CONNECTIONS),
                    "idle_cpu_percent": idle_cpu * 100,
                }
            )
            print(f"   {spec.name} {count} open: {points[-1]['kib_per_connection']:.1f} KiB/conn", flush=True)
    return {"server": spec.name, "points": points}


async def run(ctx: Context) -> ScenarioResult:
    counts = ctx.sizes.idle_counts
    result = ScenarioResult(
        name="idle",
        title="idle connections: server RSS per open subscriber (KiB; lower is better)",
        params={"counts": list(counts), "settle_seconds": ctx.sizes.idle_settle_seconds, "workers": ctx.workers},
        columns=["server", "round", "connections", "RSS MiB", "KiB/conn", "idle cpu %", "open s"],
    )
    for round_index in range(ctx.round_count()):
        for spec in alternate(ctx.contenders("realtime", "node", "tutorial"), round_index):
            if not await prepare(ctx, spec):
                continue
            res = await attempt(result, f"{spec.name} round {round_index + 1}", one(ctx, spec))
            if res is None:
                continue
            result.runs.append({"round": round_index + 1, **res})
            for p in res["points"]:
                result.rows.append(
                    [
                        spec.name,
                        round_index + 1,
                        p["connections"],
                        p["rss_bytes"] / 2**20,
                        p["kib_per_connection"],
                        p["idle_cpu_percent"],
                        p["open_seconds"],
                    ]
                )
    for r in result.runs:
        for p in r["points"]:
            per = result.summary.setdefault(r["server"], {}).setdefault(str(p["connections"]), [])
            per.append(p["kib_per_connection"])
    for per_count in result.summary.values():
        for count, values in per_count.items():
            per_count[count] = median(values)
    largest = str(counts[-1])
    rt = result.summary.get("realtime", {}).get(largest)
    for peer in ("node", "tutorial"):
        other = result.summary.get(peer, {}).get(largest)
        if other is not None:
            result.ratios[f"KiB/conn realtime/{peer} @{largest}"] = ratio(rt, other)
    if rt is not None:
        result.targets.append(Target(f"realtime KiB/conn @{largest}", rt, "<=", IDLE_KIB_PER_CONN))
    return result
