"""A small protocol client for tests: send frames, wait for the ones you expect, with deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

Frame = dict[str, Any]


class StreamClient:
    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self._ref = 0

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> StreamClient:
        return cls(await connect(url, max_size=None, **kwargs))

    async def close(self) -> None:
        await self.connection.close()

    async def send(self, frame: Frame | str) -> None:
        await self.connection.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 10.0) -> Frame:
        raw = await asyncio.wait_for(self.connection.recv(), timeout)
        frame: Frame = orjson.loads(raw)
        return frame

    async def request(self, frame: Frame, timeout: float = 10.0) -> Frame:
        """Send a frame with a fresh ref and return the direct reply (skipping anything else)."""
        self._ref += 1
        ref = self._ref
        await self.send({**frame, "ref": ref})
        return await self.recv_until(lambda f: f.get("ref") == ref, timeout)

    async def recv_until(self, predicate: Callable[[Frame], bool], timeout: float = 10.0) -> Frame:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if predicate(frame):
                    return frame

    async def subscribe(self, sub_id: str = "s1", table: str = "users", **fields: Any) -> tuple[Frame, list[Frame]]:
        """Subscribe and return the `subscribed` reply and every frame that came before it (snapshot, replay)."""
        self._ref += 1
        ref = self._ref
        await self.send({"type": "subscribe", "ref": ref, "id": sub_id, "table": table, **fields})
        before: list[Frame] = []
        async with asyncio.timeout(30):
            while True:
                frame = await self.recv()
                if frame.get("ref") == ref:
                    if frame["type"] == "error":
                        raise AssertionError(f"subscribe refused: {frame}")
                    return frame, before
                before.append(frame)

    async def changes(self, count: int, timeout: float = 10.0) -> list[Frame]:
        """The next `count` change frames."""
        result: list[Frame] = []
        async with asyncio.timeout(timeout):
            while len(result) < count:
                frame = await self.recv(timeout)
                if frame["type"] == "change":
                    result.append(frame)
        return result
