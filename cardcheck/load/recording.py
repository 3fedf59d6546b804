"""What a run measured: an HDR histogram per stage for the whole run, and per time window the
journeys started and completed, the errors by reason and a coarser histogram per stage, for the
plots over time.

Every latency is the time between two instants of the event loop's clock. A journey's runs from
its *scheduled* start, not from when the tool got round to it: a tool (or a mesh) that falls
behind shows up in the figures instead of quietly lowering the load (no coordinated omission).
The stages' own latencies run from the stage's first call."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from hdrh.histogram import HdrHistogram

# summary.json's stages: a code from RequestSmsCode to the inbox, SubmitQuery, accepted to
# READY, GetReport, and the whole journey from its scheduled start.
SUMMARY_STAGES = ("sms_code", "submit", "ready", "report", "journey")
# Reported besides when the mix runs them.
EXTRA_STAGES = ("register", "sign_in")
ALL_STAGES = SUMMARY_STAGES + EXTRA_STAGES

_HIGHEST_US = 3_600_000_000  # an hour: anything longer is a hang, clamped to it


def _histogram(digits: int) -> HdrHistogram:
    return HdrHistogram(1, _HIGHEST_US, digits)


def _us(seconds: float) -> int:
    return min(_HIGHEST_US, max(1, round(seconds * 1_000_000)))


def _ms(hist: HdrHistogram, percentile: float) -> float | None:
    if hist.get_total_count() == 0:
        return None
    value = hist.get_max_value() if percentile >= 100 else hist.get_value_at_percentile(percentile)
    return round(value / 1000, 1)


def percentiles(hist: HdrHistogram) -> dict[str, float | None]:
    return {"p50_ms": _ms(hist, 50), "p90_ms": _ms(hist, 90), "p99_ms": _ms(hist, 99), "max_ms": _ms(hist, 100)}


@dataclass
class Window:
    started: int = 0
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    stages: dict[str, HdrHistogram] = field(default_factory=dict)


@dataclass
class Refusals:
    """One reason's count, where it came from, and the RetryInfo it carried."""

    count: int = 0
    stages: Counter[str] = field(default_factory=Counter)
    limits: Counter[str] = field(default_factory=Counter)  # ErrorInfo's `limit`: which budget refused
    retry_min: timedelta | None = None
    retry_max: timedelta | None = None

    def add(self, stage: str, retry_after: timedelta | None, limit: str | None = None) -> None:
        self.count += 1
        self.stages[stage] += 1
        if limit:
            self.limits[limit] += 1
        if retry_after is not None:
            self.retry_min = retry_after if self.retry_min is None else min(self.retry_min, retry_after)
            self.retry_max = retry_after if self.retry_max is None else max(self.retry_max, retry_after)


class Recorder:
    def __init__(self, start: float, window_s: float = 1.0) -> None:
        self.start = start
        self.window_s = window_s
        self.stages: dict[str, HdrHistogram] = {}
        self.windows: dict[int, Window] = {}
        self.refusals: dict[str, Refusals] = {}
        self.started = 0
        self.completed = 0
        self.offered = 0
        self.last_at = start

    def _window(self, at: float) -> Window:
        self.last_at = max(self.last_at, at)
        index = max(0, math.floor((at - self.start) / self.window_s))
        window = self.windows.get(index)
        if window is None:
            window = self.windows[index] = Window()
        return window

    def journey_started(self, at: float) -> None:
        self.started += 1
        self._window(at).started += 1

    def record(self, stage: str, began: float, ended: float) -> None:
        value = _us(ended - began)
        hist = self.stages.get(stage)
        if hist is None:
            hist = self.stages[stage] = _histogram(3)
        hist.record_value(value)
        window = self._window(ended)
        hist = window.stages.get(stage)
        if hist is None:
            hist = window.stages[stage] = _histogram(2)
        hist.record_value(value)
        if stage == "journey":
            self.completed += 1
            window.completed += 1

    def error(
        self, reason: str, stage: str, at: float, retry_after: timedelta | None = None, limit: str | None = None
    ) -> None:
        self.refusals.setdefault(reason, Refusals()).add(stage, retry_after, limit)
        self._window(at).errors[reason] += 1

    def errors(self) -> dict[str, int]:
        return {reason: r.count for reason, r in sorted(self.refusals.items(), key=lambda kv: -kv[1].count)}

    def percentile_ms(self, stage: str, percentile: float) -> float | None:
        hist = self.stages.get(stage)
        return None if hist is None else _ms(hist, percentile)

    def summary(self, duration: float, elapsed: float) -> dict:
        """summary.json: `duration` the schedule's length, `elapsed` the run's to its last answer."""
        names = SUMMARY_STAGES + tuple(s for s in EXTRA_STAGES if s in self.stages)
        return {
            "journeys": {"started": self.started, "completed": self.completed},
            "errors": self.errors(),
            "rate": {
                "offered": round(self.offered / duration, 3),
                "achieved": round(self.completed / elapsed, 3) if elapsed > 0 else 0.0,
            },
            "stages": {name: percentiles(self.stages.get(name) or _histogram(2)) for name in names},
        }

    def series(self) -> list[dict]:
        """Per window, in order (empty windows included): for the plots over time."""
        last = max(self.windows, default=-1)
        rows = []
        for index in range(last + 1):
            window = self.windows.get(index) or Window()
            rows.append({
                "t": round(index * self.window_s, 3),
                "started": window.started,
                "completed": window.completed,
                "errors": dict(window.errors),
                "stages": {name: percentiles(hist) for name, hist in window.stages.items()},
            })
        return rows

    def distribution(self, stage: str, bins: int = 40) -> list[tuple[float, float, int]]:
        """The stage's latencies in log-spaced bins from its least to its most: (from ms, to ms, count)."""
        hist = self.stages.get(stage)
        if hist is None or hist.get_total_count() == 0:
            return []
        low = max(1, hist.get_min_value())
        high = max(low + 1, hist.get_max_value())
        ratio = (high / low) ** (1 / bins)
        edges = [low * ratio**i for i in range(bins + 1)]
        counts = [0] * bins
        iterator = hist.get_recorded_iterator()
        for item in iterator:  # the iterator yields itself, advanced: read each value as it comes
            value, count = item.value_iterated_to, item.count_at_value_iterated_to
            index = min(bins - 1, max(0, int(math.log(value / low, ratio)) if value > low else 0))
            counts[index] += count
        return [(round(edges[i] / 1000, 3), round(edges[i + 1] / 1000, 3), c) for i, c in enumerate(counts)]
