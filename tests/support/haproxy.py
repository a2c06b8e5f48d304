"""A real HAProxy (Debian's /usr/sbin/haproxy) in front of `realtime serve` processes, stopped by PID.

    start ─► config written beside its log ─► haproxy -db (foreground) ─► stats page answers, every server UP
          ─► ... servers die, the /readyz checks take them out ... ─► terminate(): SIGTERM by PID, waited for

Its statistics page (`/stats;csv`, on a port of its own) tells which servers it counts as up and how many sessions
each holds: an upgraded WebSocket is one session for as long as it is open.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.server import free_port

HAPROXY = Path("/usr/sbin/haproxy")
# The checks ask /readyz every 200 ms and take a server out after two failures in a row: a dead instance is out
# within half a second, and until then a refused connection is retried on another server (`option redispatch`).
CHECK_INTERVAL_MS = 200


@dataclass(frozen=True)
class ServerStats:
    """One backend server as HAProxy sees it."""

    status: str  # UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" (coming up), MAINT
    sessions: int  # current sessions: requests in flight and open WebSockets


def require_haproxy() -> Path:
    if not HAPROXY.exists():
        raise RuntimeError(f"{HAPROXY} not found; `make system-packages` (apt-get install haproxy) installs it")
    return HAPROXY


@dataclass
class HAProxy:
    """HAProxy on a free loopback port balancing `servers` (name: loopback port) by fewest connections."""

    servers: dict[str, int]
    directory: Path
    port: int = field(default_factory=free_port)
    stats_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def config_path(self) -> Path:
        return self.directory / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.directory / "haproxy.log"

    def config(self) -> str:
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in self.servers.items())
        return f"""\
global
    maxconn 4096
    log stderr format short local0 info

defaults
    mode http
    log global
    option httplog
    # Only what went wrong: connections cut by a dying server, retries, servers going down.
    option dontlog-normal
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    # An upgraded WebSocket lives on this one, not on client/server.
    timeout tunnel 1h
    timeout http-request 5s
    timeout check 1s
    retries 3
    option redispatch 1

frontend realtime
    bind 127.0.0.1:{self.port}
    default_backend instances

backend instances
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server check inter {CHECK_INTERVAL_MS}ms fall 2 rise 1
{servers}

listen stats
    bind 127.0.0.1:{self.stats_port}
    stats enable
    stats uri /stats
"""

    def start(self, timeout: float = 15.0) -> None:
        """Write the configuration, start HAProxy and wait until it counts every server as up."""
        program = require_haproxy()
        self.config_path.write_text(self.config())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(program), "-db", "-f", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}: {self.log_path.read_text()}")
            try:
                stats = self.read_stats()
            except httpx.HTTPError as error:
                last = repr(error)
            else:
                if all(server.status == "UP" for server in stats.values()):
                    return
                last = repr(stats)
            time.sleep(0.05)
        raise TimeoutError(f"haproxy not ready after {timeout}s: {last}; see {self.log_path}")

    def read_stats(self) -> dict[str, ServerStats]:
        """Each backend server's status and current sessions, from the CSV statistics page."""
        response = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5.0)
        response.raise_for_status()
        rows = csv.DictReader(response.text.removeprefix("# ").splitlines())
        return {
            row["svname"]: ServerStats(status=row["status"], sessions=int(row["scur"] or 0))
            for row in rows
            if row["pxname"] == "instances" and row["svname"] in self.servers
        }

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM the HAProxy we started (it stops at once, cutting what it carries) and wait for it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
