"""When journeys are due: an open-loop Poisson process, so the offered load never waits for the
system under test (a closed loop slows down with it and hides its latency).

The rate rises linearly from 0 to `rate` over the first `ramp` seconds, then holds. Arrivals
come from exponential gaps of mean 1 in the expected count Λ(t) = ∫ rate(s) ds, mapped back
to time through Λ⁻¹: an exact non-homogeneous Poisson process, no thinning."""

from __future__ import annotations

import math
import random


def expected_arrivals(rate: float, duration: float, ramp: float = 0.0) -> float:
    """Λ(duration): how many journeys the schedule offers on average."""
    return _cumulative(rate, ramp, duration)


def _cumulative(rate: float, ramp: float, t: float) -> float:
    if t < ramp:
        return rate * t * t / (2 * ramp)
    return rate * (t - ramp / 2)


def _inverse(rate: float, ramp: float, count: float) -> float:
    if count < rate * ramp / 2:
        return math.sqrt(2 * ramp * count / rate)
    return count / rate + ramp / 2


def arrival_offsets(rate: float, duration: float, ramp: float = 0.0, rng: random.Random | None = None) -> list[float]:
    """Seconds from the start of the run at which each journey is due, ascending, all below
    `duration`."""
    if not rate > 0 or not duration > 0 or not 0 <= ramp <= duration:
        raise ValueError("rate and duration above 0, ramp from 0 to the duration")
    rng = rng or random.Random()
    total = expected_arrivals(rate, duration, ramp)
    offsets: list[float] = []
    count = rng.expovariate(1.0)
    while count < total:
        offsets.append(_inverse(rate, ramp, count))
        count += rng.expovariate(1.0)
    return offsets
