"""Scenario 6: REST throughput and p99 for GET /users/{id} and POST /users at 32 connections.

realtime (streaming on, as deployed) against the seed app (SQLAlchemy, AsyncSession per request) on a
plain table. Each endpoint gets a closed-loop run of the same length; the table is reset before each server.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from bench import db
from bench.config import REST_VS_SEED
from bench.httpload import HttpResult, get_request, json_request, run_http_load
from bench.proc import CpuWindow
from bench.report import ScenarioResult, Target
from bench.scenarios.common import Context, alternate, attempt, prepare
from bench.servers import ServerSpec, running
from bench.stats import median, per_thousand, percentiles, ratio

HOST = "127.0.0.1"
_run_ids = itertools.count(1)


def _get_factory(rows: int) -> Any:
    def make(conn: int, n: int) -> bytes:
        # A fixed stride over the seeded ids: every request hits an existing row, spread over the table.
        row_id = (conn * 7919 + n * 104_729) % rows + 1
        return get_request(HOST, f"/users/{row_id}")

    return make


def _post_factory() -> Any:
    run_id = next(_run_ids)

    def make(conn: int, n: int) -> bytes:
        body = json.dumps({"name": f"rest {conn}.{n}", "email": f"rest-{run_id}-{conn}-{n}@example.com"})
        return json_request("POST", HOST, "/users", body.encode())

    return make


def _summarize(res: HttpResult, cpu_s: float) -> dict[str, Any]:
    lat = {k: v * 1000 for k, v in percentiles(res.latencies).items()}
    return {
        "requests": res.requests,
        "errors": res.errors,
        "statuses": {str(k): v for k, v in res.statuses.items()},
        "rps": res.requests / res.seconds if res.seconds else 0.0,
        "latency_ms": lat,
        "server_cpu_ms_per_1k_requests": (per_thousand(cpu_s, res.requests) or 0.0) * 1000,
    }


async def one(ctx: Context, spec: ServerSpec) -> dict[str, Any]:
    sz = ctx.sizes
    await db.reset_users(spec.database, sz.seed_rows)
    out: dict[str, Any] = {"server": spec.name}
    async with running(spec, ctx.log_dir, ctx.workers) as server:
        for endpoint, factory in (("GET /users/{id}", _get_factory(sz.seed_rows)), ("POST /users", _post_factory())):
            cpu = CpuWindow(server.pid)
            cpu.start()
            res = await run_http_load(
                HOST,
                server.port,
                factory,
                connections=sz.rest_connections,
                duration=sz.rest_seconds,
                warmup=sz.rest_warmup_seconds,
            )
            # The window includes the warm-up; scale it out so CPU per request stays comparable.
            cpu_s = cpu.stop() * sz.rest_seconds / (sz.rest_seconds + sz.rest_warmup_seconds)
            out[endpoint] = _summarize(res, cpu_s)
            s = out[endpoint]
            print(
                f"   {spec.name} {endpoint}: {s['rps']:,.0f} req/s p99 {s['latency_ms']['p99']:.1f} ms "
                f"errors {s['errors']}",
                flush=True,
            )
    return out


async def run(ctx: Context) -> ScenarioResult:
    sz = ctx.sizes
    endpoints = ("GET /users/{id}", "POST /users")
    result = ScenarioResult(
        name="rest",
        title=f"REST at {sz.rest_connections} keep-alive connections (req/s higher, p99 lower is better)",
        params={
            "connections": sz.rest_connections,
            "seconds": sz.rest_seconds,
            "warmup_seconds": sz.rest_warmup_seconds,
            "rows": sz.seed_rows,
            "workers": ctx.workers,
        },
        columns=["server", "round", "endpoint", "req/s", "p50 ms", "p99 ms", "errors", "cpu ms/1k req"],
    )
    contenders = ctx.contenders("realtime", "seed_rest")
    for round_index in range(ctx.round_count()):
        for spec in alternate(contenders, round_index):
            # The seed app is a plain REST app: its table carries no NOTIFY trigger.
            if not await prepare(ctx, spec, streaming=spec.kind == "realtime"):
                continue
            res = await attempt(result, f"{spec.name} round {round_index + 1}", one(ctx, spec))
            if res is None:
                continue
            result.runs.append({"round": round_index + 1, **res})
            for endpoint in endpoints:
                s = res[endpoint]
                if s["errors"] > s["requests"] / 100:
                    result.notes.append(
                        f"{spec.name} {endpoint}: {s['errors']} errors of {s['requests']} (statuses {s['statuses']})"
                    )
                result.rows.append(
                    [
                        spec.name,
                        round_index + 1,
                        endpoint,
                        s["rps"],
                        s["latency_ms"]["p50"],
                        s["latency_ms"]["p99"],
                        s["errors"],
                        s["server_cpu_ms_per_1k_requests"],
                    ]
                )
    await db.set_notify_trigger(True)
    for spec in contenders:
        runs = [r for r in result.runs if r["server"] == spec.name]
        for endpoint in endpoints:
            result.summary.setdefault(spec.name, {})[endpoint] = {
                "rps": median(r[endpoint]["rps"] for r in runs),
                "p99_ms": median(r[endpoint]["latency_ms"]["p99"] for r in runs),
                "errors": sum(r[endpoint]["errors"] for r in runs),
            }
    rt = result.summary.get("realtime")
    seed = result.summary.get("seed_rest")
    if rt and seed:
        for endpoint in endpoints:
            key = f"req/s realtime/seed {endpoint}"
            result.ratios[key] = ratio(rt[endpoint]["rps"], seed[endpoint]["rps"])
            result.ratios[f"p99 realtime/seed {endpoint}"] = ratio(rt[endpoint]["p99_ms"], seed[endpoint]["p99_ms"])
            result.targets.append(Target(key, result.ratios[key], ">=", REST_VS_SEED))
    return result
