"""Single-use tickets that open one SSE stream for a browser, whose EventSource cannot send headers.

A bearer token must never travel in a URL (URLs land in proxy, server and browser-history logs), and a token is
long-lived. A ticket is: `POST /sse/tickets` with the token returns a random value that stands for the token's
identity; it is good once, for SSE_TICKET_TTL_S. Tickets live in the database (`realtime.sse_tickets`, this
module's SQL only), so that any process of any server can redeem one, and only one can.

Lifecycle of a ticket:
    issued    a row holding the SHA-256 of the ticket, the identity and its deadline; issuing first sweeps
              the expired rows, and is refused while MAX_OUTSTANDING unexpired tickets wait
    redeemed  the first GET that presents it deletes the row: a second use, in any process, finds nothing
    expired   past its deadline it is refused like an unknown one, and swept by the next issue
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import orjson

from realtime.auth.tokens import Identity

# Unused tickets at once (per database): each is a row of a few hundred bytes, and only an authenticated caller
# can ask for one.
MAX_OUTSTANDING = 10_000

_ISSUE = """
WITH swept AS (DELETE FROM realtime.sse_tickets WHERE expires_at <= now())
INSERT INTO realtime.sse_tickets (digest, identity, expires_at)
SELECT $1, $2::jsonb, now() + make_interval(secs => $3)
WHERE (SELECT count(*) FROM realtime.sse_tickets WHERE expires_at > now()) < $4
RETURNING 1
"""
_REDEEM = "DELETE FROM realtime.sse_tickets WHERE digest = $1 RETURNING identity::text, expires_at > now()"

Connect = Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]


class TicketError(Exception):
    """A ticket that opens nothing: never issued, already used, or expired."""


class TicketsFull(Exception):
    """MAX_OUTSTANDING tickets are waiting to be used."""


class Tickets:
    def __init__(self, connect: Connect, ttl_s: float, max_outstanding: int = MAX_OUTSTANDING) -> None:
        self._connect = connect  # a pooled connection, held for one statement
        self.ttl_s = ttl_s
        self._max = max_outstanding

    async def issue(self, identity: Identity | None) -> str:
        """A new ticket for `identity` (None on an open server); the database's errors are raised as they are."""
        ticket = secrets.token_urlsafe(32)
        async with self._connect() as conn:
            issued = await conn.fetchval(_ISSUE, _digest(ticket), _dump(identity), self.ttl_s, self._max)
        if issued is None:
            raise TicketsFull(f"{self._max} tickets are waiting to be used; retry shortly")
        return ticket

    async def redeem(self, ticket: str) -> Identity | None:
        """The identity a ticket stands for, taking it out; TicketError if it opens nothing."""
        async with self._connect() as conn:
            row = await conn.fetchrow(_REDEEM, _digest(ticket))
        if row is None or not row[1]:
            raise TicketError("unknown, already used or expired ticket: get a new one from POST /sse/tickets")
        return _load(row[0])


def _digest(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode()).digest()


def _dump(identity: Identity | None) -> str | None:
    if identity is None:
        return None
    fields = {"sub": identity.sub, "role": identity.role, "exp": identity.exp, "claims": dict(identity.claims)}
    return orjson.dumps(fields).decode()


def _load(text: str | None) -> Identity | None:
    if text is None:
        return None
    fields: dict[str, Any] = orjson.loads(text)
    return Identity(sub=fields["sub"], role=fields["role"], exp=fields["exp"], claims=fields["claims"])
