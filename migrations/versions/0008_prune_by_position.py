"""Change capture v6 (triggers/v6): retention by count finds its cutoff from the newest position, not by reading
up to RETENTION_MAX_ROWS rows on every run.

Revision ID: 0008_prune_by_position
Revises: 0007_sse_tickets
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from realtime._migrations.sql_script import run_trigger_file

revision: str = "0008_prune_by_position"
down_revision: str | None = "0007_sse_tickets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_trigger_file("v6/upgrade.sql")


def downgrade() -> None:
    run_trigger_file("v6/downgrade.sql")
