"""Row filter semantics (pure logic)."""

from typing import Any

import pytest

from realtime.stream.filters import FilterError, compile_condition, compile_filter

ROW = {"id": 7, "name": "Ada", "score": 2.5, "active": True, "gone": None}


@pytest.mark.parametrize(
    ("column", "op", "value", "expected"),
    [
        ("id", "eq", 7, True),
        ("id", "eq", 7.0, True),
        ("id", "eq", "7", False),
        ("active", "eq", 1, False),
        ("id", "neq", 8, True),
        ("id", "neq", 7, False),
        ("id", "lt", 8, True),
        ("id", "lte", 7, True),
        ("id", "gt", 7, False),
        ("id", "gte", 7, True),
        ("name", "lt", "B", True),
        ("name", "gt", 5, False),
        ("id", "in", [1, 7], True),
        ("id", "in", ["7"], False),
        ("gone", "is", None, True),
        ("active", "is", True, True),
        ("active", "is", False, False),
        ("missing", "is", None, True),
        ("gone", "eq", None, True),
        ("gone", "lt", 3, False),
    ],
)
def test_condition_semantics(column: str, op: str, value: Any, expected: bool) -> None:
    """Each op compares by JSON type: numbers with numbers, strings with strings, never across types."""
    assert compile_condition(column, op, value).holds(ROW) is expected


@pytest.mark.parametrize(
    ("op", "value"),
    [("like", "x"), ("in", []), ("in", 3), ("in", [[1]]), ("is", 1), ("is", "null"), ("lt", True), ("eq", {})],
)
def test_invalid_conditions_are_refused(op: str, value: Any) -> None:
    """Unknown ops and wrongly shaped values raise FilterError instead of matching nothing."""
    with pytest.raises(FilterError):
        compile_condition("id", op, value)


def test_filter_is_an_and_and_indexes_its_first_eq() -> None:
    """A filter matches only when every condition holds, and offers its first eq condition for indexing."""
    row_filter = compile_filter([compile_condition("score", "gt", 1), compile_condition("name", "eq", "Ada")])
    assert row_filter.matches(ROW)
    assert not row_filter.matches({**ROW, "score": 0})
    assert row_filter.index_condition == compile_condition("name", "eq", "Ada")
