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
