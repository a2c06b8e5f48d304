"""A token bucket: how many frames a connection may send, refilled continuously.

Written here rather than taken from `limits`: its in-memory storage keys state by string, expires it from a
`threading.Timer` restarted every 10 ms while hits arrive, and takes a lock per hit. A connection's budget lives
and dies with the connection, so two floats on the session are all the state it needs.
"""

from __future__ import annotations

import time


class TokenBucket:
    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def rested(self) -> bool:
        """The client kept to the rate long enough to refill its whole burst (as of its last frame)."""
        return self._tokens >= self._burst - 1

    def wait_ms(self) -> int:
        """Milliseconds until the next token."""
        return max(1, int((1 - self._tokens) / self._rate * 1000) + 1)
