"""`realtime tail TABLE`: print a table's committed changes as they happen, on top of realtime.client.

Two formats: `--json`, one JSON object per line (change frames exactly as the server sent them, a snapshot as one
object with all its rows, a reset as `{"type": "reset", ...}`), meant for pipes; and a readable one, a line per
change with its commit time, operation, key and the columns it changed, coloured only on a terminal (and never
with NO_COLOR set). Each line is flushed as it is written, so `| head`, `| grep --line-buffered` and `| jq` see it
at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit, urlunsplit

from realtime.client import (
    AuthenticationError,
    Change,
    ClientError,
    Condition,
    Event,
    Operation,
    Reset,
    Snapshot,
    SubscriptionError,
    connect,
)

DEFAULT_URL = "ws://127.0.0.1:8000/ws"
# Refusals that mean the command line asked for something that cannot exist: a usage error (status 2).
_USAGE_CODES = frozenset({"unknown_table", "unknown_column", "invalid_filter", "bad_message"})
_OP_COLOURS = {"INSERT": "32", "UPDATE": "33", "DELETE": "31", "TRUNCATE": "35", "SNAPSHOT": "36", "RESET": "1;31"}
# The view each op has on a subscription that sees the whole table; another one is worth showing.
_PLAIN_VIEW = {"INSERT": "added", "UPDATE": "modified", "DELETE": "removed", "TRUNCATE": "reset"}

ColourChoice = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class TailOptions:
    url: str
    token: str | None
    table: str
    filter: Sequence[Condition]
    events: Sequence[Operation] | None
    since: int | None
    snapshot: bool
    json: bool
    colour: ColourChoice


def socket_url(text: str) -> str:
    """`text` as a WebSocket URL: http(s) becomes ws(s), and a bare host gets the `/ws` path."""
    parts = urlsplit(text)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"a server URL is ws://HOST:PORT/ws (or http://HOST:PORT), not {text!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def use_colour(choice: ColourChoice, out: TextIO) -> bool:
    if choice != "auto":
        return choice == "always"
    return out.isatty() and not os.environ.get("NO_COLOR")


class Printer:
    """Writes events to `out` in one of the two formats, a flushed line at a time."""

    def __init__(self, out: TextIO, *, as_json: bool, colour: bool) -> None:
        self._out = out
        self._json = as_json
        self._colour = colour

    def write(self, event: Event) -> None:
        lines = self._json_lines(event) if self._json else self._readable_lines(event)
        for line in lines:
            self._out.write(line + "\n")
        self._out.flush()

    def _json_lines(self, event: Event) -> list[str]:
        frame: dict[str, Any]
        if isinstance(event, Change):
            frame = event.frame
        elif isinstance(event, Snapshot):
            frame = {"type": "snapshot", "id": event.subscription, "table": event.table, "seq": event.seq}
            frame["rows"] = event.rows
        else:
            frame = {"type": "reset", "id": event.subscription, "table": event.table, "reason": event.reason}
        return [json.dumps(frame, ensure_ascii=False, separators=(",", ":"))]

    def _paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self._colour else text

    def _readable_lines(self, event: Event) -> list[str]:
        if isinstance(event, Snapshot):
            label = self._paint(_OP_COLOURS["SNAPSHOT"], f"{'SNAPSHOT':<8}")
            head = f"{'snapshot':<12}  {label}  {event.table}"
            lines = [f"{head}  {len(event.rows)} row(s) at seq {event.seq}"]
            lines += [f"{'':<12}  {'':<8}  {event.table}  {_columns(row)}" for row in event.rows]
            return lines
        if isinstance(event, Reset):
            label = self._paint(_OP_COLOURS["RESET"], f"{'RESET':<8}")
            return [f"{'':<12}  {label}  {event.table}  {event.reason}; a fresh snapshot follows"]
        time = self._paint("2", event.ts.astimezone().strftime("%H:%M:%S.%f")[:-3])
        op = self._paint(_OP_COLOURS[event.op], f"{event.op:<8}")
        view = "" if _PLAIN_VIEW[event.op] == event.view else f" ({event.view})"
        parts = [f"{time}  {op}  {event.table}{view}"]
        if event.key is not None:
            parts.append(self._paint("1", _columns(event.key)))
        changed = _changed(event)
        if changed:
            parts.append(changed)
        return ["  ".join(parts)]


def _render(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _columns(row: dict[str, Any]) -> str:
    return " ".join(f"{column}={_render(value)}" for column, value in row.items())


def _changed(change: Change) -> str:
    """The columns worth showing: every column of a row that entered the view, only the changed ones (old → new)
    of a modified row, nothing but the key of one that left it."""
    if change.view == "added" and change.row is not None:
        key = change.key or {}
        return _columns({column: value for column, value in change.row.items() if column not in key})
    if change.view == "modified" and change.row is not None and change.old is not None:
        old = change.old
        return " ".join(
            f"{column}={_render(old.get(column))}→{_render(value)}"
            for column, value in change.row.items()
            if column not in old or old[column] != value
        )
    return ""


def _quiet_client_logs() -> None:
    """Reconnects and refusals go to stderr as one short line each; the stream itself goes to stdout."""
    logger = logging.getLogger("realtime.client")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("realtime tail: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


async def tail(options: TailOptions, out: TextIO) -> int:
    """Print the table's events until interrupted; the exit status when the stream ends for good."""
    _quiet_client_logs()
    printer = Printer(out, as_json=options.json, colour=use_colour(options.colour, out))
    try:
        async with (
            connect(options.url, token=options.token) as client,
            client.subscribe(
                options.table,
                filter=options.filter,
                events=options.events,
                since=options.since,
                snapshot=options.snapshot,
            ) as subscription,
        ):
            async for event in subscription:
                printer.write(event)
    except SubscriptionError as error:
        print(f"realtime tail: {options.table}: {error.code}: {error.message}", file=sys.stderr)
        return 2 if error.code in _USAGE_CODES else 1
    except (AuthenticationError, ClientError) as error:
        print(f"realtime tail: {error.code}: {error.message}", file=sys.stderr)
        return 1
    return 0
