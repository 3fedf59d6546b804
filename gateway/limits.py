"""Rate limits: one interface, two backends.

`RateLimiter.acquire(key, cost=1)` answers None (allowed) or how long to wait. Every limit is a
token bucket of `burst` tokens refilled at `per_second`:

- `TokenBucketLimiter`: in this process (the embedded default, `CARDCHECK_REDIS_URL` unset).
- `RedisLimiter`: the same bucket as GCRA in one Lua script on Redis, so every gateway replica
  draws on one budget. A decision is one EVALSHA round trip; keys are
  `<prefix>:rl:<limit>:<key>` and expire once their bucket is full again. Time is the Redis
  server's (`TIME`), so replicas with skewed clocks still agree; tests may pass a clock instead.

When Redis cannot be reached (refused, timed out, or any other Redis error):

- The global admission limit on SubmitQuery FAILS CLOSED: SubmitQuery is refused SERVICE_BUSY with
  a RetryInfo until Redis answers again. Without the shared count no replica knows how much the
  fleet admits, and admitting blindly would pass an overload on to the banks, which is what the
  limit is there to prevent. Sign-in, listing and reading reports go on working.
- Per-user, per-session and per-caller limits FALL BACK to an in-process bucket of the same
  rate on each replica: everyone stays limited (at worst N times the rate across N replicas,
  and a bucket starts full when the fallback begins), and nobody is locked out of their own
  reports because a shared cache is down.
- Each failed call is answered that way at once. After `RedisStore.trip_after` failures in a
  row Redis is not asked again for `RedisStore.retry_after_s` (a small circuit breaker), so an
  outage costs no connection timeouts per request; the first call after that tries Redis
  again, and a success closes the circuit. (One slow answer on a loaded host does not open it.)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from cardcheck.runtime.clock import Clock

if TYPE_CHECKING:
    import redis.asyncio
    from redis.commands.core import AsyncScript

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class RateLimiter(Protocol):
    async def acquire(self, key: str, cost: float = 1) -> timedelta | None:
        """Takes `cost` tokens from `key`'s bucket: None when allowed, else how long to wait."""
        ...


class LimiterUnavailable(Exception):
    """The limiter's store cannot answer now; try again after `retry_after`."""

    def __init__(self, message: str, retry_after: timedelta) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Rate:
    """`burst` tokens, refilled at `per_second`."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not self.per_second > 0 or not self.burst > 0:
            raise ValueError("rate and burst must be positive")

    @classmethod
    def per_minute(cls, count: float, burst: float) -> Rate:
        return cls(count / 60.0, burst)

    @classmethod
    def per_hour(cls, count: float, burst: float) -> Rate:
        return cls(count / 3600.0, burst)


# --- in process ----------------------------------------------------------------------------------


def _microseconds(instant: datetime) -> int:
    return (instant - _EPOCH) // _MICROSECOND


class TokenBucketLimiter:
    """In-process token buckets, one per key: `burst` tokens, refilled at `rate` per second.

    Kept as GCRA (one number per key, the instant the bucket is full again), the same
    arithmetic as the Redis script, so both backends answer alike. Time comes from the clock.
    At most `max_keys` keys are kept, least recently used dropped first (a dropped bucket starts
    full again), so many keys cannot grow memory or cost."""

    def __init__(self, rate: float, burst: float, clock: Clock, *, max_keys: int = 100_000) -> None:
        Rate(rate, burst)  # validates
        self.rate = rate
        self.burst = burst
        self._interval_us = 1_000_000 / rate
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, float] = OrderedDict()  # key -> full again at (µs)

    @classmethod
    def of(cls, rate: Rate, clock: Clock, **kwargs: Any) -> TokenBucketLimiter:
        return cls(rate.per_second, rate.burst, clock, **kwargs)

    async def acquire(self, key: str, cost: float = 1) -> timedelta | None:
        return self.take(key, cost)

    def take(self, key: str, cost: float = 1) -> timedelta | None:
        """`acquire` without the coroutine. No await inside, so atomic on the event loop."""
        now = _microseconds(self._clock.now())
        tat = self._buckets.get(key)
        if tat is None or tat < now:
            tat = now
        new_tat = tat + self._interval_us * cost
        allow_at = new_tat - self._interval_us * self.burst
        if allow_at > now:
            return timedelta(microseconds=math.ceil(allow_at - now))
        self._buckets[key] = new_tat
        self._buckets.move_to_end(key)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return None


# --- on Redis ------------------------------------------------------------------------------------

# GCRA: the bucket is one number, the theoretical arrival time (TAT, microseconds) at which it
# would be full again. A request of `cost` moves TAT on by cost * interval; it is allowed when
# the new TAT is at most burst * interval ahead of now. Equivalent to a token bucket of `burst`
# tokens refilled every `interval`. Numbers are written with %.0f: Lua's tostring would round
# a 16-digit microsecond count.
GCRA_SCRIPT = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval * cost
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, string.format('%.0f', math.ceil(allow_at - now))}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, '0'}
"""


class RedisStore:
    """One Redis client shared by the gateway's limits, its GCRA script, the key namespace and
    a small circuit breaker (see the module docstring)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = "cardcheck",
        retry_after_s: float = 1.0,
        trip_after: int = 3,
        max_in_flight: int = 64,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        self.trip_after = trip_after
        self._failures = 0  # in a row
        # At most this many calls (so connections) to Redis however many RPCs are in flight: a
        # burst of load waits its turn (each call held at most the socket timeout) instead of
        # opening hundreds of connections. (A semaphore costs less than redis-py's blocking pool.)
        self._in_flight = asyncio.Semaphore(max_in_flight)
        import redis

        self._errors = (redis.RedisError, OSError, TimeoutError)
        self._monotonic = monotonic
        self._script = client.register_script(GCRA_SCRIPT)
        self._down_until = 0.0
        self._down = False

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "cardcheck", timeout_s: float = 0.5, max_connections: int = 64
    ) -> RedisStore:
        """Raises ValueError on a malformed URL; does not connect yet."""
        import redis.asyncio
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        pool = redis.asyncio.ConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # a failure is answered by the policy, not by waiting
        )
        return cls(redis.asyncio.Redis(connection_pool=pool), prefix=prefix, max_in_flight=max_connections)

    @property
    def unreachable(self) -> bool:
        """Whether the last call failed (the limits then fail over until one succeeds)."""
        return self._down

    def key(self, limit: str, key: str) -> str:
        return f"{self.prefix}:rl:{limit}:{key}"

    def script(self, text: str) -> AsyncScript:
        """A Lua script of another user of this store (e.g. gateway/watches.py), for `run`."""
        return self.client.register_script(text)

    async def gcra(self, key: str, interval_us: float, burst: float, cost: float, now_us: int | None) -> int:
        """0 when allowed, else the wait in microseconds. Raises LimiterUnavailable."""
        allowed, wait = await self.run(
            self._script,
            [key],
            [repr(interval_us), repr(burst), repr(cost), "" if now_us is None else now_us],
        )
        return 0 if int(allowed) else int(wait)

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Runs one of this store's scripts behind the circuit breaker. Raises
        LimiterUnavailable when Redis cannot answer (or has not been asked: circuit open)."""
        if self._down and self._monotonic() < self._down_until:
            raise LimiterUnavailable("redis is unreachable", timedelta(seconds=self.retry_after_s))
        try:
            async with self._in_flight:
                answer = await script(keys=keys, args=args)
        except self._errors as error:
            self._failures += 1
            if self._failures >= self.trip_after:
                self._down_until = self._monotonic() + self.retry_after_s
                if not self._down:
                    log.warning("rate limits: redis unreachable (%s); failing over", type(error).__name__)
                self._down = True
            raise LimiterUnavailable(f"redis: {error}", timedelta(seconds=self.retry_after_s)) from error
        self._failures = 0
        if self._down:
            log.warning("rate limits: redis answers again")
            self._down = False
        return answer

    async def close(self) -> None:
        await self.client.aclose()


class RedisLimiter:
    """A token bucket per key on Redis (GCRA). Raises LimiterUnavailable when Redis cannot
    answer; wrap it in `FailClosed` or `FallingBack` to choose what that means."""

    def __init__(self, store: RedisStore, name: str, rate: Rate, *, clock: Clock | None = None) -> None:
        self._store = store
        self.name = name
        self.rate = rate
        self._interval_us = 1_000_000 / rate.per_second
        self._clock = clock  # None: Redis's own clock

    async def acquire(self, key: str, cost: float = 1) -> timedelta | None:
        now_us = None if self._clock is None else _microseconds(self._clock.now())
        wait = await self._store.gcra(
            self._store.key(self.name, key), self._interval_us, self.rate.burst, cost, now_us
        )
        return None if wait == 0 else timedelta(microseconds=wait)


class FailClosed:
    """When the store cannot answer, refuse (wait as long as the store asks)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def acquire(self, key: str, cost: float = 1) -> timedelta | None:
        try:
            return await self._limiter.acquire(key, cost)
        except LimiterUnavailable as error:
            return error.retry_after


class FallingBack:
    """When the primary store cannot answer, ask the fallback (an in-process bucket)."""

    def __init__(self, primary: RateLimiter, fallback: RateLimiter) -> None:
        self._primary = primary
        self._fallback = fallback

    async def acquire(self, key: str, cost: float = 1) -> timedelta | None:
        try:
            return await self._primary.acquire(key, cost)
        except LimiterUnavailable:
            return await self._fallback.acquire(key, cost)


# --- the gateway's limits ------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitRates:
    submit_global: Rate
    submit_user: Rate
    submit_session: Rate
    sms_user: Rate
    sms_session: Rate
    sms_caller: Rate
    report_user: Rate
    report_session: Rate


@dataclass
class Limiters:
    """Every limit the gateway applies, and the store behind them (None: in process)."""

    # The per-session limits are checked on the token's claims before the database says the
    # session is live, the per-user ones after it (gateway/flows.py says why).
    submit_global: RateLimiter  # admission of SubmitQuery across the whole service
    submit_user: RateLimiter  # each user's SubmitQuery attempts
    submit_session: RateLimiter  # each session token's SubmitQuery attempts
    sms_user: RateLimiter  # each user's RequestSmsCode (QUERY_AUTH)
    sms_session: RateLimiter  # each session token's RequestSmsCode (QUERY_AUTH)
    sms_caller: RateLimiter  # RequestSmsCode per caller (peer address or proxy header)
    report_user: RateLimiter  # each user's GetReport attempts
    report_session: RateLimiter  # each session token's GetReport attempts
    store: RedisStore | None = None

    @classmethod
    def in_process(cls, rates: LimitRates, clock: Clock) -> Limiters:
        limiters: dict[str, Any] = {name: TokenBucketLimiter.of(getattr(rates, name), clock) for name in _LIMITS}
        return cls(**limiters)

    @classmethod
    def on_redis(cls, store: RedisStore, rates: LimitRates, fallback_clock: Clock) -> Limiters:
        """Shared buckets; the global limit fails closed, the others fall back in process."""

        def shared(name: str) -> RedisLimiter:
            return RedisLimiter(store, name.replace("_", "-"), getattr(rates, name))

        def falling_back(name: str) -> FallingBack:
            return FallingBack(shared(name), TokenBucketLimiter.of(getattr(rates, name), fallback_clock))

        return cls(
            submit_global=FailClosed(shared("submit_global")),
            **{name: falling_back(name) for name in _LIMITS if name != "submit_global"},
            store=store,
        )

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


_LIMITS = (
    "submit_global",
    "submit_user",
    "submit_session",
    "sms_user",
    "sms_session",
    "sms_caller",
    "report_user",
    "report_session",
)
