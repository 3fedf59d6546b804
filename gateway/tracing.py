"""Tracing under overload.

While the gateway sheds SubmitQuery load, recording and exporting a span for every refused
call would cost more than the refusal itself (bench/limits.py: a traced bare echo already runs
at well under half the throughput of an untraced one), and that work competes for the very CPU
the shedding is there to protect. So while shedding, SubmitQuery spans are sampled at most
`per_second` (the shedding still shows in the traces, marked `cardcheck.admission.shed`);
otherwise the configured sampler decides, as usual. A client's `traceparent` cannot force
recording while the gateway sheds. The shedding state is held for `hold_s` after the last
refusal. Time here is the process's monotonic clock: this is about CPU, not business rules."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

SHED_METHODS = ("/cardcheck.v1.CardCheck/SubmitQuery",)


class Shedding:
    """Whether the gateway refused admission recently."""

    def __init__(self, *, hold_s: float = 1.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._hold_s = hold_s
        self._monotonic = monotonic
        self._until = float("-inf")
        self.refused = 0  # calls shed since start (metrics)

    def shed(self) -> None:
        self.refused += 1
        self._until = self._monotonic() + self._hold_s

    @property
    def active(self) -> bool:
        return self._monotonic() < self._until


class SheddingSampler(Sampler):
    """Wraps the configured sampler: while shedding, at most `per_second` spans of the shed
    methods are sampled (a token bucket of one), the rest dropped before they are recorded."""

    def __init__(
        self,
        base: Sampler,
        shedding: Shedding,
        *,
        per_second: float = 1.0,
        methods: Sequence[str] = SHED_METHODS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = base
        self._shedding = shedding
        self._per_second = per_second
        self._methods = frozenset(methods)
        self._monotonic = monotonic
        self._tokens = 1.0
        self._updated = monotonic()

    def _take(self) -> bool:
        now = self._monotonic()
        self._tokens = min(1.0, self._tokens + (now - self._updated) * self._per_second)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def should_sample(
        self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
    ) -> SamplingResult:
        if name in self._methods and self._shedding.active and not self._take():
            return SamplingResult(Decision.DROP)
        return self._base.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"SheddingSampler{{{self._base.get_description()}}}"
