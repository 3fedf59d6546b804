"""Rate limiting behind one small seam, so a shared store (Redis, for several gateway replicas)
can replace the in-process buckets without the callers changing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cardcheck.runtime.clock import Clock


class RateLimiter(Protocol):
    async def acquire(self, key: str, cost: float = 1) -> timedelta | None:
        """Takes `cost` tokens from `key`'s bucket: None when allowed, else how long to wait."""
        ...


@dataclass
class _Bucket:
    tokens: float
    updated: datetime


class TokenBucketLimiter:
    """In-process token buckets, one per key: `burst` tokens, refilled at `rate` per second.

    Time comes from the clock. Idle buckets (full again) are dropped once there are many, so
    per-user keys do not grow memory without bound."""

    def __init__(self, rate: float, burst: float, clock: Clock, *, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._lock = asyncio.Lock()

    def _refilled(self, bucket: _Bucket, now: datetime) -> float:
        elapsed = max((now - bucket.updated).total_seconds(), 0.0)
        return min(self.burst, bucket.tokens + elapsed * self.rate)

    def _prune(self, now: datetime) -> None:
        full = [key for key, b in self._buckets.items() if self._refilled(b, now) >= self.burst]
        for key in full:
            del self._buckets[key]

    async def acquire(self, key: str, cost: float = 1) -> timedelta | None:
        async with self._lock:
            now = self._clock.now()
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self._max_keys:
                    self._prune(now)
                bucket = self._buckets[key] = _Bucket(self.burst, now)
            tokens = self._refilled(bucket, now)
            bucket.updated = now
            if tokens >= cost:
                bucket.tokens = tokens - cost
                return None
            bucket.tokens = tokens
            return timedelta(seconds=(cost - tokens) / self.rate)
