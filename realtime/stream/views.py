"""What one change means for one subscription's view: `added`, `modified`, `removed`, or nothing.

A subscription's view is the rows of its table that its filter matches (and, under a row-level policy, that its
grant lets it read, with the columns the grant shows). A change frame says how the change moves that view
(docs/protocol.md, "change"), so that a client applying two rules (`added`/`modified`: upsert `row` by `key`;
`removed`: delete `key`) holds exactly `SELECT ... WHERE filter` at every `seq`:

    INSERT  the new row is in the view: added, with `row`
    DELETE  the old row was in the view: removed, with `old` (a DELETE is judged on the row it removed)
    UPDATE  in(old) and in(new): modified, `row` and `old`
            in(new) only: added, `row` only (the old values were never in the client's view)
            in(old) only: removed, `old` only (the new values are outside the view and must not leak); when a
                grant no longer lets the subscriber read the row at all, `old` holds only the primary key
            neither: not sent
    TRUNCATE  reset, to every subscription of the table whatever its filter, grant or `events`: the view is empty

`in(row)` is the filter and, under a grant, the grant's verdict on that row. The same decision is made live (the
hub), in a `since` replay and, for the rows themselves, in a snapshot, so a resumed view equals a live one.
`ChangeFrames` holds one change's decoded rows, keys and bodies, so subscriptions that receive the same body share
one encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeAlias

import orjson

from realtime.auth.policy import Grant, RowView, trim
from realtime.stream.changes import Change, Row
from realtime.stream.filters import RowFilter
from realtime.stream.wire import encode_text_frame

ADDED = "added"
MODIFIED = "modified"
REMOVED = "removed"
RESET = "reset"  # TRUNCATE: every view of the table is empty now, whatever its filter or grant
# The view of a subscription that neither filters nor is restricted, by op: every row is in it.
WHOLE_TABLE_VIEW = {"INSERT": ADDED, "UPDATE": MODIFIED, "DELETE": REMOVED}
# What a frame says of its row: (view, key, row, old), each a JSON text or None where the frame has none.
Parts: TypeAlias = tuple[str, str | None, str | None, str | None]
# A frame's parts are worked out only for the first subscription that receives them.
_Body: TypeAlias = Callable[[], Parts]
# What `decide` found for one subscription: (what tells this body from the change's others, how to build it).
Decided: TypeAlias = tuple[Hashable, _Body]


class ChangeFrames:
    """The frames of one change for the subscriptions it reaches, each body built once and encoded once per
    subscription id (two subscriptions with one id on two connections receive the same bytes)."""

    __slots__ = ("_encoded", "_keys", "_table", "_whole", "change")

    def __init__(self, change: Change) -> None:
        self.change = change
        self._table = orjson.dumps(change.table.wire_name).decode()
        self._keys: dict[tuple[bool, tuple[str, ...]], str] = {}
        self._encoded: dict[tuple[str, Hashable, bool], bytes] = {}
        self._whole: dict[tuple[str, bool], bytes] = {}

    def frame(
        self, sub_id: str, row_filter: RowFilter, grant: Grant | None, key_columns: tuple[str, ...], tx_end: bool
    ) -> bytes | None:
        """The encoded frame this subscription receives, or None when the change does not touch its view;
        `tx_end`: it is the subscription's last frame of its transaction (transactions.py)."""
        if (grant is None and not row_filter.conditions) or self.change.op == "TRUNCATE":
            return self.whole_frame(sub_id, key_columns, tx_end)
        decided = self.decide(row_filter, grant, key_columns)
        return None if decided is None else self.encode(sub_id, decided, tx_end)

    def encode(self, sub_id: str, decided: Decided, tx_end: bool) -> bytes:
        """The frame `decide` found for a subscription, encoded once per subscription id, body and `tx_end`."""
        cache_key = (sub_id, decided[0], tx_end)
        frame = self._encoded.get(cache_key)
        if frame is None:
            frame = self._encoded[cache_key] = encode_text_frame(self.text_of(sub_id, decided, tx_end))
        return frame

    def text_of(self, sub_id: str, decided: Decided, tx_end: bool) -> str:
        """The frame `decide` found, as text (a replay sends one subscription's frames one by one)."""
        return change_frame(sub_id, self._compose(*decided[1]()), self._tail(tx_end))

    def whole_frame(self, sub_id: str, key_columns: tuple[str, ...], tx_end: bool) -> bytes:
        """The frame of a subscription whose view is the whole table (no filter, no grant): one body per change."""
        cache_key = (sub_id, tx_end)
        frame = self._whole.get(cache_key)
        if frame is None:
            body = self._whole_body(key_columns)
            frame = self._whole[cache_key] = encode_text_frame(change_frame(sub_id, body, self._tail(tx_end)))
        return frame

    def _tail(self, tx_end: bool) -> str:
        return transaction_tail(self.change.tx, tx_end)

    def decide(self, row_filter: RowFilter, grant: Grant | None, key_columns: tuple[str, ...]) -> Decided | None:
        """(what distinguishes this body from the change's other bodies, how to build it), or None when the change
        does not touch the subscription's view."""
        change = self.change
        op = change.op
        if op == "TRUNCATE":
            return RESET, lambda: (RESET, None, None, None)
        if grant is not None:
            return self._restricted(row_filter, grant, key_columns)
        view: str | None
        if not row_filter.conditions:
            view = WHOLE_TABLE_VIEW[op]
        elif op == "INSERT":
            view = ADDED if row_filter.matches(self._new) else None
        elif op == "DELETE":
            view = REMOVED if row_filter.matches(self._old) else None
        else:
            was, now = row_filter.matches(self._old), row_filter.matches(self._new)
            view = MODIFIED if was and now else ADDED if now else REMOVED if was else None
        if view is None:
            return None
        chosen = view
        return (chosen, key_columns), lambda: self._parts(chosen, key_columns)

    @property
    def _new(self) -> Row:
        row = self.change.new_row
        assert row is not None
        return row

    @property
    def _old(self) -> Row:
        row = self.change.old_row
        assert row is not None
        return row

    def _key(self, key_columns: tuple[str, ...], old: bool) -> str:
        cached = self._keys.get((old, key_columns))
        if cached is None:
            row = self._old if old else self._new
            cached = self._keys[old, key_columns] = orjson.dumps({c: row.get(c) for c in key_columns}).decode()
        return cached

    def _whole_body(self, key_columns: tuple[str, ...]) -> str:
        change = self.change
        if change.op == "TRUNCATE":
            return self._compose(RESET, None, None, None)
        return self._compose(*self._parts(WHOLE_TABLE_VIEW[change.op], key_columns))

    def _parts(self, view: str, key_columns: tuple[str, ...]) -> Parts:
        change = self.change
        removed = view == REMOVED
        row = None if removed else change.new_json
        old = change.old_json if view != ADDED else None
        return view, self._key(key_columns, removed), row, old

    def _restricted(self, row_filter: RowFilter, grant: Grant, key_columns: tuple[str, ...]) -> Decided | None:
        op = self.change.op
        if op == "INSERT":
            new = self._new
            view = grant.view(new) if row_filter.matches(new) else False
            if not view:
                return None
            return (ADDED, view), lambda: (ADDED, self._key(key_columns, False), self._shown(False, view), None)
        if op == "DELETE":
            old = self._old
            view = grant.view(old) if row_filter.matches(old) else False
            if not view:
                return None
            return (REMOVED, view), lambda: (REMOVED, self._key(key_columns, True), None, self._shown(True, view))
        new, old = self._new, self._old
        readable_new, readable_old = grant.view(new), grant.view(old)
        in_new = readable_new if readable_new and row_filter.matches(new) else False
        in_old = readable_old if readable_old and row_filter.matches(old) else False
        if in_new and in_old:
            return (MODIFIED, in_new, in_old), lambda: (
                MODIFIED,
                self._key(key_columns, False),
                self._shown(False, in_new),
                self._shown(True, in_old),
            )
        if in_new:
            return (ADDED, in_new), lambda: (ADDED, self._key(key_columns, False), self._shown(False, in_new), None)
        if not in_old:
            return None
        key = self._key(key_columns, True)
        if readable_new:  # only the filter moved it out: the old values were the subscriber's to read
            return (REMOVED, in_old), lambda: (REMOVED, key, None, self._shown(True, in_old))
        # Out of what the grant lets it read: nothing of the row but the key it already knows.
        return (REMOVED, "key"), lambda: (REMOVED, key, None, key)

    def _shown(self, old: bool, view: RowView) -> str:
        """The new (or old) row as the grant shows it: PostgreSQL's own text when it shows every column, as for an
        unrestricted subscription, else the trimmed row encoded."""
        if view is True:
            text = self.change.old_json if old else self.change.new_json
            assert text is not None
            return text
        return _text(self._old if old else self._new, view)

    def _compose(self, view: str, key: str | None, row: str | None, old: str | None) -> str:
        change = self.change
        return compose_body(change.seq, self._table, change.op, (view, key, row, old), change.ts)


def compose_body(seq: int, table: str, op: str, parts: Parts, ts: str) -> str:
    """A change frame's fields after its id, up to (not including) the transaction's; `table` is JSON text."""
    view, key, row, old = parts
    fields = [f'"seq":{seq},"table":{table},"op":"{op}","view":"{view}"']
    if key is not None:
        fields.append(f'"key":{key}')
    if row is not None:
        fields.append(f'"row":{row}')
    if old is not None:
        fields.append(f'"old":{old}')
    fields.append(f'"ts":"{ts}"')
    return ",".join(fields)


def transaction_tail(tx: str | None, tx_end: bool) -> str:
    """What closes a change frame: its transaction and whether the frame ends it (neither for a change
    recorded before capture v5, which stands alone)."""
    if tx is None:
        return "}"
    return f',"tx":"{tx}","tx_end":true}}' if tx_end else f',"tx":"{tx}"}}'


def change_frame(sub_id: str, body: str, tail: str) -> str:
    """A change frame's text: `body` is its fields after the id, `tail` the rest (transactions.py)."""
    return '{"type":"change","id":' + orjson.dumps(sub_id).decode() + "," + body + tail


def _text(row: Row, view: RowView) -> str:
    return orjson.dumps(trim(row, view)).decode()


def restricted_snapshot_row(grant: Grant, row_filter: RowFilter, text: str) -> str | None:
    """A snapshot row's text as the subscriber may see it, or None when it is outside the grant or the filter."""
    row = orjson.loads(text)
    if not row_filter.matches(row):
        return None
    view = grant.view(row)
    if not view:
        return None
    return text if view is True else _text(row, view)
