"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from realtime.config import Settings
from realtime.db import bounded_connection, describe_failure
from realtime.dsn import Dsn
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
    summary="The database is reachable and the change listener is live",
    responses={503: {"description": "Not ready; the body says which part is not"}},
)
async def readyz(request: Request) -> JSONResponse:
    settings: Settings = request.state.settings
    budget = min(_DB_CHECK_TIMEOUT_S, settings.pool_timeout)
    database = await _database_state(request.state.read_engine, budget)
    body: dict[str, Any] = {"database": _without_password(database, settings.database_url)}
    stream: StreamPipeline = request.state.stream
    body["listener"] = stream.listener.status()
    ready = body["database"] == "ok" and body["listener"]["state"] == "live"
    body["status"] = "ready" if ready else "not_ready"
    return JSONResponse(body, status_code=200 if ready else 503)


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
