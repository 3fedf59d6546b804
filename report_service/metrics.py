"""report_service's own metrics: the queries' life (accepted, ready, failed, expired, the time
from acceptance to READY against the 24-hour promise, banks asked again), counted from the
events the audit trail records, and the work backlog read from the database at each scrape
(cached briefly, so several scrapers cost one query)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, bindparam, func, select
from sqlmodel import Session

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import table_of
from cardcheck.runtime.metrics import ServiceMetrics
from report_service import audit
from report_service.models import EXECUTE, NOTIFY, QueryRow, QueryStatus, WorkRow

# Seconds from acceptance to READY: most within a minute, the promise is 24 hours.
READY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 48 * 3600)
SCRAPE_CACHE_S = 2.0
_QUERIES, _WORK = table_of(QueryRow), table_of(WorkRow)


_SUBMITTED_AT = select(table_of(QueryRow).c.submitted_at).where(table_of(QueryRow).c.query_id == bindparam("query_id"))


class QueryLife:
    """Counts each query event as the audit trail records it (in the event's transaction: a
    transaction rolled back afterwards, rare, has been counted)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        registry = metrics.registry
        self.accepted = Counter("cardcheck_report_queries_accepted", "Queries accepted.", registry=registry)
        self.ready = Counter("cardcheck_report_queries_ready", "Queries whose report became READY.", registry=registry)
        self.failed = Counter(
            "cardcheck_report_queries_failed", "Queries FAILED: no bank answered by their deadline.", registry=registry)
        self.expired = Counter(
            "cardcheck_report_reports_expired", "Reports deleted after their retention (EXPIRED).", registry=registry)
        self.asked_again = Counter(
            "cardcheck_report_banks_asked_again", "Banks asked again for a query, after the first pass.",
            registry=registry)
        self.time_to_ready = Histogram(
            "cardcheck_report_time_to_ready_seconds", "Time from a query's acceptance to its READY report, in seconds.",
            buckets=READY_BUCKETS, registry=registry)

    def __call__(self, session: Session | Connection, event: audit.AuditEvent, at: datetime) -> None:
        kind = event.event
        if kind == audit.QUERY_ACCEPTED:
            self.accepted.inc()
        elif kind == audit.REPORT_GENERATED:
            self.ready.inc()
            submitted_at = event.facts.get("submitted_at")
            if not isinstance(submitted_at, datetime):  # not told: read it
                submitted_at = session.execute(_SUBMITTED_AT, {"query_id": event.query_id}).scalar()
            if submitted_at is not None:
                self.time_to_ready.observe(max((as_utc(at) - as_utc(submitted_at)).total_seconds(), 0.0))
        elif kind == audit.QUERY_FAILED:
            self.failed.inc()
        elif kind == audit.REPORT_DELETED:
            self.expired.inc()
        elif kind == audit.BANKS_ASKED and int(str(event.details.get("pass", 1))) > 1:
            banks = event.details.get("banks", ())
            self.asked_again.inc(len(banks) if isinstance(banks, list | tuple) else 1)


class Backlog(Collector):
    """Queries by status and the work still to do, from the database, at most every
    SCRAPE_CACHE_S (the scrape runs on the metrics thread, never on the event loop)."""

    def __init__(self, engine: Engine, clock: Clock, lease: timedelta,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self._lease = lease
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or self._monotonic() - self._cached[0] >= SCRAPE_CACHE_S:
                self._cached = (self._monotonic(), self._read())
            return iter(self._cached[1])

    def _read(self) -> list[Metric]:
        now = self._clock.now()
        with self._engine.connect() as connection:
            statuses: dict[str, int] = dict(connection.execute(
                select(_QUERIES.c.status, func.count()).group_by(_QUERIES.c.status)).all())
            work = {kind: (count, oldest) for kind, count, oldest in connection.execute(
                select(_WORK.c.kind, func.count(), func.min(_WORK.c.created_at)).group_by(_WORK.c.kind)).all()}
            soonest = connection.execute(
                select(func.min(_WORK.c.lease_expires_at)).where(_WORK.c.lease_expires_at > now)).scalar()
        queries = GaugeMetricFamily("cardcheck_report_queries", "Queries stored, by status.", labels=("status",))
        for status in QueryStatus:
            queries.add_metric((status.value,), statuses.get(status.value, 0))
        backlog = GaugeMetricFamily(
            "cardcheck_report_work_backlog", "Work still to do: EXECUTE (ask banks) and NOTIFY (report-ready SMS).",
            labels=("kind",))
        oldest = GaugeMetricFamily(
            "cardcheck_report_work_oldest_age_seconds", "Age of the oldest work still to do, in seconds (0: none).",
            labels=("kind",))
        for kind in (EXECUTE, NOTIFY):
            count, created = work.get(kind, (0, None))
            backlog.add_metric((kind,), count)
            oldest.add_metric((kind,), _age(now, created))
        lease = GaugeMetricFamily(
            "cardcheck_report_lease_oldest_age_seconds",
            "Time since the oldest live lease on work was taken or renewed, in seconds (0: none).",
            value=0.0 if soonest is None else max((self._lease - (as_utc(soonest) - now)).total_seconds(), 0.0))
        return [queries, backlog, oldest, lease]


def _age(now: datetime, then: datetime | None) -> float:
    return 0.0 if then is None else max((now - as_utc(then)).total_seconds(), 0.0)


def instrument(metrics: ServiceMetrics, chain: audit.AuditChain, engine: Engine, clock: Clock,
               lease: timedelta) -> None:
    chain.observers.append(QueryLife(metrics))
    metrics.register(Backlog(engine, clock, lease))
