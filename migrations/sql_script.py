"""Run a multi-statement SQL script inside the current migration's transaction.

SQLAlchemy's asyncpg driver prepares every statement, and a prepared statement holds exactly one command, so
scripts (functions with `$$` bodies, several DDL statements) go through asyncpg's simple-query path instead.
"""

from alembic import op
from sqlalchemy.util import await_only

from realtime import resources


def run_script(sql: str) -> None:
    driver_connection = op.get_bind().connection.driver_connection
    await_only(driver_connection.execute(sql))


def run_trigger_file(relative: str) -> None:
    run_script((resources.triggers() / relative).read_text())
