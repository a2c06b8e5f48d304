"""realtime change capture (triggers/v1) and streaming of `users`.

Revision ID: 0002_capture
Revises: 0001_users
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

from realtime._migrations.sql_script import run_trigger_file

revision: str = "0002_capture"
down_revision: str | None = "0001_users"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A released migration must not change, so it reads a versioned folder that is never edited afterwards.


def upgrade() -> None:
    run_trigger_file("v1/capture.sql")
    op.execute("SELECT realtime.enable_stream('public.users')")


def downgrade() -> None:
    run_trigger_file("v1/drop.sql")
