"""The resilience policies on their own, on a ManualClock: backoff bounds, the retry budget's
sliding window, the breaker's states, the bulkhead's slots, admission, and the configuration
read from the environment."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest

from bank_connector.admission import Admission
from bank_connector.config import ConnectorConfig
from bank_connector.resilience import (
    BreakerPolicy,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    RetryBudget,
    RetryPolicy,
)
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.settings import SettingsError


def test_backoff_is_full_jitter_under_a_doubling_ceiling():
    policy = RetryPolicy(max_attempts=6, base_backoff_s=0.1, max_backoff_s=0.5)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (5, 0.5)]:
        draws = [policy.backoff_s(attempt, rng) for _ in range(2000)]
        assert 0 <= min(draws) and max(draws) <= ceiling
        assert max(draws) > 0.9 * ceiling and min(draws) < 0.1 * ceiling  # spread over the range


def test_the_retry_budget_refills_as_its_window_slides():
    clock = ManualClock()
    budget = RetryBudget(clock, ratio=0.5, floor=2, window=timedelta(seconds=10), buckets=10)
    for _ in range(4):
        budget.record_call()
    assert [budget.try_retry() for _ in range(5)] == [True, True, True, True, False]  # 2 + 0.5 * 4
    clock.advance(timedelta(seconds=5))
    assert not budget.try_retry()
    clock.advance(timedelta(seconds=5, milliseconds=1))  # the calls and retries above have left the window
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]


def test_the_breaker_opens_after_consecutive_failures_and_half_opens_after_its_interval():
    clock = ManualClock()
    breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=3, open_for=timedelta(seconds=5)), clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.allow()
    breaker.record_success()  # a success resets the run
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow() and breaker.rejected == 1
    clock.advance(timedelta(seconds=4.9))
    assert not breaker.allow()
    clock.advance(timedelta(seconds=0.2))
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record_neutral()  # the probe's caller went away: another may probe
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.openings == 1


def test_the_breaker_opens_on_a_failure_rate_once_enough_calls_are_seen():
    clock = ManualClock()
    breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=100, failure_rate=0.5, window=10, min_calls=10), clock)
    for outcome in [True, False] * 4 + [True]:
        breaker.record_success() if outcome else breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # 4 of 9: not enough calls yet
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN  # 5 of 10


async def test_the_bulkhead_gives_out_its_slots_and_times_out_a_wait():
    bulkhead = Bulkhead(2)
    assert await bulkhead.acquire(1) and await bulkhead.acquire(1)
    assert bulkhead.in_use == 2
    assert not await bulkhead.acquire(0.01)
    assert bulkhead.full_timeouts == 1 and bulkhead.waiting == 0
    waiter = asyncio.create_task(bulkhead.acquire(30))
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    bulkhead.release()
    assert await waiter and bulkhead.in_use == 2


async def test_admission_queues_up_to_its_bound_then_refuses():
    admission = Admission(max_active=1, max_queued=1)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold():
        async with admission.turn():
            entered.set()
            await release.wait()

    first = asyncio.create_task(hold())
    await entered.wait()
    second = asyncio.create_task(hold())
    await asyncio.sleep(0)
    assert (admission.active, admission.queued) == (1, 1)
    with pytest.raises(CardCheckError) as refused:
        async with admission.turn():
            pass
    assert refused.value.reason == "SERVICE_BUSY" and admission.refused == 1
    second.cancel()  # a caller that gives up leaves the queue
    await asyncio.gather(second, return_exceptions=True)
    assert admission.queued == 0
    release.set()
    await first
    assert admission.active == 0


def test_the_configuration_comes_from_the_environment():
    config = ConnectorConfig.from_env({
        "CARDCHECK_BANK_RETRY_MAX_ATTEMPTS": "4", "CARDCHECK_BANK_BREAKER_OPEN_S": "0.5",
        "CARDCHECK_BANK_CONCURRENCY": "32", "CARDCHECK_BANK_CONCURRENCY_JLRCU": "20",
        "CARDCHECK_BANK_CONNECTOR_MAX_QUEUED": "10",
    })
    assert config.retry.max_attempts == 4 and config.breaker.open_for == timedelta(seconds=0.5)
    assert (config.concurrency_of("ICBC"), config.concurrency_of("JLRCU"), config.max_queued) == (32, 20, 10)
    assert ConnectorConfig.from_env({}) == ConnectorConfig()
    for bad in [{"CARDCHECK_BANK_RETRY_MAX_ATTEMPTS": "0"}, {"CARDCHECK_BANK_CONCURRENCY_NOSUCH": "3"},
                {"CARDCHECK_BANK_BREAKER_FAILURE_RATE": "often"}]:
        with pytest.raises(SettingsError):
            ConnectorConfig.from_env(bad)
