"""The in-process limiter's decisions to the microsecond, on the ManualClock, without any server
or Redis: a bucket of `burst` tokens refilled at its rate, a refused call costs nothing, a cost
takes that many tokens, idle buckets are dropped least recently used first, and every gateway
limit is a bucket of its own."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cardcheck.runtime.clock import ManualClock
from gateway.limits import Limiters, LimitRates, Rate, TokenBucketLimiter

MICROSECOND = timedelta(microseconds=1)


def test_after_the_burst_the_next_token_comes_one_interval_later_to_the_microsecond():
    clock = ManualClock()
    limiter = TokenBucketLimiter.of(Rate.per_minute(6, burst=2), clock)  # one token every 10 s
    assert [limiter.take("u") for _ in range(2)] == [None, None]
    assert limiter.take("u") == timedelta(seconds=10)
    clock.advance(timedelta(seconds=10) - MICROSECOND)
    assert limiter.take("u") == MICROSECOND
    clock.advance(MICROSECOND)
    assert limiter.take("u") is None
    assert limiter.take("u") == timedelta(seconds=10)


def test_a_refused_call_costs_nothing():
    clock = ManualClock()
    limiter = TokenBucketLimiter(1.0, 2, clock)
    limiter.take("u"), limiter.take("u")
    for _ in range(50):
        assert limiter.take("u") == timedelta(seconds=1)
    clock.advance(timedelta(seconds=2))
    assert [limiter.take("u") for _ in range(3)] == [None, None, timedelta(seconds=1)]


def test_a_cost_takes_that_many_tokens_and_waits_for_them_all():
    clock = ManualClock()
    limiter = TokenBucketLimiter(1.0, 3, clock)
    assert limiter.take("u", cost=2) is None
    assert limiter.take("u", cost=2) == timedelta(seconds=1)
    assert limiter.take("u", cost=1) is None
    assert limiter.take("u", cost=3) == timedelta(seconds=3)
    clock.advance(timedelta(seconds=3))
    assert limiter.take("u", cost=3) is None


def test_the_least_recently_used_bucket_is_dropped_first():
    clock = ManualClock()
    limiter = TokenBucketLimiter(1.0, 1, clock, max_keys=2)
    assert limiter.take("a") is None and limiter.take("b") is None
    assert limiter.take("a") == timedelta(seconds=1)  # refused: "a" is not made recent by it
    assert limiter.take("c") is None  # drops "a", the least recently used
    assert limiter.take("a") is None  # a fresh, full bucket
    assert limiter.take("c") == timedelta(seconds=1)  # kept


@pytest.mark.parametrize("per_second, burst", [(0, 1), (1, 0), (-1, 1), (1, -1)])
def test_a_rate_and_a_burst_must_be_positive(per_second, burst):
    with pytest.raises(ValueError, match="rate and burst must be positive"):
        Rate(per_second, burst)


def test_rates_per_minute_and_per_hour():
    assert Rate.per_minute(30, burst=5) == Rate(0.5, 5)
    assert Rate.per_hour(3600, burst=1) == Rate(1.0, 1)


async def test_every_gateway_limit_is_a_bucket_of_its_own():
    clock = ManualClock()
    one = Rate(1.0, 1)
    limiters = Limiters.in_process(LimitRates(*[one] * 8), clock)
    names = [
        "submit_global", "submit_user", "submit_session", "sms_user",
        "sms_session", "sms_caller", "report_user", "report_session",
    ]
    assert [await getattr(limiters, name).acquire("k") for name in names] == [None] * 8
    assert [await getattr(limiters, name).acquire("k") for name in names] == [timedelta(seconds=1)] * 8
    assert limiters.store is None
