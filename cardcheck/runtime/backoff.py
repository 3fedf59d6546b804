"""The one retry backoff: exponential with full jitter under a cap.

Attempt n (1-based) failed: the ceiling is base * 2^(n-1), at most max_s, and the wait is drawn
uniformly from [0, ceiling]. Full jitter spreads replicas retrying the same outage over the
whole window instead of bunching them at its top. The rng is injected so tests can draw the
same waits as the code under test, and instants come from the injected clock."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from cardcheck.runtime.clock import Clock

_MAX_EXPONENT = 40  # 2^40 times any sane base is past every cap: no float overflow


class Backoff:
    def __init__(self, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError("a backoff needs 0 < base_s <= max_s")
        self.base_s = base_s
        self.max_s = max_s
        self._rng = rng or random.Random()

    def ceiling(self, attempts: int) -> float:
        """The longest wait after `attempts` failed attempts, in seconds."""
        return min(self.max_s, self.base_s * 2.0 ** max(0, min(attempts - 1, _MAX_EXPONENT)))

    def delay(self, attempts: int) -> timedelta:
        return timedelta(seconds=self._rng.uniform(0.0, self.ceiling(attempts)))

    __call__ = delay

    def next_at(self, clock: Clock, attempts: int, *, until: datetime | None = None) -> datetime:
        """When the next attempt is due: a drawn wait from now, never past `until`."""
        due = clock.now() + self.delay(attempts)
        return min(due, until) if until is not None else due

    def __eq__(self, other: object) -> bool:  # settings compare by their numbers, not their rng
        return isinstance(other, Backoff) and (self.base_s, self.max_s) == (other.base_s, other.max_s)

    def __hash__(self) -> int:
        return hash((self.base_s, self.max_s))

    def __repr__(self) -> str:
        return f"Backoff(base_s={self.base_s}, max_s={self.max_s})"
