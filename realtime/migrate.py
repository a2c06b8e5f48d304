"""Apply or revert the Alembic migrations (`migrations/`, shipped as `realtime._migrations`) against a database."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from realtime import resources
from realtime.dsn import Dsn


def alembic_config(url: Dsn) -> Config:
    # No sys.path entry: the migrations import their helper as `realtime._migrations`, importable wherever
    # realtime is, so nothing beside the package (a checkout's other folders) lands on the import path.
    config = Config()
    config.set_main_option("script_location", str(resources.migrations()))
    config.set_main_option("path_separator", "os")
    # ConfigParser interpolation would treat a '%' in a password as a placeholder.
    config.set_main_option("sqlalchemy.url", url.sqlalchemy().replace("%", "%%"))
    return config


def upgrade(url: Dsn, revision: str = "head") -> None:
    """Migrate up to `revision`. Blocking: call from sync code or a worker thread."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: Dsn, revision: str = "base") -> None:
    """Migrate down to `revision`. Blocking: call from sync code or a worker thread."""
    command.downgrade(alembic_config(url), revision)
