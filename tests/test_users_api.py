"""The users REST API over real HTTP against the real server process and a real PostgreSQL.

The run shares one database, so every test makes its own rows (unique emails) and never assumes the table is empty:
pages are read from `after` = an id just below the test's own rows, which works because tests run one at a time
and ids only grow.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from realtime.db import POOL_APPLICATION_NAME
from realtime.dsn import Dsn
from realtime.errors import _TITLES

PROBLEM_JSON = "application/problem+json"
MAX_ID = 2**63 - 1
API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex}@example.com"


async def create(http: httpx.AsyncClient, name: str = "Ada Lovelace", address: str | None = None) -> dict[str, Any]:
    response = await http.post("/users", json={"name": name, "email": address or email()})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_problem(response: httpx.Response, status: int, slug: str, fields: set[str] | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem of this status and type; `fields` are the invalid inputs it names."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    problem: dict[str, Any] = response.json()
    assert problem["type"] == f"/problems/{slug}"
    assert problem["status"] == status
    assert isinstance(problem["title"], str)
    assert problem["title"]
    assert isinstance(problem["detail"], str)
    assert problem["detail"]
    if fields is not None:
        assert {error["field"] for error in problem["errors"]} == fields, problem
        for error in problem["errors"]:
            assert error["location"]
            assert error["message"]
    return problem


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an observable condition (here: lock waits in pg_stat_activity) until it holds, failing after `timeout`."""
    async with asyncio.timeout(timeout):
        # PostgreSQL announces nothing when a backend starts waiting for a lock, so there is no event to await.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def blocked_requests(db: asyncpg.Connection, count: int) -> Callable[[], Awaitable[bool]]:
    """True once `count` of the server's pool connections are waiting for a lock in this database.

    `db` must not be inside a transaction: statistics views are frozen for the rest of a transaction.
    """

    async def check() -> bool:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1 AND wait_event_type = 'Lock'",
            POOL_APPLICATION_NAME,
        )
        return bool(waiting == count)

    return check


@pytest.fixture
async def holder(database_url: Dsn) -> AsyncIterator[asyncpg.Connection]:
    """A second connection that holds locks while `db` (outside any transaction) watches who waits for them."""
    conn = await asyncpg.connect(database_url.asyncpg())
    try:
        yield conn
    finally:
        await conn.close()


# --- POST /users -------------------------------------------------------------------------------------------------


async def test_create_returns_201_with_location_etag_and_the_row(http: httpx.AsyncClient) -> None:
    """POST /users answers 201 with Location, ETag "1" and the stored user."""
    address = email("create")
    response = await http.post("/users", json={"name": "Ada", "email": address})
    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    user = response.json()
    assert set(user) == {"id", "name", "email", "created_at", "updated_at", "version"}
    assert (user["name"], user["email"], user["version"]) == ("Ada", address, 1)
    assert user["created_at"] == user["updated_at"]
    assert response.headers["location"] == f"/users/{user['id']}"
    assert response.headers["etag"] == '"1"'
    fetched = await http.get(response.headers["location"])
    assert fetched.json() == user


async def test_create_lowercases_the_email_domain_only(http: httpx.AsyncClient) -> None:
    """The email is stored normalised: the domain lower-cased, the local part exactly as given."""
    local = f"Mixed.Case-{uuid.uuid4().hex}"
    response = await http.post("/users", json={"name": "Ada", "email": f"{local}@Example.COM"})
    assert response.status_code == 201
    assert response.json()["email"] == f"{local}@example.com"


async def test_create_accepts_a_200_character_name(http: httpx.AsyncClient) -> None:
    """A name of exactly 200 characters (the maximum) is accepted and stored whole."""
    user = await create(http, name="n" * 200)
    assert user["name"] == "n" * 200


async def test_create_duplicate_email_is_409(http: httpx.AsyncClient) -> None:
    """A second user with the same email gets 409 conflict."""
    address = email("dup")
    await create(http, address=address)
    response = await http.post("/users", json={"name": "Other", "email": address})
    assert_problem(response, 409, "conflict")


async def test_create_duplicate_email_in_other_case_is_409(http: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """Emails are unique case-insensitively: the same address in upper case gets 409 and no second row."""
    address = email("case")
    await create(http, address=address)
    response = await http.post("/users", json={"name": "Other", "email": address.upper()})
    assert_problem(response, 409, "conflict")
    assert await db.fetchval("SELECT count(*) FROM users WHERE lower(email) = lower($1)", address) == 1


async def test_racing_creates_with_one_email_give_one_201_and_one_409(
    http: httpx.AsyncClient, db: asyncpg.Connection, holder: asyncpg.Connection
) -> None:
    """Two POSTs of one email, both past any check when the row appears, get one 201 and one 409 from the index."""
    address = email("race")
    transaction = holder.transaction()
    await transaction.start()
    # An uncommitted row with this email makes both inserts wait on the unique index until it rolls back.
    await holder.execute("INSERT INTO users (name, email) VALUES ('holder', $1)", address)
    racing = asyncio.gather(
        http.post("/users", json={"name": "First", "email": address}),
        http.post("/users", json={"name": "Second", "email": address.upper()}),
    )
    try:
        await wait_until(blocked_requests(db, 2))
    finally:
        await transaction.rollback()
    responses = await racing
    assert sorted(r.status_code for r in responses) == [201, 409]
    assert_problem(next(r for r in responses if r.status_code == 409), 409, "conflict")
    assert await db.fetchval("SELECT count(*) FROM users WHERE lower(email) = lower($1)", address) == 1


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        pytest.param({}, {"name", "email"}, id="missing-fields"),
        pytest.param({"email": "ok@example.com"}, {"name"}, id="missing-name"),
        pytest.param({"name": "", "email": "ok@example.com"}, {"name"}, id="empty-name"),
        pytest.param({"name": "   ", "email": "ok@example.com"}, {"name"}, id="blank-name"),
        pytest.param({"name": "n" * 201, "email": "ok@example.com"}, {"name"}, id="name-201-chars"),
        pytest.param({"name": "a\u0000b", "email": "ok@example.com"}, {"name"}, id="nul-in-name"),
        pytest.param({"name": "Ada", "email": "not-an-email"}, {"email"}, id="invalid-email"),
        pytest.param({"name": "Ada", "email": "ada@localhost"}, {"email"}, id="email-without-dot-domain"),
        pytest.param({"name": "Ada", "email": "ok@example.com", "admin": True}, {"admin"}, id="extra-field"),
        pytest.param({"name": None, "email": None}, {"name", "email"}, id="null-values"),
        pytest.param({"name": 5, "email": ["ok@example.com"]}, {"name", "email"}, id="wrong-types"),
        pytest.param([{"name": "Ada", "email": "ok@example.com"}], {"body"}, id="array-body"),
        pytest.param("Ada", {"body"}, id="string-body"),
    ],
)
async def test_create_invalid_body_is_422_naming_the_fields(
    http: httpx.AsyncClient, body: object, fields: set[str]
) -> None:
    """An invalid POST body gets a 422 validation-error problem whose `errors` name the offending fields."""
    assert_problem(await http.post("/users", json=body), 422, "validation-error", fields)


async def test_create_non_json_body_is_422(http: httpx.AsyncClient) -> None:
    """A body that is not JSON gets 422 with the error on `body`."""
    response = await http.post("/users", content=b"{name: Ada", headers={"Content-Type": "application/json"})
    problem = assert_problem(response, 422, "validation-error", {"body"})
    assert problem["errors"][0]["location"] == "body"


async def test_create_without_body_is_422(http: httpx.AsyncClient) -> None:
    """A POST with no body at all gets 422."""
    assert_problem(await http.post("/users"), 422, "validation-error", {"body"})


async def test_create_with_body_that_is_not_utf8_is_400(http: httpx.AsyncClient) -> None:
    """A body that cannot even be decoded (not UTF-8) gets a 400 bad-request problem."""
    response = await http.post("/users", content=b'{"name": "\xff"}', headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "bad-request")


# --- GET /users (keyset pagination) ------------------------------------------------------------------------------


async def test_list_after_the_newest_id_is_an_empty_last_page(http: httpx.AsyncClient) -> None:
    """A page after the newest row is empty and has next_after null."""
    newest = await create(http)
    response = await http.get("/users", params={"after": newest["id"]})
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_after": None}


async def test_list_after_the_largest_id_is_empty(http: httpx.AsyncClient) -> None:
    """`after` = 2**63-1 (past every possible id) is valid and gives an empty page."""
    response = await http.get("/users", params={"after": MAX_ID})
    assert response.json() == {"items": [], "next_after": None}


async def test_list_limit_equal_to_remaining_rows_ends_with_null(http: httpx.AsyncClient) -> None:
    """When the page size equals the rows left, the page holds them all and next_after is null."""
    users = [await create(http) for _ in range(3)]
    response = await http.get("/users", params={"after": users[0]["id"] - 1, "limit": 3})
    assert response.json() == {"items": users, "next_after": None}


async def test_list_partial_page_points_at_its_last_id(http: httpx.AsyncClient) -> None:
    """A full page with rows left after it has next_after = its last id, and that continues where it stopped."""
    users = [await create(http) for _ in range(3)]
    first = (await http.get("/users", params={"after": users[0]["id"] - 1, "limit": 2})).json()
    assert first == {"items": users[:2], "next_after": users[1]["id"]}
    second = (await http.get("/users", params={"after": first["next_after"], "limit": 2})).json()
    assert second == {"items": users[2:], "next_after": None}


async def test_list_with_limit_1_walks_one_row_at_a_time(http: httpx.AsyncClient) -> None:
    """With limit=1 each page holds the next row and points at it until the last page."""
    users = [await create(http) for _ in range(3)]
    after, seen = users[0]["id"] - 1, []
    while after is not None:
        page = (await http.get("/users", params={"after": after, "limit": 1})).json()
        assert len(page["items"]) == 1
        seen.append(page["items"][0])
        after = page["next_after"]
    assert seen == users


async def test_walking_every_page_returns_every_row_once_in_id_order(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Following next_after from the start returns exactly the table's ids, each once, ascending."""
    for _ in range(5):
        await create(http)
    ids: list[int] = []
    after: int | None = 0
    while after is not None:
        response = await http.get("/users", params={"after": after, "limit": 7})
        assert response.status_code == 200
        page = response.json()
        assert len(page["items"]) <= 7
        ids.extend(item["id"] for item in page["items"])
        after = page["next_after"]
    assert ids == [row["id"] for row in await db.fetch("SELECT id FROM users ORDER BY id")]


async def test_list_defaults_to_50_from_the_start(http: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """Without parameters the list starts at the lowest id and holds at most 50 users."""
    for _ in range(3):
        await create(http)
    page = (await http.get("/users")).json()
    expected = [row["id"] for row in await db.fetch("SELECT id FROM users ORDER BY id LIMIT 50")]
    assert [item["id"] for item in page["items"]] == expected


async def test_list_accepts_limit_500(http: httpx.AsyncClient) -> None:
    """limit=500, the maximum page size, is accepted."""
    response = await http.get("/users", params={"limit": 500})
    assert response.status_code == 200
    assert len(response.json()["items"]) <= 500


@pytest.mark.parametrize(
    ("params", "field"),
    [
        pytest.param({"limit": 0}, "limit", id="limit-0"),
        pytest.param({"limit": 501}, "limit", id="limit-501"),
        pytest.param({"limit": "ten"}, "limit", id="limit-not-integer"),
        pytest.param({"after": -1}, "after", id="after-negative"),
        pytest.param({"after": 2**63}, "after", id="after-2**63"),
        pytest.param({"after": "x"}, "after", id="after-not-integer"),
    ],
)
async def test_list_invalid_parameters_are_422(
    http: httpx.AsyncClient, params: dict[str, str | int], field: str
) -> None:
    """Out-of-range or non-integer limit/after gets 422 naming the parameter."""
    problem = assert_problem(await http.get("/users", params=params), 422, "validation-error", {field})
    assert problem["errors"][0]["location"] == "query"


# --- GET /users/{id} ---------------------------------------------------------------------------------------------


async def test_get_returns_the_user_with_its_etag(http: httpx.AsyncClient) -> None:
    """GET /users/{id} answers 200 with the user and ETag = its quoted version."""
    user = await create(http)
    response = await http.get(f"/users/{user['id']}")
    assert response.status_code == 200
    assert response.json() == user
    assert response.headers["etag"] == '"1"'


async def test_get_missing_user_is_404(http: httpx.AsyncClient) -> None:
    """An id no user has gets a 404 not-found problem."""
    assert_problem(await http.get(f"/users/{MAX_ID}"), 404, "not-found")


@pytest.mark.parametrize("bad_id", ["abc", "1.5", "0", "-1", str(2**63)])
async def test_get_with_invalid_id_is_422(http: httpx.AsyncClient, bad_id: str) -> None:
    """A non-integer id or one outside 1..2**63-1 gets 422 naming `user_id` in the path."""
    problem = assert_problem(await http.get(f"/users/{bad_id}"), 422, "validation-error", {"user_id"})
    assert problem["errors"][0]["location"] == "path"


# --- PATCH /users/{id} -------------------------------------------------------------------------------------------


async def test_patch_changes_only_given_fields_and_bumps_version(http: httpx.AsyncClient) -> None:
    """PATCH with only `name` changes the name, keeps the email, bumps version and updated_at, keeps created_at."""
    user = await create(http)
    response = await http.patch(f"/users/{user['id']}", json={"name": "Grace"})
    assert response.status_code == 200
    updated = response.json()
    assert (updated["name"], updated["email"], updated["version"]) == ("Grace", user["email"], 2)
    assert updated["created_at"] == user["created_at"]
    assert datetime.fromisoformat(updated["updated_at"]) > datetime.fromisoformat(user["updated_at"])
    assert response.headers["etag"] == '"2"'
    assert (await http.get(f"/users/{user['id']}")).json() == updated


async def test_patch_can_change_the_email(http: httpx.AsyncClient) -> None:
    """PATCH with only `email` changes the email and keeps the name."""
    user = await create(http, name="Keep")
    address = email("moved")
    updated = (await http.patch(f"/users/{user['id']}", json={"email": address})).json()
    assert (updated["name"], updated["email"], updated["version"]) == ("Keep", address, 2)


async def test_patch_own_email_in_other_case_is_allowed(http: httpx.AsyncClient) -> None:
    """Changing only the case of one's own email is not a conflict with oneself."""
    user = await create(http)
    local, domain = user["email"].split("@")
    response = await http.patch(f"/users/{user['id']}", json={"email": f"{local.upper()}@{domain}"})
    assert response.status_code == 200
    assert response.json()["email"] == f"{local.upper()}@{domain}"


async def test_patch_missing_user_is_404(http: httpx.AsyncClient) -> None:
    """PATCH of an id no user has gets 404."""
    assert_problem(await http.patch(f"/users/{MAX_ID}", json={"name": "x"}), 404, "not-found")


async def test_patch_to_another_users_email_is_409(http: httpx.AsyncClient) -> None:
    """PATCH to an email another user has (in any case) gets 409 and changes nothing."""
    taken = await create(http)
    user = await create(http)
    response = await http.patch(f"/users/{user['id']}", json={"email": taken["email"].upper()})
    assert_problem(response, 409, "conflict")
    assert (await http.get(f"/users/{user['id']}")).json() == user


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        pytest.param({}, {"body"}, id="empty-object"),
        pytest.param({"name": None}, {"name"}, id="null-name"),
        pytest.param({"email": None}, {"email"}, id="null-email"),
        pytest.param({"name": ""}, {"name"}, id="empty-name"),
        pytest.param({"name": "n" * 201}, {"name"}, id="name-201-chars"),
        pytest.param({"email": "nope"}, {"email"}, id="invalid-email"),
        pytest.param({"version": 9}, {"version"}, id="read-only-field"),
        pytest.param({"name": ["Ada"]}, {"name"}, id="wrong-type"),
        pytest.param(None, {"body"}, id="json-null"),
    ],
)
async def test_patch_invalid_body_is_422(http: httpx.AsyncClient, body: object, fields: set[str]) -> None:
    """An invalid PATCH body gets 422 naming the fields, and the user is unchanged."""
    user = await create(http)
    assert_problem(await http.patch(f"/users/{user['id']}", json=body), 422, "validation-error", fields)
    assert (await http.get(f"/users/{user['id']}")).json() == user


async def test_patch_without_body_is_422(http: httpx.AsyncClient) -> None:
    """A PATCH with no body at all gets 422."""
    user = await create(http)
    assert_problem(await http.patch(f"/users/{user['id']}"), 422, "validation-error", {"body"})


async def test_patch_with_matching_if_match_is_200(http: httpx.AsyncClient) -> None:
    """If-Match equal to the current ETag lets the update through."""
    user = await create(http)
    response = await http.patch(f"/users/{user['id']}", json={"name": "B"}, headers={"If-Match": '"1"'})
    assert response.status_code == 200
    assert response.headers["etag"] == '"2"'


async def test_patch_with_if_match_list_containing_current_is_200(http: httpx.AsyncClient) -> None:
    """If-Match listing several tags succeeds when one of them is current."""
    user = await create(http)
    response = await http.patch(f"/users/{user['id']}", json={"name": "B"}, headers={"If-Match": '"7", "1"'})
    assert response.status_code == 200


async def test_patch_with_stale_if_match_is_412_with_current_etag(http: httpx.AsyncClient) -> None:
    """A stale If-Match gets 412 carrying the current ETag, and the user is unchanged."""
    user = await create(http)
    await http.patch(f"/users/{user['id']}", json={"name": "B"})
    response = await http.patch(f"/users/{user['id']}", json={"name": "C"}, headers={"If-Match": '"1"'})
    assert_problem(response, 412, "precondition-failed")
    assert response.headers["etag"] == '"2"'
    assert (await http.get(f"/users/{user['id']}")).json()["name"] == "B"


@pytest.mark.parametrize("tag", ['W/"1"', "1", '"one"', '""', '"01"', '"\u00b2"', '"2147483648"', '"1'])
async def test_patch_with_weak_or_malformed_if_match_is_412(http: httpx.AsyncClient, tag: str) -> None:
    """If-Match compares strongly: a weak tag or anything that is not exactly one of our tags is a 412."""
    user = await create(http)
    # Sent as Latin-1 bytes: httpx would refuse "²" in a str header.
    response = await http.patch(
        f"/users/{user['id']}", json={"name": "B"}, headers={b"If-Match": tag.encode("latin-1")}
    )
    assert_problem(response, 412, "precondition-failed")


async def test_patch_with_if_match_star_is_200(http: httpx.AsyncClient) -> None:
    """If-Match: * updates any existing user whatever its version."""
    user = await create(http)
    await http.patch(f"/users/{user['id']}", json={"name": "B"})
    response = await http.patch(f"/users/{user['id']}", json={"name": "C"}, headers={"If-Match": "*"})
    assert response.status_code == 200
    assert response.json()["version"] == 3


async def test_patch_missing_user_with_if_match_is_404(http: httpx.AsyncClient) -> None:
    """A conditional PATCH of a missing user is 404, not 412: there is nothing to be stale."""
    response = await http.patch(f"/users/{MAX_ID}", json={"name": "x"}, headers={"If-Match": '"1"'})
    assert_problem(response, 404, "not-found")


async def test_racing_patches_with_same_if_match_give_one_200_and_one_412(
    http: httpx.AsyncClient, db: asyncpg.Connection, holder: asyncpg.Connection
) -> None:
    """Two PATCHes with the same If-Match, both in flight at once, produce exactly one 200 and one 412."""
    user = await create(http)
    url, headers = f"/users/{user['id']}", {"If-Match": '"1"'}
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user["id"])
    racing = asyncio.gather(
        http.patch(url, json={"name": "First"}, headers=headers),
        http.patch(url, json={"name": "Second"}, headers=headers),
    )
    try:
        await wait_until(blocked_requests(db, 2))
    finally:
        await transaction.rollback()
    responses = await racing
    assert sorted(r.status_code for r in responses) == [200, 412]
    winner = next(r for r in responses if r.status_code == 200)
    loser = next(r for r in responses if r.status_code == 412)
    assert winner.json()["version"] == 2
    assert loser.headers["etag"] == '"2"'
    assert await db.fetchval("SELECT version FROM users WHERE id = $1", user["id"]) == 2


async def test_racing_unconditional_patches_both_apply(
    http: httpx.AsyncClient, db: asyncpg.Connection, holder: asyncpg.Connection
) -> None:
    """Two PATCHes without If-Match, both in flight at once, both succeed and the version rises by two."""
    user = await create(http)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user["id"])
    racing = asyncio.gather(
        http.patch(f"/users/{user['id']}", json={"name": "First"}),
        http.patch(f"/users/{user['id']}", json={"name": "Second"}),
    )
    try:
        await wait_until(blocked_requests(db, 2))
    finally:
        await transaction.rollback()
    responses = await racing
    assert sorted(r.json()["version"] for r in responses) == [2, 3]
    assert await db.fetchval("SELECT version FROM users WHERE id = $1", user["id"]) == 3


# --- DELETE /users/{id} ------------------------------------------------------------------------------------------


async def test_delete_is_204_and_the_user_is_gone(http: httpx.AsyncClient) -> None:
    """DELETE answers 204 with no body (nor content type); afterwards GET and a second DELETE are 404."""
    user = await create(http)
    response = await http.delete(f"/users/{user['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert "content-type" not in response.headers
    assert_problem(await http.get(f"/users/{user['id']}"), 404, "not-found")
    assert_problem(await http.delete(f"/users/{user['id']}"), 404, "not-found")


async def test_delete_missing_user_is_404(http: httpx.AsyncClient) -> None:
    """DELETE of an id no user has gets 404."""
    assert_problem(await http.delete(f"/users/{MAX_ID}"), 404, "not-found")


async def test_delete_with_invalid_id_is_422(http: httpx.AsyncClient) -> None:
    """DELETE with a non-integer id gets 422."""
    assert_problem(await http.delete("/users/abc"), 422, "validation-error", {"user_id"})


async def test_delete_with_stale_if_match_is_412_and_keeps_the_user(http: httpx.AsyncClient) -> None:
    """A stale If-Match on DELETE gets 412 with the current ETag and the user stays."""
    user = await create(http)
    await http.patch(f"/users/{user['id']}", json={"name": "B"})
    response = await http.delete(f"/users/{user['id']}", headers={"If-Match": '"1"'})
    assert_problem(response, 412, "precondition-failed")
    assert response.headers["etag"] == '"2"'
    assert (await http.get(f"/users/{user['id']}")).status_code == 200


async def test_delete_with_matching_if_match_is_204(http: httpx.AsyncClient) -> None:
    """DELETE with the current ETag in If-Match deletes the user."""
    user = await create(http)
    response = await http.delete(f"/users/{user['id']}", headers={"If-Match": '"1"'})
    assert response.status_code == 204
    assert (await http.get(f"/users/{user['id']}")).status_code == 404


# --- the database maintains version and updated_at ---------------------------------------------------------------


async def test_plain_sql_update_bumps_version_and_updated_at(http: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """An UPDATE from outside the API bumps version and updated_at, so the API's ETag and If-Match see it."""
    user = await create(http)
    await db.execute("UPDATE users SET name = 'from psql' WHERE id = $1", user["id"])
    response = await http.get(f"/users/{user['id']}")
    assert response.headers["etag"] == '"2"'
    current = response.json()
    assert (current["name"], current["version"]) == ("from psql", 2)
    assert datetime.fromisoformat(current["updated_at"]) > datetime.fromisoformat(user["updated_at"])
    stale = await http.patch(f"/users/{user['id']}", json={"name": "x"}, headers={"If-Match": '"1"'})
    assert_problem(stale, 412, "precondition-failed")


async def test_sql_cannot_set_version_or_created_at(http: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """The trigger overrides explicit version/created_at in an UPDATE: version is old+1, created_at unchanged."""
    user = await create(http)
    await db.execute(
        "UPDATE users SET version = 100, created_at = '2000-01-01' WHERE id = $1",
        user["id"],
    )
    current = (await http.get(f"/users/{user['id']}")).json()
    assert current["version"] == 2
    assert current["created_at"] == user["created_at"]


# --- probes, documentation and routing errors --------------------------------------------------------------------


async def test_healthz_is_ok(http: httpx.AsyncClient) -> None:
    """/healthz answers 200 {"status": "ok"}."""
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_reports_ready_with_database_ok(http: httpx.AsyncClient) -> None:
    """/readyz answers 200 JSON with status "ready" and database "ok"."""
    response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["status"], body["database"]) == ("ready", "ok")


async def test_openapi_describes_the_users_routes(http: httpx.AsyncClient) -> None:
    """/openapi.json is served and documents every users operation with its problem responses."""
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths["/users"]) == {"get", "post"}
    assert set(paths["/users/{user_id}"]) == {"get", "patch", "delete"}
    assert PROBLEM_JSON in paths["/users/{user_id}"]["patch"]["responses"]["412"]["content"]


async def test_docs_page_is_served(http: httpx.AsyncClient) -> None:
    """/docs serves the interactive API documentation as HTML."""
    response = await http.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


async def test_unknown_path_is_404_problem(http: httpx.AsyncClient) -> None:
    """A path no route serves gets a 404 problem+json."""
    assert_problem(await http.get(f"/no-such-thing/{uuid.uuid4().hex}"), 404, "not-found")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/users/1", "DELETE, GET, PATCH"),
        ("POST", "/users/1", "DELETE, GET, PATCH"),
        ("HEAD", "/users/1", "DELETE, GET, PATCH"),
        ("DELETE", "/users", "GET, POST"),
        ("OPTIONS", "/users", "GET, POST"),
        ("POST", "/healthz", "GET"),
        ("POST", "/index.html", "GET, HEAD"),
        ("DELETE", "/", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_problem_with_allow(
    http: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    """A method the path does not support gets 405 problem+json whose Allow lists exactly the supported ones."""
    response = await http.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    if method != "HEAD":  # a HEAD answer has no body
        assert_problem(response, 405, "method-not-allowed")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_any_method_on_a_path_that_does_not_exist_is_404(http: httpx.AsyncClient, method: str) -> None:
    """The demo page is mounted at `/`; a path that is neither a route nor one of its files is 404 whatever the
    method, not 405 as if it existed for GET."""
    assert_problem(await http.request(method, "/no-such-path"), 404, "not-found")


async def test_api_doc_covers_every_operation_and_problem_type(http: httpx.AsyncClient) -> None:
    """docs/api.md names every operation of /openapi.json and the problem type of every status they declare."""
    api_doc = await asyncio.to_thread(API_DOC.read_text)
    paths = (await http.get("/openapi.json")).json()["paths"]
    missing = []
    statuses = {404, 405, 500}  # answered by routing and the catch-all handler, not declared per operation
    for path, operations in paths.items():
        for method, operation in operations.items():
            if f"{method.upper()} {path.replace('{user_id}', '{id}')}" not in api_doc:
                missing.append(f"{method.upper()} {path}")
            if "stream" in operation.get("tags", []):
                continue  # a refused stream's problem type follows its error code, not its status (docs/sse.md)
            statuses |= {int(code) for code in operation["responses"] if int(code) >= 400}
    missing += [
        f"/problems/{_TITLES[code][0]}" for code in statuses if f"`/problems/{_TITLES[code][0]}`" not in api_doc
    ]
    assert missing == []
