"""A real `realtime serve` process on a free loopback port, stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from realtime.dsn import Dsn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """One `realtime serve` subprocess (which may itself run several uvicorn workers)."""

    database: Dsn
    log_path: Path
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    # The `realtime` command to run and where: this checkout's by default, or e.g. an installed wheel's script.
    program: list[str] = field(default_factory=lambda: [sys.executable, "-m", "realtime"])
    cwd: Path | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 30.0) -> None:
        environment = {
            **os.environ,
            "DATABASE_URL": self.database.libpq(),
            "MIGRATE_ON_START": "false",
            "LOG_LEVEL": "info",
            **self.env,
        }
        command = [
            *self.program, "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=environment, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until /readyz says ready (database reachable, listener live)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=2.0)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s: {last}; see {self.log_path}")

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM the process we started and wait for it; returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def running_server(
    database: Dsn, log_path: Path, *, workers: int = 1, env: dict[str, str] | None = None
) -> AsyncIterator[ServerProcess]:
    """A `realtime serve` process of the test's own, ready; SIGTERMed (by PID) and waited for afterwards."""
    server = ServerProcess(database=database, log_path=log_path, workers=workers, env=env or {})
    try:
        await asyncio.to_thread(server.start)
        yield server
    finally:
        await asyncio.to_thread(server.terminate)
