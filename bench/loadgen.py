"""One load-generator shard: many WebSocket subscribers in one process, driven over stdin/stdout.

Run as `python -m bench.loadgen` by `bench.shards`; each stdin line is a JSON command, each reply one JSON
line on stdout:

    open {count, first}  -> connect `count` subscribers (realtime ones also subscribe and wait for
                            `subscribed`), reply {opened, failed, error}
    mark                 -> start a measurement window: zero the counters
    collect {...}        -> wait until the window's changes have arrived (or went quiet / the deadline),
                            write the latencies to `lat_path`, reply with the window's counts
    status               -> open subscribers, RSS, CPU
    quit                 -> drop every connection and exit

Subscribers are asyncio Protocols speaking WebSocket through `bench.wsframes`, so a frame costs one slice
and a few `bytes.find`s: no task, future or queue per message, no UTF-8 check and no JSON decoding. Only
`seq`, `ts` and, when filtering, the row's `id` are read from a frame.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from array import array
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from bench import wsframes
from bench.proc import raise_nofile_limit, self_cpu_seconds, tree_rss_bytes

_SEQ = re.compile(rb'"seq"\s*:\s*(-?\d+)')
_ID = re.compile(rb'"id"\s*:\s*(-?\d+)')
T = TypeVar("T")

_TEXT_FINAL = wsframes.FIN | wsframes.OP_TEXT

# Every subscriber receives the same change, so the same `ts` string arrives N times: parse it once.
_ts_cache: dict[bytes, float] = {}


def _ts_epoch(raw: bytes) -> float:
    value = _ts_cache.get(raw)
    if value is None:
        if len(_ts_cache) > 65536:
            _ts_cache.clear()
        value = datetime.fromisoformat(raw.decode()).timestamp()
        _ts_cache[raw] = value
    return value


@dataclass
class ShardWindow:
    """Counters of the current measurement window, shared by every subscriber of the shard."""

    frames: int = 0  # change frames read, including ones a client-side filter drops
    deliveries: int = 0  # changes the subscribers asked for, first arrivals only
    duplicates: int = 0
    out_of_order: int = 0
    unexpected: int = 0  # a realtime frame for a row the subscription's filter excludes
    errors: int = 0  # `error` frames
    first: float = 0.0
    last: float = 0.0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    closes: Counter[int] = field(default_factory=Counter)
    last_frame_at: float = 0.0  # time.time() of the last socket read


class Subscriber(asyncio.Protocol):
    """One WebSocket connection. Realtime subscribers check `seq`; peer ones only count and time."""

    def __init__(self, shard: Shard, key: int | None) -> None:
        self.shard = shard
        self.key = key  # the row id this subscriber filters on, or None for every change
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.accept = b""
        self.pending = b""  # bytes of an incomplete handshake reply or frame
        self.live = False
        self.last_seq = 0
        self.base_seq = 0
        self.seen = bytearray()  # seen[seq - base_seq] == 1 once that change arrived
        self.count = 0  # deliveries in the current window
        self.partial: list[bytes] = []

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        request, self.accept = wsframes.handshake_request(self.shard.host, self.shard.port, self.shard.path)
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        # One clock read per socket read: frames that arrived together share their arrival time.
        now = time.time()
        self.shard.window.last_frame_at = now
        if self.pending:
            data = self.pending + data
        try:
            if not self.upgraded:
                data = self._upgrade(data)
            frames, self.pending = wsframes.split_frames(data)
        except wsframes.ProtocolError as exc:
            self.pending = b""
            self._abort(str(exc))
            return
        for first_byte, payload in frames:
            if first_byte == _TEXT_FINAL:
                self._on_text(payload, now)
            elif first_byte & 0x0F == wsframes.OP_TEXT:
                self.partial = [payload]
            elif first_byte & 0x0F == wsframes.OP_CONT and self.partial:
                self.partial.append(payload)
                if first_byte & wsframes.FIN:
                    whole, self.partial = b"".join(self.partial), []
                    self._on_text(whole, now)
            elif first_byte & 0x0F == wsframes.OP_PING:
                self._send(wsframes.OP_PONG, payload)
            elif first_byte & 0x0F == wsframes.OP_CLOSE:
                code = wsframes.close_code(payload)
                self.shard.window.closes[code] += 1
                self._send(wsframes.OP_CLOSE, payload[:2])
                self._abort(f"closed by server with {code} {payload[2:].decode(errors='replace')}")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.live = False
        self.shard.subscribers.discard(self)
        self._fail(f"connection lost: {exc}")

    # helpers

    def _upgrade(self, data: bytes) -> bytes:
        """Check the handshake reply once it is whole; return the bytes after it (frames already sent)."""
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            if len(data) > 16384:
                raise wsframes.ProtocolError("handshake reply too long")
            return data
        wsframes.check_handshake_reply(data[:head_end], self.accept)
        self.upgraded = True
        self._on_open()
        return data[head_end + 4 :]

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wsframes.client_frame(opcode, payload))

    def _abort(self, reason: str) -> None:
        self._fail(reason)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))

    def _on_open(self) -> None:
        if self.shard.kind == "peer":
            self._go_live(0)
            return
        subscribe: dict[str, Any] = {"type": "subscribe", "id": "b", "table": "users"}
        if self.key is not None:
            subscribe["filter"] = [{"column": "id", "op": "eq", "value": self.key}]
        self._send(wsframes.OP_TEXT, json.dumps(subscribe, separators=(",", ":")).encode())

    def _go_live(self, seq: int) -> None:
        self.live = True
        self.base_seq = self.last_seq = seq
        self.shard.subscribers.add(self)
        if not self.ready.done():
            self.ready.set_result(None)

    def _on_text(self, data: bytes, now: float) -> None:
        window = self.shard.window
        # Both realtime and the peers' trigger put `ts` last, after the row: search from the end.
        ts_at = data.rfind(b'"ts"')
        if ts_at < 0:
            # Not a change: `subscribed`, `error`, `pong`.
            if b'"error"' in data:
                window.errors += 1
                self._fail(data.decode(errors="replace"))
            elif not self.live and b'"subscribed"' in data:
                match = _SEQ.search(data)
                self._go_live(int(match.group(1)) if match else 0)
            return
        if not self.live:
            return
        window.frames += 1
        ts_open = data.find(b'"', ts_at + 4)
        ts_close = data.find(b'"', ts_open + 1)
        if ts_open < 0 or ts_close < 0:
            window.errors += 1
            return
        if self.key is not None:
            row_at = data.find(b'"row"')
            id_match = _ID.search(data, row_at) if row_at >= 0 else None
            if id_match is None or int(id_match.group(1)) != self.key:
                # Broadcasting peers send every change to everyone; their clients drop what they did not ask
                # for. From realtime such a frame is a filtering bug.
                if self.shard.kind == "realtime":
                    window.unexpected += 1
                return
        if self.shard.kind == "realtime":
            # Realtime writes `"seq":N,` near the start of every change frame.
            seq_at = data.find(b'"seq":')
            if seq_at < 0:
                window.errors += 1
                return
            seq = int(data[seq_at + 6 : data.find(b",", seq_at)])
            index = seq - self.base_seq
            if index <= 0:
                # At or before the `subscribed` position: the protocol promises this never arrives.
                window.out_of_order += 1
                return
            seen = self.seen
            if index >= len(seen):
                seen.extend(bytes(index - len(seen) + 4096))
            if seen[index]:
                window.duplicates += 1
                return
            seen[index] = 1
            if seq < self.last_seq:
                window.out_of_order += 1
            else:
                self.last_seq = seq
        self.count += 1
        window.deliveries += 1
        if not window.first:
            window.first = now
        window.last = now
        window.latencies.append(now - _ts_epoch(data[ts_open + 1 : ts_close]))


class Shard:
    def __init__(self, url: str, kind: str, filter_base: int | None, concurrency: int, lat_path: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.kind = kind
        self.filter_base = filter_base
        self.concurrency = concurrency
        self.lat_path = lat_path
        self.subscribers: set[Subscriber] = set()
        self.window = ShardWindow()
        self._all: list[Subscriber] = []
        self._cpu_mark = self_cpu_seconds()
        self._wall_mark = time.monotonic()

    async def open(self, first: int, count: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(self.concurrency)
        failures: Counter[str] = Counter()

        async def one(index: int) -> None:
            key = None if self.filter_base is None else self.filter_base + index
            async with gate:
                sub = Subscriber(self, key)
                try:
                    await asyncio.wait_for(loop.create_connection(lambda: sub, self.host, self.port), 30)
                    await asyncio.wait_for(sub.ready, 30)
                except (OSError, ConnectionError, TimeoutError) as exc:
                    failures[f"{type(exc).__name__}: {exc}"[:200]] += 1
                    if sub.transport is not None:
                        sub.transport.abort()
                    return
                self._all.append(sub)

        await asyncio.gather(*(one(first + i) for i in range(count)))
        return {
            "opened": count - sum(failures.values()),
            "failed": sum(failures.values()),
            "error": failures.most_common(1)[0][0] if failures else None,
            "live": len(self.subscribers),
        }

    def mark(self) -> None:
        self.window = ShardWindow()
        for sub in self._all:
            sub.count = 0
        self._cpu_mark = self_cpu_seconds()
        self._wall_mark = time.monotonic()

    async def collect(
        self,
        expected_per_sub: int | None,
        expected_by_key: dict[int, int] | None,
        frames_per_sub: int | None,
        quiet_s: float,
        deadline_s: float,
    ) -> dict[str, Any]:
        """Wait until every live subscriber has its expected changes, the stream went quiet, or the deadline.

        `frames_per_sub` also waits for frames a client-side filter drops, so a broadcasting server's window
        covers all the sending it was asked to do.
        """
        window = self.window
        started = time.monotonic()
        started_at = time.time()  # the clock subscribers stamp their reads with
        live = list(self.subscribers)

        def expected(sub: Subscriber) -> int:
            if expected_by_key is not None:
                return expected_by_key.get(sub.key, 0) if sub.key is not None else 0
            return expected_per_sub or 0

        known = expected_per_sub is not None or expected_by_key is not None
        target = sum(expected(sub) for sub in live)
        target_frames = (frames_per_sub or 0) * len(live)
        while True:
            if known and window.deliveries >= target and window.frames >= target_frames:
                break
            if time.time() - max(window.last_frame_at, started_at) >= quiet_s:
                break
            if time.monotonic() - started >= deadline_s:
                break
            await asyncio.sleep(0.02)
        lost = sum(max(0, expected(sub) - sub.count) for sub in live) if known else 0
        self._dump_latencies()
        return {
            "subscribers": len(live),
            "frames": window.frames,
            "deliveries": window.deliveries,
            "duplicates": window.duplicates,
            "out_of_order": window.out_of_order,
            "unexpected": window.unexpected,
            "errors": window.errors,
            "lost": lost,
            "closes": {str(k): v for k, v in window.closes.items()},
            "first": window.first,
            "last": window.last,
            "cpu_s": self_cpu_seconds() - self._cpu_mark,
            "wall_s": time.monotonic() - self._wall_mark,
            "drain_s": time.monotonic() - started,
            "lat_path": self.lat_path,
        }

    def _dump_latencies(self) -> None:
        # A few MB at most, written once per window: blocking here costs nothing measured.
        with open(self.lat_path, "wb") as f:
            self.window.latencies.tofile(f)

    def status(self) -> dict[str, Any]:
        return {"live": len(self.subscribers), "cpu_s": self_cpu_seconds(), "rss": tree_rss_bytes(os.getpid())}

    def close(self) -> None:
        for sub in self._all:
            if sub.transport is not None:
                sub.transport.abort()


async def _serve(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    shard = Shard(
        config["url"], config["kind"], config.get("filter_base"), config.get("concurrency", 100), config["lat_path"]
    )

    def reply(payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        command = json.loads(line)
        name = command["cmd"]
        if name == "open":
            reply(await shard.open(command["first"], command["count"]))
        elif name == "mark":
            shard.mark()
            reply({"ok": True})
        elif name == "collect":
            reply(
                await shard.collect(
                    command.get("expected_per_sub"),
                    {int(k): v for k, v in command["expected_by_key"].items()}
                    if "expected_by_key" in command
                    else None,
                    command.get("frames_per_sub"),
                    command["quiet_s"],
                    command["deadline_s"],
                )
            )
        elif name == "status":
            reply(shard.status())
        elif name == "quit":
            break
        else:
            reply({"error": f"unknown command {name}"})
    shard.close()
    # Let the aborts reach the sockets before the loop goes away.
    await asyncio.sleep(0.1)
    reply({"ok": True})


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when installed: its reads and callbacks are cheaper, leaving more CPU to the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main() -> None:
    raise_nofile_limit()
    run_fast(_serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
