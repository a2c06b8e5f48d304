"""REST renders timestamps exactly as PostgreSQL renders them into stream rows (realtime/timestamps.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

from realtime.stream import changelog
from realtime.timestamps import format_timestamp

MOMENTS = [
    datetime(2026, 11, 26, 7, 38, 58, 202697, tzinfo=UTC),
    datetime(2026, 11, 26, 7, 38, 58, 500000, tzinfo=UTC),  # trailing zeros dropped: .5
    datetime(2026, 11, 26, 7, 38, 58, 120, tzinfo=UTC),  # leading zeros kept: .00012
    datetime(2026, 11, 26, 7, 38, 58, tzinfo=UTC),  # a whole second: no fraction at all
    datetime(2026, 11, 26, 2, 38, 58, 1, tzinfo=timezone(timedelta(hours=-5))),  # converted to UTC
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
async def test_format_matches_postgresql_json_in_utc(moment: datetime, db: asyncpg.Connection) -> None:
    """Rows (to_jsonb under TimeZone UTC) and a frame's `ts` (realtime/stream/changelog.py) render as REST does."""
    async with db.transaction():
        await db.execute("SET LOCAL TimeZone = 'UTC'")
        row_value = await db.fetchval("SELECT to_jsonb($1::timestamptz) #>> '{}'", moment)
        # A zone far from UTC: the commit time's rendering must not depend on the session.
        await db.execute("SET LOCAL TimeZone = 'Asia/Kathmandu'")
        commit_time = await db.fetchval(f"SELECT {changelog.utc_text('$1::timestamptz')}", moment)
    assert format_timestamp(moment) == row_value == commit_time
