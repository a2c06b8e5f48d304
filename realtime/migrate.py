"""Apply or revert the Alembic migrations under `migrations/` against a given database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from realtime.dsn import Dsn

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = REPO_ROOT / "migrations"


def alembic_config(url: Dsn) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.set_main_option("prepend_sys_path", str(REPO_ROOT))
    # ConfigParser interpolation would treat a '%' in a password as a placeholder.
    config.set_main_option("sqlalchemy.url", url.sqlalchemy().replace("%", "%%"))
    return config


def upgrade(url: Dsn, revision: str = "head") -> None:
    """Migrate up to `revision`. Blocking: call from sync code or a worker thread."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: Dsn, revision: str = "base") -> None:
    """Migrate down to `revision`. Blocking: call from sync code or a worker thread."""
    command.downgrade(alembic_config(url), revision)
