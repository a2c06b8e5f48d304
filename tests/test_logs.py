"""LOG_FORMAT=json against a real `realtime serve` with two workers: everything it writes is one JSON object per
line, uvicorn's lines included and in every worker; an HTTP request's lines carry its X-Request-ID (the caller's or
a new one, echoed in the response) and a WebSocket's its connection id, client address and subscription."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from realtime.dsn import Dsn
from tests.support.server import ServerProcess, running_server
from tests.support.waiting import eventually
from tests.support.ws import StreamClient

pytestmark = pytest.mark.timeout(60)

Entry = dict[str, Any]


def entries(server: ServerProcess) -> list[Entry]:
    """Every line of the server's log, each parsed as one JSON object (a line that is not one fails the test)."""
    parsed: list[Entry] = []
    for number, line in enumerate(server.log_path.read_text().splitlines(), 1):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"line {number} of {server.log_path} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message", "pid"} <= set(entry), line
        parsed.append(entry)
    return parsed


def find(server: ServerProcess, **fields: Any) -> Entry | None:
    """The first log entry with all of `fields`, or None."""
    return next((e for e in entries(server) if all(e.get(k) == v for k, v in fields.items())), None)


async def test_json_logs_follow_requests_and_connections(database_url: Dsn, artifacts_dir: Path) -> None:
    """With LOG_FORMAT=json every line is a JSON object; an access line names its request id and status, and a
    WebSocket's lines share one connection id with its client address, subscription and positions."""
    log_path = artifacts_dir / "json-logs.log"
    log_path.unlink(missing_ok=True)
    async with running_server(database_url, log_path, workers=2, env={"LOG_FORMAT": "json"}) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http:
            given = await http.get("/healthz", headers={"X-Request-ID": "probe-7f3a"})
            generated = await http.get("/users/999999999")
            invalid = await http.get("/healthz", headers={"X-Request-ID": "has spaces"})
        assert given.headers["x-request-id"] == "probe-7f3a"
        assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
        assert re.fullmatch(r"[0-9a-f]{32}", invalid.headers["x-request-id"])

        ws = await StreamClient.open(server.ws_url)
        subscribed, _ = await ws.subscribe("mine", "users")
        client_port = ws.connection.local_address[1]
        await ws.close()

        access = await eventually(
            lambda: _found(server, logger="uvicorn.access", request_id="probe-7f3a"), 10, "the access line"
        )
        assert (access["method"], access["path"], access["status"]) == ("GET", "/healthz", 200), access
        assert access["client"].startswith("127.0.0.1:"), access
        not_found = await eventually(
            lambda: _found(server, logger="uvicorn.access", request_id=generated.headers["x-request-id"]), 10, "404"
        )
        assert (not_found["path"], not_found["status"]) == ("/users/999999999", 404), not_found

        client = f"127.0.0.1:{client_port}"
        closed = await eventually(lambda: _found(server, message="WebSocket closed", client=client), 10, "closed")
        connection = closed["connection_id"]
        assert re.fullmatch(r"[0-9a-f]{12}", connection), closed
        assert (closed["close_code"], closed["last_seq"]) == (None, subscribed["seq"]), closed
        opened = find(server, message="WebSocket connected", connection_id=connection)
        assert opened is not None
        assert (opened["client"], opened["pid"]) == (client, closed["pid"]), opened
        subscription = find(server, message="subscribed", connection_id=connection)
        assert subscription is not None
        assert subscription["subscription_id"] == "mine", subscription
        assert (subscription["table"], subscription["seq"]) == ("users", subscribed["seq"]), subscription

    everything = entries(server)  # the whole log, shutdown included, is JSON
    workers = {e["pid"] for e in everything if e["message"].startswith("Started server process")}
    assert len(workers) == 2, workers
    # The service's own INFO lines are kept in the workers too, not only uvicorn's.
    assert {e["pid"] for e in everything if e["logger"] == "realtime.app"} == workers


async def _found(server: ServerProcess, **fields: Any) -> Entry | None:
    return find(server, **fields)
