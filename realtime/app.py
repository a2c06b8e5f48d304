"""The FastAPI application: lifespan-owned resources, routers, error handlers and the static demo page.

Lifecycle (one per worker process):
    startup   engine (pool) -> row-level policy checked against the database -> stream pipeline (listener,
              watchdog, pruner)
    serving   requests use the pool through `TransactionDep` / `ReadConnectionDep`; /ws uses the pipeline's hub
    shutdown  in reverse: stream pipeline (WebSockets closed with 1012) -> engine
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypedDict

import anyio
from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from realtime import __version__, health, metrics_endpoint, resources, supervision
from realtime.auth import dev_tokens
from realtime.auth.dependencies import authenticate, declare_bearer_auth
from realtime.auth.policy import POLICY_NEEDS_TOKENS, load_policy, read_schemas
from realtime.auth.tickets import Tickets
from realtime.auth.tokens import TokenVerifier
from realtime.config import Settings, get_settings
from realtime.db import autocommit, create_engine
from realtime.dsn import Dsn
from realtime.errors import install_error_handlers
from realtime.limits import BodySizeLimit
from realtime.metrics import Metrics
from realtime.origins import DemoPagePolicy, Guard, HttpGuard
from realtime.request_id import RequestId
from realtime.request_metrics import RequestMetrics
from realtime.stream import sse
from realtime.stream.endpoint import stream
from realtime.stream.pipeline import StreamPipeline
from realtime.users.router import router as users_router

_log = logging.getLogger(__name__)


STREAM_PATH = "/ws"


class State(TypedDict):
    settings: Settings
    engine: AsyncEngine
    read_engine: AsyncEngine
    stream: StreamPipeline
    # The bearer-token verifier of REST and /ws alike; None when no token key is configured (open mode).
    auth: TokenVerifier | None
    # The single-use tickets that open an SSE stream from a browser (realtime/auth/tickets.py).
    tickets: Tickets
    metrics: Metrics


def create_app(settings: Settings) -> FastAPI:
    """Build the app for `settings`; `settings.database_url` must be set (the CLI resolves embedded mode)."""
    if settings.database_url is None:
        raise ValueError("create_app needs settings.database_url; `realtime serve` sets it for embedded mode")
    url = Dsn.parse(str(settings.database_url))
    verifier = TokenVerifier.from_settings(settings)
    guard = Guard.from_settings(settings)
    policy_file = load_policy(settings.auth_policy_file) if settings.auth_policy_file is not None else None
    if policy_file is not None and verifier is None:
        raise ValueError(POLICY_NEEDS_TOKENS)
    metrics = Metrics() if settings.metrics_enabled else Metrics.off()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[State]:
        engine = create_engine(settings, url)
        _log.info("serving with database %s", url.redacted())
        try:
            stream = StreamPipeline(settings, url, engine, guard, metrics)
            if policy_file is not None:
                async with stream.connection() as conn:
                    stream.policy = policy_file.bind(await read_schemas(conn, policy_file.tables))
            await stream.start()
            _freeze_startup_objects()
            try:
                yield State(
                    settings=settings,
                    engine=engine,
                    read_engine=autocommit(engine),
                    stream=stream,
                    auth=verifier,
                    tickets=Tickets(stream.connection, settings.sse_ticket_ttl_s),
                    metrics=metrics,
                )
            finally:
                await stream.stop()
        finally:
            await engine.dispose()
            supervision.end_if_dead()  # a worker whose pipeline task died exits non-zero here, to be restarted

    app = RealtimeApp(
        guard,
        metrics,
        title="realtime",
        version=__version__,
        summary="REST CRUD for users and live change streams over WebSocket (/ws).",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    if verifier is not None:
        declare_bearer_auth(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    if metrics.enabled:
        app.include_router(metrics_endpoint.router)
    # The bearer-token dependency only when there is a key to verify with: even doing nothing, a dependency costs
    # FastAPI's resolution on every request (about 4% of a GET's server CPU).
    app.include_router(users_router, dependencies=[Depends(authenticate)] if verifier is not None else None)
    app.include_router(sse.router)
    if settings.auth_dev_tokens:
        app.include_router(dev_tokens.router)
    app.mount("/", DemoPagePolicy(DemoFiles(directory=resources.web_demo(), html=True)), name="web_demo")
    return app


class DemoFiles(StaticFiles):
    """The demo page's files, mounted at `/` and so asked for every path no route has. A method other than GET or
    HEAD on a path that is no file is 404, as that path is for GET: StaticFiles answers 405 before it looks."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if scope["method"] not in ("GET", "HEAD"):
            _, found = await anyio.to_thread.run_sync(self.lookup_path, path)
            if found is None:
                raise HTTPException(status_code=404)
        return await super().get_response(path, scope)


class RealtimeApp(FastAPI):
    """FastAPI for HTTP; WebSockets on `/ws` go straight to the stream endpoint, around middleware and router.

    A WebSocket's coroutine chain lives as long as the connection. Through the full stack that chain is about
    twenty frames (error and exception middleware, body limits, the router, the route's wrappers): 9 KB per
    idle connection, a third of its memory, spent on layers that have nothing to do for a WebSocket. Any
    other WebSocket path still goes through the router, which refuses it.

    Every HTTP response passes through `HttpGuard` first, outside even the server-error middleware, so a 500
    carries the security headers too; `/ws` applies the same `Guard` itself (see `stream`).
    """

    def __init__(self, guard: Guard, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = guard
        self.metrics = metrics

    def build_middleware_stack(self) -> ASGIApp:
        # The request id outside everything, so that a refused Host's answer and its log lines carry it too; the
        # request metrics outside that, so that they count those answers.
        stack = RequestId(HttpGuard(super().build_middleware_stack(), self.guard))
        return RequestMetrics(stack, self.metrics) if self.metrics.enabled else stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == scope.get("root_path", "") + STREAM_PATH:
            await stream(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _freeze_startup_objects() -> None:
    """Exclude everything alive after start-up (modules, classes, the app) from garbage collection.

    A full collection walks every tracked object; after importing FastAPI, pydantic and SQLAlchemy that is
    hundreds of thousands of objects that never die, and the walk stalls the event loop for 100+ ms, which
    shows up directly as delivery latency. Frozen objects are never collected, which is what they need.
    """
    gc.collect()
    gc.freeze()


def create_app_from_env() -> FastAPI:
    """uvicorn factory (`realtime.app:create_app_from_env`) used by `realtime serve` for every worker."""
    return create_app(get_settings())
