"""Reconnect and retry delays: capped exponential backoff with full jitter.

Each delay is drawn uniformly from [0, min(cap, initial * 2**attempt)], so clients that lost the same server at
the same instant do not come back at the same instant.
"""

from __future__ import annotations

import random

# 2**30 times any sane initial delay is past any sane cap; the exponent stops growing there.
_MAX_EXPONENT = 30


class Backoff:
    def __init__(self, initial: float, cap: float) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"backoff needs 0 < initial <= cap, not {initial} and {cap}")
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def ceiling(self) -> float:
        """The current attempt's upper bound, before jitter."""
        return float(min(self.cap, self.initial * 2 ** min(self.attempt, _MAX_EXPONENT)))

    def next(self) -> float:
        """The delay before the next attempt; each call counts one more attempt."""
        delay = random.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """The server answered: the next loss starts from the shortest delay again."""
        self.attempt = 0
