"""users table: identity id, case-insensitive unique email, database-maintained timestamps and version.

Revision ID: 0001_users
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0001_users"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE users (
            id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name       text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
            email      text        NOT NULL CHECK (char_length(email) BETWEEN 3 AND 320),
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            version    integer     NOT NULL DEFAULT 1
        )
        """
    )
    op.execute("CREATE UNIQUE INDEX users_email_key ON users (lower(email))")
    # The database, not the API, maintains updated_at and version, so writes from psql or other programs
    # bump them too and ETags stay truthful whoever wrote the row.
    op.execute(
        """
        CREATE FUNCTION users_touch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.created_at := OLD.created_at;
            NEW.updated_at := now();
            NEW.version := OLD.version + 1;
            RETURN NEW;
        END;
        $$
        """
    )
    op.execute("CREATE TRIGGER users_touch BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION users_touch()")


def downgrade() -> None:
    op.execute("DROP TABLE users")
    op.execute("DROP FUNCTION users_touch()")
