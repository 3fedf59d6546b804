"""What keeps a sick bank from hurting the others: jittered exponential backoff, a retry budget,
a circuit breaker and a bulkhead per bank. Plain classes, no gRPC; time comes from the
injected clock (open intervals, budget windows), so tests move it instead of waiting."""

from __future__ import annotations

import asyncio
import enum
import random
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cardcheck.runtime.clock import Clock


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `max_attempts` attempts in all; before attempt n+1 a pause drawn uniformly from
    [0, min(max_backoff_s, base_backoff_s * multiplier**(n-1))] ("full jitter")."""

    max_attempts: int = 3
    base_backoff_s: float = 0.025
    max_backoff_s: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must not be negative and the multiplier at least 1")

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff_s, self.base_backoff_s * self.multiplier ** (attempt - 1))
        return rng.uniform(0, ceiling)


class RetryBudget:
    """Retries allowed over a sliding window: at most `floor` plus `ratio` of the first
    attempts made in it. A bank that fails everything gets ~ratio more load, never a multiple."""

    def __init__(self, clock: Clock, *, ratio: float = 0.1, floor: int = 10, window: timedelta = timedelta(seconds=10),
                 buckets: int = 10) -> None:
        self._clock = clock
        self.ratio = ratio
        self.floor = floor
        self._bucket_span = window / buckets
        self._window = self._bucket_span * buckets
        self._buckets: deque[list[Any]] = deque(maxlen=buckets)  # [start, first attempts, retries]

    def _current(self) -> list[Any]:
        now = self._clock.now()
        if not self._buckets or now - self._buckets[-1][0] >= self._bucket_span:
            self._buckets.append([now, 0, 0])
        return self._buckets[-1]

    def _totals(self) -> tuple[int, int]:
        oldest = self._clock.now() - self._window
        calls = retries = 0
        for start, first, again in self._buckets:
            if start > oldest:
                calls += first
                retries += again
        return calls, retries

    def record_call(self) -> None:
        self._current()[1] += 1

    def try_retry(self) -> bool:
        """Takes one retry from the budget, or says there is none left."""
        calls, retries = self._totals()
        if retries >= self.floor + self.ratio * calls:
            return False
        self._current()[2] += 1
        return True


class BreakerState(enum.Enum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@dataclass(frozen=True)
class BreakerPolicy:
    """Opens after `consecutive_failures` failures in a row, or when at least `min_calls` of
    the last `window` calls ended and `failure_rate` of them failed. Stays open `open_for`,
    then lets `probes` calls through (half-open): a success closes it, a failure reopens it."""

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    open_for: timedelta = timedelta(seconds=5)
    probes: int = 1


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at: datetime | None = None
        self._consecutive = 0
        self._recent: deque[bool] = deque(maxlen=policy.window)
        self._probing = 0
        self.rejected = 0  # calls failed fast since start
        self.openings = 0

    @property
    def state(self) -> BreakerState:
        opened_at = self._opened_at
        if self._state is BreakerState.OPEN and opened_at is not None and self._clock.now() - opened_at >= self.policy.open_for:
            self._state = BreakerState.HALF_OPEN
            self._probing = 0
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the bank now. An allowed call must end in exactly one of
        record_success, record_failure or record_neutral."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probing < self.policy.probes:
            self._probing += 1
            return True
        self.rejected += 1
        return False

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock.now()
        self._consecutive = 0
        self._recent.clear()
        self.openings += 1

    def record_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
            self._recent.clear()
        self._consecutive = 0
        self._recent.append(True)

    def record_failure(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._open()
            return
        if self._state is BreakerState.OPEN:  # a call let through before it opened
            return
        self._consecutive += 1
        self._recent.append(False)
        failures = self._recent.count(False)
        policy = self.policy
        if self._consecutive >= policy.consecutive_failures or (
            len(self._recent) >= policy.min_calls and failures >= policy.failure_rate * len(self._recent)
        ):
            self._open()

    def record_neutral(self) -> None:
        """A call that says nothing about the bank's health (e.g. the caller went away)."""
        if self._state is BreakerState.HALF_OPEN:
            self._probing = max(0, self._probing - 1)


class Bulkhead:
    """At most `limit` calls to one bank at once; the rest wait their turn (within their
    deadline), so a slow bank ties up its own slots and never the other banks'."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a bulkhead needs at least one slot")
        self.limit = limit
        self._semaphore = asyncio.Semaphore(limit)
        self.waiting = 0
        self.full_timeouts = 0  # calls that waited their whole deadline for a slot

    @property
    def in_use(self) -> int:
        return self.limit - self._semaphore._value  # noqa: SLF001 - the semaphore keeps the count

    def try_acquire(self) -> bool:
        """A slot at once, without waiting, or False."""
        if self._semaphore.locked():
            return False
        self._semaphore._value -= 1  # noqa: SLF001 - what Semaphore.acquire does when a slot is free
        return True

    async def acquire(self, timeout_s: float) -> bool:
        """A slot within `timeout_s`, or False."""
        if not self._semaphore.locked():
            await self._semaphore.acquire()
            return True
        self.waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), timeout_s)
            return True
        except TimeoutError:
            self.full_timeouts += 1
            return False
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._semaphore.release()
