"""Users use cases: conditional requests (ETag / If-Match) and the mapping of outcomes to problems."""

from __future__ import annotations

import re

from sqlalchemy.ext.asyncio import AsyncConnection

from realtime.errors import Conflict, NotFound, PreconditionFailed
from realtime.users import repository
from realtime.users.schemas import User, UserCreate, UserPage, UserUpdate


def etag(user: User) -> str:
    """A strong entity tag derived from the database-maintained version."""
    return f'"{user.version}"'


# One of our entity tags exactly as `etag()` writes it: a quoted ASCII decimal without leading zeros (tags
# compare as strings, so "01" is not "1"), in the range of the `integer` column. (str.isdigit() would also
# accept "²", which int() then refuses: that was a 500.)
_TAG = re.compile(r'"([1-9][0-9]{0,9})"')
_MAX_VERSION = 2**31 - 1


def expected_versions(if_match: str | None) -> frozenset[int] | None:
    """The versions an If-Match header accepts; None means unconditional (absent header or `*`).

    If-Match uses strong comparison (RFC 9110 §13.1.1), so weak tags and anything that is not one of our tags
    match no version and the request fails with 412 rather than silently succeeding.
    """
    if if_match is None or if_match.strip() == "*":
        return None
    versions = set()
    for tag in if_match.split(","):
        match = _TAG.fullmatch(tag.strip())
        if match and int(match[1]) <= _MAX_VERSION:
            versions.add(int(match[1]))
    return frozenset(versions)


def not_found(user_id: int) -> NotFound:
    """The one 404 of a user id: a row a policy hides from the caller gets exactly this too."""
    return NotFound(f"no user with id {user_id}")


def precondition_failed(current: User, *, version_shown: bool = True) -> PreconditionFailed:
    """If-Match named none of the user's tags. The current tag is given only to a caller who may read `version`."""
    if not version_shown:
        return PreconditionFailed(f"user {current.id} is not at a version If-Match names")
    return PreconditionFailed(
        f"user {current.id} is at version {current.version}; If-Match did not match",
        headers={"ETag": etag(current)},
    )


def _email_taken(email: str) -> Conflict:
    return Conflict(f"a user with email {email!r} already exists")


async def create(db: AsyncConnection, body: UserCreate) -> User:
    try:
        return await repository.insert(db, body.name, str(body.email))
    except repository.EmailTaken:
        raise _email_taken(str(body.email)) from None


async def get(db: AsyncConnection, user_id: int) -> User:
    user = await repository.get(db, user_id)
    if user is None:
        raise not_found(user_id)
    return user


async def list_page(db: AsyncConnection, after: int, limit: int) -> UserPage:
    items, more = await repository.page(db, after, limit)
    return UserPage(items=items, next_after=items[-1].id if more else None)


async def update(db: AsyncConnection, user_id: int, body: UserUpdate, if_match: str | None) -> User:
    changes = body.model_dump(exclude_unset=True)
    if "email" in changes:
        changes["email"] = str(changes["email"])
    try:
        user = await repository.update_fields(db, user_id, changes, expected_versions(if_match))
    except repository.EmailTaken:
        raise _email_taken(changes["email"]) from None
    if user is None:
        raise await _why_not_found(db, user_id)
    return user


async def delete(db: AsyncConnection, user_id: int, if_match: str | None) -> None:
    if not await repository.delete_row(db, user_id, expected_versions(if_match)):
        raise await _why_not_found(db, user_id)


async def _why_not_found(db: AsyncConnection, user_id: int) -> NotFound | PreconditionFailed:
    """A conditional write touched no row: the row is gone (404) or its version moved on (412)."""
    current = await repository.get(db, user_id)
    if current is None:
        return not_found(user_id)
    return precondition_failed(current)
