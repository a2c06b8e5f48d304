"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from realtime.stream.pipeline import StreamPipeline

router = APIRouter(tags=["health"])
_DB_CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database is reachable and the change listener is live",
    responses={503: {"description": "Not ready; the body says which part is not"}},
)
async def readyz(request: Request) -> JSONResponse:
    engine: AsyncEngine = request.state.engine
    body: dict[str, Any] = {"database": await _database_state(engine)}
    stream: StreamPipeline = request.state.stream
    body["listener"] = stream.listener.status()
    ready = body["database"] == "ok" and body["listener"]["state"] == "live"
    body["status"] = "ready" if ready else "not_ready"
    return JSONResponse(body, status_code=200 if ready else 503)


async def _database_state(engine: AsyncEngine) -> str:
    try:
        async with asyncio.timeout(_DB_CHECK_TIMEOUT_S), engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as error:  # any failure means "not reachable"; the body names it
        return f"unreachable: {type(error).__name__}"
    return "ok"
