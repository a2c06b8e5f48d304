"""Baseline peer: the LISTEN/NOTIFY + WebSocket broadcaster from the usual FastAPI tutorials.

One asyncpg connection LISTENs on `changes`; its callback queues the payload; one loop awaits
`send_text(payload)` on each connected socket in turn. That is the pattern's defining cost: one slow
socket delays everyone, and each send is a separate await. It is kept that way on purpose.

Run: DATABASE_URL=postgresql://... uvicorn bench.peers.tutorial_fastapi:app --workers 1
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

clients: set[WebSocket] = set()


async def broadcast(queue: asyncio.Queue[str]) -> None:
    while True:
        payload = await queue.get()
        for ws in list(clients):
            try:
                await ws.send_text(payload)
            except Exception:
                clients.discard(ws)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        queue.put_nowait(str(payload))

    await conn.add_listener("changes", on_notify)
    sender = asyncio.create_task(broadcast(queue))
    try:
        yield
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await conn.close()


app = FastAPI(lifespan=lifespan)


@app.websocket("/ws")
async def changes(ws: WebSocket) -> None:
    await ws.accept()
    clients.add(ws)
    try:
        while True:
            await ws.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        clients.discard(ws)
