"""The error hierarchy and the handlers that turn every failure into RFC 9457 problem+json.

Expected failures raise a `ProblemError` subclass carrying its HTTP status; one handler renders them all.
Validation errors (FastAPI's and Starlette's own) are rendered in the same shape, so a client parses one format.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

import asyncpg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from realtime.db import describe_failure, failure_chain

PROBLEM_JSON = "application/problem+json"
_ASYNCPG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
_log = logging.getLogger(__name__)


class FieldError(BaseModel):
    """One invalid input: which field, where it came from, and what is wrong with it."""

    field: str
    location: str
    message: str


class Problem(BaseModel):
    """The body of every error response (RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """An expected failure that maps to one HTTP status and problem type."""

    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class Unauthorized(ProblemError):
    """No bearer token, or one that proves no identity; the detail says which (RFC 6750 3.1)."""

    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": bearer_challenge(detail)})


def bearer_challenge(description: str) -> str:
    """The `WWW-Authenticate` value of a 401: the token is missing or invalid, and why."""
    # A quoted-string cannot carry a double quote or a backslash, nor anything outside printable ASCII.
    safe = "".join(c for c in description if " " <= c <= "~" and c not in '"\\')
    return f'Bearer error="invalid_token", error_description="{safe}"'


class Forbidden(ProblemError):
    """The caller is known but its role may not do this (a row-level policy, AUTH_POLICY_FILE, said so)."""

    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(ProblemError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(ProblemError):
    status, slug, title = 409, "conflict", "Conflict"


class PreconditionFailed(ProblemError):
    status, slug, title = 412, "precondition-failed", "Precondition failed"


# Seconds a client is asked to wait before retrying after a 503: the database may be back by then, and a request
# that finds it still away costs the server at most POOL_TIMEOUT of waiting.
RETRY_AFTER_S = 1


class Unavailable(ProblemError):
    status, slug, title = 503, "unavailable", "Service unavailable"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": str(RETRY_AFTER_S), **(headers or {})})


_TITLES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    412: ("precondition-failed", "Precondition failed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Validation error"),
    428: ("precondition-required", "Precondition required"),
    500: ("internal-error", "Internal server error"),
    503: ("unavailable", "Service unavailable"),
}


def problem_type(slug: str) -> str:
    """The `type` URI of a problem; docs/api.md lists every slug."""
    return f"/problems/{slug}"


def problem_response(
    status: int,
    detail: str,
    *,
    errors: Sequence[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    slug: str | None = None,
    title: str | None = None,
) -> JSONResponse:
    default_slug, default_title = _TITLES.get(status, ("error", "Error"))
    body = Problem(
        type=problem_type(slug or default_slug),
        title=title or default_title,
        status=status,
        detail=detail,
        errors=list(errors) if errors is not None else None,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, headers=headers, media_type=PROBLEM_JSON
    )


def _field_errors(raw: Sequence[Any]) -> list[FieldError]:
    result = []
    for err in raw:
        loc = [str(part) for part in err.get("loc", ())]
        location = loc[0] if loc else "body"
        field = ".".join(loc[1:]) if len(loc) > 1 else location
        if err.get("type") == "json_invalid":
            # FastAPI puts the byte offset of the syntax error where a field name would be.
            field = "body"
        result.append(FieldError(field=field, location=location, message=str(err.get("msg", "invalid"))))
    return result


def _allowed_methods(request: Request) -> set[str]:
    """Every method the app's own OpenAPI description offers on the request's path.

    The router cannot be asked: Starlette's 405 names only the methods of the first route whose path matches,
    and the demo page mounted at `/` claims every path that no route fully matches (answering `405 Allow: GET,
    HEAD`, or 404 for HEAD). The OpenAPI paths are the documented truth, so the answer agrees with /openapi.json.
    """
    methods: set[str] = set()
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    concrete = paths.get(request.url.path)
    if concrete is not None:
        # As OpenAPI matches: a concrete path before templated ones (`/sse/tickets` is not `/sse/{table}`).
        return {method.upper() for method in concrete if method in _HTTP_METHODS}
    for template, operations in paths.items():
        if _path_regex(template).fullmatch(request.url.path):
            methods.update(method.upper() for method in operations if method in _HTTP_METHODS)
    return methods


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


@functools.cache
def _path_regex(template: str) -> re.Pattern[str]:
    """`/users/{user_id}` -> a regex matching `/users/<one segment>`."""
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)))


async def _on_problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(exc.status, exc.detail, headers=exc.headers, slug=exc.slug, title=exc.title)


async def _on_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _field_errors(exc.errors())
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors) or "the request is invalid"
    return problem_response(422, detail, errors=errors)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405):
        allowed = _allowed_methods(request)
        if allowed and request.method not in allowed:
            allow = ", ".join(sorted(allowed))
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allow}"
            return problem_response(405, detail, headers={"Allow": allow})
    return problem_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


async def _on_database(request: Request, exc: Exception) -> JSONResponse:
    """Connection loss, timeouts, pool exhaustion and a server that refuses work are the database's state, not a
    bug: 503 with Retry-After, logged in one line. Anything else from the database is a bug: 500."""
    if _is_unavailable(exc):
        _log.warning("database unavailable on %s %s: %s", request.method, request.url.path, describe_failure(exc))
        return problem_response(
            503,
            "the database is unavailable or overloaded; retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return await _on_unexpected(request, exc)


# SQLSTATE classes that mean "the server cannot do work now", whatever the statement: connection exception,
# insufficient resources (too many connections, out of memory, disk full), operator intervention (statement
# timeout, shutdown, starting up), system error (I/O).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "58")


def _is_unavailable(exc: BaseException) -> bool:
    """Whether this error, or what it was raised from, is a connection, timeout, pool or server-state failure.

    Errors come wrapped by SQLAlchemy (`.orig`, then the asyncpg error as `__cause__`) or bare: a timeout or a
    refused connection while a connection is opened, and asyncpg's command timeout, are not DBAPI errors.
    """
    for error in failure_chain(exc):
        if isinstance(error, _UNAVAILABLE_ERRORS):
            return True
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return True
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(error, asyncpg.PostgresError) and str(sqlstate)[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            return True
    return False


_UNAVAILABLE_ERRORS = (
    sqlalchemy.exc.TimeoutError,  # no pool connection free in time
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    OSError,  # with TimeoutError (and so DatabaseTimeout), ConnectionRefusedError, ConnectionResetError
    asyncpg.InterfaceError,  # with ConnectionDoesNotExistError
    asyncpg.InternalClientError,
)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    _log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the app can produce as problem+json."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    # Errors of the database layer get their own handlers: one registered for Exception would run in Starlette's
    # outermost middleware, which re-raises after answering, so every outage would log a traceback.
    for database_error in (sqlalchemy.exc.SQLAlchemyError, OSError, *_ASYNCPG_ERRORS):
        app.add_exception_handler(database_error, _on_database)
    app.add_exception_handler(Exception, _on_unexpected)
