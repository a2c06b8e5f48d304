"""Change capture v2 (triggers/v2): committers to streamed tables no longer wait for one another.

Revision ID: 0003_shared_capture
Revises: 0002_capture
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from realtime._migrations.sql_script import run_trigger_file

revision: str = "0003_shared_capture"
down_revision: str | None = "0002_capture"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_trigger_file("v2/upgrade.sql")


def downgrade() -> None:
    run_trigger_file("v2/downgrade.sql")
