"""The gateway's own metrics: each rate-limit decision by limit and outcome, load shed, whether
the limits' Redis answers, and the sessions alive (read from the database at each scrape,
cached briefly). Refusals by reason are counted for every service (cardcheck_refusals_total)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, false, func, select

from cardcheck.runtime.clock import Clock
from cardcheck.runtime.database import table_of
from gateway.limits import Limiters, LimiterUnavailable, RateLimiter
from gateway.sessions import SessionRow
from gateway.tracing import Shedding

SCRAPE_CACHE_S = 2.0
_SESSIONS = table_of(SessionRow)


class CountedLimiter:
    """A limiter whose every decision is counted: allowed, refused (over the limit) or
    unavailable (the limit could not be asked: Redis down and no fallback)."""

    def __init__(self, limiter: RateLimiter, limit: str) -> None:
        self._limiter = limiter
        self.limit = limit
        # plain counts, on the event loop's thread (read by the scrape's)
        self.allowed = self.refused = self.unavailable = 0

    async def acquire(self, key: str, cost: float = 1) -> timedelta | None:
        try:
            wait = await self._limiter.acquire(key, cost)
        except LimiterUnavailable:
            self.unavailable += 1
            raise
        if wait is None:
            self.allowed += 1
        else:
            self.refused += 1
        return wait


def counted(limiters: Limiters) -> Limiters:
    """`limiters` with every decision counted (GatewayState exposes the counts)."""
    changes: dict[str, Any] = {
        field.name: CountedLimiter(getattr(limiters, field.name), field.name)
        for field in dataclasses.fields(limiters) if field.name != "store"
    }
    return dataclasses.replace(limiters, **changes)


class GatewayState(Collector):
    def __init__(self, engine: Engine, clock: Clock, shedding: Shedding, limiters: Limiters) -> None:
        self._engine = engine
        self._clock = clock
        self._shedding = shedding
        self._store = limiters.store
        self._counted = [limiter for limiter in vars(limiters).values() if isinstance(limiter, CountedLimiter)]
        self._lock = threading.Lock()
        self._sessions: tuple[float, int] | None = None

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "cardcheck_gateway_limit_decisions", "Rate-limit decisions, by limit and outcome "
            "(allowed, refused, unavailable).", labels=("limit", "outcome"))
        for limiter in self._counted:
            decisions.add_metric((limiter.limit, "allowed"), limiter.allowed)
            decisions.add_metric((limiter.limit, "refused"), limiter.refused)
            decisions.add_metric((limiter.limit, "unavailable"), limiter.unavailable)
        yield decisions
        yield CounterMetricFamily(
            "cardcheck_gateway_load_shed", "SubmitQuery calls refused by admission (the global limit).",
            value=self._shedding.refused)
        yield GaugeMetricFamily(
            "cardcheck_gateway_shedding", "1 while the gateway sheds SubmitQuery load, else 0.",
            value=int(self._shedding.active))
        yield GaugeMetricFamily(
            "cardcheck_gateway_limits_shared", "1 when the rate limits live on Redis, 0 when in this process.",
            value=int(self._store is not None))
        yield GaugeMetricFamily(
            "cardcheck_gateway_redis_fallback", "1 while Redis is unreachable (per-user limits counted in "
            "this process, SubmitQuery shed), else 0.",
            value=int(self._store is not None and self._store.unreachable))
        yield GaugeMetricFamily(
            "cardcheck_gateway_sessions_active", "Sessions signed in, neither expired nor revoked.",
            value=self._active_sessions())

    def _active_sessions(self) -> int:
        with self._lock:
            if self._sessions is None or time.monotonic() - self._sessions[0] >= SCRAPE_CACHE_S:
                with self._engine.connect() as connection:
                    count = connection.execute(
                        select(func.count()).select_from(_SESSIONS).where(
                            _SESSIONS.c.revoked == false(), _SESSIONS.c.expires_at > self._clock.now())
                    ).scalar_one()
                self._sessions = (time.monotonic(), int(count))
            return self._sessions[1]
