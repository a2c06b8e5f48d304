"""HTTP routes of the users resource; thin: parsing, status codes and headers only."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Path, Query, Request, Response, status

from realtime.auth.policy import Policy
from realtime.db import ReadConnectionDep, TransactionDep
from realtime.errors import PROBLEM_JSON, RETRY_AFTER_S, Problem
from realtime.users import access, service
from realtime.users.schemas import MAX_ID, User, UserCreate, UserPage, UserUpdate

# `model` registers the Problem schema (FastAPI files it under application/json); the body is actually
# served as application/problem+json, so that media type gets the schema too.
_PROBLEM_CONTENT = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
_AUTH: dict[int | str, dict[str, Any]] = {
    401: {
        "model": Problem,
        "content": _PROBLEM_CONTENT,
        "description": "No bearer token, or an invalid one (when the server has a token key configured).",
        "headers": {
            "WWW-Authenticate": {
                "description": '`Bearer error="invalid_token", error_description="..."`',
                "schema": {"type": "string"},
            }
        },
    },
    403: {
        "model": Problem,
        "content": _PROBLEM_CONTENT,
        "description": "Under a row-level policy (AUTH_POLICY_FILE): the token's role may not do this at all, "
        "may not do it to this user, or may not write the user with these values.",
    },
}

# Every route of the resource is behind the bearer token when the server has a token key: the app includes the
# router with `authenticate` as a dependency then (realtime/app.py), decided once, not route by route.
router = APIRouter(prefix="/users", tags=["users"], responses=_AUTH)

UserId = Annotated[int, Path(ge=1, le=MAX_ID, description="The user's id.")]
IfMatch = Annotated[
    str | None,
    Header(description='Only act if the user\'s current ETag is listed (e.g. `"3"`); otherwise 412.'),
]


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The problem responses of a route, plus 503: every route needs the database (see errors._on_database)."""
    content = _PROBLEM_CONTENT
    responses: dict[int | str, dict[str, Any]] = {code: {"model": Problem, "content": content} for code in codes}
    responses[503] = {"model": Problem, "content": content, "headers": _RETRY_AFTER}
    return responses


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 1, "example": RETRY_AFTER_S},
    }
}


def _user_response(user: User, status_code: int = status.HTTP_200_OK) -> Response:
    """A user as JSON with its ETag, rendered here once: the routes declare `response_model=User` for the
    OpenAPI schema, and returning a Response skips FastAPI re-validating a model that was just built."""
    headers = {"ETag": service.etag(user)}
    if status_code == status.HTTP_201_CREATED:
        headers["Location"] = f"/users/{user.id}"
    return Response(user.model_dump_json(), status_code, headers, media_type="application/json")


def _rights(request: Request, action: str) -> access.Rights | None:
    """What the row-level policy lets the caller do; None without a policy (and so in open mode) or when it
    restricts nothing, and the route then takes its plain path.

    The lifespan state is read from the scope (ASGI's `state` key, which `request.state` wraps): through
    `request.state` each attribute costs a failed normal lookup first, about 1.2 µs, against 0.1 µs here, and
    this runs on every request of the benchmarked routes.
    """
    policy: Policy | None = request.scope["state"]["stream"].policy
    if policy is None:
        return None
    return access.rights_for(policy, request.state.identity, action)


def _shown_response(shown: access.Shown, status_code: int = status.HTTP_200_OK) -> Response:
    """A user as the policy shows it to the caller: the plain response when every column is shown, else the
    trimmed JSON (the fields of User it may not read are absent), with the ETag only if `version` is shown."""
    if shown.view is True:
        return _user_response(shown.user, status_code)
    headers = {"ETag": service.etag(shown.user)} if shown.shows("version") else {}
    if status_code == status.HTTP_201_CREATED:
        headers["Location"] = f"/users/{shown.user.id}"
    return Response(orjson.dumps(shown.body()), status_code, headers, media_type="application/json")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=User,
    responses=_problems(400, 409, 422),
    summary="Create a user",
)
async def create_user(request: Request, body: UserCreate, db: TransactionDep) -> Response:
    rights = _rights(request, "insert")
    if rights is None:
        return _user_response(await service.create(db, body), status.HTTP_201_CREATED)
    return _shown_response(await access.create(db, body, rights), status.HTTP_201_CREATED)


@router.get("", response_model=UserPage, responses=_problems(422), summary="List users, keyset-paginated by id")
async def list_users(
    request: Request,
    db: ReadConnectionDep,
    limit: Annotated[int, Query(ge=1, le=500, description="Page size.")] = 50,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="Return users with id greater than this.")] = 0,
) -> UserPage | Response:
    rights = _rights(request, "read")
    if rights is None:
        return await service.list_page(db, after, limit)
    page = await access.list_page(db, after, limit, rights)
    return Response(orjson.dumps(page), media_type="application/json")


@router.get("/{user_id}", response_model=User, responses=_problems(404, 422), summary="Get one user")
async def get_user(request: Request, user_id: UserId, db: ReadConnectionDep) -> Response:
    rights = _rights(request, "read")
    if rights is None:
        return _user_response(await service.get(db, user_id))
    return _shown_response(await access.get(db, user_id, rights))


@router.patch(
    "/{user_id}",
    response_model=User,
    responses=_problems(400, 404, 409, 412, 422),
    summary="Update some fields of a user",
)
async def update_user(
    request: Request, user_id: UserId, body: UserUpdate, db: TransactionDep, if_match: IfMatch = None
) -> Response:
    rights = _rights(request, "update")
    if rights is None:
        return _user_response(await service.update(db, user_id, body, if_match))
    return _shown_response(await access.update(db, user_id, body, if_match, rights))


@router.delete(
    "/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    # A plain Response: the JSON default would label the empty 204 `content-type: application/json`.
    response_class=Response,
    responses=_problems(404, 412, 422),
    summary="Delete a user",
)
async def delete_user(request: Request, user_id: UserId, db: TransactionDep, if_match: IfMatch = None) -> None:
    rights = _rights(request, "delete")
    if rights is None:
        await service.delete(db, user_id, if_match)
    else:
        await access.delete(db, user_id, if_match, rights)
