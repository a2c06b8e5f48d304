"""Change capture v5 (triggers/v5): each change records the id of the transaction that made it.

Revision ID: 0006_transaction_ids
Revises: 0005_truncate_capture
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from realtime._migrations.sql_script import run_trigger_file

revision: str = "0006_transaction_ids"
down_revision: str | None = "0005_truncate_capture"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_trigger_file("v5/upgrade.sql")


def downgrade() -> None:
    run_trigger_file("v5/downgrade.sql")
