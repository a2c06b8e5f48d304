"""Bearer tokens for the client: where they come from, and when an open connection asks for a fresh one."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TypeAlias

# A fixed token, or a function (plain or async) asked on every connection and before each expiry.
TokenSource: TypeAlias = str | Callable[[], str | Awaitable[str]]

# A token is refreshed at this fraction of its remaining life, or this many seconds before `exp` if that is
# earlier; never sooner than the floor after the previous answer, whatever the token says.
REFRESH_AT = 0.8
REFRESH_MARGIN_S = 30.0
REFRESH_FLOOR_S = 1.0


class TokenUnavailable(Exception):
    """The token source raised, or gave something other than a non-empty string."""


async def fetch_token(source: TokenSource) -> str:
    if isinstance(source, str):
        return source
    try:
        value = source()
        if inspect.isawaitable(value):
            value = await value
    except Exception as error:
        raise TokenUnavailable(f"the token source raised {error!r}") from error
    if not isinstance(value, str) or not value:
        raise TokenUnavailable(f"the token source gave {type(value).__name__}, not a non-empty string")
    return value


def refresh_delay(exp: float, now: float, previous_exp: float | None) -> float:
    """Seconds until an open connection should send a fresh token, given the current one's `exp`.

    A source that handed back a token living no longer than the last one is asked again after half the remaining
    time: if nothing better comes, the server closes the connection at `exp` and the reconnect asks again.
    """
    remaining = exp - now
    if previous_exp is not None and exp <= previous_exp:
        return max(REFRESH_FLOOR_S, remaining / 2)
    return max(REFRESH_FLOOR_S, min(remaining * REFRESH_AT, remaining - REFRESH_MARGIN_S))
