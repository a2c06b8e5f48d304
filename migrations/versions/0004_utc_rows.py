"""Change capture v3 (triggers/v3): rows are recorded in UTC whatever the writer's TimeZone.

Revision ID: 0004_utc_rows
Revises: 0003_shared_capture
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from realtime._migrations.sql_script import run_trigger_file

revision: str = "0004_utc_rows"
down_revision: str | None = "0003_shared_capture"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_trigger_file("v3/upgrade.sql")


def downgrade() -> None:
    run_trigger_file("v3/downgrade.sql")
