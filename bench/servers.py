"""Starting and stopping the servers under test.

Lifecycle of one server, always inside `running(...)`:

    free port -> spawn (own session, log file) -> poll readiness -> yield RunningServer -> SIGTERM group
                                                                                      -> SIGKILL after 10 s

Each server gets its own process group so its workers go down with it, and nothing else is signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from bench.db import PEERS_DB, REALTIME_DB, dsn, realtime_cli
from bench.httpload import http_get

BENCH_DIR = Path(__file__).parent
REPO_DIR = BENCH_DIR.parent
NODE_DIR = BENCH_DIR / "peers" / "node_ws_pg"

Kind = Literal["realtime", "peer"]
Readiness = Literal["healthz", "tcp"]


@dataclass(frozen=True)
class ServerSpec:
    """How to run one contender. `broadcasts` marks servers that send every change to every client."""

    name: str
    kind: Kind
    database: str
    readiness: Readiness
    broadcasts: bool
    ws_path: str = "/ws"

    def command(self, port: int, workers: int) -> list[str]:
        host = ["--host", "127.0.0.1", "--port", str(port)]
        if self.name == "realtime":
            return [str(realtime_cli()), "serve", *host, "--workers", str(workers), "--log-level", "warning"]
        if self.name == "node":
            return ["node", str(NODE_DIR / "server.js")]
        module = {"tutorial": "bench.peers.tutorial_fastapi:app", "seed_rest": "bench.peers.seed_rest:app"}
        # The Python peers are single-process by design: that is how their tutorials deploy them.
        return [sys.executable, "-m", "uvicorn", module[self.name], *host, "--workers", "1", "--log-level", "warning"]


REALTIME = ServerSpec("realtime", "realtime", REALTIME_DB, "healthz", broadcasts=False)
NODE = ServerSpec("node", "peer", PEERS_DB, "tcp", broadcasts=True)
TUTORIAL = ServerSpec("tutorial", "peer", PEERS_DB, "tcp", broadcasts=True)
SEED_REST = ServerSpec("seed_rest", "peer", PEERS_DB, "tcp", broadcasts=False, ws_path="")

SPECS: dict[str, ServerSpec] = {s.name: s for s in (REALTIME, NODE, TUTORIAL, SEED_REST)}


@dataclass
class RunningServer:
    spec: ServerSpec
    pid: int
    port: int
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.spec.ws_path}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def ensure_node_modules() -> None:
    """`npm ci` into the Node peer's folder once; later runs reuse node_modules."""
    if (NODE_DIR / "node_modules" / ".package-lock.json").exists():
        return
    proc = await asyncio.create_subprocess_exec(
        "npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", cwd=NODE_DIR
    )
    if await asyncio.wait_for(proc.wait(), 300) != 0:
        raise RuntimeError("npm ci failed in bench/peers/node_ws_pg")


async def _ready(spec: ServerSpec, port: int) -> bool:
    if spec.readiness == "healthz":
        try:
            status, body = await http_get("127.0.0.1", port, "/healthz", timeout=1.0)
        except (OSError, TimeoutError, ValueError):
            return False
        return status == 200 and b'"ok"' in body
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    # The group id is the child's pid (start_new_session), so this reaches its workers and nothing else.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 5)


def _open_log(log_dir: Path, name: str, port: int) -> tuple[Path, BinaryIO]:
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}-{port}.log"
    return path, open(path, "wb")


@asynccontextmanager
async def running(
    spec: ServerSpec, log_dir: Path, workers: int = 1, env: Mapping[str, str | None] | None = None
) -> AsyncIterator[RunningServer]:
    """Run `spec` on a free loopback port until the block exits; the server is stopped even on errors.

    `env` adds to or overrides the server's environment (a None value removes the variable), e.g. the token key
    and policy of a realtime run.
    """
    if spec.name == "node":
        await ensure_node_modules()
    port = free_port()
    log_path, log = _open_log(log_dir, spec.name, port)
    server_env = {**os.environ, "DATABASE_URL": dsn(spec.database), "PORT": str(port)}
    if spec.name == "realtime":
        # Every subscriber of the load generator comes from 127.0.0.1, and the idle scenario holds 10,000+.
        server_env.update(WS_MAX_CONNECTIONS_PER_CLIENT="1000000", WS_MAX_CONNECTIONS="1000000")
    for name, value in (env or {}).items():
        if value is None:
            server_env.pop(name, None)
        else:
            server_env[name] = value
    try:
        proc = await asyncio.create_subprocess_exec(
            *spec.command(port, workers),
            cwd=REPO_DIR,
            env=server_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    try:
        deadline = time.monotonic() + 60
        while not await _ready(spec, port):
            if proc.returncode is not None:
                raise RuntimeError(f"{spec.name} exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec.name} not ready after 60 s:\n{_tail(log_path)}")
            await asyncio.sleep(0.1)
        yield RunningServer(spec, proc.pid, port, log_path)
    finally:
        await _stop(proc)
