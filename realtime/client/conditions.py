"""Filter conditions written as text, `column=op:value`, for command lines: the syntax of the SSE endpoint's
`filter` parameter (docs/sse.md), so a condition reads the same in `realtime tail` and in a URL.

`op` is one of the protocol's (`eq neq lt lte gt gte in is`). `value` is read as JSON when it parses and as the
text itself otherwise, so `id=gt:5` compares with the number 5, `email=eq:a@b.c` with a string, `name=eq:"5"` with
the string "5", `flag=is:null` tests for null and `id=in:[1,2,3]` takes a list.
"""

from __future__ import annotations

import json
from typing import Any

from realtime.client.subscription import FILTER_OPS, Condition


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_condition(text: str) -> Condition:
    """`column=op:value` as a (column, op, value) condition; ValueError saying what is wrong otherwise."""
    column, equals, rest = text.partition("=")
    op, colon, raw = rest.partition(":")
    if not equals or not column or not colon:
        raise ValueError(f"a filter is column=op:value (e.g. email=eq:a@b.c), not {text!r}")
    if op not in FILTER_OPS:
        raise ValueError(f"unknown filter op {op!r} in {text!r}; ops: {' '.join(FILTER_OPS)}")
    value = _value(raw)
    if op == "in":
        if not isinstance(value, list) or not value or any(isinstance(item, list | dict) for item in value):
            raise ValueError(f'`in` takes a non-empty JSON list of values (e.g. [1,2] or ["a","b"]), not {raw!r}')
    elif op == "is":
        if not (value is None or isinstance(value, bool)):
            raise ValueError(f"`is` takes null, true or false, not {raw!r}")
    elif isinstance(value, list | dict):
        raise ValueError(f"`{op}` takes one value (a number, string, true, false or null), not {raw!r}")
    return column, op, value
