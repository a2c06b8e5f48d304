"""Change capture v4 (triggers/v4): a TRUNCATE of a streamed table is recorded as one change.

Revision ID: 0005_truncate_capture
Revises: 0004_utc_rows
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from realtime._migrations.sql_script import run_trigger_file

revision: str = "0005_truncate_capture"
down_revision: str | None = "0004_utc_rows"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_trigger_file("v4/upgrade.sql")


def downgrade() -> None:
    run_trigger_file("v4/downgrade.sql")
