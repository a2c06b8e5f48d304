"""WebSocket frames: client messages parsed and validated into typed requests, server frames encoded.

docs/protocol.md is the contract; every rule enforced here is stated there. Parsing never raises anything but
`ProtocolError`, whose `code` is the `error` frame's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from realtime.stream.changes import TableKey
from realtime.stream.filters import Condition, FilterError, compile_condition

EVENTS = ("INSERT", "UPDATE", "DELETE")
MAX_ID_LENGTH = 64
MAX_REF_LENGTH = 128
MAX_FILTER_CONDITIONS = 20
MAX_SEQ = 2**63 - 1
# A bearer token in an `auth` frame; identity providers' tokens are 1-2 KiB.
MAX_TOKEN_LENGTH = 8192

Ref = str | int | float | bool | None


class ProtocolError(Exception):
    """A client frame the server refuses; `code` and the message go back in an `error` frame."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        ref: Ref = None,
        sub_id: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.sub_id = sub_id
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True, slots=True)
class Subscribe:
    ref: Ref
    id: str
    table: TableKey
    events: frozenset[str]
    conditions: tuple[Condition, ...]
    since: int | None
    snapshot: bool
    coalesce: bool = False  # merge the backlog per key while the connection is behind (coalescing.py)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    ref: Ref
    id: str


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Ref


@dataclass(frozen=True, slots=True)
class Auth:
    ref: Ref
    token: str = field(repr=False)


ClientMessage = Auth | Subscribe | Unsubscribe | Ping

_ALLOWED_FIELDS = {
    "subscribe": {"type", "ref", "id", "table", "events", "filter", "since", "snapshot", "coalesce"},
    "unsubscribe": {"type", "ref", "id"},
    "ping": {"type", "ref"},
    "auth": {"type", "ref", "token"},
}


def parse_client_message(text: str) -> ClientMessage:
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise ProtocolError("bad_message", f"frame is not valid JSON: {error}") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", "frame must be a JSON object")
    ref = message.get("ref")
    if isinstance(ref, dict | list):
        raise ProtocolError("bad_message", "ref must be a string, number, boolean or null")
    if isinstance(ref, str) and len(ref) > MAX_REF_LENGTH:
        # Not echoed: every reply repeats the ref, and a large one would be a cheap way to fill the queue.
        raise ProtocolError("bad_message", f"ref strings are limited to {MAX_REF_LENGTH} characters")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "frame needs a string field 'type'", ref=ref)
    allowed = _ALLOWED_FIELDS.get(kind)
    if allowed is None:
        raise ProtocolError("unknown_type", f"unknown type {kind!r}; use auth, subscribe, unsubscribe or ping", ref=ref)
    unknown = sorted(set(message) - allowed)
    if unknown:
        raise ProtocolError("bad_message", f"unknown field(s) for {kind}: {', '.join(unknown)}", ref=ref)
    if kind == "ping":
        return Ping(ref)
    if kind == "auth":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("bad_message", "'token' must be a non-empty string (a JWT)", ref=ref)
        if len(token) > MAX_TOKEN_LENGTH:
            raise ProtocolError("bad_message", f"'token' is limited to {MAX_TOKEN_LENGTH} characters", ref=ref)
        return Auth(ref, token)
    sub_id = _sub_id(message, ref)
    if kind == "unsubscribe":
        return Unsubscribe(ref, sub_id)
    return _subscribe(message, ref, sub_id)


def _sub_id(message: dict[str, Any], ref: Ref) -> str:
    sub_id = message.get("id")
    if not isinstance(sub_id, str) or not 1 <= len(sub_id) <= MAX_ID_LENGTH:
        raise ProtocolError("bad_message", f"'id' must be a string of 1 to {MAX_ID_LENGTH} characters", ref=ref)
    return sub_id


def _subscribe(message: dict[str, Any], ref: Ref, sub_id: str) -> Subscribe:
    def bad(code: str, text: str) -> ProtocolError:
        return ProtocolError(code, text, ref=ref, sub_id=sub_id)

    table = message.get("table")
    if not isinstance(table, str) or not table or len(table) > 130:
        raise bad("bad_message", '\'table\' must be a table name such as "users" or "schema.table"')

    events_field = message.get("events", list(EVENTS))
    if not isinstance(events_field, list) or not events_field or any(event not in EVENTS for event in events_field):
        raise bad("bad_message", "'events' must be a non-empty list of INSERT, UPDATE, DELETE")

    filter_field = message.get("filter", [])
    if not isinstance(filter_field, list):
        raise bad("invalid_filter", "'filter' must be a list of conditions")
    if len(filter_field) > MAX_FILTER_CONDITIONS:
        raise bad("invalid_filter", f"'filter' takes at most {MAX_FILTER_CONDITIONS} conditions")
    conditions = []
    for position, raw in enumerate(filter_field):
        if not isinstance(raw, dict) or set(raw) != {"column", "op", "value"}:
            raise bad("invalid_filter", f"filter[{position}] must be an object with column, op and value")
        column, op = raw["column"], raw["op"]
        if not isinstance(column, str) or not column:
            raise bad("invalid_filter", f"filter[{position}].column must be a column name")
        if not isinstance(op, str):
            raise bad("invalid_filter", f"filter[{position}].op must be a string")
        try:
            conditions.append(compile_condition(column, op, raw["value"]))
        except FilterError as error:
            raise bad("invalid_filter", f"filter[{position}]: {error}") from None

    since = message.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or not 0 <= since <= MAX_SEQ):
        raise bad("bad_message", "'since' must be a non-negative integer position")
    snapshot = message.get("snapshot", False)
    if not isinstance(snapshot, bool):
        raise bad("bad_message", "'snapshot' must be true or false")
    if snapshot and since is not None:
        raise bad("bad_message", "'since' and 'snapshot' are mutually exclusive")
    coalesce = message.get("coalesce", False)
    if not isinstance(coalesce, bool):
        raise bad("bad_message", "'coalesce' must be true or false")
    return Subscribe(
        ref=ref,
        id=sub_id,
        table=TableKey.parse(table),
        events=frozenset(events_field),
        conditions=tuple(conditions),
        since=since,
        snapshot=snapshot,
        coalesce=coalesce,
    )


# --- server -> client -------------------------------------------------------------------------------------


def _dump(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def error_frame(
    code: str, message: str, *, ref: Ref = None, sub_id: str | None = None, retry_after_ms: int | None = None
) -> str:
    frame: dict[str, Any] = {"type": "error"}
    if ref is not None:
        frame["ref"] = ref
    if sub_id is not None:
        frame["id"] = sub_id
    frame["code"] = code
    frame["message"] = message
    if retry_after_ms is not None:
        frame["retry_after_ms"] = retry_after_ms
    return _dump(frame)


def reply_frame(kind: str, ref: Ref, **fields: Any) -> str:
    frame: dict[str, Any] = {"type": kind}
    if ref is not None:
        frame["ref"] = ref
    frame.update(fields)
    return _dump(frame)


def snapshot_frame(sub_id: str, seq: int, row_texts: list[str], last: bool) -> str:
    # Rows are spliced in as the JSON text PostgreSQL produced: no decode/encode per row.
    head = _dump({"type": "snapshot", "id": sub_id, "seq": seq})[:-1]
    return f'{head},"rows":[{",".join(row_texts)}],"last":{"true" if last else "false"}}}'
