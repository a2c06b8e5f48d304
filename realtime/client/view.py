"""`View`: the rows of one subscription, kept equal to `SELECT ... WHERE filter` from its events.

The rules are the protocol's (docs/protocol.md, "change"): a `Snapshot` replaces every row; `added` and
`modified` upsert `row` under `key`; `removed` deletes `key`; `reset` (a TRUNCATE) empties the view. An UPDATE
that changed the primary key arrives under the new key with `old` holding the old key's row, so the old key is
deleted first.

With `transactions=True` (the default) a change that carries `tx` is held until the next frame with `tx_end`,
and then everything held is applied at once, so the rows never show half a transaction:

    Change(tx="7")  Change(tx="7")  Change(tx="7", tx_end=True)      ->  applied together on the third
    Change(tx="7")  Change(tx="8")  Change(tx="7")  Change(tx="8", tx_end=True)
                                         (transactions that committed side by side end together: docs/protocol.md)
    Change(tx=None)                                                  ->  applied at once (it stands alone)

A frame without `tx` (recorded before the server stamped transactions) applies whatever is held first, then
itself, so nothing is applied out of order.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from realtime.client.events import Change, Event, Reset, Row, Snapshot


class View:
    """A dict of the subscription's rows by primary key, current as of `seq`.

    `key` names the primary key's columns (snapshot rows carry no key of their own, so the view must know them).
    Rows are keyed by the key's value for a one-column key (`view[42]`) and by a tuple of values, in `key`'s order,
    for a composite one (`view[("eu", 7)]`).
    """

    def __init__(self, key: Sequence[str] = ("id",), *, transactions: bool = True) -> None:
        if not key:
            raise ValueError("a view needs the primary key's column names")
        self._columns = tuple(key)
        self._transactions = transactions
        self._rows: dict[Hashable, Row] = {}
        self._held: list[Change] = []
        self._seq: int | None = None

    @property
    def rows(self) -> dict[Hashable, Row]:
        """The rows by key (read it; change it only through `apply`)."""
        return self._rows

    @property
    def seq(self) -> int | None:
        """The position the rows are current at: the last applied snapshot or change (None before any)."""
        return self._seq

    @property
    def held(self) -> int:
        """Changes received but not applied yet: no frame with `tx_end` has come since."""
        return len(self._held)

    def apply(self, event: Event) -> bool:
        """Apply one event; True when the rows changed now (False when a change was held for its transaction)."""
        if isinstance(event, Snapshot):
            self._held.clear()
            self._rows = {self.key_of(row): row for row in event.rows}
            self._seq = event.seq
            return True
        if isinstance(event, Reset):
            # A snapshot follows; until then the old rows are no longer known to be true.
            self._held.clear()
            self._rows.clear()
            return True
        if not self._transactions or event.tx is None:
            self._flush()
            self._apply_change(event)
            return True
        self._held.append(event)
        if event.tx_end:
            return self._flush()
        return False

    def key_of(self, row: Row) -> Hashable:
        """The key under which `row` (a snapshot row, a change's `row` or `old`, or a `key` object) is held."""
        try:
            values = tuple(row[column] for column in self._columns)
        except KeyError as missing:
            raise ValueError(f"a row without the key column {missing}; the view's key is {self._columns}") from None
        return values[0] if len(values) == 1 else values

    def _flush(self) -> bool:
        held, self._held = self._held, []
        for change in held:
            self._apply_change(change)
        return bool(held)

    def _apply_change(self, change: Change) -> None:
        self._seq = change.seq
        if change.view == "reset":
            self._rows.clear()
            return
        if change.old is not None and self._has_key(change.old):
            self._rows.pop(self.key_of(change.old), None)
        if change.key is not None:
            key = self.key_of(change.key)
            if change.view == "removed":
                self._rows.pop(key, None)
            elif change.row is not None:
                self._rows[key] = change.row

    def _has_key(self, row: Row) -> bool:
        return all(column in row for column in self._columns)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __getitem__(self, key: Hashable) -> Row:
        return self._rows[key]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._rows)

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self._rows.get(key, default)
