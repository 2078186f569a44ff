"""The benchmark's arithmetic: percentiles, medians of rounds and ratios, kept apart so that they are tested alone."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value that at least `share` (0 < share <= 1) of `values` do not
    exceed. Nearest rank rather than interpolation, so the figure reported is a latency that was measured."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < share <= 1:
        raise ValueError(f"percentile share must be in (0, 1], not {share}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return statistics.median(values)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing or the baseline is zero (nothing to compare with)."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def mib_per_second(size_bytes: int, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"a transfer cannot take {seconds} s")
    return size_bytes / (1024 * 1024) / seconds
