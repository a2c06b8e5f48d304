"""Single-use tickets that open one SSE stream for a browser, whose EventSource cannot send headers.

A bearer token must never travel in a URL (URLs land in proxy, server and browser-history logs), and a token is
long-lived. A ticket is: `POST /sse/tickets` with the token returns a random value that stands for the token's
identity; it is good once, for SSE_TICKET_TTL_S, in the process that issued it.

Lifecycle of a ticket:
    issued    kept in this process's table with the identity and its deadline; at most MAX_OUTSTANDING at once
              (expired ones are swept when the table is full), beyond that issuing is refused
    redeemed  taken out of the table by the first GET that presents it: a second use finds nothing
    expired   past its deadline it is refused like an unknown one, and swept
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from realtime.auth.tokens import Identity

# Outstanding tickets per process: each is a few hundred bytes, and only an authenticated caller can ask for one.
MAX_OUTSTANDING = 10_000


class TicketError(Exception):
    """A ticket that opens nothing: never issued here, already used, or expired."""


class TicketsFull(Exception):
    """MAX_OUTSTANDING tickets are waiting to be used."""


@dataclass(frozen=True, slots=True)
class _Issued:
    identity: Identity | None
    deadline: float


class Tickets:
    def __init__(self, ttl_s: float, max_outstanding: int = MAX_OUTSTANDING) -> None:
        self.ttl_s = ttl_s
        self._max = max_outstanding
        self._issued: dict[str, _Issued] = {}

    def issue(self, identity: Identity | None) -> str:
        now = time.monotonic()
        if len(self._issued) >= self._max:
            self._issued = {ticket: i for ticket, i in self._issued.items() if i.deadline > now}
            if len(self._issued) >= self._max:
                raise TicketsFull(f"{self._max} tickets are waiting to be used; retry shortly")
        ticket = secrets.token_urlsafe(32)
        self._issued[ticket] = _Issued(identity, now + self.ttl_s)
        return ticket

    def redeem(self, ticket: str) -> Identity | None:
        issued = self._issued.pop(ticket, None)
        if issued is None or issued.deadline <= time.monotonic():
            raise TicketError("unknown, already used or expired ticket: get a new one from POST /sse/tickets")
        return issued.identity
