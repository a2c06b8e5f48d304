"""The receive inbox of the lean WebSocket protocol: what uvicorn's protocol expects of its asyncio.Queue."""

from __future__ import annotations

import asyncio

import pytest

from realtime.stream.ws_protocol import _Inbox


async def test_messages_put_before_reading_come_out_in_order() -> None:
    """Messages queued while nobody reads are received first in, first out."""
    inbox = _Inbox()
    inbox.put_nowait({"type": "websocket.connect"})
    inbox.put_nowait({"type": "websocket.receive", "text": "a"})
    assert not inbox.empty()
    assert await inbox.get() == {"type": "websocket.connect"}
    assert await inbox.get() == {"type": "websocket.receive", "text": "a"}
    assert inbox.empty()


async def test_a_waiting_reader_is_woken_by_the_next_message() -> None:
    """get() waits for put_nowait(), as asyncio.Queue.get() does."""
    inbox = _Inbox()
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not reader.done()
    inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    assert await asyncio.wait_for(reader, 1) == {"type": "websocket.disconnect", "code": 1000}


async def test_a_cancelled_reader_leaves_the_inbox_usable() -> None:
    """Cancelling a waiting get() loses no message and lets the next reader wait again."""
    inbox = _Inbox()
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    inbox.put_nowait({"type": "websocket.connect"})
    assert await asyncio.wait_for(inbox.get(), 1) == {"type": "websocket.connect"}


async def test_a_second_concurrent_reader_is_refused() -> None:
    """The inbox serves one reader; a second one fails loudly instead of waiting forever."""
    inbox = _Inbox()
    first = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await inbox.get()
    inbox.put_nowait({"type": "websocket.connect"})
    assert await asyncio.wait_for(first, 1) == {"type": "websocket.connect"}
