"""The change record as read from `realtime.changes`, and the names of streamed tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

Row = dict[str, Any]


class TableKey(NamedTuple):
    """A table by schema and name; `public` tables are named without their schema on the wire."""

    schema: str
    name: str

    @classmethod
    def parse(cls, text: str) -> TableKey:
        schema, dot, name = text.partition(".")
        return cls(schema, name) if dot else cls("public", schema)

    @property
    def wire_name(self) -> str:
        return self.name if self.schema == "public" else f"{self.schema}.{self.name}"


@dataclass(eq=False, slots=True)
class Change:
    """One committed change: of a row (`op` INSERT, UPDATE or DELETE), or a TRUNCATE of the whole table, which
    has no rows (`new_json` and `old_json` are None). `tx` is the id of the transaction that made it, the same for
    all of that transaction's changes (None for changes recorded before capture v5: each stands alone).

    Rows stay as the JSON text PostgreSQL produced: a row is decoded once per change (for its key, and for filters
    and rules), and a subscription that sees whole rows gets that text spliced into its frame, never re-encoded."""

    seq: int
    table: TableKey
    op: str
    new_json: str | None
    old_json: str | None
    ts: str
    tx: str | None = None
    _new: Row | None = field(default=None, repr=False)
    _old: Row | None = field(default=None, repr=False)

    @property
    def new_row(self) -> Row | None:
        if self._new is None and self.new_json is not None:
            self._new = orjson.loads(self.new_json)
        return self._new

    @property
    def old_row(self) -> Row | None:
        if self._old is None and self.old_json is not None:
            self._old = orjson.loads(self.old_json)
        return self._old

    @property
    def filter_row(self) -> Row:
        """The row filters are checked against: the new row, or the old one for DELETE.

        Not for TRUNCATE: it empties every view of its table whatever the filter, so callers decide on it before
        any filter. It reads as an empty row here only so that code which does not know TRUNCATE does not fail.
        """
        row = self.old_row if self.op == "DELETE" else self.new_row
        if row is None:
            assert self.op == "TRUNCATE", f"a {self.op} change without its row"
            return {}
        return row
