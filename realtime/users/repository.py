"""The only SQL that touches `users` from the API.

Uniqueness of email is enforced by the database's unique index; a violation surfaces here as `EmailTaken`, never
through a racy check-then-insert. Version checks are part of the UPDATE/DELETE statement itself, so two writers
racing with the same expected version cannot both succeed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, Table, Text, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from realtime.users.schemas import User

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("name", Text, nullable=False),
    Column("email", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("version", Integer, nullable=False),
)

UNIQUE_VIOLATION = "23505"


class EmailTaken(Exception):
    """Another user already has this email (compared case-insensitively)."""


def _sqlstate(error: IntegrityError) -> str | None:
    code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    return str(code) if code is not None else None


def _user(row: Any) -> User:
    # The columns are typed and NOT NULL, so asyncpg already hands out what User declares: validating the row
    # again would cost more than decoding it did.
    return User.model_construct(**row)


async def _returning_user(db: AsyncConnection, statement: Any) -> User | None:
    try:
        result = await db.execute(statement.returning(*users.c))
    except IntegrityError as error:
        if _sqlstate(error) == UNIQUE_VIOLATION:
            raise EmailTaken from error
        raise
    row = result.mappings().one_or_none()
    return _user(row) if row is not None else None


async def insert(db: AsyncConnection, name: str, email: str) -> User:
    user = await _returning_user(db, users.insert().values(name=name, email=email))
    assert user is not None
    return user


async def get(db: AsyncConnection, user_id: int) -> User | None:
    row = (await db.execute(select(users).where(users.c.id == user_id))).mappings().one_or_none()
    return _user(row) if row is not None else None


async def page(db: AsyncConnection, after: int, limit: int) -> tuple[list[User], bool]:
    """Up to `limit` users with id > `after` in id order, and whether more follow."""
    statement = select(users).where(users.c.id > after).order_by(users.c.id).limit(limit + 1)
    rows = (await db.execute(statement)).mappings().all()
    return [_user(row) for row in rows[:limit]], len(rows) > limit


async def update_fields(
    db: AsyncConnection, user_id: int, changes: dict[str, Any], versions: frozenset[int] | None
) -> User | None:
    """Apply `changes`; None when no row has this id (and, unless `versions` is None, one of these versions)."""
    statement = update(users).where(users.c.id == user_id).values(**changes)
    if versions is not None:
        statement = statement.where(users.c.version.in_(versions))
    return await _returning_user(db, statement)


async def delete_row(db: AsyncConnection, user_id: int, versions: frozenset[int] | None) -> bool:
    """Delete the row; False when no row has this id (and, unless `versions` is None, one of these versions)."""
    statement = delete(users).where(users.c.id == user_id)
    if versions is not None:
        statement = statement.where(users.c.version.in_(versions))
    result = await db.execute(statement.returning(users.c.id))
    return result.first() is not None
