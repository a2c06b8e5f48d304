"""`python -m bench.instructions [TREE ...]`: instructions a REST GET executes in the server, by callgrind.

Timing a REST request on a shared 2-core machine drifts by several percent from run to run, which hides a cost of
one or two percent. Instructions do not drift: valgrind's callgrind counts what the server process executes,
whatever else the machine does, so two versions of the code can be compared on a busy machine too.

Per TREE (a checkout of realtime: `git worktree add /tmp/before <commit>`; default: this one) and round, trees
alternating: a fresh database on BENCH_PG (migrated by that tree), `realtime serve` from that tree under
`valgrind --tool=callgrind` with instrumentation off, one user, `--warmup` keep-alive GETs of /users/1, then
instrumentation on for `--requests` GETs, then a dump. Reported: instructions per GET, median of the rounds with
the lowest and highest. Only the server process is counted (not PostgreSQL, not the client), and only
user-space instructions (not the kernel's work for its sockets). Needs `valgrind` on PATH; each round takes
about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

from bench.stats import median

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


def recreate_database(admin: str, name: str) -> str:
    async def recreate() -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(recreate())
    return admin.rsplit("/", 1)[0] + "/" + name


def wait_healthy(base: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout}s")


def _gets(base: str, count: int) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        for _ in range(count):
            response = client.get("/users/1")
            response.raise_for_status()


def measure(tree: Path, admin: str, port: int, warmup: int, requests: int, work: Path) -> float:
    """Instructions per GET of one server run from `tree`."""
    url = recreate_database(admin, "bench_instructions")
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(tree), "LOG_LEVEL": "warning", "PYTHONHASHSEED": "0"}
    subprocess.run([sys.executable, "-m", "realtime", "migrate"], cwd=tree, env=env, check=True, capture_output=True)
    out = work / f"callgrind.{port}"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "realtime", "serve", "--port", str(port),
    ]  # fmt: skip
    with (work / "server.log").open("ab") as log:
        process = subprocess.Popen(
            command, cwd=tree, env={**env, "MIGRATE_ON_START": "false"}, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process, 300)
        httpx.post(f"{base}/users", json={"name": "Ada", "email": "ada@example.com"}, timeout=60).raise_for_status()
        _gets(base, warmup)
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(process.pid)], check=True, capture_output=True)
        _gets(base, requests)
        subprocess.run([*control, "-i", "off", str(process.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(process.pid)], check=True, capture_output=True)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(120)
    total = sum(int(m) for path in work.glob(f"callgrind.{port}*") for m in _TOTALS.findall(path.read_text()))
    for path in work.glob(f"callgrind.{port}*"):
        path.unlink()
    return total / requests


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, help="checkouts to compare (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--port", type=int, default=18700)
    args = parser.parse_args(argv)
    trees = [tree.resolve() for tree in args.trees] or [Path(__file__).resolve().parent.parent]
    admin = os.environ.get("BENCH_PG", DEFAULT_PG)
    counts: dict[Path, list[float]] = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as work:
        for round_number in range(args.rounds):
            order = trees if round_number % 2 == 0 else list(reversed(trees))
            for tree in order:
                count = measure(tree, admin, args.port, args.warmup, args.requests, Path(work))
                counts[tree].append(count)
                print(f"round {round_number + 1}: {tree}: {count:,.0f} instructions per GET", flush=True)
    print("\ninstructions per GET /users/{id} in the server: median (lowest-highest)")
    for tree, values in counts.items():
        print(f"  {tree}: {median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
