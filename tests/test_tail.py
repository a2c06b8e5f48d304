"""`realtime tail` as a user runs it: a subprocess against a real server, its output read from a pipe or a
terminal, stopped with Ctrl-C (SIGINT) by PID or by `head` closing the pipe."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from realtime.auth.tokens import issue_token
from realtime.cli import main
from realtime.config import Settings
from realtime.dsn import Dsn
from tests.support.server import ServerProcess, running_server
from tests.support.tables import committed_changes, create_streamed_table, head
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(60)

SECRET = "tail-test-secret-" + "t" * 40


def _environment(**extra: str) -> dict[str, str]:
    # Without PYTHONUNBUFFERED, so that the tests see tail's own flushing, as a pipe in a shell does.
    unset = ("NO_COLOR", "REALTIME_URL", "REALTIME_TOKEN", "PYTHONUNBUFFERED")
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    return {**environment, **extra}


async def _start(*args: str, stdout: Any = asyncio.subprocess.PIPE, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "realtime",
        "tail",
        *args,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=_environment(**env),
    )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


@pytest.fixture
async def table(db: asyncpg.Connection) -> str:
    return await create_streamed_table(db)


@pytest.fixture
async def started(db: asyncpg.Connection) -> int:
    """The position before the test writes anything: tails resume from it, so no change can slip by."""
    return await head(db)


async def _lines(process: asyncio.subprocess.Process, count: int) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(15):
        while len(lines) < count:
            line = await process.stdout.readline()
            assert line, f"tail ended early: {(await process.stderr.read()).decode() if process.stderr else ''}"
            lines.append(line.decode())
    return lines


async def test_json_lines_hold_every_change_and_ctrl_c_exits_cleanly(
    server: ServerProcess, db: asyncpg.Connection, table: str, started: int
) -> None:
    """`--json` prints each change frame as one parseable line; SIGINT ends it with 130 or 0 and no traceback."""
    process = await _start(table, "--url", server.ws_url, "--json", "--since", str(started))
    try:
        await db.execute(f"INSERT INTO {table} (k, v) VALUES (1, 'a')")
        await db.execute(f"UPDATE {table} SET v = 'b' WHERE k = 1")
        await db.execute(f"DELETE FROM {table} WHERE k = 1")
        frames = [json.loads(line) for line in await _lines(process, 3)]
        truth = await committed_changes(db, table, after=started)
        assert [(f["type"], f["seq"], f["op"]) for f in frames] == [("change", c["seq"], c["op"]) for c in truth]
        assert frames[0]["row"] == truth[0]["row"]
        assert frames[1]["old"] == truth[1]["old"]
        assert frames[2]["view"] == "removed"

        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            code = await process.wait()
        assert code == 130  # 128 + SIGINT, as a shell reports an interrupted command
        assert process.stderr is not None
        assert b"Traceback" not in await process.stderr.read()
    finally:
        await _stop(process)


async def test_the_readable_format_shows_op_key_and_changed_columns(
    server: ServerProcess, db: asyncpg.Connection, table: str
) -> None:
    """Without --json: a snapshot, then a line per change with its op and key, and only the columns it changed;
    no colour when the output is not a terminal."""
    await db.execute(f"INSERT INTO {table} (k, v) VALUES (1, 'a')")
    process = await _start(table, "--url", server.ws_url, "--snapshot", "--filter", "k=lte:5")
    try:
        snapshot = await _lines(process, 2)
        assert "SNAPSHOT" in snapshot[0]
        assert "1 row(s)" in snapshot[0]
        assert 'v="a"' in snapshot[1]
        await db.execute(f"UPDATE {table} SET v = 'b' WHERE k = 1")
        await db.execute(f"UPDATE {table} SET k = 9 WHERE k = 1")  # out of the filter
        (update, moved) = await _lines(process, 2)
        row_id = await db.fetchval(f"SELECT id FROM {table}")
        assert "UPDATE" in update
        assert f"id={row_id}" in update
        assert 'v="a"→"b"' in update
        assert "k=" not in update
        assert "UPDATE" in moved
        assert "(removed)" in moved
        assert "\x1b[" not in "".join([*snapshot, update, moved])
    finally:
        await _stop(process)


async def _read_terminal(master: int, needle: bytes) -> bytes:
    seen = b""
    async with asyncio.timeout(15):
        while needle not in seen:
            seen += await asyncio.to_thread(os.read, master, 4096)
    return seen


@pytest.mark.parametrize("no_color", [False, True])
async def test_colour_only_on_a_terminal_and_never_with_no_color(
    server: ServerProcess, db: asyncpg.Connection, table: str, started: int, no_color: bool
) -> None:
    """On a terminal the op is coloured, unless NO_COLOR is set."""
    master, terminal = pty.openpty()
    env = {"NO_COLOR": "1"} if no_color else {}
    process = await _start(table, "--url", server.ws_url, "--since", str(started), stdout=terminal, **env)
    os.close(terminal)
    try:
        await db.execute(f"INSERT INTO {table} (k) VALUES (1)")
        output = await _read_terminal(master, b"INSERT")
        assert (b"\x1b[32mINSERT" in output) is not no_color
        assert (b"\x1b[" in output) is not no_color
    finally:
        await _stop(process)
        os.close(master)


async def test_a_closed_pipe_ends_it_quietly(server: ServerProcess, db: asyncpg.Connection, table: str) -> None:
    """`realtime tail ... | head -n 2`: once head is gone, the next line ends tail with status 0 and no message."""
    read_end, write_end = os.pipe()
    since = str(await head(db))
    process = await _start(table, "--url", server.ws_url, "--json", "--since", since, stdout=write_end)
    head_process = await asyncio.create_subprocess_exec(
        "head", "-n", "2", stdin=read_end, stdout=asyncio.subprocess.PIPE
    )
    os.close(read_end)
    os.close(write_end)
    try:
        await db.execute(f"INSERT INTO {table} (k) SELECT g FROM generate_series(1, 3) g")
        output, _ = await asyncio.wait_for(head_process.communicate(), 15)
        assert [json.loads(line)["row"]["k"] for line in output.decode().splitlines()] == [1, 2]

        async def gone() -> bool:
            await db.execute(f"INSERT INTO {table} (k) VALUES (4)")  # another line to write into the closed pipe
            try:
                await asyncio.wait_for(process.wait(), 0.5)
            except TimeoutError:
                return False
            return True

        await eventually(gone, 15, "tail exits once its pipe is closed")
        assert process.returncode == 0
        assert process.stderr is not None
        assert await process.stderr.read() == b""
    finally:
        await _stop(process)
        await _stop(head_process)


async def test_a_table_the_server_does_not_stream_is_a_usage_error(server: ServerProcess) -> None:
    """The server's `unknown_table` ends tail with status 2 and the reason on stderr."""
    process = await _start("no_such_table", "--url", server.ws_url)
    try:
        async with asyncio.timeout(20):
            _, error = await process.communicate()
        assert process.returncode == 2
        assert "no_such_table: unknown_table" in error.decode()
    finally:
        await _stop(process)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["users", "--filter", "email"], "column=op:value"),
        (["users", "--filter", "id=like:1"], "unknown filter op 'like'"),
        (["users", "--events", "INSERT,MERGE"], "INSERT, UPDATE, DELETE"),
        (["users", "--since", "-1"], "whole number >= 0"),
        (["users", "--since", "5", "--snapshot"], "not allowed with argument"),
        (["users", "--color", "blue"], "invalid choice"),
        ([], "the following arguments are required: table"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed arguments are refused before connecting, with status 2 and a message naming the problem."""
    with pytest.raises(SystemExit) as exited:
        main(["tail", *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_url_that_is_not_a_websocket_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--url (or REALTIME_URL) must be ws(s):// or http(s)://; anything else is status 2."""
    assert main(["tail", "users", "--url", "ftp://example.com"]) == 2
    assert "ws://HOST:PORT/ws" in capsys.readouterr().err


async def test_a_token_from_realtime_token_is_used_and_a_missing_one_is_refused(
    database_url: Dsn, artifacts_dir: Path, db: asyncpg.Connection, table: str
) -> None:
    """Against a server with a token key, REALTIME_TOKEN authenticates tail; without a token it exits 1 saying why."""
    env = {"AUTH_JWT_SECRET": SECRET}
    async with running_server(database_url, artifacts_dir / "tail-auth.log", env=env) as server:
        refused = await _start(table, "--url", server.ws_url)
        try:
            async with asyncio.timeout(20):
                _, error = await refused.communicate()
            assert refused.returncode == 1
            assert "unauthorized" in error.decode()
        finally:
            await _stop(refused)

        token = issue_token(Settings(auth_jwt_secret=SECRET), sub="7", role=None, ttl_s=600, claims={})
        since = str(await head(db))
        process = await _start(table, "--url", server.ws_url, "--json", "--since", since, REALTIME_TOKEN=token)
        try:
            await db.execute(f"INSERT INTO {table} (k) VALUES (1)")
            (line,) = await _lines(process, 1)
            assert json.loads(line)["row"]["k"] == 1
        finally:
            await _stop(process)
