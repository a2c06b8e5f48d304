"""`python -m bench.writecost_trees TREE ...`: what each checkout's change capture costs writers, side by side.

Scenario 5 compares capture with no capture and with a NOTIFY trigger, all from one checkout. A change to the
capture itself (a column, a trigger) is judged against the previous version instead: per TREE (a checkout of
realtime: `git worktree add /tmp/before <commit>`) and round, trees alternating, a fresh database on BENCH_PG
migrated by that tree, `users` seeded with `--rows` rows, that tree's `realtime serve` attached (its listener reads
the changes, as in production), then pgbench's UPDATE of one random row per transaction (scenario 5's script) for
`--seconds` at each `--clients` count, then `--cpu-transactions` of the same UPDATE on one connection, timing
the CPU its PostgreSQL backend spends per transaction (throughput on a shared machine drifts by tens of percent
between rounds; a backend's own CPU time much less). Reported: TPS per tree and client count and CPU per
transaction, median of the rounds with the lowest and highest, and each tree against the first. Needs `pgbench`
on PATH, and PostgreSQL on this machine for the CPU figure; a round of two trees takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg

from bench import db
from bench.instructions import recreate_database, wait_healthy
from bench.proc import cpu_seconds
from bench.scenarios.writecost import SCRIPT, pgbench

DATABASE = "bench_writecost_trees"


async def backend_cpu_per_update(url: str, rows: int, count: int) -> float:
    """Microseconds of CPU the writing backend spends per one-row UPDATE transaction (scenario 5's statement,
    autocommit), over `count` of them: what a transaction costs PostgreSQL, which a busy machine's other work
    changes far less than it changes throughput. The backend must run on this machine (its /proc is read)."""
    conn = await asyncpg.connect(url)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        statement = "UPDATE users SET name = 'w ' || $1, updated_at = now(), version = version + 1 WHERE id = $1"
        ids = [random.randint(1, rows) for _ in range(count)]
        for row_id in ids[:200]:  # warm: plans, caches
            await conn.execute(statement, row_id)
        before = cpu_seconds([pid])
        for row_id in ids:
            await conn.execute(statement, row_id)
        return (cpu_seconds([pid]) - before) / count * 1e6
    finally:
        await conn.close()


def measure(
    tree: Path, port: int, clients: list[int], seconds: float, rows: int, script: Path, cpu_count: int
) -> dict[str, float]:
    """TPS at each client count against one tree's capture, its server attached, and the backend's CPU per
    transaction ("cpu")."""
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
        figures: dict[str, float] = {}
        for count in clients:
            before = cpu_seconds([server.pid])
            tps = asyncio.run(pgbench(DATABASE, count, seconds, script))["tps"]
            figures[f"@{count}"] = tps
            # What the attached server spends reading the changes: it shares the machine with the writers.
            figures[f"server µs/tx @{count}"] = (cpu_seconds([server.pid]) - before) / (tps * seconds) * 1e6
        if cpu_count:
            figures["cpu"] = asyncio.run(backend_cpu_per_update(url, rows, cpu_count))
        return figures
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
    parser.add_argument("--cpu-transactions", type=int, default=20000, help="0: no backend CPU measurement")
    args = parser.parse_args(argv)
    trees = [tree.resolve() for tree in args.trees]
    clients = [int(count) for count in args.clients.split(",")]
    figures: dict[Path, dict[str, list[float]]] = {tree: {} for tree in trees}
    with tempfile.TemporaryDirectory(prefix="bench-writecost-") as work:
        script = Path(work) / "update.sql"
        script.write_text(SCRIPT.format(rows=args.rows))
        for round_number in range(args.rounds):
            order = trees if round_number % 2 == 0 else list(reversed(trees))
            for tree in order:
                measured = measure(tree, args.port, clients, args.seconds, args.rows, script, args.cpu_transactions)
                for name, value in measured.items():
                    figures[tree].setdefault(name, []).append(value)
                    print(f"round {round_number + 1}: {tree} {name}: {value:,.1f}", flush=True)
    print("\npgbench UPDATE TPS at @N writers, and backend CPU µs per transaction (cpu): median (lowest-highest),")
    print("and against the first tree")
    reference = trees[0]
    for tree in trees:
        for name, values in figures[tree].items():
            middle = statistics.median(values)
            against = middle / statistics.median(figures[reference][name])
            print(f"  {tree} {name}: {middle:,.1f} ({min(values):,.1f}-{max(values):,.1f})  {against:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
