"""The `realtime` command: help, settings errors, `stream enable|disable|list`, and `serve` in embedded mode.

Most commands run in this process through `realtime.cli.main` (the same code the console script calls, without
a second of interpreter start-up each); the console script, one `stream enable` and `serve` run as processes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from realtime import migrate
from realtime.cli import main
from realtime.config import get_settings
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


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., Outcome]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    """Run `realtime ARGS` in this process with extra environment variables given as keywords."""
    monkeypatch.chdir(tmp_path)  # away from any .env file of the checkout
    monkeypatch.setenv("LOG_LEVEL", "warning")

    def invoke(*args: str, **env: str) -> Outcome:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            code = main(list(args))
        finally:
            get_settings.cache_clear()
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return invoke


def test_no_command_is_a_usage_error(cli: Cli) -> None:
    """`realtime` without a command prints usage and exits 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli()
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [("DATABASE_URL", "mysql://db/app", "not a PostgreSQL URL"), ("PORT", "eighty", "valid integer")],
)
def test_invalid_setting_is_reported_by_name(cli: Cli, variable: str, value: str, message: str) -> None:
    """A refused environment variable stops the command with exit 2 and a line naming the variable."""
    outcome = cli("migrate", **{variable: value})
    assert outcome.returncode == 2
    assert f"  {variable}: " in outcome.stderr
    assert message in outcome.stderr


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


def _capture_triggers(url: Dsn, table: str) -> object:
    return asyncio.run(
        _fetchval(url, f"SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND NOT tgisinternal")
    )


def test_stream_enable_list_disable(cli: Cli, stream_db: Dsn, tmp_path: Path) -> None:
    """A table with a primary key can be enabled (twice, harmlessly), is listed and captured (rows and TRUNCATE),
    and can be disabled."""
    url = stream_db.libpq()
    assert cli("stream", "list", DATABASE_URL=url).stdout.split() == ["public.users"]

    # Once as a user runs it, once more in-process: enabling again is harmless.
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "warning"}
    enabled = run("stream", "enable", "things", env=env, cwd=tmp_path)
    assert (enabled.returncode, enabled.stdout) == (0, "enabled streaming of things\n"), enabled.stderr
    assert cli("stream", "enable", "things").returncode == 0
    assert cli("stream", "list").stdout.split() == ["public.things", "public.users"]
    assert _capture_triggers(stream_db, "things") == 2
    asyncio.run(_execute(stream_db, "INSERT INTO things VALUES (1, 'captured')"))
    assert _captured_changes(stream_db, "things") == 1
    asyncio.run(_execute(stream_db, "TRUNCATE things"))
    assert _captured_changes(stream_db, "things") == 2

    disabled = cli("stream", "disable", "public.things")
    assert (disabled.returncode, disabled.stdout) == (0, "disabled streaming of public.things\n")
    assert cli("stream", "list").stdout.split() == ["public.users"]
    assert _capture_triggers(stream_db, "things") == 0
    asyncio.run(_execute(stream_db, "INSERT INTO things VALUES (2, 'not captured'); TRUNCATE things"))
    assert _captured_changes(stream_db, "things") == 2


def test_dropped_streamed_table_is_flagged_and_can_be_disabled(cli: Cli, stream_db: Dsn) -> None:
    """After DROP TABLE, `list` warns that the registration captures nothing and `disable` removes it."""
    assert cli("stream", "enable", "things", DATABASE_URL=stream_db.libpq()).returncode == 0
    asyncio.run(_execute(stream_db, "DROP TABLE things"))
    listed = cli("stream", "list")
    assert listed.stdout.split() == ["public.users"]
    assert "public.things is registered but has no capture trigger" in listed.stderr
    disabled = cli("stream", "disable", "things")
    assert disabled.returncode == 0, disabled.stderr
    listed = cli("stream", "list")
    assert (listed.stdout.split(), listed.stderr) == (["public.users"], "")


def test_stream_enable_refuses_a_table_without_primary_key(cli: Cli, stream_db: Dsn) -> None:
    """Enabling a table without a primary key fails with exit 1 and says why; no trigger is installed."""
    outcome = cli("stream", "enable", "keyless", DATABASE_URL=stream_db.libpq())
    assert outcome.returncode == 1
    assert "has no primary key" in outcome.stderr
    assert _capture_triggers(stream_db, "keyless") == 0


@pytest.mark.parametrize(
    ("action", "table", "message"),
    [
        ("enable", "no_such_table", 'relation "no_such_table" does not exist'),
        ("enable", "realtime.changes", "the realtime schema cannot be streamed"),
        ("enable", 'bad"name', 'relation "bad"name" does not exist'),
        ("disable", "no_such_table", 'relation "no_such_table" does not exist'),
        ("disable", 'bad"name', 'relation "bad"name" does not exist'),
    ],
)
def test_stream_refuses_unknown_internal_and_malformed_tables(
    cli: Cli, stream_db: Dsn, action: str, table: str, message: str
) -> None:
    """`stream enable|disable` of a missing, internal or malformed table name exits 1 with a one-line reason."""
    outcome = cli("stream", action, table, DATABASE_URL=stream_db.libpq())
    assert outcome.returncode == 1
    assert outcome.stderr.startswith("error: ")
    assert message in outcome.stderr


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


@pytest.fixture
def embedded_home() -> Iterator[Path]:
    """A world-traversable directory outside pytest's temporary tree for the embedded PostgreSQL's data.

    Run as root, the embedded server runs as another user, and pytest closes its tree (mode 0700) whenever
    another run starts, which would cut the server off from its data directory in the middle of the test.
    """
    path = Path(tempfile.mkdtemp(prefix="realtime-cli-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_serve_without_database_url_runs_and_stops_an_embedded_postgres(tmp_path: Path, embedded_home: Path) -> None:
    """Without DATABASE_URL, serve starts an embedded PostgreSQL, stops it on SIGTERM, and reuses its data."""
    data_dir, log, port = embedded_home / "pgdata", tmp_path / "serve.log", free_port()
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


# --- realtime policy check ---------------------------------------------------------------------------------------

MEMBER_RULE = """
[[rule]]
table = "users"
roles = ["member"]
actions = ["read", "update"]
where = [{ column = "id", op = "eq", claim = "sub" }]
columns = ["id", "name", "version"]
"""


def test_policy_check_prints_the_effective_rules(cli: Cli, stream_db: Dsn, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(MEMBER_RULE + '\n[[rule]]\ntable = "users"\nroles = ["admin", "member"]\nactions = ["read"]\n')
    outcome = cli("policy", "check", str(policy), DATABASE_URL=stream_db.libpq())
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stdout.splitlines() == [
        f"{policy}: valid, 2 rule(s)",
        "role admin:",
        "  users: read where every row; columns: every column  [rule 2]",
        "role member:",
        "  users: read, update where id eq claim sub; columns: id, name, version  [rule 1]",
        "  users: read where every row; columns: every column  [rule 2]",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MEMBER_RULE.replace('"update"', '"upsert"'), "rule 1 (table 'users'): unknown action(s) 'upsert'"),
        (MEMBER_RULE.replace('op = "eq"', 'op = "like"'), "rule 1 (table 'users'): where[0]: unknown op 'like'"),
        (
            MEMBER_RULE.replace('"version"]', '"version", "salary"]'),
            "rule 1 (table 'users'): unknown column(s) 'salary'",
        ),
        (MEMBER_RULE.replace('["id", ', "["), "rule 1 (table 'users'): columns must keep the primary key ('id')"),
        (MEMBER_RULE.replace('table = "users"', 'table = "payroll"'), "rule 1 (table 'payroll'): table 'payroll' does"),
        ("[[rule]]\ntable = 'users'\nroles = []\n", "rule 1 (table 'users'): `roles` must be a non-empty list"),
        ("[rules]\n", "unknown top-level key(s) rules"),
        ("[[rule]\n", "not valid TOML"),
    ],
)
def test_policy_check_names_the_rule_and_the_mistake(
    cli: Cli, stream_db: Dsn, tmp_path: Path, text: str, message: str
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    outcome = cli("policy", "check", str(policy), DATABASE_URL=stream_db.libpq())
    assert outcome.returncode == 1
    assert message in outcome.stderr, outcome.stderr


def test_serve_refuses_a_policy_that_does_not_fit_the_database(stream_db: Dsn, tmp_path: Path) -> None:
    """An unknown column stops `serve` with exit 2 before it binds; a policy without a token key is refused too."""
    policy = tmp_path / "policy.toml"
    policy.write_text(MEMBER_RULE.replace('"version"]', '"version", "salary"]'))
    env = {**os.environ, "DATABASE_URL": stream_db.libpq(), "AUTH_POLICY_FILE": str(policy), "LOG_LEVEL": "warning"}
    result = run("serve", "--port", str(free_port()), env={**env, "AUTH_JWT_SECRET": "s" * 32}, cwd=tmp_path)
    assert result.returncode == 2
    assert "rule 1 (table 'users'): unknown column(s) 'salary'" in result.stderr
    result = run("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "AUTH_POLICY_FILE needs a token key" in result.stderr
