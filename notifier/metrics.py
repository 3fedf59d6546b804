"""notifier's own metrics: each delivery attempt by kind and outcome and the provider's latency
(measured around the provider the delivery worker calls), and the outbox (messages still
QUEUED, and the oldest one's age) read from the database at each scrape, cached briefly."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import table_of
from cardcheck.runtime.metrics import ServiceMetrics
from notifier.messages import QUEUED, MessageRow
from notifier.providers import DeliveryError, OutgoingSms, SmsProvider

PROVIDER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCRAPE_CACHE_S = 2.0
_MESSAGES = table_of(MessageRow)


class MeasuredProvider(SmsProvider):
    """The provider, each delivery counted (DELIVERED, RETRYABLE or PERMANENT failure) and
    timed. Labels are the message's kind and the provider's name, never the phone."""

    def __init__(self, provider: SmsProvider, metrics: ServiceMetrics) -> None:
        self._provider = provider
        self.name = provider.name
        self._deliveries = Counter(
            "cardcheck_sms_deliveries", "SMS delivery attempts, by kind, provider and outcome "
            "(DELIVERED, RETRYABLE or PERMANENT failure).", ("kind", "provider", "outcome"),
            registry=metrics.registry)
        self._latency = Histogram(
            "cardcheck_sms_provider_seconds", "How long the SMS provider took to take one message, in seconds.",
            ("provider",), buckets=PROVIDER_BUCKETS, registry=metrics.registry).labels(provider.name)

    @property
    def delivers_by_recording(self) -> bool:
        return self._provider.delivers_by_recording

    async def deliver(self, sms: OutgoingSms) -> None:
        started = time.perf_counter()
        outcome = "PERMANENT"
        try:
            await self._provider.deliver(sms)
            outcome = "DELIVERED"
        except DeliveryError as error:
            outcome = "RETRYABLE" if error.retryable else "PERMANENT"
            raise
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        except Exception:
            outcome = "RETRYABLE"  # the delivery worker retries any other exception
            raise
        finally:
            self._latency.observe(time.perf_counter() - started)
            self._deliveries.labels(sms.kind, self.name, outcome).inc()

    async def close(self) -> None:
        await self._provider.close()


class OutboxDepth(Collector):
    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] >= SCRAPE_CACHE_S:
                self._cached = (time.monotonic(), self._read())
            return iter(self._cached[1])

    def _read(self) -> list[Metric]:
        now = self._clock.now()
        with self._engine.connect() as connection:
            depth, oldest = connection.execute(
                select(func.count(), func.min(_MESSAGES.c.created_at)).where(_MESSAGES.c.status == QUEUED)).one()
        return [
            GaugeMetricFamily("cardcheck_outbox_depth", "Messages QUEUED, not yet delivered.", value=depth),
            GaugeMetricFamily(
                "cardcheck_outbox_oldest_age_seconds", "Age of the oldest QUEUED message, in seconds (0: none).",
                value=0.0 if oldest is None else max((now - as_utc(oldest)).total_seconds(), 0.0)),
        ]
