"""The stream's SQL: reading `realtime.changes`, snapshots, the catalog of streamed tables, retention.

Positions in `realtime.changes` are final only up to the stable position (see triggers/README.md): below it every
transaction that took a position has finished, so "every change after N" is `N < seq <= stable`, and nothing
committed later can land inside a range already read. Every read here is bounded by a stable position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import asyncpg
import orjson

from realtime.auth.policy import Grant
from realtime.stream.changes import Change, TableKey
from realtime.stream.filters import RowFilter
from realtime.stream.views import restricted_snapshot_row


def utc_text(expression: str) -> str:
    """SQL rendering the timestamptz `expression` as every timestamp in rows and REST bodies reads
    (realtime/timestamps.py), whatever the session's TimeZone."""
    return f"(to_jsonb(({expression}) AT TIME ZONE 'UTC') #>> '{{}}') || '+00:00'"


_COLUMNS = f"seq, table_schema, table_name, op, new_row::text, old_row::text, {utc_text('committed_at')}, tx::text"

READ_RANGE = f"SELECT {_COLUMNS} FROM realtime.changes WHERE seq > $1 AND seq <= $2 ORDER BY seq"
# The transactions whose changes in ($1, $2] fall into more than one of the ranges ($1 + k*$3, $1 + (k+1)*$3], with
# the position of their last change: what a reader of those ranges cannot see from one range alone.
_SPANNING = """
    SELECT tx::text, max(seq) FROM realtime.changes
    WHERE seq > $1 AND seq <= $2 AND tx IS NOT NULL {table}
    GROUP BY tx HAVING (min(seq) - $1 - 1) / $3 <> (max(seq) - $1 - 1) / $3
"""
_SPANNING_ALL = _SPANNING.format(table="")
_SPANNING_TABLE = _SPANNING.format(table="AND table_schema = $4 AND table_name = $5")
_HOLD_POSITION = "SELECT realtime.hold_position()"
_RELEASE_POSITION = "SELECT realtime.release_position()"
# How many times a snapshot finds its table held (a TRUNCATE, a schema change) before it gives up.
_TABLE_ATTEMPTS = 3


class CursorExpired(Exception):
    """A resume position the changelog can no longer serve (pruned by retention, or not a position of it)."""


def _change(record: asyncpg.Record, offset: int = 0) -> Change:
    return Change(
        seq=record[offset],
        table=TableKey(record[offset + 1], record[offset + 2]),
        op=record[offset + 3],
        new_json=record[offset + 4],
        old_json=record[offset + 5],
        ts=record[offset + 6],
        tx=record[offset + 7],
    )


async def read_range(conn: asyncpg.Connection, after: int, through: int) -> list[Change]:
    """The changes with after < seq <= through, in order; `through` must be stable. Large ranges are read in
    pieces (see `pieces`), so that what one read holds in memory is bounded by the piece's size."""
    records = await conn.fetch(READ_RANGE, after, through)
    return [_change(record) for record in records]


@dataclass(frozen=True)
class Pieces:
    """A range of positions (after, through] cut into pieces of at most `size` positions, with what a reader of
    one piece needs from the others to tell where each transaction ends: `ends`, the last position of every
    transaction whose changes lie in more than one piece."""

    after: int
    through: int
    size: int
    ends: dict[str, int]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(after, through) of each piece, in order."""
        for start in range(self.after, self.through, self.size):
            yield start, min(start + self.size, self.through)

    def continuing(self, changes: Sequence[Change], through: int) -> frozenset[str]:
        """The transactions of `changes` (a piece ending at `through`) that have changes after it."""
        ends = self.ends
        if not ends:
            return frozenset()
        return frozenset(c.tx for c in changes if c.tx is not None and ends.get(c.tx, 0) > through)


async def pieces(
    conn: asyncpg.Connection, after: int, through: int, size: int, table: TableKey | None = None
) -> Pieces:
    """The range (after, through] (`through` stable) as pieces of `size` positions, for reading all changes or,
    with `table`, that table's. One extra statement, and only for a range longer than one piece: it reads the
    range once more, grouped by transaction (no index on `tx`: writers would pay for one on every change)."""
    ends: dict[str, int] = {}
    if through - after > size:
        if table is None:
            records = await conn.fetch(_SPANNING_ALL, after, through, size)
        else:
            records = await conn.fetch(_SPANNING_TABLE, after, through, size, table.schema, table.name)
        ends = {record[0]: record[1] for record in records}
    return Pieces(after, through, size, ends)


async def stable_position(conn: asyncpg.Connection) -> int:
    """The newest position up to which every transaction has finished (0 on an empty changelog).

    Briefly stops committers to streamed tables while the ones already holding positions finish; raises
    asyncpg.LockNotAvailableError if one of them stays open for 2 s. `conn` must not be in a transaction.
    """
    return int(await conn.fetchval("SELECT realtime.stable_position()"))


@dataclass(frozen=True)
class StreamedTable:
    key: TableKey
    columns: frozenset[str]
    primary_key: tuple[str, ...]


async def streamed_table(conn: asyncpg.Connection, key: TableKey) -> StreamedTable | None:
    """The table's columns and primary key if it streams, else None."""
    records = await conn.fetch(
        """
        SELECT a.attname, array_position(i.indkey::int2[], a.attnum) AS pk_position
        FROM realtime.streamed_tables s
        JOIN pg_namespace n ON n.nspname = s.table_schema
        JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.table_name
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
        WHERE s.table_schema = $1 AND s.table_name = $2
          -- A table dropped and re-created under the same name is registered but not captured: not streamed.
          AND EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = 'realtime_capture')
        """,
        key.schema,
        key.name,
    )
    if not records:
        return None
    primary_key = tuple(r[0] for r in sorted((r for r in records if r[1] is not None), key=lambda r: r[1]))
    return StreamedTable(key=key, columns=frozenset(r[0] for r in records), primary_key=primary_key)


class SnapshotTooLarge(Exception):
    """The rows matching a snapshot's filter weigh more than the snapshot bound."""


class SnapshotMemoryBusy(Exception):
    """The process's memory for snapshots being sent is taken by others just now."""


async def read_snapshot(
    conn: asyncpg.Connection,
    table: StreamedTable,
    row_filter: RowFilter,
    grant: Grant | None,
    chunk_rows: int,
    max_bytes: int,
    reserve: Callable[[int], bool],
) -> tuple[int, list[list[str]]]:
    """The rows matching `row_filter` and `grant` (which also trims their columns) as JSON texts in chunks of
    `chunk_rows`, all read in one snapshot at the returned position; SnapshotTooLarge past `max_bytes`,
    SnapshotMemoryBusy when `reserve` refuses a row's memory (the caller gives back what it reserved once the
    rows are sent); asyncpg.LockNotAvailableError when a transaction holds a position for 2 s, or the table
    stays locked (a TRUNCATE or a schema change in progress) through three tries with up to 2 s between them.

    Every change with a larger position committed after the snapshot was taken, so a subscriber that applies
    those changes to these rows misses nothing and sees nothing twice. The rows are read whole before any is
    sent: a consistent snapshot needs one transaction, and a transaction must never wait on a client.
    """
    quoted = f"{_ident(table.key.schema)}.{_ident(table.key.name)}"
    order = ", ".join(_ident(column) for column in table.primary_key)
    # The snapshot must be taken while no transaction holds a position, so that it holds exactly the changes up
    # to `position`: the session keeps the position lock across BEGIN and lets it go in the transaction's first
    # statement that takes a snapshot, which is where a REPEATABLE READ snapshot is taken. The table is locked
    # before that: TRUNCATE is not MVCC-safe, and one committed after the snapshot but before the read would
    # show the table empty at `position`. No TRUNCATE commits while the position lock is held (it takes a
    # position at commit), and none starts on the locked table until the read ends (triggers/README.md).
    released = True
    chunks: list[list[str]] = []
    chunk: list[str] = []
    size = 0
    try:
        for attempt in range(1, _TABLE_ATTEMPTS + 1):
            # Before the request: a read cancelled while the lock is being granted must not leave it held either.
            released = False
            position = int(await conn.fetchval(_HOLD_POSITION))
            try:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    # Never waits: the transaction holding the table may be waiting for the position at its commit.
                    await conn.execute(f"LOCK TABLE {quoted} IN ACCESS SHARE MODE NOWAIT")
                    await conn.execute(_RELEASE_POSITION)
                    released = True
                    query = f"SELECT to_jsonb(t)::text FROM {quoted} t ORDER BY {order}"
                    async for record in conn.cursor(query, prefetch=max(chunk_rows, 50)):
                        text = record[0]
                        if grant is not None:
                            text = restricted_snapshot_row(grant, row_filter, text)
                            if text is None:
                                continue
                        elif row_filter.conditions and not row_filter.matches(orjson.loads(text)):
                            continue
                        weight = text_bytes(text)
                        size += weight
                        if size <= max_bytes and not reserve(weight):
                            raise SnapshotMemoryBusy("the memory for snapshots being sent is in use")
                        if size > max_bytes:
                            raise SnapshotTooLarge(
                                f"the rows matching this subscription exceed the snapshot bound of {max_bytes}"
                                " bytes; narrow the filter, or subscribe without a snapshot"
                            )
                        chunk.append(text)
                        if len(chunk) >= chunk_rows:
                            chunks.append(chunk)
                            chunk = []
                break
            except asyncpg.LockNotAvailableError:
                if released:
                    raise
                await conn.execute(_RELEASE_POSITION)
                released = True
                if attempt == _TABLE_ATTEMPTS:
                    raise
                await _wait_for_table(conn, quoted)
    finally:
        if not released:
            # A pooled session must never keep the lock: every commit to a streamed table would wait for it.
            conn.terminate()
    chunks.append(chunk)
    return position, chunks


async def _wait_for_table(conn: asyncpg.Connection, quoted: str) -> None:
    """Wait, holding no position, until whatever holds the table lets it go: at most 2 s, then
    asyncpg.LockNotAvailableError, as for a position held too long."""
    async with conn.transaction(readonly=True):
        await conn.execute("SET LOCAL lock_timeout = '2s'")
        await conn.execute(f"LOCK TABLE {quoted} IN ACCESS SHARE MODE")


def text_bytes(text: str) -> int:
    """What a row's text holds in memory, near enough: its characters at their widest plus the string's header."""
    return (len(text) if text.isascii() else 4 * len(text)) + _STR_OVERHEAD


_STR_OVERHEAD = 64


# One statement, so one snapshot: the retention mark, the changelog's newest position and the chunk agree.
_REPLAY_CHUNK = f"""
    SELECT r.pruned_through, COALESCE(pg_sequence_last_value('realtime.changes_seq'), 0), c.*
    FROM realtime.retention r
    LEFT JOIN LATERAL (
        SELECT {_COLUMNS} FROM realtime.changes
        WHERE seq > $1 AND seq <= $2 AND table_schema = $3 AND table_name = $4
        ORDER BY seq
    ) c ON true
"""


async def replay_chunk(conn: asyncpg.Connection, table: TableKey, after: int, until: int) -> list[Change]:
    """The changes to `table` with after < seq <= until (stable), in order; CursorExpired if retention took some.
    A long replay is read piece by piece (`pieces`), each on a connection held only for that one statement."""
    records = await conn.fetch(_REPLAY_CHUNK, after, until, table.schema, table.name)
    pruned_through, newest = int(records[0][0]), int(records[0][1])
    if after < pruned_through:
        raise CursorExpired(f"changes up to {pruned_through} were pruned by retention; resubscribe with a snapshot")
    if after > newest:
        raise CursorExpired(f"position {after} is ahead of the changelog ({newest}); resubscribe with a snapshot")
    return [_change(record, 2) for record in records if record[2] is not None]


async def prune(conn: asyncpg.Connection, max_age_s: int, max_rows: int, timeout_s: float) -> int:
    """Delete changelog rows older than `max_age_s` or beyond the newest `max_rows`; one pruner at a time.

    Never past the stable position: a row beyond it may sit after a hole that an open transaction still fills.
    """
    through = await stable_position(conn)
    # A backlog (downtime, a bulk load, a lowered retention) can take longer to delete than a request's statement
    # bound, and a prune that always times out would let the changelog grow without limit.
    async with conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")
        deleted = await conn.fetchval(
            "SELECT realtime.prune(make_interval(secs => $1), $2, $3)", max_age_s, max_rows, through, timeout=timeout_s
        )
    return int(deleted)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
