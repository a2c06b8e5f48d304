"""The one textual form of a timestamp, shared by REST bodies, snapshot rows and change frames.

Rows reach WebSocket subscribers as the JSON text PostgreSQL produced (never decoded and re-encoded), so REST
renders timestamps the way PostgreSQL's `to_jsonb` does in a session whose TimeZone is UTC: ISO 8601 with a
`T`, fractional seconds without trailing zeros (none at all on a whole second) and the offset `+00:00`. The same
row then reads the same, character for character, whichever way it was fetched.
"""

from __future__ import annotations

from datetime import UTC, datetime


def format_timestamp(value: datetime) -> str:
    """`value` (timezone-aware) in UTC, e.g. `2026-11-26T07:38:58.2027+00:00`."""
    utc = value.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}".rstrip("0")
    return text + "+00:00"
