"""`Client`: one WebSocket to a realtime server, kept open, carrying every subscription of a program.

Connection lifecycle (each arrow is logged once, on the `realtime.client` logger):

    start ─► connecting ─[token]─► handshake ─[auth ─► authenticated]─► live ─► subscriptions sent
                ▲                                                        │
                │  capped, jittered backoff (after every buffer has room) │ closed: 1012, 4008, 1006, 4001 token
                └──────────────────────── reconnecting ◄──────────────────┘ expired, keepalive timeout, ...
    refused token / 4001 "authentication required" / URL refused for good ─► failed (iterators raise)
    close() ─► closed (iterators end after their buffered events)

While live with a token that has an `exp`, the client asks its token source again before `exp` and sends `auth`
on the same socket (docs/protocol.md, "Refreshing"); subscriptions carry on untouched.

Liveness is the WebSocket library's keepalive: a protocol-level ping every `ping_interval`, and a pong missing
for `ping_timeout` drops the connection, which is then reopened and resumed like any other loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeAlias

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as open_websocket
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from realtime.client.backoff import Backoff
from realtime.client.events import AuthenticationError, ClientError, SubscriptionError
from realtime.client.subscription import Condition, Operation, Subscription
from realtime.client.tokens import TokenSource, TokenUnavailable, fetch_token, refresh_delay

_log = logging.getLogger("realtime.client")

Status: TypeAlias = Literal["connecting", "live", "reconnecting", "closed", "failed"]
# The reason of a 1012, 4008, 1008 or 4001 close ends with the last position the server sent.
_LAST_SEQ = re.compile(r"last_seq=(\d+)\s*$")
# A `retry_after_ms` hint above this counts as this.
_MAX_HINT_S = 300.0
_CLOSE_UNAUTHENTICATED = 4001


@dataclass(frozen=True, slots=True)
class Disconnect:
    """How a connection that had opened was lost. `server_last_seq` is parsed from the close reason, for logs:
    the client resumes from its own positions."""

    code: int | None
    reason: str
    server_last_seq: int | None


class _ConnectionLost(Exception):
    """The socket closed while a request on it waited for its answer."""


class Client:
    """A connection to `url` (`ws://host:port/ws`) that reconnects and resumes until `close()`.

    Use `connect(...)` and `async with`. Options:
    - `token`: a string, or a function (plain or async) returning one, asked before every connection and again
      before the token's `exp`; leave it out for an open server.
    - `buffer`: events each subscription holds for the program before the client stops reading (subscription.py).
    - `backoff_initial`, `backoff_max`: bounds in seconds of the reconnect delay (full jitter, doubling).
    - `ping_interval`, `ping_timeout`: keepalive pings and how long a pong may take before the link counts as dead.
    - `connect_timeout`: seconds the handshake and, with a token, the server's answer to `auth` may take.
    - `on_disconnect`: called with a `Disconnect` each time an open connection is lost.
    """

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource | None = None,
        buffer: int = 1000,
        backoff_initial: float = 0.5,
        backoff_max: float = 15.0,
        ping_interval: float = 15.0,
        ping_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        on_disconnect: Callable[[Disconnect], None] | None = None,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI as error:
            raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url!r}") from error
        if buffer < 1:
            raise ValueError(f"`buffer` is at least 1 event, not {buffer}")
        self.url = url
        self._token = token
        self._buffer = buffer
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._on_disconnect = on_disconnect
        self.status: Status = "connecting"
        self.disconnects = 0
        self.last_disconnect: Disconnect | None = None
        self._subs: dict[str, Subscription] = {}
        self._ids = itertools.count(1)
        self._refs = itertools.count(1)
        self._auth_waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ws: ClientConnection | None = None
        self._generation = 0
        self._ready = False
        self._failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._failing: str | None = None  # why the attempts in a row have been failing (logged once)

    # ------------------------------------------------------------------------------------- the program's side

    async def __aenter__(self) -> Client:
        self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (idempotent); `async with` calls it."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervised(), name=f"realtime.client {self.url}")

    async def close(self) -> None:
        """Close the connection and stop reconnecting; subscriptions end after their buffered events."""
        if self.status not in ("closed", "failed"):
            self._set_status("closed")
        for sub in list(self._subs.values()):
            sub.end(StopAsyncIteration(), "closed")
        self._subs.clear()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    def subscribe(
        self,
        table: str,
        *,
        filter: Sequence[Condition] = (),
        events: Sequence[Operation] | None = None,
        since: int | None = None,
        snapshot: bool = False,
        id: str | None = None,
    ) -> Subscription:
        """A subscription to open with `async with`; see docs/protocol.md "subscribe" for the fields.

        `since` resumes after a position the program stored; `snapshot=True` starts with the rows that match now.
        `id` defaults to a fresh one; a chosen one must not be in use on this client.
        """
        if self._failure is not None:
            raise self._failure
        sub_id = id if id is not None else f"s{next(self._ids)}"
        if not 1 <= len(sub_id) <= 64:
            raise ValueError(f"a subscription id has 1 to 64 characters, not {len(sub_id)}")
        if sub_id in self._subs:
            raise ValueError(f"subscription id {sub_id!r} is already in use on this client")
        return Subscription(
            self,
            sub_id,
            table,
            filter=filter,
            events=events,
            since=since,
            snapshot=snapshot,
            capacity=self._buffer,
            backoff=Backoff(self._backoff.initial, self._backoff.cap),
        )

    async def _open(self, sub: Subscription) -> None:
        if self._failure is not None:
            raise self._failure
        if self.status == "closed":
            raise RuntimeError("the client is closed")
        if sub.id in self._subs:
            raise ValueError(f"subscription id {sub.id!r} is already in use on this client")
        self._subs[sub.id] = sub
        self.start()
        if self._ready:
            await self._send_subscribe(sub)

    async def _close_subscription(self, sub: Subscription) -> None:
        if self._subs.get(sub.id) is not sub:
            return
        del self._subs[sub.id]
        was_sent = sub.sent_on == self._generation
        sub.end(StopAsyncIteration(), "closed")
        ws = self._ws
        if ws is not None and self._ready and was_sent:
            # (A closed connection's subscriptions are forgotten by the server anyway.)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "unsubscribe", "id": sub.id}))

    def _room_made(self) -> None:
        self._room.set()

    # --------------------------------------------------------------------------------- the connection loop

    async def _supervised(self) -> None:
        """The connection loop; a bug in it stops the client like any failure, so no iterator waits forever."""
        try:
            await self._run()
        except Exception as error:
            _log.exception("the connection loop died")
            self._fail(ClientError("internal", repr(error)))

    async def _run(self) -> None:
        while self._failure is None:
            await self._wait_for_room()
            ws: ClientConnection | None = None
            delay: float | None = None
            try:
                token = await fetch_token(self._token) if self._token is not None else None
                ws = await open_websocket(
                    self.url,
                    open_timeout=self._connect_timeout,
                    ping_interval=self._ping_interval,
                    ping_timeout=self._ping_timeout,
                    close_timeout=2.0,
                    max_size=None,  # snapshot chunks and rows are bounded by the server, not by a frame size here
                )
            except TokenUnavailable as error:
                self._attempt_failed(f"no token: {error}")
            except InvalidStatus as error:
                status = error.response.status_code
                if status != 429 and status < 500:
                    self._fail(ClientError("refused", f"{self.url} answered the upgrade with HTTP {status}"))
                    return
                delay = _retry_after(error.response.headers.get("Retry-After"))
                self._attempt_failed(f"the upgrade was answered with HTTP {status}")
            except (OSError, TimeoutError, InvalidHandshake) as error:
                self._attempt_failed(str(error) or type(error).__name__)
            if ws is not None:
                delay = await self._session(ws, token)
                if self._failure is not None:
                    return
            wait = self._backoff.next()
            if delay is not None:
                wait = max(wait, delay)
            self._set_status("reconnecting")
            _log.debug("reconnecting in %.2f s", wait)
            await asyncio.sleep(wait)

    async def _wait_for_room(self) -> None:
        """Hold the next connection until every subscription's buffer is at most half full, so that a program that
        stopped reading is not cut again at once."""
        while any(sub.buffered > sub.capacity // 2 for sub in self._subs.values()):
            self._room.clear()
            await self._room.wait()

    async def _session(self, ws: ClientConnection, token: str | None) -> float | None:
        """Serve one connection until it is lost; returns the least delay the server asked for before the next."""
        self._generation += 1
        self._ws = ws
        reader = self._reader = asyncio.create_task(self._read(ws), name="realtime.client reader")
        refresher: asyncio.Task[None] | None = None
        delay: float | None = None
        try:
            if token is not None:
                answer = await self._first_auth(ws, token, reader)
                if answer is None or self._failure is not None:
                    return None
                if answer["type"] != "authenticated":
                    delay = _hint(answer)  # `unavailable`: the server cannot check tokens right now
                    _log.warning("authentication unavailable: %s", answer.get("message"))
                    return delay
                if answer.get("exp") is not None:
                    refresher = asyncio.create_task(self._refreshing(ws, float(answer["exp"])))
            self._backoff.reset()
            self._ready = True
            self._set_status("live")
            for sub in list(self._subs.values()):
                await self._send_subscribe(sub)
            await asyncio.wait([reader])
            return delay
        except ConnectionClosed:
            await asyncio.wait([reader])
            return delay
        finally:
            self._ready = False
            self._ws = None
            tasks = [task for task in (refresher, reader) if task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sub in self._subs.values():
                if sub.retry_task is not None:
                    sub.retry_task.cancel()
                    sub.retry_task = None
                if sub.state != "failed":
                    sub.state = "pending"
            await ws.close()
            self._lost(ws)

    async def _first_auth(self, ws: ClientConnection, token: str, reader: asyncio.Task[None]) -> dict[str, Any] | None:
        """The server's answer to the connection's `auth` (None when the socket closed first or took too long)."""
        answer = asyncio.ensure_future(self._authenticate(ws, token))
        done, _ = await asyncio.wait([answer, reader], timeout=self._connect_timeout, return_when="FIRST_COMPLETED")
        if answer not in done:
            answer.cancel()
            if not done:
                _log.warning("no answer to auth within %.1f s", self._connect_timeout)
            return None
        try:
            frame = answer.result()
        except (_ConnectionLost, ConnectionClosed):
            return None
        if frame["type"] == "error" and frame.get("code") != "unavailable":
            self._fail(AuthenticationError(str(frame.get("code")), str(frame.get("message"))))
            return None
        return frame

    async def _authenticate(self, ws: ClientConnection, token: str) -> dict[str, Any]:
        """Send `auth` and return the answer (`authenticated` or `error`)."""
        ref = next(self._refs)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._auth_waiters[ref] = waiter
        try:
            await ws.send(json.dumps({"type": "auth", "ref": ref, "token": token}))
            return await waiter
        finally:
            self._auth_waiters.pop(ref, None)

    async def _refreshing(self, ws: ClientConnection, exp: float) -> None:
        """`_refresh`, whose failure stops the client instead of leaving a connection whose token will lapse."""
        try:
            await self._refresh(ws, exp)
        except Exception as error:
            _log.exception("refreshing the token failed")
            self._fail(ClientError("internal", repr(error)))

    async def _refresh(self, ws: ClientConnection, exp: float) -> None:
        """Send a fresh token before `exp`, for as long as the connection lasts."""
        assert self._token is not None
        previous: float | None = None
        while True:
            await asyncio.sleep(refresh_delay(exp, time.time(), previous))
            try:
                token = await fetch_token(self._token)
            except TokenUnavailable as error:
                _log.warning("cannot refresh the token: %s", error)
                previous = exp
                continue
            try:
                answer = await self._authenticate(ws, token)
            except (_ConnectionLost, ConnectionClosed):
                return
            if answer["type"] == "authenticated":
                if answer.get("exp") is None:
                    return
                previous, exp = exp, float(answer["exp"])
                _log.info("token refreshed; it expires at %d", exp)
            elif answer.get("code") == "unavailable":
                previous = exp
            else:
                self._fail(AuthenticationError(str(answer.get("code")), str(answer.get("message"))))
                return

    def _lost(self, ws: ClientConnection) -> None:
        code, reason = ws.close_code, ws.close_reason or ""
        found = _LAST_SEQ.search(reason)
        lost = Disconnect(code, reason, int(found.group(1)) if found else None)
        self.disconnects += 1
        self.last_disconnect = lost
        if self._failure is None and self.status != "closed":
            _log.warning("connection lost: %s %s", code, reason)
        if code == _CLOSE_UNAUTHENTICATED and reason.startswith("authentication required"):
            self._fail(AuthenticationError("unauthorized", f"the server closed the connection: {reason}"))
        if self._on_disconnect is not None:
            self._on_disconnect(lost)

    # ------------------------------------------------------------------------------------- frames and replies

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    raise ClientError("bad_frame", "the server sent a binary frame")
                frame = json.loads(message)
                if not isinstance(frame, dict):
                    raise ClientError("bad_frame", f"the server sent {message[:200]!r}")
                await self._dispatch(frame)
                if self._failure is not None:
                    return
        except ConnectionClosed:
            pass
        except (ClientError, ValueError, KeyError, TypeError) as error:
            failure = error if isinstance(error, ClientError) else ClientError("bad_frame", repr(error))
            self._fail(failure)
        finally:
            for waiter in self._auth_waiters.values():
                if not waiter.done():
                    waiter.set_exception(_ConnectionLost())

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "change":
            sub = self._subs.get(frame["id"])
            if sub is not None:
                await sub.on_change(frame)
        elif kind == "snapshot":
            sub = self._subs.get(frame["id"])
            if sub is not None:
                await sub.on_snapshot(frame)
        elif kind == "subscribed":
            sub = self._subs.get(frame["id"])
            if sub is not None:
                sub.on_subscribed(frame)
                _log.info("subscription %s to %s live from seq %s", sub.id, sub.table, sub.seq)
        elif kind in ("authenticated", "error") and frame.get("ref") in self._auth_waiters:
            waiter = self._auth_waiters.pop(frame["ref"])
            if not waiter.done():
                waiter.set_result(frame)
        elif kind == "error":
            await self._on_error(frame)
        # `pong` and `unsubscribed` need nothing.

    async def _on_error(self, frame: dict[str, Any]) -> None:
        code, message = str(frame.get("code")), str(frame.get("message", ""))
        if code == "unauthorized":
            self._fail(AuthenticationError(code, message))
            return
        sub = self._subs.get(frame["id"]) if isinstance(frame.get("id"), str) else None
        if sub is None:
            if code != "not_subscribed":
                _log.warning("error from the server: %s: %s", code, message)
            return
        if code == "cursor_expired":
            _log.warning("subscription %s: %s; starting over from a snapshot", sub.id, message)
            await sub.on_cursor_expired(message)
            await self._send_subscribe(sub, again=True)
        elif code in ("unavailable", "rate_limited"):
            delay = max(_hint(frame) or 0.0, sub.retry_backoff.ceiling()) * (1 + random.random() / 2)
            sub.retry_backoff.attempt += 1
            sub.state = "retrying"
            _log.warning("subscription %s: %s; asking again in %.2f s", sub.id, message, delay)
            sub.retry_task = asyncio.create_task(self._retry(sub, self._generation, delay))
        else:
            del self._subs[sub.id]
            _log.error("subscription %s refused: %s: %s", sub.id, code, message)
            sub.end(SubscriptionError(code, message), "failed")

    async def _retry(self, sub: Subscription, generation: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._generation == generation and self._subs.get(sub.id) is sub:
            sub.retry_task = None
            await self._send_subscribe(sub, again=True)

    async def _send_subscribe(self, sub: Subscription, *, again: bool = False) -> None:
        """Send `sub` on the current connection: once per connection, or again after a refusal to retry."""
        ws = self._ws
        if ws is None or not self._ready or (sub.sent_on == self._generation and not again):
            return
        sub.sent_on = self._generation
        sub.state = "pending"
        with contextlib.suppress(ConnectionClosed):  # it is sent again on the next connection
            await ws.send(json.dumps({**sub.request(), "ref": next(self._refs)}))

    def _fail(self, error: BaseException) -> None:
        """Stop for good: every subscription's iterator raises `error` after its buffered events."""
        if self._failure is not None or self.status == "closed":
            return
        self._failure = error
        self._set_status("failed")
        _log.error("stopped: %s", error)
        for sub in list(self._subs.values()):
            sub.end(error, "failed")
        self._subs.clear()
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            reader.cancel()

    def _attempt_failed(self, why: str) -> None:
        """Log a failed attempt once per reason in a row: a server that stays down is one line, not one a try."""
        if why != self._failing:
            _log.warning("cannot connect to %s: %s; retrying", self.url, why)
            self._failing = why
        else:
            _log.debug("cannot connect to %s: %s; retrying", self.url, why)

    def _set_status(self, status: Status) -> None:
        if status == self.status:
            return
        if status == "live" and self.status == "reconnecting":
            # Paired with the warning about the loss, so that a log that shows the loss shows the recovery.
            _log.warning("connected again to %s", self.url)
        elif status == "live":
            _log.info("connected to %s", self.url)
        if status == "live":
            self._failing = None
        self.status = status


def _hint(frame: dict[str, Any]) -> float | None:
    """A frame's `retry_after_ms` in seconds (capped), or None."""
    hint = frame.get("retry_after_ms")
    return min(hint / 1000, _MAX_HINT_S) if isinstance(hint, int | float) and hint >= 0 else None


def _retry_after(header: str | None) -> float | None:
    try:
        return min(float(header), _MAX_HINT_S) if header is not None else None
    except ValueError:
        return None


# `async with connect(url, token=...) as client:` reads as what it does; the options are `Client`'s.
connect = Client
