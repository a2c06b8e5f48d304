"""`python -m bench.policy_instructions`: scenario 8's CPU per frame counted in instructions, by callgrind.

Scenario 8 (`python -m bench policy`) times the server's CPU per delivered frame with and without row-level rules.
On a shared 2-core machine one round's figure lands up to 25% from its median, more than the rules cost. Here the
same server, subscribers, tokens, policy and changes run with the server under valgrind's callgrind
(instrumentation on only for each variant's measured window), so the count does not depend on what else the
machine does. The server runs some 30-50 times slower under valgrind, so the rate is far lower than scenario 8's
(`--rate`, default 100 changes/s, each reaching one subscriber): what a frame costs at that rate, where a listener
read carries a commit's `policy_rows_per_commit` changes.

Per round (`--rounds`, default 3): one server under callgrind; per variant (`filter`, `rule+filter`, `rule`, order
alternating from round to round): open the subscribers, `--warmup` seconds of changes uninstrumented, then
instrumentation on for `--seconds` of changes until every frame arrived, off, and a dump. Reported: instructions
per delivered frame in the server process (every thread), median of the rounds with the lowest and highest, and
each variant against `filter`. Needs `valgrind` (and `callgrind_control`) on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from bench import db
from bench.config import FULL, QUICK
from bench.scenarios.common import alternate, measure, require_open
from bench.scenarios.policy import BASELINE, VARIANTS, server_env, tokens_for
from bench.servers import REALTIME, REPO_DIR, RunningServer, free_port
from bench.shards import SubscriberPool
from bench.writers import ChangeWriters

_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


@asynccontextmanager
async def callgrind_server(secret: str, work: Path) -> AsyncIterator[RunningServer]:
    """realtime serve under callgrind, instrumentation off, with scenario 8's token key and policy."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db.dsn(REALTIME.database),
        "WS_MAX_CONNECTIONS_PER_CLIENT": "1000000",
        "WS_MAX_CONNECTIONS": "1000000",
        "LOG_LEVEL": "warning",
        "PYTHONHASHSEED": "0",
    }
    for name, value in server_env(secret).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={work}/callgrind.%p",
        str(db.realtime_cli()), "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    log = (work / "server.log").open("ab")
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO_DIR, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"server exited with {process.returncode}; see {work / 'server.log'}")
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("server not ready under valgrind after 600 s")
                await asyncio.sleep(1.0)
        yield RunningServer(REALTIME, process.pid, port, work / "server.log")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 300)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=300)


def _take_dumps(work: Path) -> int:
    """Instructions in the dumps written so far (removed once read)."""
    total = 0
    for path in work.glob("callgrind.*"):
        if path.name.endswith(".log"):
            continue
        total += sum(int(match) for match in _TOTALS.findall(path.read_text(errors="replace")))
        path.unlink()
    return total


async def one_round(round_index: int, args: argparse.Namespace, secret: str, work: Path) -> dict[str, float]:
    sizes = QUICK if args.quick else FULL
    n = args.subscribers
    ids = list(range(1, n + 1))
    tokens = {role: tokens_for(secret, role, ids) for role in {v.role for v in VARIANTS}}
    await db.reset_users(REALTIME.database, max(sizes.seed_rows, n))
    counts: dict[str, float] = {}
    async with (
        callgrind_server(secret, work) as server,
        ChangeWriters(REALTIME.database, sizes.policy_writers) as writers,
    ):
        _take_dumps(work)  # whatever startup wrote
        for variant in alternate(list(VARIANTS), round_index):
            async with SubscriberPool(
                server, 1, filter_base=1, tokens=tokens[variant.role], filter_mode=variant.filter_mode
            ) as pool:
                opened = await pool.open(n)
                require_open(REALTIME, n, opened)
                window = functools.partial(
                    measure,
                    REALTIME,
                    server.pid,
                    pool,
                    opened,
                    writers,
                    rate=args.rate,
                    ids=ids,
                    mode="updates",
                    per_key=True,
                    rows_per_commit=sizes.policy_rows_per_commit,
                )
                await window(seconds=args.warmup)
                await asyncio.to_thread(_control, "-i", "on", str(server.pid))
                run = await window(seconds=args.seconds)
                await asyncio.to_thread(_control, "-i", "off", str(server.pid))
                await asyncio.to_thread(_control, "-d", str(server.pid))
                frames = run.window.deliveries
                instructions = _take_dumps(work)
                if run.window.lost or run.window.unexpected:
                    raise RuntimeError(f"{variant.name}: {run.window.lost} lost, {run.window.unexpected} unexpected")
                counts[variant.name] = instructions / frames
                print(
                    f"round {round_index + 1}: {variant.name}: {counts[variant.name]:,.0f} instructions per frame"
                    f" ({frames:,} frames)",
                    flush=True,
                )
            await asyncio.sleep(2.0)
    return counts


async def run(args: argparse.Namespace) -> int:
    secret = secrets.token_hex(32)
    per_variant: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-policy-instructions-") as work:
        for round_index in range(args.rounds):
            for name, value in (await one_round(round_index, args, secret, Path(work))).items():
                per_variant[name].append(value)
    print("\ninstructions per delivered frame in the server: median (lowest-highest), against filter")
    base = statistics.median(per_variant[BASELINE])
    for name, values in per_variant.items():
        middle = statistics.median(values)
        print(f"  {name}: {middle:,.0f} ({min(values):,.0f}-{max(values):,.0f})  {middle / base:.3f}x")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=100.0, help="changes/s, each reaching one subscriber")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="the quick sizes' writers and rows")
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
