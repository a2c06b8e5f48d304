"""`GET /metrics`: the Prometheus text exposition, and who may read it.

Who may read: with METRICS_TOKEN set, a caller sending `Authorization: Bearer <METRICS_TOKEN>` (what a Prometheus
scrape job sends from its `authorization` credentials) or a token of an AUTH_OPERATOR_ROLES role; without it, an
operator's token on a server with a token key, and anyone on an open server (no token key: every table is
readable there anyway). Everybody else gets 401 (no credential, or a wrong one) or 403 (a valid token of another
role), as problem+json.

Under `realtime serve` the answer adds up the files of every worker (metrics.py); a worker that is gone (killed,
restarted by the supervisor) is marked dead first, so its connections and subscriptions leave the gauges.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from realtime.auth.dependencies import authenticate
from realtime.config import Settings
from realtime.errors import Forbidden, Unauthorized
from realtime.metrics import Metrics, forget_process

router = APIRouter(tags=["operations"])
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db")


@router.get(
    "/metrics",
    summary="Prometheus metrics of this instance (every worker process)",
    response_class=Response,
    responses={
        200: {"content": {_CONTENT_TYPE: {}}, "description": "The Prometheus text format"},
        401: {"description": "No credential, or a wrong one (see docs/operations.md#metrics)"},
        403: {"description": "A valid token of a role that is not an operator's"},
    },
)
async def metrics(request: Request) -> Response:
    settings: Settings = request.state.settings
    await _authorize(request, settings)
    exposed: Metrics = request.state.metrics
    # Reading every worker's files is blocking work that grows with the workers that ever ran: not on the loop
    # that delivers changes.
    return Response(await run_in_threadpool(_exposition, exposed), media_type=_CONTENT_TYPE)


async def _authorize(request: Request, settings: Settings) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    secret = settings.metrics_token
    if secret is not None and scheme.lower() == "bearer" and hmac.compare_digest(credential.encode(), secret.encode()):
        return
    if request.state.auth is None:
        if secret is None:
            return  # an open server: metrics are no more secret than the tables it serves
        raise Unauthorized("send `Authorization: Bearer <METRICS_TOKEN>` to read /metrics")
    identity = await authenticate(request)  # 401 for a missing or invalid token
    if identity is None or identity.role not in settings.operator_roles:
        raise Forbidden("reading /metrics needs METRICS_TOKEN or a token of an operator role (AUTH_OPERATOR_ROLES)")


def _exposition(exposed: Metrics) -> bytes:
    """This process's metrics, or, when prometheus-client writes to a directory (under `serve`), every worker's."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    directory = exposed.directory
    if directory is None:
        return generate_latest(exposed.registry)
    _forget_dead_workers(directory)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def _forget_dead_workers(directory: Path) -> None:
    """Drop the live gauges of processes that no longer exist, so that a killed worker's connections do not stay
    counted (its counters stay: totals never go down)."""
    for path in directory.glob("gauge_live*_*.db"):
        match = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if match is not None and not _alive(int(match.group(1))):
            forget_process(directory, int(match.group(1)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
