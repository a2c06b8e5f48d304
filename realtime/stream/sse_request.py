"""An SSE request's query string and `Last-Event-ID` header, validated into the same `Subscribe` as a WebSocket
`subscribe` frame, with the same limits and error codes (docs/sse.md states the syntax).

    events=INSERT,UPDATE        a comma list; default all three
    filter=column=op:value      repeatable; `value` is JSON when it parses as JSON, else the text as a string
    since=N                     replay the changes after N
    snapshot=true               the matching rows first
    ticket=...                  read by the route, not here

`Last-Event-ID` (what an EventSource sends when it reconnects) wins over `since` and `snapshot`: the browser
reconnects with the URL it started with, and the header is the newer position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from realtime.stream.changes import TableKey
from realtime.stream.filters import Condition, FilterError, compile_condition
from realtime.stream.protocol import EVENTS, MAX_FILTER_CONDITIONS, MAX_SEQ, ProtocolError, Subscribe

# Every event of an SSE stream names its one subscription with this id.
SUBSCRIPTION_ID = "sse"
PARAMETERS = frozenset({"events", "filter", "since", "snapshot", "ticket"})
_SINGLE = ("events", "since", "snapshot", "ticket")
_MAX_TABLE_NAME = 130


def parse_request(table: str, query: Mapping[str, Sequence[str]], last_event_id: str | None) -> Subscribe:
    """The subscription a request asks for; ProtocolError (bad_message, invalid_filter) says what is wrong."""
    unknown = sorted(set(query) - PARAMETERS)
    if unknown:
        raise ProtocolError(
            "bad_message", f"unknown query parameter(s) {', '.join(unknown)}; use {', '.join(sorted(PARAMETERS))}"
        )
    for name in _SINGLE:
        if len(query.get(name, ())) > 1:
            raise ProtocolError("bad_message", f"'{name}' may be given once")
    if not table or len(table) > _MAX_TABLE_NAME:
        raise ProtocolError("bad_message", 'the table must be a name such as "users" or "schema.table"')
    events = _events(query.get("events"))
    conditions = tuple(_condition(index, text) for index, text in enumerate(_filters(query.get("filter", ()))))
    since = _position("since", query["since"][0]) if "since" in query else None
    snapshot = _snapshot(query["snapshot"][0]) if "snapshot" in query else False
    if snapshot and since is not None:
        raise ProtocolError("bad_message", "'since' and 'snapshot' are mutually exclusive")
    if last_event_id is not None and last_event_id.strip():
        since, snapshot = _position("Last-Event-ID", last_event_id.strip()), False
    return Subscribe(
        ref=None,
        id=SUBSCRIPTION_ID,
        table=TableKey.parse(table),
        events=events,
        conditions=conditions,
        since=since,
        snapshot=snapshot,
    )


def _events(given: Sequence[str] | None) -> frozenset[str]:
    if given is None:
        return frozenset(EVENTS)
    names = [name.strip() for name in given[0].split(",")]
    if not given[0].strip() or any(name not in EVENTS for name in names):
        raise ProtocolError("bad_message", f"'events' must be a comma list of {', '.join(EVENTS)}, not {given[0]!r}")
    return frozenset(names)


def _filters(given: Sequence[str]) -> Sequence[str]:
    if len(given) > MAX_FILTER_CONDITIONS:
        raise ProtocolError("invalid_filter", f"'filter' may be given at most {MAX_FILTER_CONDITIONS} times")
    return given


def _condition(index: int, text: str) -> Condition:
    column, equals, rest = text.partition("=")
    op, colon, raw = rest.partition(":")
    if not equals or not colon or not column or not op:
        raise ProtocolError("invalid_filter", f"filter[{index}] {text!r} must be column=op:value, e.g. id=eq:7")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw  # plain text is a string: `email=eq:a@b.c`; a string that reads as JSON is quoted: `eq:"7"`
    try:
        return compile_condition(column, op, value)
    except FilterError as error:
        raise ProtocolError("invalid_filter", f"filter[{index}]: {error}") from None


def _position(name: str, text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > MAX_SEQ:
        raise ProtocolError("bad_message", f"'{name}' must be a non-negative integer position, not {text[:40]!r}")
    return int(text)


def _snapshot(text: str) -> bool:
    if text not in ("true", "false"):
        raise ProtocolError("bad_message", f"'snapshot' must be true or false, not {text[:40]!r}")
    return text == "true"
