"""Percentiles and the small arithmetic every scenario shares."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentiles(samples: Iterable[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus max, in the samples' unit; empty input gives NaN."""
    ordered = sorted(samples)
    out: dict[str, float] = {}
    for p in points:
        key = f"p{p:g}"
        if not ordered:
            out[key] = math.nan
            continue
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        out[key] = ordered[rank - 1]
    out["max"] = ordered[-1] if ordered else math.nan
    return out


def first_and_spread(commits: Iterable[float], latencies: Iterable[float]) -> tuple[list[float], list[float]]:
    """Per change (named by its commit time): its first delivery's latency, and how long its last one came after.

    The median latency is roughly first + spread / 2: how fast a change reaches the server's first subscriber
    and how long one change takes to go out to all of them are different limits, and this tells them apart.
    """
    by_change: dict[float, list[float]] = {}
    for commit, latency in zip(commits, latencies, strict=True):
        span = by_change.get(commit)
        if span is None:
            by_change[commit] = [latency, latency]
        elif latency < span[0]:
            span[0] = latency
        elif latency > span[1]:
            span[1] = latency
    return [lo for lo, _ in by_change.values()], [hi - lo for lo, hi in by_change.values()]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(denominator):
        return None
    if math.isnan(numerator):
        return None
    return numerator / denominator


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def per_thousand(seconds: float, count: int) -> float | None:
    return seconds / count * 1000 if count else None
