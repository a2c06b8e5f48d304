"""`python -m bench [scenario ...] [--quick]`: run the benchmark scenarios and print one table each."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.config import FULL, QUICK
from bench.loop import run_fast
from bench.proc import raise_nofile_limit
from bench.report import ScenarioResult, machine_info, render, write_json
from bench.scenarios import SCENARIOS
from bench.scenarios.common import Context
from bench.servers import BENCH_DIR, SPECS

Scenario = Callable[[Context], Awaitable[ScenarioResult]]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenarios", nargs="*", metavar="scenario", help=f"any of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (a few minutes)")
    parser.add_argument(
        "--servers",
        default="realtime,node,tutorial,seed_rest",
        help="comma-separated contenders to run (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="times each server runs per scenario (default: 2, quick: 1)")
    parser.add_argument("--workers", type=int, default=1, help="realtime's --workers (default 1)")
    parser.add_argument("--shards", type=int, default=0, help="loadgen processes (default: by delivery rate)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="where the JSON goes")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    bad = [n for n in names if n not in SPECS]
    if bad:
        parser.error(f"unknown server(s) {', '.join(bad)}; choose from {', '.join(SPECS)}")
    args.server_names = names
    return args


async def main_async(args: argparse.Namespace) -> int:
    ctx = Context(
        sizes=QUICK if args.quick else FULL,
        quick=args.quick,
        servers=[SPECS[n] for n in SPECS if n in args.server_names],
        results_dir=args.results,
        log_dir=args.results / "logs",
        workers=args.workers,
        shards=args.shards,
        rounds=args.rounds,
    )
    machine = machine_info()
    print(f"machine: {machine['cores']} cores, {machine['memory_gib']} GiB, load {machine['loadavg']}", flush=True)
    failed = 0
    for name in args.scenarios or list(SCENARIOS):
        scenario: Scenario = SCENARIOS[name]
        started = time.monotonic()
        print(f"-- {name} ...", flush=True)
        try:
            result = await scenario(ctx)
        except Exception:
            failed += 1
            traceback.print_exc()
            continue
        ctx.done[name] = result
        path = write_json(result, ctx.results_dir, machine, ctx.quick)
        print(render(result))
        print(f"   ({time.monotonic() - started:.0f}s, {path})", flush=True)
    for server, why in ctx.unavailable.items():
        print(f"skipped {server}: {why.splitlines()[0]}")
    # A contender asked for that could not run is a failed run too: its figures are missing.
    return 1 if failed or ctx.unavailable else 0


def main() -> None:
    raise_nofile_limit()
    sys.exit(run_fast(main_async(parse_args(sys.argv[1:]))))


if __name__ == "__main__":
    main()
