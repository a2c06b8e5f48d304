"""Scenario 3: server CPU seconds per 1,000 delivered frames, taken from the latency and saturation runs.

It measures nothing itself: the figures come from scenarios 1 and 2 of this invocation, else from their
JSON in the results folder (same --quick setting only). Without either, it runs scenario 1 first.
"""

from __future__ import annotations

import json
from typing import Any

from bench.config import CPU_PER_FRAME_VS_NODE
from bench.report import ScenarioResult, Target
from bench.scenarios import latency
from bench.scenarios.common import Context
from bench.stats import ratio


def _summary(ctx: Context, name: str) -> dict[str, Any] | None:
    if name in ctx.done:
        return ctx.done[name].summary
    path = ctx.results_dir / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("quick") != ctx.quick:
        return None
    summary: dict[str, Any] = data.get("summary", {})
    return summary


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        name="cpu",
        title="server CPU per 1,000 delivered frames (ms of CPU; lower is better)",
        params={},
        columns=["load", "server", "cpu ms/1k frames", "vs node"],
    )
    lat = _summary(ctx, "latency")
    if lat is None:
        result.notes.append("no latency results yet: ran the latency scenario first")
        ctx.done["latency"] = await latency.run(ctx)
        lat = ctx.done["latency"].summary
    sat = _summary(ctx, "saturation") or {}

    loads: list[tuple[str, dict[str, float | None]]] = [
        ("latency run", {name: s.get("server_cpu_ms_per_1k_frames") for name, s in lat.items()})
    ]
    subscriber_counts = sorted({int(k) for per in sat.values() for k in per}, key=int)
    for subs in subscriber_counts:
        loads.append(
            (
                f"saturation @{subs} (held step)",
                {name: per.get(str(subs), {}).get("cpu_ms_per_1k_frames") for name, per in sat.items()},
            )
        )
    for load, per_server in loads:
        node = per_server.get("node")
        for name, value in per_server.items():
            result.rows.append([load, name, value, ratio(value, node)])
            result.summary.setdefault(load, {})[name] = value
        rt = per_server.get("realtime")
        if rt is not None and node is not None:
            key = f"cpu per frame realtime/node, {load}"
            result.ratios[key] = ratio(rt, node)
            result.targets.append(Target(key, result.ratios[key], "<=", CPU_PER_FRAME_VS_NODE))
    return result
