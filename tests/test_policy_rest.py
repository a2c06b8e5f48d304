"""Row-level policies on the users REST routes against a real server: a role without a rule is refused, a row it
may not read is a 404 like a missing one, lists hold only readable rows (keyset pages stay full), bodies show only
readable columns, and writes outside a rule are refused and rolled back."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from realtime.dsn import Dsn
from tests.support.server import ServerProcess, running_server
from tests.support.tables import committed_changes, head
from tests.test_auth import AUDIENCE, SECRET, bearer, make_token
from tests.test_users_api import assert_problem

CREATOR_NAME = "Made by a creator"
POLICY = f"""
[[rule]]
table = "users"
roles = ["admin"]
actions = ["read", "insert", "update", "delete"]

[[rule]]
table = "users"
roles = ["member"]
actions = ["read"]
where = [{{ column = "id", op = "eq", claim = "sub" }}]
columns = ["id", "name", "created_at", "updated_at", "version"]

[[rule]]
table = "users"
roles = ["member"]
actions = ["update"]
where = [{{ column = "id", op = "eq", claim = "sub" }}, {{ column = "name", op = "neq", value = "locked" }}]

[[rule]]
table = "users"
roles = ["creator"]
actions = ["insert"]
where = [{{ column = "name", op = "eq", value = "{CREATOR_NAME}" }}]

# A team's rows, named after the team: all of them readable, those never updated (version 1) deletable.
[[rule]]
table = "users"
roles = ["teammate"]
actions = ["read"]
where = [{{ column = "name", op = "eq", claim = "team" }}]

[[rule]]
table = "users"
roles = ["teammate"]
actions = ["delete"]
where = [{{ column = "name", op = "eq", claim = "team" }}, {{ column = "version", op = "eq", value = 1 }}]

# Orderings, on a number bound to a claim and on a string, in SQL (lists) as in Python (one row).
[[rule]]
table = "users"
roles = ["range"]
actions = ["read"]
where = [{{ column = "id", op = "gt", claim = "floor" }}, {{ column = "name", op = "lt", value = "N" }}]
"""
MEMBER_COLUMNS = {"id", "name", "created_at", "updated_at", "version"}


@pytest.fixture(scope="module")
async def guarded(
    database_url: Dsn, artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServerProcess]:
    """A server with a token key and the policy above."""
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    policy.write_text(POLICY)
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE, "AUTH_POLICY_FILE": str(policy)}
    async with running_server(database_url, artifacts_dir / "policy-rest.log", env=env) as server:
        yield server


@pytest.fixture
async def rest(guarded: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.base_url, timeout=10.0) as http:
        yield http


def as_role(role: str, sub: str = "0", **claims: Any) -> dict[str, str]:
    return bearer(make_token(sub=sub, role=role, **claims))


ADMIN = as_role("admin")


async def create(rest: httpx.AsyncClient, name: str = "Ada") -> dict[str, Any]:
    """A user made by the admin, who sees all of it."""
    response = await rest.post("/users", json={"name": name, "email": f"{uuid.uuid4().hex}@example.com"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def member_of(user: dict[str, Any]) -> dict[str, str]:
    return as_role("member", sub=str(user["id"]))


async def stored(db: asyncpg.Connection, user_id: int) -> dict[str, Any] | None:
    """The row as the stream renders it, read straight from the database."""
    text = await db.fetchval("SELECT realtime.utc_jsonb(u)::text FROM users u WHERE id = $1", user_id)
    return orjson.loads(text) if text is not None else None


def not_found(user_id: int) -> dict[str, Any]:
    return {"type": "/problems/not-found", "title": "Not found", "status": 404, "detail": f"no user with id {user_id}"}


async def test_a_member_lists_only_its_own_row_without_email(rest: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """A member's list holds its own row alone, without the email it may not read, as the stream renders it."""
    own = await create(rest)
    for _ in range(2):
        await create(rest)
    response = await rest.get("/users", params={"limit": 500}, headers=member_of(own))
    assert response.status_code == 200, response.text
    row = await stored(db, own["id"])
    assert row is not None
    del row["email"]
    assert response.json() == {"items": [row], "next_after": None}
    assert set(response.json()["items"][0]) == MEMBER_COLUMNS


async def test_a_member_gets_its_own_row_trimmed_with_its_etag(rest: httpx.AsyncClient) -> None:
    """GET of the member's own row shows every column but email, and the ETag (version is readable)."""
    own = await create(rest)
    response = await rest.get(f"/users/{own['id']}", headers=member_of(own))
    assert response.status_code == 200, response.text
    assert response.json() == {column: own[column] for column in MEMBER_COLUMNS}
    assert response.headers["etag"] == f'"{own["version"]}"'


async def test_a_row_the_token_may_not_read_is_a_404_like_a_missing_one(rest: httpx.AsyncClient) -> None:
    """GET, PATCH (even with a wrong If-Match) and DELETE of a hidden row answer exactly the missing row's 404."""
    own, other = await create(rest), await create(rest)
    gone = await create(rest)
    assert (await rest.delete(f"/users/{gone['id']}", headers=ADMIN)).status_code == 204
    teammate = as_role("teammate", team=f"team-{uuid.uuid4().hex}")
    requests = [
        ("GET", {}, None, member_of(own)),
        ("PATCH", {}, {"name": "Mallory"}, member_of(own)),
        ("PATCH", {"If-Match": '"99"'}, {"email": "mallory@example.com"}, member_of(own)),
        ("DELETE", {}, None, teammate),
        ("DELETE", {"If-Match": '"99"'}, None, teammate),
    ]
    for method, extra, body, headers in requests:
        answers = {}
        for user in (other, gone):
            response = await rest.request(method, f"/users/{user['id']}", json=body, headers={**headers, **extra})
            assert_problem(response, 404, "not-found")
            assert response.json() == not_found(user["id"]), (method, extra)
            answers[user["id"] == gone["id"]] = {
                k: v for k, v in response.headers.items() if k not in ("date", "content-length", "x-request-id")
            }
        assert answers[True] == answers[False], (method, extra)
    assert (await rest.get(f"/users/{other['id']}", headers=ADMIN)).json() == other


async def test_a_member_patches_its_own_row(rest: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """PATCH of the member's own row updates it and answers it trimmed with its new ETag; If-Match still gives 412."""
    own = await create(rest)
    headers = member_of(own)
    stale = await rest.patch(f"/users/{own['id']}", json={"name": "Ada K."}, headers={**headers, "If-Match": '"7"'})
    assert_problem(stale, 412, "precondition-failed")
    assert stale.headers["etag"] == '"1"'
    response = await rest.patch(f"/users/{own['id']}", json={"name": "Ada K."}, headers={**headers, "If-Match": '"1"'})
    assert response.status_code == 200, response.text
    assert set(response.json()) == MEMBER_COLUMNS
    assert (response.json()["name"], response.json()["version"]) == ("Ada K.", 2)
    assert response.headers["etag"] == '"2"'
    row = await stored(db, own["id"])
    assert row is not None
    assert (row["name"], row["version"]) == ("Ada K.", 2)


async def test_a_patch_moving_the_row_out_of_the_update_rule_is_refused_and_rolled_back(
    rest: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Setting name "locked" (outside the member's update rule) is 403; the row and the change log stay as they were."""
    own = await create(rest)
    before, position = await stored(db, own["id"]), await head(db)
    response = await rest.patch(f"/users/{own['id']}", json={"name": "locked"}, headers=member_of(own))
    assert_problem(response, 403, "forbidden")
    assert await stored(db, own["id"]) == before
    assert [c for c in await committed_changes(db, "users", position) if (c["row"] or {}).get("id") == own["id"]] == []


async def test_a_row_outside_the_update_rule_cannot_be_patched(rest: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """A readable row whose current values are outside the update rule (name "locked") is 403 and stays as it is."""
    own = await create(rest, name="locked")
    response = await rest.patch(f"/users/{own['id']}", json={"name": "free"}, headers=member_of(own))
    assert_problem(response, 403, "forbidden")
    assert "may not update user" in response.json()["detail"]
    row = await stored(db, own["id"])
    assert row is not None
    assert (row["name"], row["version"]) == ("locked", 1)


async def test_a_member_may_not_delete_or_insert(rest: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """A member has no delete or insert rule: both are 403 naming the role and the action, and nothing changes."""
    own = await create(rest)
    response = await rest.delete(f"/users/{own['id']}", headers=member_of(own))
    assert_problem(response, 403, "forbidden")
    assert response.json()["detail"] == "role 'member' may not delete users"
    assert await stored(db, own["id"]) is not None
    address = f"{uuid.uuid4().hex}@example.com"
    response = await rest.post("/users", json={"name": "Eve", "email": address}, headers=member_of(own))
    assert_problem(response, 403, "forbidden")
    assert await db.fetchval("SELECT count(*) FROM users WHERE email = $1", address) == 0


async def test_a_role_without_any_rule_is_forbidden_on_every_route(
    rest: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A role the policy does not name gets 403 on every users route, whether or not the row exists."""
    user = await create(rest)
    headers = as_role("guest", sub=str(user["id"]))
    address = f"{uuid.uuid4().hex}@example.com"
    requests = [
        ("GET", "/users", None, "read"),
        ("GET", f"/users/{user['id']}", None, "read"),
        ("GET", "/users/9223372036854775807", None, "read"),
        ("POST", "/users", {"name": "Eve", "email": address}, "insert"),
        ("PATCH", f"/users/{user['id']}", {"name": "Eve"}, "update"),
        ("DELETE", f"/users/{user['id']}", None, "delete"),
    ]
    for method, path, body, action in requests:
        response = await rest.request(method, path, json=body, headers=headers)
        assert_problem(response, 403, "forbidden")
        assert response.json()["detail"] == f"role 'guest' may not {action} users"
    assert await stored(db, user["id"]) == {**user}
    assert await db.fetchval("SELECT count(*) FROM users WHERE email = $1", address) == 0


async def test_an_insert_outside_the_insert_rule_is_refused_and_nothing_is_inserted(
    rest: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A creator's insert must satisfy its rule (WITH CHECK): 403 and no row; within it, 201 with the id alone."""
    creator = as_role("creator")
    refused = f"{uuid.uuid4().hex}@example.com"
    response = await rest.post("/users", json={"name": "Someone else", "email": refused}, headers=creator)
    assert_problem(response, 403, "forbidden")
    assert await db.fetchval("SELECT count(*) FROM users WHERE email = $1", refused) == 0

    accepted = f"{uuid.uuid4().hex}@example.com"
    response = await rest.post("/users", json={"name": CREATOR_NAME, "email": accepted}, headers=creator)
    assert response.status_code == 201, response.text
    user_id = await db.fetchval("SELECT id FROM users WHERE email = $1", accepted)
    # The creator may not read users: the new row is answered with its key alone, and no ETag.
    assert response.json() == {"id": user_id}
    assert response.headers["location"] == f"/users/{user_id}"
    assert "etag" not in response.headers


async def test_a_list_under_a_rule_pages_by_keyset_without_short_pages(rest: httpx.AsyncClient) -> None:
    """Rows of a team interleaved with others come in full pages of `limit`, each once, until next_after is null."""
    team = f"team-{uuid.uuid4().hex}"
    mine = []
    for _ in range(5):
        mine.append((await create(rest, name=team))["id"])
        await create(rest, name="someone else")
    headers = as_role("teammate", team=team)
    seen: list[int] = []
    after: int | None = mine[0] - 1
    sizes = []
    while after is not None:
        page = await rest.get("/users", params={"limit": 2, "after": after}, headers=headers)
        assert page.status_code == 200, page.text
        sizes.append(len(page.json()["items"]))
        seen += [item["id"] for item in page.json()["items"]]
        after = page.json()["next_after"]
    assert seen == mine
    assert sizes == [2, 2, 1]


async def test_delete_under_a_rule(rest: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """A readable row outside the delete rule is 403 and stays; If-Match is checked (412); one inside goes (204)."""
    team = f"team-{uuid.uuid4().hex}"
    headers = as_role("teammate", team=team)
    updated, fresh = await create(rest, name=team), await create(rest, name=team)
    assert (
        await rest.patch(f"/users/{updated['id']}", json={"email": f"{uuid.uuid4().hex}@example.com"}, headers=ADMIN)
    ).is_success
    response = await rest.delete(f"/users/{updated['id']}", headers=headers)
    assert_problem(response, 403, "forbidden")
    assert await stored(db, updated["id"]) is not None
    stale = await rest.delete(f"/users/{fresh['id']}", headers={**headers, "If-Match": '"5"'})
    assert_problem(stale, 412, "precondition-failed")
    assert stale.headers["etag"] == '"1"'
    assert (await rest.delete(f"/users/{fresh['id']}", headers={**headers, "If-Match": '"1"'})).status_code == 204
    assert await stored(db, fresh["id"]) is None


async def test_a_conflict_is_still_a_409_for_a_permitted_write(rest: httpx.AsyncClient) -> None:
    """A member changing its own email to a taken one gets the usual 409."""
    own, other = await create(rest), await create(rest)
    response = await rest.patch(f"/users/{own['id']}", json={"email": other["email"]}, headers=member_of(own))
    assert_problem(response, 409, "conflict")


async def test_the_admin_sees_and_does_everything(rest: httpx.AsyncClient) -> None:
    """A role whose rules cover every row and column reads every user in full, with ETags, and writes freely."""
    first, second = await create(rest), await create(rest)
    page = await rest.get("/users", params={"after": first["id"] - 1, "limit": 2}, headers=ADMIN)
    assert page.json()["items"] == [first, second]
    one = await rest.get(f"/users/{second['id']}", headers=ADMIN)
    assert (one.json(), one.headers["etag"]) == (second, '"1"')
    patched = await rest.patch(f"/users/{second['id']}", json={"name": "locked"}, headers=ADMIN)
    assert patched.json()["name"] == "locked"
    assert (await rest.delete(f"/users/{second['id']}", headers=ADMIN)).status_code == 204


async def test_ordering_rules_select_the_same_rows_in_lists_and_gets(rest: httpx.AsyncClient) -> None:
    """`gt` on a claim-bound number and `lt` on a string pick the same rows in a list (SQL) and a GET (Python)."""
    floor = (await create(rest))["id"]
    users = {name: (await create(rest, name=name))["id"] for name in ("Alice", "Zed", "Mia", "Nora", "N", "MZ")}
    headers = as_role("range", floor=floor)
    page = await rest.get("/users", params={"after": floor - 1, "limit": 500}, headers=headers)
    assert [item["id"] for item in page.json()["items"]] == [users["Alice"], users["Mia"], users["MZ"]]
    for name, user_id in users.items():
        response = await rest.get(f"/users/{user_id}", headers=headers)
        assert response.status_code == (200 if name < "N" else 404), name
    assert (await rest.get(f"/users/{floor}", headers=headers)).status_code == 404
