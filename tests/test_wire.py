"""The direct sink as pure logic: a transport that fails a write is closed, and the failure goes no further."""

from __future__ import annotations

import asyncio

from realtime.stream.wire import FRAMES_EXTENSION, AsgiSink, TransportSink, sink_for


class BrokenTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


class Frames:
    def __init__(self, transport: asyncio.Transport, usable: bool = True) -> None:
        self.transport = transport
        self.writable = asyncio.Event()
        self._usable = usable

    def usable(self) -> bool:
        return self._usable

    def gone(self) -> bool:
        return self.transport.is_closing()


async def _send(message: dict[str, object]) -> None:
    raise AssertionError("the direct sink must not use ASGI send")


def test_a_failed_write_aborts_that_connection_and_raises_nothing() -> None:
    transport = BrokenTransport()
    sink = sink_for({"extensions": {FRAMES_EXTENSION: {"frames": Frames(transport)}}}, _send)
    assert isinstance(sink, TransportSink)
    sink.write(b"\x81\x02{}")
    assert transport.aborted
    assert sink.gone()


def test_without_usable_direct_frames_the_sink_is_asgi_send() -> None:
    assert isinstance(sink_for({}, _send), AsgiSink)
    compressed = {"extensions": {FRAMES_EXTENSION: {"frames": Frames(BrokenTransport(), usable=False)}}}
    assert isinstance(sink_for(compressed, _send), AsgiSink)
