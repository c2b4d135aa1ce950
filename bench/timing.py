"""Repeated timing: every figure is the median of several repeats.

A repeat runs a body ``n`` times, ``n`` chosen once (by a short calibration run)
so that one repeat lasts at least ``min_repeat_s``: timer resolution and the cost
of the timing loop itself then vanish beside the work measured.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

# The calibration run stops once it has taken this share of a repeat; the loop
# count is then scaled up to fill a whole repeat with some margin.
_CALIBRATION_SHARE = 0.25
_MARGIN = 1.2


class Timing(NamedTuple):
    """A repeated measurement.

    Attributes:
        median_s: Median over repeats of the time per iteration, in seconds.
        repeats_s: Time per iteration of every repeat, in seconds.
        iterations: Iterations per repeat.
        repeat_s: Median wall time of one repeat, in seconds.
    """

    median_s: float
    repeats_s: tuple[float, ...]
    iterations: int
    repeat_s: float

    @property
    def rate_hz(self) -> float:
        """Iterations per second at the median."""
        return 1.0 / self.median_s

    def to_dict(self) -> dict:
        return {"median_s": self.median_s, "repeats_s": list(self.repeats_s),
                "iterations": self.iterations, "repeat_s": self.repeat_s}


def calibrate_iterations(run: Callable[[int], None], min_repeat_s: float) -> int:
    """Iterations of ``run`` that take at least ``min_repeat_s`` (about 1.2 times).

    Args:
        run: ``run(n)`` performs n iterations.
        min_repeat_s: Least duration of one repeat, in seconds.
    """
    n = 1
    while True:
        started = time.perf_counter()
        run(n)
        elapsed = time.perf_counter() - started
        if elapsed >= min_repeat_s * _CALIBRATION_SHARE or n >= 1 << 30:
            per_iteration = elapsed / n
            return max(1, math.ceil(min_repeat_s * _MARGIN / max(per_iteration, 1e-9)))
        n *= 4


def time_repeated(run: Callable[[int], None], repeats: int,
                  min_repeat_s: float) -> Timing:
    """Times ``run`` over ``repeats`` repeats of at least ``min_repeat_s`` each.

    Args:
        run: ``run(n)`` performs n iterations; it is called once to calibrate
            (which also warms caches), then once per repeat.
        repeats: Number of timed repeats (>= 1).
        min_repeat_s: Least duration of one repeat, in seconds.

    Returns:
        The median time per iteration and every repeat's.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    n = calibrate_iterations(run, min_repeat_s)
    per_iteration = []
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(n)
        wall = time.perf_counter() - started
        walls.append(wall)
        per_iteration.append(wall / n)
    return Timing(statistics.median(per_iteration), tuple(per_iteration), n,
                  statistics.median(walls))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics.

    Raises:
        ValueError: ``values`` is empty or q is outside 0..100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in 0..100, got {q!r}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
