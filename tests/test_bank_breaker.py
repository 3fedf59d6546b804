"""What tests/test_bank_connector_policies.py leaves of the breaker and the bulkhead, on the
classes and the ManualClock: the breaker half-opens exactly `open_for` after it opened, a failed
probe opens it for a whole `open_for` again, a late failure of a call let through before it
opened changes nothing, the failure rate is over the last `window` calls only; the bulkhead's
slot without waiting."""

from __future__ import annotations

from datetime import timedelta

import pytest

from bank_connector.resilience import BreakerPolicy, BreakerState, Bulkhead, CircuitBreaker
from cardcheck.runtime.clock import ManualClock

OPEN_FOR = timedelta(seconds=5)
MICROSECOND = timedelta(microseconds=1)


def _opened(clock: ManualClock) -> CircuitBreaker:
    breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=2, open_for=OPEN_FOR), clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    return breaker


def test_a_failed_probe_opens_the_breaker_for_a_whole_interval_again():
    clock = ManualClock()
    breaker = _opened(clock)
    clock.advance(OPEN_FOR - MICROSECOND)
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.advance(MICROSECOND)
    assert breaker.state is BreakerState.HALF_OPEN
    clock.advance(timedelta(seconds=3))  # the probe takes its time
    assert breaker.allow()
    breaker.record_failure()
    assert (breaker.state, breaker.openings) == (BreakerState.OPEN, 2)
    clock.advance(OPEN_FOR - MICROSECOND)  # counted from the failed probe
    assert not breaker.allow()
    clock.advance(MICROSECOND)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()  # the run of failures starts again from a closed breaker
    assert breaker.state is BreakerState.CLOSED


def test_a_late_failure_of_a_call_let_through_before_the_breaker_opened_changes_nothing():
    clock = ManualClock()
    breaker = _opened(clock)
    breaker.record_failure()
    assert breaker.openings == 1
    clock.advance(OPEN_FOR)
    assert breaker.state is BreakerState.HALF_OPEN  # not pushed back by the late failure


def test_the_failure_rate_counts_the_last_window_of_calls_only():
    clock = ManualClock()
    policy = BreakerPolicy(consecutive_failures=100, failure_rate=0.5, window=4, min_calls=4)
    breaker = CircuitBreaker(policy, clock)
    for success in [False, False, True, True, True]:  # the window now holds F T T T
        breaker.record_success() if success else breaker.record_failure()
    breaker.record_failure()  # T T T F: one in four
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()  # T T F F: half
    assert breaker.state is BreakerState.OPEN


def test_a_bulkhead_slot_without_waiting():
    bulkhead = Bulkhead(1)
    assert bulkhead.try_acquire() and bulkhead.in_use == 1
    assert not bulkhead.try_acquire()
    bulkhead.release()
    assert bulkhead.try_acquire()
    with pytest.raises(ValueError, match="at least one slot"):
        Bulkhead(0)
