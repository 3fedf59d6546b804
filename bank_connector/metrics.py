"""bank_connector's own metrics, each per-bank series labelled `bank` with the bank's code:
calls by how they ended, each attempt's latency, retries, the breaker, the bulkhead, and the
admission queue in front of every call. Counts are read from the connector at each scrape;
only the latency histogram is fed as attempts end (lock-free Buckets: 24 a fan-out)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bank_connector.admission import Admission
from bank_connector.connector import BankConnector, OutcomeKind
from bank_connector.resilience import BreakerState
from cardcheck.runtime.metrics import Buckets, ServiceMetrics

# Seconds: a simulated bank answers in a few ms, a real one in tens to hundreds, 5 s is the
# default per-bank timeout.
BANK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class BankCollector(Collector):
    def __init__(self, connector: BankConnector, admission: Admission) -> None:
        self._connector = connector
        self._admission = admission
        self._latencies = {code: Buckets(BANK_BUCKETS) for code in connector.lines()}
        for code, line in connector.lines().items():
            line.stats.observe = self._latencies[code].observe

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "cardcheck_bank_calls", "Calls to a bank (all attempts of one), by how they ended: "
            "ANSWERED, TIMED_OUT, ERROR or CIRCUIT_OPEN (failed fast).", labels=("bank", "outcome"))
        attempts = CounterMetricFamily(
            "cardcheck_bank_attempts", "Attempts at a bank, by result (ok or failed).", labels=("bank", "result"))
        retries = CounterMetricFamily("cardcheck_bank_retries", "Attempts at a bank after the first.", labels=("bank",))
        openings = CounterMetricFamily(
            "cardcheck_bank_breaker_openings", "Times a bank's circuit breaker opened.", labels=("bank",))
        state = GaugeMetricFamily(
            "cardcheck_bank_breaker_state", "A bank's circuit breaker: 0 closed, 1 half-open, 2 open.",
            labels=("bank",))
        in_flight = GaugeMetricFamily(
            "cardcheck_bank_bulkhead_in_flight", "Calls to a bank under way (bulkhead slots taken).", labels=("bank",))
        limit = GaugeMetricFamily(
            "cardcheck_bank_bulkhead_limit", "Calls a bank may have under way at once.", labels=("bank",))
        waiting = GaugeMetricFamily(
            "cardcheck_bank_bulkhead_waiting", "Calls waiting for one of a bank's bulkhead slots.", labels=("bank",))
        for code, line in self._connector.lines().items():
            for kind in OutcomeKind:
                calls.add_metric((code, kind.value), line.outcomes[kind])
            attempts.add_metric((code, "ok"), line.stats.calls - line.stats.failures)
            attempts.add_metric((code, "failed"), line.stats.failures)
            retries.add_metric((code,), line.retries)
            openings.add_metric((code,), line.breaker.openings)
            state.add_metric((code,), BREAKER_VALUES[line.breaker.state])
            in_flight.add_metric((code,), line.bulkhead.in_use)
            limit.add_metric((code,), line.bulkhead.limit)
            waiting.add_metric((code,), line.bulkhead.waiting)
        latency = HistogramMetricFamily(
            "cardcheck_bank_attempt_seconds", "How long one attempt at a bank took, in seconds.", labels=("bank",))
        for code, buckets in self._latencies.items():
            buckets.add_to(latency, (code,))
        yield from (latency, calls, attempts, retries, openings, state, in_flight, limit, waiting)
        admission = self._admission
        yield GaugeMetricFamily(
            "cardcheck_bank_connector_admission_active", "Requests being handled (admission slots taken).",
            value=admission.active)
        yield GaugeMetricFamily(
            "cardcheck_bank_connector_admission_queued", "Requests waiting for an admission slot.",
            value=admission.queued)
        yield CounterMetricFamily(
            "cardcheck_bank_connector_admission_refused", "Requests refused at once with SERVICE_BUSY (queue full).",
            value=admission.refused)


def instrument(metrics: ServiceMetrics, connector: BankConnector, admission: Admission) -> None:
    metrics.register(BankCollector(connector, admission))
