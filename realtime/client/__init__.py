"""A Python client for realtime's WebSocket stream (docs/protocol.md), built on `websockets` and asyncio.

    async with realtime.client.connect("ws://127.0.0.1:8000/ws", token=get_token) as rt:
        async with rt.subscribe("users", filter=[("email", "eq", "a@b.c")], snapshot=True) as sub:
            async for event in sub:  # Snapshot, Change or Reset
                ...

It reconnects with capped, jittered backoff and resumes every subscription from its own last position, so the
program sees every committed change once, in order, across server restarts, 4008 cuts and network drops; a gap it
cannot replay shows as a `Reset` followed by a fresh `Snapshot`. See docs/client.md, "Python".
"""

from realtime.client.connection import Client, Disconnect, Status, connect
from realtime.client.events import (
    AuthenticationError,
    Change,
    ClientError,
    Event,
    RealtimeError,
    Reset,
    Row,
    Snapshot,
    SubscriptionError,
)
from realtime.client.subscription import Condition, FilterOp, Operation, Subscription
from realtime.client.tokens import TokenSource
from realtime.client.view import View

__all__ = [
    "AuthenticationError",
    "Change",
    "Client",
    "ClientError",
    "Condition",
    "Disconnect",
    "Event",
    "FilterOp",
    "Operation",
    "RealtimeError",
    "Reset",
    "Row",
    "Snapshot",
    "Status",
    "Subscription",
    "SubscriptionError",
    "TokenSource",
    "View",
    "connect",
]
