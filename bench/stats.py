"""The benchmark's arithmetic: percentiles, medians of rounds and ratios, kept apart so that they are tested alone."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


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


def _paired(values: Sequence[float], baselines: Sequence[float]) -> None:
    if not values:
        raise ValueError("no rounds to pair")
    if len(values) != len(baselines):
        raise ValueError(f"{len(values)} rounds paired with {len(baselines)} baseline rounds")


def median_of_ratios(values: Sequence[float], baselines: Sequence[float]) -> float | None:
    """The median over rounds of value / baseline, each round's value over the same round's baseline (None when a
    baseline is zero). Rounds interleave the ways, so a ratio within a round compares ways measured under the same
    state of the machine; the median of those ratios drops a round that drift hit, where a ratio of medians mixes
    rounds."""
    _paired(values, baselines)
    ratios = [ratio(value, baseline) for value, baseline in zip(values, baselines, strict=True)]
    known = [value for value in ratios if value is not None]
    return median(known) if len(known) == len(ratios) else None


def median_of_differences(values: Sequence[float], baselines: Sequence[float]) -> float:
    """The median over rounds of value - baseline, each round against the same round's baseline: what a way adds
    over another, measured side by side (see median_of_ratios)."""
    _paired(values, baselines)
    return median([value - baseline for value, baseline in zip(values, baselines, strict=True)])


def alternating(items: Sequence[T], round_number: int) -> list[T]:
    """The order of the ways in round `round_number` (0-based): as given in even rounds, reversed in odd ones
    (A B C, C B A, A B C, ...), so that over a pair of rounds each way runs as often early as late and a steady drift
    of the machine weighs on every way alike."""
    return list(items) if round_number % 2 == 0 else list(reversed(items))
