"""Scenario 8: what row-level policies cost: server CPU per delivered frame and deliveries/s, with and without rules.

realtime only, with a token key (AUTH_JWT_SECRET) and AUTH_POLICY_FILE = bench/policy.toml, N subscribers, subscriber
i authenticated with `sub` = its row id i + 1. Three variants, which differ only in the token's role and the
subscribe message:

    filter        role `reader`, whose rule covers every row: its subscriptions carry no grant (`_read_grant`
                  returns None for a grant that restricts nothing), the path of a server without a policy. Each
                  subscriber filters on its own id, so the same frames reach the same sockets as with the rule
    rule+filter   role `member` (a member reads the row whose id is its `sub`) and the same filter: the rule is
                  checked on top of it
    rule          role `member` and no filter: only the rule narrows the subscription, which the hub indexes by
                  the id the rule binds (the case where a rule evaluated per subscriber would cost O(N))

All three run one after the other on the same server process (started once per round, order alternating from
round to round), so drift between processes and over minutes of a shared machine does not land in the ratio; the
token is verified once per connection in all three. Per variant, on that server:

    open N: connect, auth, subscribe -> fixed rate: `policy_rate` changes/s for `policy_seconds` after 2 s
    unmeasured (server CPU / frames delivered) -> climb: from `policy_start` changes/s, x `policy_factor` per step,
    judged like the saturation scenario (p99 <= 100 ms, nothing lost, no slow-client close; writers or load
    generator at their limit end the climb, and its result is then a lower bound) -> close the N connections

Every change is an UPDATE of one of the N rows, so it reaches exactly one subscriber: deliveries/s = changes/s.
UPDATEs go in statements of `policy_rows_per_commit` consecutive ids (round robin): several rows per commit keep
the database's commit rate, which on a shared machine lags first, out of the figures, and make changes arrive in
batches as they do under load, where the per-read cost is spread thin and a per-frame overhead shows most.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench import db
from bench.config import POLICY_CPU_VS_UNRESTRICTED, SATURATION_P99_MS, SUPABASE_RLS_MESSAGES_PER_S
from bench.report import ScenarioResult, Target
from bench.scenarios.common import Context, StreamRun, alternate, attempt, measure, prepare, require_open
from bench.scenarios.saturation import judge
from bench.servers import BENCH_DIR, REALTIME, RunningServer, running
from bench.shards import FilterMode, OpenReport, SubscriberPool
from bench.stats import median, ratio
from bench.writers import ChangeWriters
from realtime.auth.tokens import issue_token
from realtime.config import Settings

POLICY_FILE = BENCH_DIR / "policy.toml"
TOKEN_TTL_S = 6 * 3600  # outlives any run: an expiring token would close its connection mid-window
WARMUP_S = 2.0
BASELINE = "filter"


@dataclass(frozen=True)
class Variant:
    name: str
    role: str  # the token's role: "reader" (a rule covering every row) or "member" (its own row)
    filter_mode: FilterMode  # "ask": the subscribe filters on the subscriber's id; "check": it does not


VARIANTS = (
    Variant(BASELINE, "reader", "ask"),
    Variant("rule+filter", "member", "ask"),
    Variant("rule", "member", "check"),
)

COLUMNS = [
    "variant",
    "round",
    "subs",
    "changes",
    "deliv/s",
    "p50 ms",
    "p99 ms",
    "lost",
    "wrong",
    "cpu ms/1k",
    "held deliv/s",
    "p99 ms @held",
    "cpu ms/1k @held",
    "stopped by",
]


def server_env(secret: str) -> dict[str, str | None]:
    """The token key and the policy, and nothing else that changes what a token means, so the tokens made here are
    accepted whatever the harness's environment holds."""
    return {
        "AUTH_MODE": "",
        "AUTH_JWT_SECRET": secret,
        "AUTH_JWKS_URL": "",
        "AUTH_PUBLIC_KEY_FILE": "",
        "AUTH_AUDIENCE": "",
        "AUTH_ISSUER": "",
        "AUTH_ROLE_CLAIM": "role",
        "AUTH_POLICY_FILE": str(POLICY_FILE),
    }


def tokens_for(secret: str, role: str, ids: list[int]) -> list[str]:
    settings = Settings(
        _env_file=None,
        auth_jwt_secret=secret,
        auth_jwks_url=None,
        auth_public_key_file=None,
        auth_audience=None,
        auth_issuer=None,
        auth_role_claim="role",
    )
    return [issue_token(settings, sub=str(i), role=role, ttl_s=TOKEN_TTL_S, claims={}) for i in ids]


async def climb(
    ctx: Context, server_pid: int, pool: SubscriberPool, writers: ChangeWriters, opened: OpenReport, ids: list[int]
) -> dict[str, Any]:
    """Raise the change rate until a step is not held twice or the writers / load generator become the limit."""
    sz = ctx.sizes
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    stopped = "step budget"
    target = sz.policy_start
    for _ in range(sz.policy_max_steps):
        held = False
        for attempt_no in (1, 2):
            one = await measure(
                REALTIME,
                server_pid,
                pool,
                opened,
                writers,
                rate=target,
                seconds=sz.policy_step_seconds,
                ids=ids,
                mode="updates",
                per_key=True,
                rows_per_commit=sz.policy_rows_per_commit,
            )
            summary = one.summary()
            held, why = judge(one)
            summary.update(held=held, stopped_by=why, attempt=attempt_no)
            steps.append(summary)
            print(
                f"     {one.deliveries_per_s:,.0f} deliv/s p99 {summary['latency_ms']['p99']:.1f} ms "
                f"{'held' if held else 'not held'}" + (f", stop: {why}" if why else ""),
                flush=True,
            )
            await asyncio.sleep(0.5)  # let queues and socket buffers empty before the next step
            if held:
                break
        if held and (best is None or summary["deliveries_per_s"] > best["deliveries_per_s"]):
            best = summary
        if why is not None:
            stopped = why
            break
        target *= sz.policy_factor
    return {
        "steps": steps,
        "held_deliveries_per_s": best["deliveries_per_s"] if best else None,
        "held_p99_ms": best["latency_ms"]["p99"] if best else None,
        "held_cpu_ms_per_1k_frames": best["server_cpu_ms_per_1k_frames"] if best else None,
        "stopped_by": stopped,
    }


async def one_variant(
    ctx: Context, server: RunningServer, writers: ChangeWriters, variant: Variant, tokens: list[str]
) -> dict[str, Any]:
    sz = ctx.sizes
    n = sz.policy_subscribers
    ids = list(range(1, n + 1))
    # Two shards from the start: the climb goes past what one keeps up with (SHARD_THRESHOLD).
    async with SubscriberPool(
        server, ctx.shards or 2, filter_base=1, tokens=tokens, filter_mode=variant.filter_mode
    ) as pool:
        opened = await pool.open(n)
        require_open(REALTIME, n, opened)
        await asyncio.sleep(1.0)
        fixed: StreamRun = await measure(
            REALTIME,
            server.pid,
            pool,
            opened,
            writers,
            rate=sz.policy_rate,
            seconds=sz.policy_seconds,
            ids=ids,
            mode="updates",
            warmup_s=WARMUP_S,
            per_key=True,
            rows_per_commit=sz.policy_rows_per_commit,
        )
        print(
            f"   {variant.name}: {fixed.summary()['server_cpu_ms_per_1k_frames'] or 0:.2f} µs CPU/frame "
            f"at {fixed.deliveries_per_s:,.0f} deliv/s; climbing",
            flush=True,
        )
        climbed = await climb(ctx, server.pid, pool, writers, opened, ids)
    # The shards closed their sockets: give the server a moment to drop those subscriptions before the next set.
    await asyncio.sleep(2.0)
    return {"variant": variant.name, "fixed": fixed.summary(), **climbed}


async def one_round(
    ctx: Context, result: ScenarioResult, round_index: int, secret: str, tokens: dict[str, list[str]]
) -> None:
    sz = ctx.sizes
    await db.reset_users(REALTIME.database, max(sz.seed_rows, sz.policy_subscribers))
    async with (
        running(REALTIME, ctx.log_dir, ctx.workers, env=server_env(secret)) as server,
        ChangeWriters(REALTIME.database, sz.policy_writers) as writers,
    ):
        for variant in alternate(list(VARIANTS), round_index):
            record = await attempt(
                result,
                f"{variant.name} round {round_index + 1}",
                one_variant(ctx, server, writers, variant, tokens[variant.role]),
            )
            if record is None:
                continue
            record = {"round": round_index + 1, **record}
            result.runs.append(record)
            result.rows.append(row(record))


def row(record: Mapping[str, Any]) -> list[Any]:
    fixed = record["fixed"]
    return [
        record["variant"],
        record["round"],
        fixed["subscribers"],
        fixed["changes_committed"],
        fixed["deliveries_per_s"],
        fixed["latency_ms"]["p50"],
        fixed["latency_ms"]["p99"],
        fixed["lost"],
        fixed["unexpected"],
        fixed["server_cpu_ms_per_1k_frames"],
        record["held_deliveries_per_s"],
        record["held_p99_ms"],
        record["held_cpu_ms_per_1k_frames"],
        record["stopped_by"],
    ]


async def run(ctx: Context) -> ScenarioResult:
    sz = ctx.sizes
    result = ScenarioResult(
        name="policy",
        title=f"row-level policies: {sz.policy_subscribers} subscribers, each receiving its own row "
        f"({sz.policy_rate:g} changes/s for {sz.policy_seconds:g}s, then a climb with p99 <= {SATURATION_P99_MS:g} ms)",
        params={
            "subscribers": sz.policy_subscribers,
            "rate": sz.policy_rate,
            "seconds": sz.policy_seconds,
            "writers": sz.policy_writers,
            "rows_per_commit": sz.policy_rows_per_commit,
            "climb_start": sz.policy_start,
            "climb_factor": sz.policy_factor,
            "climb_step_seconds": sz.policy_step_seconds,
            "climb_max_steps": sz.policy_max_steps,
            "policy_file": POLICY_FILE.read_text(),
            "variants": {v.name: {"role": v.role, "filter": v.filter_mode == "ask"} for v in VARIANTS},
            "workers": ctx.workers,
        },
        columns=COLUMNS,
    )
    if not ctx.contenders("realtime") or not await prepare(ctx, REALTIME):
        result.notes.append("realtime is not among the servers or cannot run: nothing measured")
        return result
    secret = secrets.token_hex(32)
    ids = list(range(1, sz.policy_subscribers + 1))
    tokens = {role: tokens_for(secret, role, ids) for role in {v.role for v in VARIANTS}}
    for round_index in range(ctx.round_count()):
        await attempt(result, f"round {round_index + 1}", one_round(ctx, result, round_index, secret, tokens))
    summarize(result)
    return result


def _spread(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    return {
        "median": median(present),
        "min": min(present) if present else None,
        "max": max(present) if present else None,
    }


def summarize(result: ScenarioResult) -> None:
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in result.runs:
        by_variant.setdefault(r["variant"], []).append(r)
    for name, runs in by_variant.items():
        result.summary[name] = {
            "cpu_ms_per_1k_frames": _spread([r["fixed"]["server_cpu_ms_per_1k_frames"] for r in runs]),
            "deliveries_per_s": _spread([r["fixed"]["deliveries_per_s"] for r in runs]),
            "p50_ms": _spread([r["fixed"]["latency_ms"]["p50"] for r in runs]),
            "p99_ms": _spread([r["fixed"]["latency_ms"]["p99"] for r in runs]),
            "held_deliveries_per_s": _spread([r["held_deliveries_per_s"] for r in runs]),
            "held_p99_ms": _spread([r["held_p99_ms"] for r in runs]),
            "held_cpu_ms_per_1k_frames": _spread([r["held_cpu_ms_per_1k_frames"] for r in runs]),
            "stopped_by": [r["stopped_by"] for r in runs],
            "lost": sum(r["fixed"]["lost"] + sum(s["lost"] for s in r["steps"] if s["held"]) for r in runs),
            "wrong": sum(r["fixed"]["unexpected"] + sum(s["unexpected"] for s in r["steps"]) for r in runs),
        }
    variants = dict(result.summary)  # the variants measured; summary keys added below are not variants
    base = variants.get(BASELINE)
    for variant in VARIANTS[1:]:
        mine = variants.get(variant.name)
        if base is None or mine is None:
            continue
        key = f"cpu per frame {variant.name}/{BASELINE}"
        result.ratios[key] = ratio(mine["cpu_ms_per_1k_frames"]["median"], base["cpu_ms_per_1k_frames"]["median"])
        result.ratios[f"held deliveries/s {variant.name}/{BASELINE}"] = ratio(
            mine["held_deliveries_per_s"]["median"], base["held_deliveries_per_s"]["median"]
        )
        paired = _paired_ratios(result.runs, variant.name)
        mine["cpu_per_frame_vs_baseline_by_round"] = paired
        if paired:
            result.notes.append(
                f"cpu per frame {variant.name}/{BASELINE} round by round: " + ", ".join(f"{p:.2f}" for p in paired)
            )
        result.targets.append(Target(key, result.ratios[key], "<=", POLICY_CPU_VS_UNRESTRICTED))
    _step_ratios(result)
    low, high = SUPABASE_RLS_MESSAGES_PER_S
    for name, per in variants.items():
        held = per["held_deliveries_per_s"]["median"]
        if held is not None:
            result.ratios[f"held deliveries/s {name} / Supabase RLS ceiling {high:,}"] = held / high
    result.notes.append(
        f"Supabase's published Postgres Changes throughput with RLS: {low:,}-{high:,} messages/s in total; "
        "a climb stopped by 'writers', 'loadgen' or 'step budget' is a lower bound"
    )
    if variants:
        wrong = sum(per["lost"] + per["wrong"] for per in variants.values())
        result.targets.append(Target("lost + wrong deliveries (every variant)", float(wrong), "<=", 0))


def _paired_ratios(runs: list[dict[str, Any]], name: str) -> list[float]:
    """The variant's CPU per frame over the baseline's of the same round: rounds alternate, so drift cancels."""
    by_round: dict[int, dict[str, float | None]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["variant"]] = r["fixed"]["server_cpu_ms_per_1k_frames"]
    out = []
    for per in by_round.values():
        value = ratio(per.get(name), per.get(BASELINE))
        if value is not None:
            out.append(value)
    return out


def _step_ratios(result: ScenarioResult) -> None:
    """CPU per frame at each climb rate, over the steps each variant held: heavier loads than the fixed window's,
    where the per-read cost is spread over more frames and a per-frame overhead weighs more."""
    by_rate: dict[float, dict[str, list[float | None]]] = {}
    for r in result.runs:
        for step in r["steps"]:
            if step["held"]:
                per = by_rate.setdefault(step["rate_offered"], {})
                per.setdefault(r["variant"], []).append(step["server_cpu_ms_per_1k_frames"])
    table = {rate: {name: median(values) for name, values in per.items()} for rate, per in sorted(by_rate.items())}
    result.summary["held_step_cpu_ms_per_1k_frames"] = {f"{rate:g}": per for rate, per in table.items()}
    for variant in VARIANTS[1:]:
        parts = []
        for rate, cpu in table.items():
            value = ratio(cpu.get(variant.name), cpu.get(BASELINE))
            if value is not None:
                parts.append(f"{rate:,.0f}/s {value:.2f}")
        if parts:
            result.notes.append(f"cpu per frame {variant.name}/{BASELINE} at held climb steps: " + ", ".join(parts))
