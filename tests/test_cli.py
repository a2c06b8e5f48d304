"""The `realtime` command as a user runs it: help, `stream enable|disable|list`, and `serve` in embedded mode."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from realtime import migrate
from realtime.dsn import Dsn
from tests.support.databases import create_database, drop_database
from tests.support.server import free_port

REALTIME = Path(sys.executable).parent / "realtime"


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "realtime", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_help_lists_the_commands() -> None:
    """`realtime --help` (the installed console script) exits 0 and names serve, migrate and stream."""
    result = subprocess.run([str(REALTIME), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "migrate", "stream"):
        assert command in result.stdout


def test_no_command_is_a_usage_error() -> None:
    """`realtime` without a command prints usage and exits 2."""
    result = run()
    assert result.returncode == 2
    assert "usage: realtime" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [("DATABASE_URL", "mysql://db/app", "not a PostgreSQL URL"), ("PORT", "eighty", "valid integer")],
)
def test_invalid_setting_is_reported_by_name_without_traceback(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    """A refused environment variable stops the command with exit 2 and a line naming the variable."""
    result = run("migrate", env={**os.environ, variable: value}, cwd=tmp_path)
    assert result.returncode == 2
    assert f"{variable}: " in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# --- realtime stream ---------------------------------------------------------------------------------------------


@pytest.fixture
def stream_db(admin_url: Dsn) -> Iterator[Dsn]:
    """A fresh migrated database with one table that has a primary key and one that has none."""
    url = create_database(admin_url, prefix="rt_cli")
    try:
        migrate.upgrade(url)
        asyncio.run(
            _execute(
                url,
                "CREATE TABLE things (id bigint PRIMARY KEY, label text); CREATE TABLE keyless (label text);",
            )
        )
        yield url
    finally:
        drop_database(admin_url, url)


async def _execute(url: Dsn, sql: str) -> None:
    conn = await asyncpg.connect(url.asyncpg())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fetchval(url: Dsn, sql: str) -> object:
    conn = await asyncpg.connect(url.asyncpg())
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _captured_changes(url: Dsn, table: str) -> object:
    return asyncio.run(_fetchval(url, f"SELECT count(*) FROM realtime.changes WHERE table_name = '{table}'"))


def _stream_env(url: Dsn) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url.libpq(), "LOG_LEVEL": "warning"}


def _capture_triggers(url: Dsn, table: str) -> object:
    return asyncio.run(
        _fetchval(url, f"SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND NOT tgisinternal")
    )


def test_stream_enable_list_disable(stream_db: Dsn, tmp_path: Path) -> None:
    """A table with a primary key can be enabled (twice, harmlessly), is listed and captured, and can be disabled."""
    env = _stream_env(stream_db)
    assert run("stream", "list", env=env, cwd=tmp_path).stdout.split() == ["public.users"]

    for _ in range(2):
        enabled = run("stream", "enable", "things", env=env, cwd=tmp_path)
        assert enabled.returncode == 0, enabled.stderr
        assert "enabled streaming of things" in enabled.stdout
    assert run("stream", "list", env=env, cwd=tmp_path).stdout.split() == ["public.things", "public.users"]
    assert _capture_triggers(stream_db, "things") == 1
    asyncio.run(_execute(stream_db, "INSERT INTO things VALUES (1, 'captured')"))
    assert _captured_changes(stream_db, "things") == 1

    disabled = run("stream", "disable", "public.things", env=env, cwd=tmp_path)
    assert disabled.returncode == 0, disabled.stderr
    assert run("stream", "list", env=env, cwd=tmp_path).stdout.split() == ["public.users"]
    assert _capture_triggers(stream_db, "things") == 0
    asyncio.run(_execute(stream_db, "INSERT INTO things VALUES (2, 'not captured')"))
    assert _captured_changes(stream_db, "things") == 1


def test_dropped_streamed_table_is_flagged_and_can_be_disabled(stream_db: Dsn, tmp_path: Path) -> None:
    """After DROP TABLE, `list` warns that the registration captures nothing and `disable` removes it."""
    env = _stream_env(stream_db)
    assert run("stream", "enable", "things", env=env, cwd=tmp_path).returncode == 0
    asyncio.run(_execute(stream_db, "DROP TABLE things"))
    listed = run("stream", "list", env=env, cwd=tmp_path)
    assert listed.stdout.split() == ["public.users"]
    assert "public.things is registered but has no capture trigger" in listed.stderr
    disabled = run("stream", "disable", "things", env=env, cwd=tmp_path)
    assert disabled.returncode == 0, disabled.stderr
    listed = run("stream", "list", env=env, cwd=tmp_path)
    assert (listed.stdout.split(), listed.stderr) == (["public.users"], "")


def test_stream_enable_refuses_a_table_without_primary_key(stream_db: Dsn, tmp_path: Path) -> None:
    """Enabling a table without a primary key fails with exit 1 and says why; no trigger is installed."""
    result = run("stream", "enable", "keyless", env=_stream_env(stream_db), cwd=tmp_path)
    assert result.returncode == 1
    assert "has no primary key" in result.stderr
    assert "Traceback" not in result.stderr
    assert _capture_triggers(stream_db, "keyless") == 0


@pytest.mark.parametrize(
    ("table", "message"),
    [("no_such_table", 'relation "no_such_table" does not exist'), ("realtime.changes", "cannot be streamed")],
)
def test_stream_enable_refuses_unknown_and_internal_tables(
    stream_db: Dsn, tmp_path: Path, table: str, message: str
) -> None:
    """Enabling a missing table or one of realtime's own fails with exit 1 and a one-line reason."""
    result = run("stream", "enable", table, env=_stream_env(stream_db), cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# --- realtime serve with the embedded PostgreSQL -----------------------------------------------------------------


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log: Path, timeout: float = 90.0) -> None:
    """Poll /readyz until 200; the first start runs initdb, hence the generous bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"serve not ready after {timeout}s:\n{log.read_text(errors='replace')}")


def _is_gone(pid: int) -> bool:
    """No such process, or only a zombie left for its parent (pg_ctl's daemon has init as parent) to reap."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """The postmaster removes postmaster.pid (which `pg_ctl stop -w` waits for) a moment before it exits."""
    deadline = time.monotonic() + timeout
    while not _is_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _start_embedded_serve(workdir: Path, data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update({"EMBEDDED_DATA_DIR": str(data_dir), "LOG_LEVEL": "info"})
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "realtime", "serve", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise


def test_serve_without_database_url_runs_and_stops_an_embedded_postgres(tmp_path: Path) -> None:
    """Without DATABASE_URL, serve starts an embedded PostgreSQL, stops it on SIGTERM, and reuses its data."""
    data_dir, log, port = tmp_path / "pgdata", tmp_path / "serve.log", free_port()
    base_url = f"http://127.0.0.1:{port}"

    process = _start_embedded_serve(tmp_path, data_dir, port, log)
    try:
        _wait_ready(process, base_url, log)
        created = httpx.post(f"{base_url}/users", json={"name": "Kept", "email": "kept@example.com"}, timeout=10)
        assert created.status_code == 201, created.text
        postmaster_pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    finally:
        exit_code = _stop(process)
    assert exit_code == 0, log.read_text(errors="replace")
    assert not (data_dir / "postmaster.pid").exists()
    assert _wait_gone(postmaster_pid)

    again = _start_embedded_serve(tmp_path, data_dir, port, log)
    try:
        _wait_ready(again, base_url, log)
        fetched = httpx.get(f"{base_url}{created.headers['location']}", timeout=10)
        assert fetched.status_code == 200
        assert fetched.json() == created.json()
    finally:
        assert _stop(again) == 0
    assert not (data_dir / "postmaster.pid").exists()
