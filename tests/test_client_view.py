"""realtime.client.View and the filter syntax of `realtime tail`, on frames shaped as docs/protocol.md shows them."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from realtime.client import Change, Reset, Snapshot, View
from realtime.client.conditions import parse_condition
from realtime.client.tokens import refresh_delay

TS = "2026-11-26T07:30:00.5+00:00"


def change(seq: int, view: str, key: dict[str, Any] | None = None, **fields: Any) -> Change:
    op = fields.pop("op", {"added": "INSERT", "modified": "UPDATE", "removed": "DELETE", "reset": "TRUNCATE"}[view])
    frame = {"type": "change", "id": "s1", "seq": seq, "table": "t", "op": op, "view": view, "ts": TS, **fields}
    if key is not None:
        frame["key"] = key
    return Change.from_frame(frame)


def snapshot(seq: int, *rows: dict[str, Any]) -> Snapshot:
    return Snapshot("s1", "t", seq, list(rows))


def test_changes_apply_by_the_protocols_rules() -> None:
    """added/modified upsert by key, removed deletes, reset empties, a snapshot replaces everything."""
    view = View()
    view.apply(snapshot(10, {"id": 1, "v": "a"}, {"id": 2, "v": "b"}))
    view.apply(change(11, "added", {"id": 3}, row={"id": 3, "v": "c"}))
    view.apply(change(12, "modified", {"id": 1}, row={"id": 1, "v": "A"}, old={"id": 1, "v": "a"}))
    view.apply(change(13, "removed", {"id": 2}, old={"id": 2, "v": "b"}))
    assert view.rows == {1: {"id": 1, "v": "A"}, 3: {"id": 3, "v": "c"}}
    assert view.seq == 13
    view.apply(change(14, "reset"))
    assert len(view) == 0
    view.apply(snapshot(20, {"id": 9, "v": "z"}))
    assert view.rows == {9: {"id": 9, "v": "z"}}


def test_an_update_of_the_primary_key_moves_the_row() -> None:
    """A frame under a new key whose `old` holds the old key's row drops the old key."""
    view = View()
    view.apply(snapshot(1, {"id": 1, "v": "a"}))
    view.apply(change(2, "modified", {"id": 5}, row={"id": 5, "v": "a"}, old={"id": 1, "v": "a"}))
    assert view.rows == {5: {"id": 5, "v": "a"}}


def test_a_composite_key_holds_rows_under_tuples() -> None:
    """With a key of two columns, rows are held under (a, b), snapshot rows and change keys alike."""
    view = View(key=("region", "n"))
    view.apply(snapshot(1, {"region": "eu", "n": 1, "v": 0}))
    view.apply(change(2, "added", {"region": "us", "n": 1}, row={"region": "us", "n": 1, "v": 1}))
    view.apply(change(3, "removed", {"region": "eu", "n": 1}, old={"region": "eu", "n": 1}))
    assert view.rows == {("us", 1): {"region": "us", "n": 1, "v": 1}}
    with pytest.raises(ValueError, match="key column"):
        view.apply(snapshot(4, {"id": 1}))


def test_a_transaction_is_applied_whole_at_its_tx_end() -> None:
    """Frames with `tx` wait for the frame with `tx_end`; side-by-side transactions that end together apply
    together; a frame without `tx` stands alone."""
    view = View()
    view.apply(snapshot(1))
    assert view.apply(change(2, "added", {"id": 1}, row={"id": 1}, tx="7")) is False
    assert view.apply(change(3, "added", {"id": 2}, row={"id": 2}, tx="8")) is False
    assert view.apply(change(4, "added", {"id": 3}, row={"id": 3}, tx="7")) is False
    assert (len(view), view.held) == (0, 3)
    assert view.apply(change(5, "added", {"id": 4}, row={"id": 4}, tx="8", tx_end=True)) is True
    assert (set(view.rows), view.held, view.seq) == ({1, 2, 3, 4}, 0, 5)
    assert view.apply(change(6, "removed", {"id": 1}, old={"id": 1})) is True
    assert set(view.rows) == {2, 3, 4}
    # Without transactions every frame applies at once.
    eager = View(transactions=False)
    assert eager.apply(change(7, "added", {"id": 1}, row={"id": 1}, tx="9")) is True
    assert list(eager.rows) == [1]


def test_a_reset_drops_held_frames_and_rows() -> None:
    """A Reset (the gap could not be replayed) empties the view and what it held; the snapshot after it rebuilds."""
    view = View()
    view.apply(snapshot(1, {"id": 1}))
    view.apply(change(2, "added", {"id": 2}, row={"id": 2}, tx="5"))
    view.apply(Reset("s1", "t", "cursor_expired"))
    assert (len(view), view.held) == (0, 0)


def test_change_frames_become_typed_events() -> None:
    """Every field of a change frame is on the event; `ts` is a datetime, `tx_end` is False when absent."""
    event = change(5, "modified", {"id": 1}, row={"id": 1}, old={"id": 1}, tx="42")
    assert (event.op, event.view, event.key, event.seq, event.tx, event.tx_end) == (
        "UPDATE",
        "modified",
        {"id": 1},
        5,
        "42",
        False,
    )
    assert event.ts.isoformat() == "2026-11-26T07:30:00.500000+00:00"
    with pytest.raises(ValueError, match="op"):
        change(6, "added", op="MERGE")


@pytest.mark.parametrize(
    ("text", "condition"),
    [
        ("email=eq:a@b.c", ("email", "eq", "a@b.c")),
        ("id=gt:5", ("id", "gt", 5)),
        ('name=eq:"5"', ("name", "eq", "5")),
        ("flag=is:null", ("flag", "is", None)),
        ("id=in:[1,2]", ("id", "in", [1, 2])),
        ('status=in:["active",3]', ("status", "in", ["active", 3])),
        ("note=eq:a:b=c", ("note", "eq", "a:b=c")),
    ],
)
def test_filter_text_reads_values_as_json_else_strings(text: str, condition: tuple[str, str, Any]) -> None:
    """`column=op:value`: the value is JSON when it parses, else the text."""
    assert parse_condition(text) == condition


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("email", "column=op:value"),
        ("email=eq", "column=op:value"),
        ("=eq:1", "column=op:value"),
        ("email=like:a", "unknown filter op 'like'"),
        ("flag=is:1", "`is` takes null, true or false"),
        ("id=in:[]", "`in` takes a non-empty JSON list"),
        ("status=in:a,b", "`in` takes a non-empty JSON list"),
        ("id=eq:[1]", "`eq` takes one value"),
    ],
)
def test_bad_filter_text_says_what_is_wrong(text: str, problem: str) -> None:
    """Each malformed condition is refused with a message naming the problem."""
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_condition(text)


def test_a_token_is_refreshed_before_it_expires() -> None:
    """At 80 % of its life or 30 s before exp, whichever is earlier, never within 1 s; a token no newer than the
    last is asked for again after half the time left."""
    assert refresh_delay(exp=1000, now=0, previous_exp=None) == 800
    assert refresh_delay(exp=100, now=0, previous_exp=None) == 70
    assert refresh_delay(exp=3, now=0, previous_exp=None) == 1
    assert refresh_delay(exp=100, now=0, previous_exp=100) == 50


def test_the_client_imports_nothing_but_websockets_and_the_standard_library() -> None:
    """`import realtime.client` (and the tail command's module) loads no third-party package besides websockets."""
    probe = (
        "import sys, realtime.client, realtime.client.conditions, realtime.tail\n"
        "names = {name.split('.')[0] for name in sys.modules if not name.startswith('_')}\n"
        "print(sorted(names - set(sys.stdlib_module_names) - {'realtime'}))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "['websockets']"
