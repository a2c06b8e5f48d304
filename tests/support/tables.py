"""Streamed tables made for one test, so its changes are the only ones a subscriber of that table sees."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
import orjson


async def create_streamed_table(db: asyncpg.Connection, prefix: str = "t") -> str:
    """A new table `<prefix>_<random>(id, k, v)` with streaming enabled; returns its name."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    await db.execute(
        f"CREATE TABLE {name} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k integer, v text, flag boolean)"
    )
    await db.execute("SELECT realtime.enable_stream($1::text::regclass)", name)
    return name


async def committed_changes(db: asyncpg.Connection, table: str, after: int = 0) -> list[dict[str, Any]]:
    """The ground truth: every committed change to `table` after position `after`, in order."""
    records = await db.fetch(
        "SELECT seq, op, new_row::text AS row, old_row::text AS old FROM realtime.changes"
        " WHERE table_schema = 'public' AND table_name = $1 AND seq > $2 ORDER BY seq",
        table,
        after,
    )
    return [
        {
            "seq": r["seq"],
            "op": r["op"],
            "row": orjson.loads(r["row"]) if r["row"] else None,
            "old": orjson.loads(r["old"]) if r["old"] else None,
        }
        for r in records
    ]


async def table_rows(db: asyncpg.Connection, table: str) -> dict[int, dict[str, Any]]:
    records = await db.fetch(f"SELECT to_jsonb(t)::text AS row FROM {table} t")
    rows = [orjson.loads(r["row"]) for r in records]
    return {row["id"]: row for row in rows}


def apply_changes(rows: dict[int, dict[str, Any]], frames: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Apply change frames to a copy of `rows` (keyed by id) by the two rules of a view: `added`/`modified` upsert
    `row` by `key`, `removed` deletes `key` (and `reset`, a TRUNCATE, empties it)."""
    state = dict(rows)
    for frame in frames:
        if frame["view"] == "reset":
            state.clear()
        elif frame["view"] == "removed":
            state.pop(frame["key"]["id"])
        else:
            state[frame["key"]["id"]] = frame["row"]
    return state


def transaction_groups(frames: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Change frames cut after each `tx_end`: what a client that applies whole transactions applies at once."""
    result: list[list[dict[str, Any]]] = [[]]
    for frame in frames:
        result[-1].append(frame)
        if frame.get("tx_end"):
            result.append([])
    return [group for group in result if group]


async def head(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT COALESCE(max(seq), 0) FROM realtime.changes"))
