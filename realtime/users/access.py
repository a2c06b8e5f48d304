"""The users use cases under a row-level policy (AUTH_POLICY_FILE): which rows a caller may read and write, and
what it sees of them. The grants are realtime/auth/policy.py's, the ones /ws applies (realtime/stream/access.py),
so REST and the stream give a role the same rows and the same columns.

Only for a caller the policy restricts: without a policy, or for a role whose grants cover every row and column,
the routes take the plain path of service.py. A request's checks, in this order (docs/api.md, "Policies"):

    403  the role has no rule for the route's action (read, insert, update, delete); decided before any SQL
    404  the row does not exist or is outside the read grant: one answer, so a hidden row's existence never shows,
         not even through a 403, 412 or 409 (update and delete lock the row only if it is readable)
    403  update, delete: the row as it is now is outside the action's grant
    412  If-Match names another version, judged on the locked row (its tag only if `version` is readable)
    409  the database's own unique-email error, as without a policy
    403  insert, update: the row as written is outside the action's grant (like WITH CHECK); the exception rolls
         the request's transaction back, so nothing changes and no change is streamed

Every body shows the columns the read grant gives of that row; a written row the caller cannot read back is
answered with its id alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from realtime.auth.policy import Grant, Policy, RowView, trim
from realtime.auth.tokens import Identity
from realtime.errors import Forbidden
from realtime.stream.changes import Row, TableKey
from realtime.users import repository, service
from realtime.users.schemas import User, UserCreate, UserUpdate

USERS = TableKey("public", "users")


@dataclass(frozen=True, slots=True)
class Shown:
    """A user as one caller may see it. `row` is the user's JSON as the stream has it (the form grants judge);
    `view` what the read grant shows of it."""

    user: User
    row: Row
    view: RowView

    def shows(self, column: str) -> bool:
        return self.view is True or (self.view is not False and column in self.view)

    def body(self) -> Row:
        """The JSON body: the columns shown, or only the id when the caller may not read the row at all."""
        if self.view is False:
            return {"id": self.user.id}
        return trim(self.row, self.view)


@dataclass(frozen=True, slots=True)
class Rights:
    """One caller's grants for one request: that of the route's action, and that of reading (None: no row)."""

    role: str | None
    action: str
    grant: Grant
    read: Grant | None

    @property
    def who(self) -> str:
        return _who(self.role)

    def shown(self, user: User) -> Shown:
        row = user.model_dump(mode="json")
        return Shown(user, row, self.read.view(row) if self.read is not None else False)


def rights_for(policy: Policy, identity: Identity | None, action: str) -> Rights | None:
    """The caller's rights for `action` on users; None when they restrict nothing, so the plain path serves.
    Forbidden when the role has no rule for the action at all."""
    grant = policy.grant(identity, USERS, action)
    role = identity.role if identity is not None else None
    if grant is None:
        raise Forbidden(f"{_who(role)} may not {action} users")
    read = grant if action == "read" else policy.grant(identity, USERS, "read")
    if not grant.restricts and read is not None and not read.restricts:
        return None
    return Rights(role, action, grant, read)


def _who(role: str | None) -> str:
    return f"role {role!r}" if role is not None else "a token without a role"


def _readable(user: User | None, user_id: int, rights: Rights) -> Shown:
    """The user as shown to the caller; the plain 404 when it is missing or hidden from it."""
    if user is not None:
        shown = rights.shown(user)
        if shown.view is not False:
            return shown
    raise service.not_found(user_id)


async def get(db: AsyncConnection, user_id: int, rights: Rights) -> Shown:
    return _readable(await repository.get(db, user_id), user_id, rights)


async def list_page(db: AsyncConnection, after: int, limit: int, rights: Rights) -> dict[str, Any]:
    """A page of the readable users, as UserPage's JSON with each item trimmed to its shown columns."""
    params: dict[str, Any] = {}
    condition = rights.grant.where_sql(repository.ROW_JSON, params)
    users, more = await repository.page_where(db, after, limit, condition, params)
    items = []
    for user in users:
        shown = rights.shown(user)
        # The statement kept only readable rows, by the same test in SQL. Should the two ever disagree, the row
        # is left out (a short page) rather than shown; `next_after` still follows the statement's rows.
        if shown.view is not False:
            items.append(shown.body())
    return {"items": items, "next_after": users[-1].id if more else None}


async def create(db: AsyncConnection, body: UserCreate, rights: Rights) -> Shown:
    shown = rights.shown(await service.create(db, body))
    if not rights.grant.covers(shown.row):
        raise Forbidden(f"{rights.who} may not insert this user: the new row is outside its insert rules")
    return shown


async def update(db: AsyncConnection, user_id: int, body: UserUpdate, if_match: str | None, rights: Rights) -> Shown:
    await _lock_writable(db, user_id, if_match, rights)
    # The row is locked and its version checked: the write is unconditional and finds it.
    shown = rights.shown(await service.update(db, user_id, body, None))
    if not rights.grant.covers(shown.row):
        raise Forbidden(
            f"{rights.who} may not update user {user_id} to these values: the row would be outside its update rules"
        )
    return shown


async def delete(db: AsyncConnection, user_id: int, if_match: str | None, rights: Rights) -> None:
    await _lock_writable(db, user_id, if_match, rights)
    await service.delete(db, user_id, None)


async def _lock_writable(db: AsyncConnection, user_id: int, if_match: str | None, rights: Rights) -> None:
    """Lock the row if the caller may read it (404 if not), then check the action's grant (403) and If-Match
    (412) on it. Rows hidden from the caller are never locked, so it cannot hold up writes to them."""
    current = None
    if rights.read is not None:
        params: dict[str, Any] = {}
        condition = rights.read.where_sql(repository.ROW_JSON, params)
        current = await repository.lock_where(db, user_id, condition, params)
    shown = _readable(current, user_id, rights)
    if not rights.grant.covers(shown.row):
        raise Forbidden(f"{rights.who} may not {rights.action} user {user_id}")
    versions = service.expected_versions(if_match)
    if versions is not None and shown.user.version not in versions:
        raise service.precondition_failed(shown.user, version_shown=shown.shows("version"))
