"""SSE tickets: the single-use tickets of POST /sse/tickets, kept where every server process can redeem them.

Revision ID: 0007_sse_tickets
Revises: 0006_transaction_ids
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007_sse_tickets"
down_revision: str | None = "0006_transaction_ids"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A ticket is stored by its SHA-256 only: the table's contents open no stream. Redeeming deletes the row, so
    # of two processes presenting the same ticket at once exactly one gets it.
    op.execute(
        """
        CREATE TABLE realtime.sse_tickets (
            digest     bytea       PRIMARY KEY,
            identity   jsonb,
            expires_at timestamptz NOT NULL
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE realtime.sse_tickets")
