"""What a subscription restricted by a policy grant receives of one change: the same answer live, in a replay and
in a snapshot, so a resumed subscriber sees exactly what a live one saw.

Rules (docs/protocol.md, "Row-level policies"), with `view(row)` the grant's verdict on a row and `F` the
subscription's own filter, checked against the row the change is about as for any subscription:
    INSERT  sent when view(new) and F(new); `row` trimmed to the columns the grant shows
    DELETE  sent when view(old) and F(old); `old` trimmed (a DELETE is checked on the row it removed)
    UPDATE  view(new) and F(new): `row` trimmed; `old` trimmed when view(old), absent when the row moved in (its
            old values were never the subscriber's to read)
            not view(new), but view(old) and F(old): the row moved out; sent as `"view": "removed"` with `old` and
            `key` holding only the primary key, never a new value
"""

from __future__ import annotations

from collections.abc import Hashable

import orjson

from realtime.auth.policy import Grant, RowView, trim
from realtime.stream.changes import Change, Row
from realtime.stream.filters import RowFilter


def restricted_body(grant: Grant, row_filter: RowFilter, change: Change) -> tuple[Hashable, str] | None:
    """The change frame's body (as `protocol.change_body` makes it) for a subscription under `grant`, with a key
    under which subscriptions of the same id that receive the same body can share its frame; None: not sent."""
    op = change.op
    if op == "INSERT":
        new = change.new_row
        assert new is not None
        view = grant.view(new)
        if not view or not row_filter.matches(new):
            return None
        return (op, view), _body(change, row=_text(new, view))
    if op == "DELETE":
        old = change.old_row
        assert old is not None
        view = grant.view(old)
        if not view or not row_filter.matches(old):
            return None
        return (op, view), _body(change, old=_text(old, view))
    new, old = change.new_row, change.old_row
    assert new is not None
    assert old is not None
    new_view = grant.view(new)
    if new_view:
        if not row_filter.matches(new):
            return None
        old_view = grant.view(old)
        old_text = _text(old, old_view) if old_view else None
        return (op, new_view, old_view), _body(change, row=_text(new, new_view), old=old_text)
    if not row_filter.matches(old) or not grant.covers(old):
        return None
    key = orjson.dumps(grant.key_of(old)).decode()
    return (op, "removed"), _body(change, old=key, key=key)


def _text(row: Row, view: RowView) -> str:
    return orjson.dumps(trim(row, view)).decode()


def _body(change: Change, *, row: str | None = None, old: str | None = None, key: str | None = None) -> str:
    parts = [f'"seq":{change.seq},"table":{orjson.dumps(change.table.wire_name).decode()},"op":"{change.op}"']
    if key is not None:
        parts.append(f'"view":"removed","key":{key}')
    if row is not None:
        parts.append(f'"row":{row}')
    if old is not None:
        parts.append(f'"old":{old}')
    parts.append(f'"ts":"{change.ts}"')
    return ",".join(parts) + "}"


def restricted_snapshot_row(grant: Grant, row_filter: RowFilter, text: str) -> str | None:
    """A snapshot row's text as the subscriber may see it, or None when it is outside the grant or the filter."""
    row = orjson.loads(text)
    if not row_filter.matches(row):
        return None
    view = grant.view(row)
    if not view:
        return None
    return text if view is True else _text(row, view)
