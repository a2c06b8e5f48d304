"""The harness side of the load generator: builds and spawns `loadgen.c` shards and merges what they measure.

    SubscriberPool(...)  -> start(): spawn S shard processes
                         -> open(n): split n subscribers across the shards (may be called again to add more)
                         -> mark() ... run writers ... collect(): one merged Window
                         -> close(): `quit` each shard, wait for it, kill it by pid if it hangs

With two shards the subscribers' socket reads run on both cores, so the load generator stays ahead of a
fast server; each shard reports its own CPU so a saturated one is visible in the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from bench.servers import REPO_DIR, RunningServer


@dataclass
class OpenReport:
    opened: int = 0
    failed: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Window:
    """What every subscriber saw between mark() and the end of collect()."""

    subscribers: int = 0
    frames: int = 0
    deliveries: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    unexpected: int = 0
    errors: int = 0
    lost: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    first: float = 0.0
    last: float = 0.0
    cpu_s: float = 0.0  # all shards together
    max_shard_busy: float = 0.0  # the busiest shard's CPU / wall: near 1.0 means the loadgen was the limit
    drain_s: float = 0.0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    commits: array[float] = field(default_factory=lambda: array("d"))  # each delivery's change, by commit time


LOADGEN_SOURCE = Path(__file__).with_name("loadgen.c")
LOADGEN_BINARY = Path(__file__).with_name("build") / "loadgen"


def build_loadgen() -> Path:
    """Compile the shard program unless an up-to-date build exists (`CC`, default cc; LOADGEN_WERROR=1 makes a
    warning an error, as CI's bench smoke does)."""
    if LOADGEN_BINARY.exists() and LOADGEN_BINARY.stat().st_mtime >= LOADGEN_SOURCE.stat().st_mtime:
        return LOADGEN_BINARY
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"the load generator needs a C compiler: {compiler} is not on PATH (set CC)")
    LOADGEN_BINARY.parent.mkdir(exist_ok=True)
    strict = ["-Werror"] if os.environ.get("LOADGEN_WERROR") == "1" else []
    subprocess.run(
        [compiler, "-O2", "-Wall", "-Wextra", *strict, "-o", str(LOADGEN_BINARY), str(LOADGEN_SOURCE)],
        check=True,
    )
    return LOADGEN_BINARY


def _read(path: str) -> bytes:
    # A shard's latencies are a few MB at most and read once per window, after the measured part.
    return Path(path).read_bytes()


class _ShardProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lock = asyncio.Lock()

    async def call(self, command: str, timeout: float) -> dict[str, Any]:
        """Send one command line (see loadgen.c) and return its JSON reply."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        async with self.lock:
            self.proc.stdin.write(command.encode() + b"\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"loadgen shard {self.proc.pid} exited with {self.proc.returncode}")
        reply: dict[str, Any] = json.loads(line)
        return reply


FilterMode = Literal["ask", "check"]


class SubscriberPool:
    """Subscribers spread over loadgen shards.

    `filter_base`: subscriber i is about row `filter_base + i`; with `filter_mode` "ask" its subscribe filters on
    that id, with "check" it subscribes to the whole table (a row-level policy narrows it) and any other row it
    receives counts as unexpected. `tokens[i]`: subscriber i authenticates with it before subscribing.
    """

    def __init__(
        self,
        server: RunningServer,
        shards: int,
        *,
        filter_base: int | None = None,
        concurrency: int = 100,
        tokens: Sequence[str] | None = None,
        filter_mode: FilterMode = "ask",
    ) -> None:
        self.server = server
        self.shard_count = max(1, shards)
        self.filter_base = filter_base
        self.concurrency = concurrency
        self.tokens = tokens
        self.filter_mode = filter_mode
        self.opened = 0
        self._shards: list[_ShardProcess] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-loadgen-")

    async def __aenter__(self) -> SubscriberPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        binary = build_loadgen()
        url = urlsplit(self.server.ws_url)
        tokens_path = "-"
        if self.tokens is not None:
            tokens_file = Path(self._tmp.name) / "tokens"
            tokens_file.write_text("".join(f"{token}\n" for token in self.tokens))
            tokens_path = str(tokens_file)
        for index in range(self.shard_count):
            proc = await asyncio.create_subprocess_exec(
                str(binary),
                url.hostname or "127.0.0.1",
                str(url.port or 80),
                url.path or "/",
                self.server.spec.kind,
                "-" if self.filter_base is None else str(self.filter_base),
                str(self.concurrency),
                str(Path(self._tmp.name) / f"lat-{index}.bin"),
                tokens_path,
                self.filter_mode,
                cwd=REPO_DIR,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self._shards.append(_ShardProcess(proc))

    async def open(self, count: int, timeout: float = 600) -> OpenReport:
        """Open `count` more subscribers, spread evenly; realtime ones are subscribed when this returns."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        per = math.ceil(count / self.shard_count)
        calls = []
        first = self.opened
        remaining = count
        for shard in self._shards:
            n = min(per, remaining)
            if n <= 0:
                break
            calls.append(shard.call(f"open {first} {n}", timeout))
            first += n
            remaining -= n
        replies = await asyncio.gather(*calls)
        self.opened += count
        report = OpenReport(seconds=loop.time() - started)
        for reply in replies:
            report.opened += reply["opened"]
            report.failed += reply["failed"]
            report.error = report.error or reply["error"]
        return report

    async def mark(self) -> None:
        await asyncio.gather(*(s.call("mark", 30) for s in self._shards))

    async def collect(
        self,
        *,
        expected_per_sub: int | None = None,
        expected_by_key: dict[int, int] | None = None,
        frames_per_sub: int | None = None,
        quiet_s: float = 2.0,
        deadline_s: float = 60.0,
    ) -> Window:
        """Wait for the window's changes to arrive and merge the shards' counts.

        `expected_per_sub`: every subscriber should see this many changes. `expected_by_key`: filtering
        subscribers should see this many changes of their row id. With neither, shards wait for quiet.
        `frames_per_sub`: also wait for this many change frames per subscriber, dropped ones included.
        """
        by_key = ",".join(f"{k}:{v}" for k, v in expected_by_key.items()) if expected_by_key else "-"
        command = " ".join(
            (
                "collect",
                str(quiet_s),
                str(deadline_s),
                str(-1 if expected_per_sub is None else expected_per_sub),
                str(-1 if frames_per_sub is None else frames_per_sub),
                by_key,
            )
        )
        replies = await asyncio.gather(*(s.call(command, deadline_s + 60) for s in self._shards))
        merged = Window()
        for reply in replies:
            merged.subscribers += reply["subscribers"]
            merged.frames += reply["frames"]
            merged.deliveries += reply["deliveries"]
            merged.duplicates += reply["duplicates"]
            merged.out_of_order += reply["out_of_order"]
            merged.unexpected += reply["unexpected"]
            merged.errors += reply["errors"]
            merged.lost += reply["lost"]
            for code, n in reply["closes"].items():
                merged.closes[code] = merged.closes.get(code, 0) + n
            if reply["first"]:
                merged.first = min(merged.first or reply["first"], reply["first"])
            merged.last = max(merged.last, reply["last"])
            merged.cpu_s += reply["cpu_s"]
            merged.drain_s = max(merged.drain_s, reply["drain_s"])
            if reply["wall_s"] > 0:
                merged.max_shard_busy = max(merged.max_shard_busy, reply["cpu_s"] / reply["wall_s"])
            pairs = array("d", _read(reply["lat_path"]))
            merged.commits.extend(pairs[0::2])
            merged.latencies.extend(pairs[1::2])
        return merged

    async def live(self) -> int:
        replies = await asyncio.gather(*(s.call("status", 30) for s in self._shards))
        return sum(int(r["live"]) for r in replies)

    async def close(self) -> None:
        for shard in self._shards:
            with contextlib.suppress(Exception):
                await shard.call("quit", 30)
            try:
                await asyncio.wait_for(shard.proc.wait(), 30)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    shard.proc.kill()
                await shard.proc.wait()
        self._shards.clear()
        self._tmp.cleanup()
