"""Liveness and readiness probes.

Both stay anonymous, because load balancers and orchestrators send no token. What /readyz found (the database's
error, the listener's position and counts) is shown only to callers with the right to it (`_shows_details`);
everybody else gets the status alone, with the same 200 or 503.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from realtime.auth.dependencies import authenticate
from realtime.config import Settings
from realtime.db import bounded_connection, describe_failure
from realtime.dsn import Dsn
from realtime.errors import Unauthorized, Unavailable
from realtime.stream.pipeline import StreamPipeline

router = APIRouter(tags=["health"])
# The database must answer within this, or within POOL_TIMEOUT when that is shorter: a probe that waits longer
# than a REST request would call ready a database that every request gives up on.
_DB_CHECK_TIMEOUT_S = 2.0
_PING = text("SELECT 1")


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database is reachable, the change listener is live and no background task has died",
    responses={503: {"description": "Not ready; to a caller allowed the details, the body says which part is not"}},
)
async def readyz(request: Request) -> JSONResponse:
    settings: Settings = request.state.settings
    budget = min(_DB_CHECK_TIMEOUT_S, settings.pool_timeout)
    # The token is checked while the database is, within the same budget, so that a JWKS fetch for a new key
    # cannot make the probe slower than its documented bound.
    database, details = await asyncio.gather(
        _database_state(request.state.read_engine, budget), _shows_details(request, settings, budget)
    )
    stream: StreamPipeline = request.state.stream
    listener = stream.listener.status()
    # A dead background task makes the process not ready for good: it is shutting down to be restarted.
    ready = database == "ok" and listener["state"] == "live" and stream.failure is None
    status = "ready" if ready else "not_ready"
    body: dict[str, Any] = {"status": status}
    if details:
        body = {"database": _without_password(database, settings.database_url), "listener": listener, **body}
        if stream.failure is not None:
            body["failure"] = stream.failure
    return JSONResponse(body, status_code=200 if ready else 503)


async def _shows_details(request: Request, settings: Settings, budget: float) -> bool:
    """Whether the caller may see what /readyz found: HEALTH_DETAILS=public; else an open server (no token key,
    everything is readable anyway), or a bearer token that verifies within `budget` and has an operator role.

    A missing, invalid or unverifiable token is not refused: a probe stays anonymous and gets the status alone.
    """
    if settings.health_details == "public":
        return True
    try:
        identity = await asyncio.wait_for(authenticate(request), budget)
    except (Unauthorized, Unavailable, TimeoutError):
        return False
    return identity is None or identity.role in settings.operator_roles


async def _database_state(engine: AsyncEngine, budget: float) -> str:
    """`ok`, or `unreachable: <why>`, within `budget` seconds (plus a few milliseconds) however the database fails."""
    try:
        async with bounded_connection(engine, budget) as connection:
            await connection.execute(_PING)
    except Exception as error:  # any failure means "not reachable"; the body names it
        return f"unreachable: {describe_failure(error)}"
    return "ok"


def _without_password(reason: str, database_url: str | None) -> str:
    """The reason with the database password masked, should a driver ever quote the URL in a message."""
    password = Dsn.parse(database_url).parts.password if database_url else None
    if password:
        for spelling in (password, unquote(password)):
            reason = reason.replace(spelling, "***")
    return reason
