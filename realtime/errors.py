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

PROBLEM_JSON = "application/problem+json"
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


class NotFound(ProblemError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(ProblemError):
    status, slug, title = 409, "conflict", "Conflict"


class PreconditionFailed(ProblemError):
    status, slug, title = 412, "precondition-failed", "Precondition failed"


class Unavailable(ProblemError):
    status, slug, title = 503, "unavailable", "Service unavailable"


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
    """Connection loss, pool exhaustion and statement timeouts are the database's state, not a bug: 503."""
    if _is_unavailable(exc):
        _log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(503, "the database is unavailable or overloaded; retry shortly")
    return await _on_unexpected(request, exc)


def _is_unavailable(exc: Exception) -> bool:
    if isinstance(exc, sqlalchemy.exc.TimeoutError | sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    cause = getattr(exc, "orig", None) or exc.__cause__
    unavailable = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.QueryCanceledError)
    return isinstance(cause, unavailable) or isinstance(getattr(cause, "__cause__", None), unavailable)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    _log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the app can produce as problem+json."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(sqlalchemy.exc.SQLAlchemyError, _on_database)
    app.add_exception_handler(OSError, _on_database)
    app.add_exception_handler(Exception, _on_unexpected)
