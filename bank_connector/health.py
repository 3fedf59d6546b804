"""How each bank has been doing: counts since start, and rates and latencies over a bounded
window of its most recent calls. No gRPC here."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

WINDOW = 256  # recent calls kept per bank


@dataclass(frozen=True)
class BankHealthReport:
    bank_code: str
    calls: int  # since start
    failures: int  # since start
    success_rate: float  # over the recent window; 1.0 before any call
    latency_p50_ms: float  # over the recent window
    latency_p99_ms: float
    breaker_state: str = "CLOSED"
    retries: int = 0
    short_circuited: int = 0
    breaker_openings: int = 0
    in_flight: int = 0
    concurrency_limit: int = 0
    waiting: int = 0


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class BankCallStats:
    def __init__(self, window: int = WINDOW) -> None:
        self.calls = 0
        self.failures = 0
        self._recent: deque[tuple[bool, float]] = deque(maxlen=window)
        self.observe: Callable[[float], None] | None = None  # each attempt's seconds (metrics)

    def record(self, ok: bool, latency_ms: float) -> None:
        if self.observe is not None:
            self.observe(latency_ms / 1000)
        self.calls += 1
        if not ok:
            self.failures += 1
        self._recent.append((ok, latency_ms))

    def report(self, bank_code: str) -> BankHealthReport:
        recent = list(self._recent)
        latencies = sorted(latency for _, latency in recent)
        successes = sum(1 for ok, _ in recent if ok)
        return BankHealthReport(
            bank_code=bank_code,
            calls=self.calls,
            failures=self.failures,
            success_rate=successes / len(recent) if recent else 1.0,
            latency_p50_ms=percentile(latencies, 0.50),
            latency_p99_ms=percentile(latencies, 0.99),
        )


class HealthBook:
    """Per-bank call statistics, one entry per bank code."""

    def __init__(self, bank_codes: Iterable[str], window: int = WINDOW) -> None:
        self._stats = {code: BankCallStats(window) for code in bank_codes}

    def stats(self, bank_code: str) -> BankCallStats:
        return self._stats[bank_code]

    def record(self, bank_code: str, ok: bool, latency_ms: float) -> None:
        self._stats[bank_code].record(ok, latency_ms)

    def reports(self) -> list[BankHealthReport]:
        return [stats.report(code) for code, stats in self._stats.items()]
