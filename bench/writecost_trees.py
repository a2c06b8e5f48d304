"""`python -m bench.writecost_trees TREE ...`: what each checkout's change capture costs writers, side by side.

Scenario 5 compares capture with no capture and with a NOTIFY trigger, all from one checkout. A change to the
capture itself (a column, a trigger) is judged against the previous version instead: per TREE (a checkout of
realtime: `git worktree add /tmp/before <commit>`) and round, trees alternating, a fresh database on BENCH_PG
migrated by that tree, `users` seeded with `--rows` rows, that tree's `realtime serve` attached (its listener reads
the changes, as in production), then pgbench's UPDATE of one random row per transaction (scenario 5's script) for
`--seconds` at each `--clients` count. Reported: TPS per tree and client count, median of the rounds with the
lowest and highest, and each tree against the first. Needs `pgbench` on PATH; a round of two trees at two client
counts takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import db
from bench.instructions import recreate_database, wait_healthy
from bench.scenarios.writecost import SCRIPT, pgbench

DATABASE = "bench_writecost_trees"


def measure(tree: Path, port: int, clients: list[int], seconds: float, rows: int, script: Path) -> dict[int, float]:
    """TPS at each client count against one tree's capture, its server attached."""
    url = recreate_database(db.dsn("postgres"), DATABASE)
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(tree), "LOG_LEVEL": "warning"}
    subprocess.run([sys.executable, "-m", "realtime", "migrate"], cwd=tree, env=env, check=True, capture_output=True)
    asyncio.run(db.reset_users(DATABASE, rows))
    command = [sys.executable, "-m", "realtime", "serve", "--port", str(port)]
    server = subprocess.Popen(
        command, cwd=tree, env={**env, "MIGRATE_ON_START": "false"}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, 120)
        return {count: asyncio.run(pgbench(DATABASE, count, seconds, script))["tps"] for count in clients}
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writecost_trees", description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts to compare, the first as the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,16", help="comma-separated pgbench client counts")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--port", type=int, default=18710)
    args = parser.parse_args(argv)
    trees = [tree.resolve() for tree in args.trees]
    clients = [int(count) for count in args.clients.split(",")]
    tps: dict[Path, dict[int, list[float]]] = {tree: {count: [] for count in clients} for tree in trees}
    with tempfile.TemporaryDirectory(prefix="bench-writecost-") as work:
        script = Path(work) / "update.sql"
        script.write_text(SCRIPT.format(rows=args.rows))
        for round_number in range(args.rounds):
            order = trees if round_number % 2 == 0 else list(reversed(trees))
            for tree in order:
                for count, value in measure(tree, args.port, clients, args.seconds, args.rows, script).items():
                    tps[tree][count].append(value)
                    print(f"round {round_number + 1}: {tree} @{count}: {value:,.0f} tps", flush=True)
    print("\npgbench UPDATE TPS: median (lowest-highest), and against the first tree")
    reference = trees[0]
    for tree in trees:
        for count in clients:
            values = tps[tree][count]
            middle = statistics.median(values)
            against = middle / statistics.median(tps[reference][count])
            print(f"  {tree} @{count}: {middle:,.0f} ({min(values):,.0f}-{max(values):,.0f})  {against:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
