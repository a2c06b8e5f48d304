"""Row filters: an AND of conditions on column values, checked against JSON-decoded rows.

Values compare by JSON type: numbers with numbers, strings with strings (code-point order), booleans and null
only by equality. A comparison across types is false (so `neq` across types is true). `is` tests for null,
true or false exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from realtime.stream.changes import Row

OPS = ("eq", "neq", "lt", "lte", "gt", "gte", "in", "is")
_ORDER_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
}


class FilterError(ValueError):
    """A condition that cannot be evaluated (unknown op, wrong value shape)."""


def value_key(value: Any) -> Hashable:
    """A hashable key under which JSON-equal values meet; bools never meet numbers (True == 1 in Python)."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("num", value)
    if isinstance(value, str):
        return ("str", value)
    return ("json", repr(value))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "num"
    if isinstance(value, str):
        return "str"
    return "other"


@dataclass(frozen=True, slots=True)
class Condition:
    column: str
    op: str
    value: Any
    # What `value` compares as (value_key), worked out once: a condition is checked per change and subscription.
    _key: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.op == "in":
            key: Any = frozenset(value_key(option) for option in self.value)
        else:
            key = value_key(self.value)
        object.__setattr__(self, "_key", key)

    def holds(self, row: Row) -> bool:
        actual = row.get(self.column)
        op = self.op
        if op == "eq":
            return bool(value_key(actual) == self._key)
        if op == "neq":
            return bool(value_key(actual) != self._key)
        if op == "in":
            return bool(value_key(actual) in self._key)
        if op == "is":
            return actual is self.value
        kind = _kind(actual)
        if kind not in ("num", "str") or kind != _kind(self.value):
            return False
        return _ORDER_OPS[op](actual, self.value)


def compile_condition(column: str, op: str, value: Any) -> Condition:
    """Check a condition's shape; raises FilterError naming what is wrong."""
    if op not in OPS:
        raise FilterError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    if op == "in":
        if not isinstance(value, list) or not value:
            raise FilterError("op 'in' takes a non-empty list of values")
        if len(value) > 1000:
            raise FilterError("op 'in' takes at most 1000 values")
        if any(_kind(v) == "other" for v in value):
            raise FilterError("op 'in' takes a list of scalars (string, number, boolean, null)")
        return Condition(column, op, tuple(value))
    if op == "is":
        if value not in (None, True, False) or (value is not None and not isinstance(value, bool)):
            raise FilterError("op 'is' takes null, true or false")
        return Condition(column, op, value)
    if _kind(value) == "other":
        raise FilterError(f"op {op!r} takes a scalar value (string, number, boolean, null)")
    if op in _ORDER_OPS and _kind(value) not in ("num", "str"):
        raise FilterError(f"op {op!r} takes a number or a string")
    return Condition(column, op, value)


@dataclass(frozen=True, slots=True)
class RowFilter:
    conditions: tuple[Condition, ...] = ()

    def matches(self, row: Row) -> bool:
        # A loop, not all() over a generator: this runs for every change a filtered subscription is offered.
        for condition in self.conditions:  # noqa: SIM110
            if not condition.holds(row):
                return False
        return True

    @property
    def index_condition(self) -> Condition | None:
        """An `eq` condition the hub can index on, so non-matching subscriptions cost nothing per change."""
        for condition in self.conditions:
            if condition.op == "eq":
                return condition
        return None


def compile_filter(conditions: Sequence[Condition]) -> RowFilter:
    return RowFilter(tuple(conditions))
