"""WatchQuery streams that no user can hold open at will.

- A cap on each user's concurrent streams (`WatchSlots`): one beyond it is refused RATE_LIMITED
  (ErrorInfo `limit: watch_streams`) with a RetryInfo of when a slot frees at the latest (the
  earliest end of the user's open streams; sooner if the client closes one).
- A maximum lifetime: the stream then ends UNAVAILABLE, reason STREAM_EXPIRED, with a RetryInfo
  of zero: the client opens it again at once (its first event tells the state so far).
- When the server stops, open streams end as at their lifetime (`drain`), so that clients
  open them again on another replica rather than wait for the stop's grace to cut them.
- The session is checked again while streaming: its expiry (in the token, no I/O) on every
  wake, and its revocation (one primary-key read) every `session_check_s`; signed out or
  expired, the stream ends UNAUTHENTICATED. The wakes come from a timer raced against the next
  upstream event, so noticing never waits for report_service to send something.

Where the slots are counted: on Redis when it is configured (`RedisWatchSlots`), so the cap holds
across every gateway replica; each slot is a lease in a sorted set per user, renewed while its
stream lives, so a replica that is killed (no chance to release) leaks its slots only until
their leases run out. When Redis cannot be reached the slots fall back to this replica's own
count (`LocalWatchSlots`), as the per-user rate limits do (gateway/limits.py): everyone stays
capped, at worst N times the cap across N replicas, and nobody is locked out of watching. A slot
is released by whichever of the two took it, whenever its stream ends for any reason.

Lifetime and expiry are measured on the injected clock; how often the session is read again is
real time (the loop's), since it is about the cost of the reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

from cardcheck.runtime.clock import Clock
from cardcheck.runtime.errors import CardCheckError, Reason
from gateway.limits import LimiterUnavailable, RedisStore
from gateway.sessions import SessionClaims, Sessions

log = logging.getLogger(__name__)

Event = TypeVar("Event")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def _milliseconds(instant: datetime) -> int:
    return (instant - _EPOCH) // _MILLISECOND


@dataclass(frozen=True)
class Watch:
    """One open stream: whose, its slot (as its store names it) and when it must end."""

    user_id: str
    slot: str
    ends_at: datetime


class WatchSlots(Protocol):
    async def take(self, user_id: str, watch_id: str, lifetime: timedelta) -> str | timedelta:
        """The slot's name when taken, else how long until one frees at the latest."""
        ...

    async def renew(self, user_id: str, slot: str) -> None:
        """Keeps the slot's lease (where it has one) while its stream lives."""
        ...

    async def release(self, user_id: str, slot: str) -> None: ...


# --- in process ----------------------------------------------------------------------------------


class LocalWatchSlots:
    """Each user's open streams in this process, with the instant each must end."""

    def __init__(self, per_user: int, clock: Clock) -> None:
        self.per_user = per_user
        self._clock = clock
        self._open: dict[str, dict[str, datetime]] = {}  # user -> slot -> ends at

    async def take(self, user_id: str, watch_id: str, lifetime: timedelta) -> str | timedelta:
        now = self._clock.now()
        mine = self._open.setdefault(user_id, {})
        if len(mine) >= self.per_user:
            return max(min(mine.values()) - now, timedelta(0))
        mine[watch_id] = now + lifetime
        return watch_id

    async def renew(self, user_id: str, slot: str) -> None:
        pass  # this process releases its own slots; nothing to keep alive

    async def release(self, user_id: str, slot: str) -> None:
        mine = self._open.get(user_id, {})
        mine.pop(slot, None)
        if not mine:
            self._open.pop(user_id, None)

    def count(self, user_id: str) -> int:
        return len(self._open.get(user_id, {}))


# --- on Redis ------------------------------------------------------------------------------------

# KEYS[1]: a user's open streams, a sorted set: member `<ends at, ms>:<watch id>`, score the
# instant (ms) its lease runs out. ARGV: mode (take, renew, release), watch id (take) or member,
# cap, lease ms, lifetime ms (take), now ms or '' (Redis's clock). Expired leases are dropped
# first. take: {1, member} or {0, ms until a slot frees at the latest, when the first of the
# streams reaches its end (a dead replica's lease may free one sooner)}; renew: {1} or, when
# the lease was lost and the slots are full meanwhile, {0}. The key expires with its last lease.
WATCH_SLOTS_SCRIPT = """
local now = tonumber(ARGV[6])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local mode = ARGV[1]
local member = ARGV[2]
if mode == 'release' then
  redis.call('ZREM', KEYS[1], member)
  return {1, ''}
end
local lease = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if mode == 'take' then
  member = string.format('%.0f', now + tonumber(ARGV[5])) .. ':' .. member
end
if mode == 'take' or not redis.call('ZSCORE', KEYS[1], member) then
  local open = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  if #open / 2 >= tonumber(ARGV[3]) then
    local free_at = nil
    for i = 1, #open, 2 do
      local at = tonumber(string.match(open[i], '^(%d+):')) or tonumber(open[i + 1])
      if free_at == nil or at < free_at then free_at = at end
    end
    return {0, string.format('%.0f', math.max(free_at - now, 0))}
  end
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), member)
redis.call('PEXPIRE', KEYS[1], lease)
return {1, member}
"""


class RedisWatchSlots:
    """Each user's open streams on Redis, as leases (see the module docstring). Raises
    LimiterUnavailable when Redis cannot answer. Time is the Redis server's unless a clock is
    given (tests)."""

    def __init__(
        self, store: RedisStore, per_user: int, lease: timedelta, *, clock: Clock | None = None
    ) -> None:
        self._store = store
        self.per_user = per_user
        self._lease_ms = max(1, int(lease / _MILLISECOND))
        self._clock = clock
        self._script = store.script(WATCH_SLOTS_SCRIPT)

    def key(self, user_id: str) -> str:
        return f"{self._store.prefix}:watch:{user_id}"

    async def _run(self, mode: str, user_id: str, member: str, lifetime_ms: int = 0) -> tuple[int, str]:
        now = "" if self._clock is None else _milliseconds(self._clock.now())
        ok, value = await self._store.run(
            self._script, [self.key(user_id)], [mode, member, self.per_user, self._lease_ms, lifetime_ms, now]
        )
        return int(ok), value.decode() if isinstance(value, bytes) else str(value)

    async def take(self, user_id: str, watch_id: str, lifetime: timedelta) -> str | timedelta:
        ok, value = await self._run("take", user_id, watch_id, int(lifetime / _MILLISECOND))
        return value if ok else timedelta(milliseconds=int(value))

    async def renew(self, user_id: str, slot: str) -> None:
        ok, _ = await self._run("renew", user_id, slot)
        if not ok:
            log.warning("watch of user %s lost its slot's lease while the slots were full", user_id)

    async def release(self, user_id: str, slot: str) -> None:
        await self._run("release", user_id, slot)


class FallingBackSlots:
    """Slots on the primary store (Redis), on the fallback (in process) while it cannot answer.
    A slot is renewed and released where it was taken; a release Redis misses is left to the
    lease."""

    def __init__(self, primary: WatchSlots, fallback: WatchSlots) -> None:
        self._primary = primary
        self._fallback = fallback
        self._taken_by: dict[tuple[str, str], WatchSlots] = {}

    async def take(self, user_id: str, watch_id: str, lifetime: timedelta) -> str | timedelta:
        try:
            store, taken = self._primary, await self._primary.take(user_id, watch_id, lifetime)
        except LimiterUnavailable:
            store, taken = self._fallback, await self._fallback.take(user_id, watch_id, lifetime)
        if isinstance(taken, str):
            self._taken_by[(user_id, taken)] = store
        return taken

    async def renew(self, user_id: str, slot: str) -> None:
        with contextlib.suppress(LimiterUnavailable):
            await self._taken_by.get((user_id, slot), self._fallback).renew(user_id, slot)

    async def release(self, user_id: str, slot: str) -> None:
        store = self._taken_by.pop((user_id, slot), self._fallback)
        with contextlib.suppress(LimiterUnavailable):
            await store.release(user_id, slot)


# --- the streams ---------------------------------------------------------------------------------


def watch_streams_limited(wait: timedelta) -> CardCheckError:
    return CardCheckError(
        Reason.RATE_LIMITED,
        "too many WatchQuery streams open",
        metadata={"limit": "watch_streams", "retry_after_seconds": str(max(1, int(wait.total_seconds() + 0.999)))},
        retry_after=wait,
    )


def stream_expired(why: str = "the watch reached its maximum lifetime") -> CardCheckError:
    return CardCheckError(Reason.STREAM_EXPIRED, f"{why}; open it again", retry_after=timedelta(0))


class Watches:
    """Opens, guards and ends this replica's WatchQuery streams (see the module docstring)."""

    def __init__(
        self,
        slots: WatchSlots,
        sessions: Sessions,
        clock: Clock,
        *,
        lifetime: timedelta = timedelta(minutes=10),
        session_check_s: float = 2.0,
        lease: timedelta = timedelta(seconds=30),
    ) -> None:
        self._slots = slots
        self._sessions = sessions
        self._clock = clock
        self.lifetime = lifetime
        self._check_s = session_check_s
        self._renew_s = lease.total_seconds() / 3
        self._open: dict[str, Watch] = {}  # slot -> watch, to release what is left at shutdown
        self._releasing: set[asyncio.Future[None]] = set()  # releases a stop must wait for
        self._draining = asyncio.Event()

    @contextlib.asynccontextmanager
    async def opened(self, user_id: str) -> AsyncIterator[Watch]:
        """A slot of the user's for the block; RATE_LIMITED when every one is taken."""
        taken = await self._slots.take(user_id, secrets.token_hex(8), self.lifetime)
        if isinstance(taken, timedelta):
            raise watch_streams_limited(taken)
        watch = Watch(user_id, taken, self._clock.now() + self.lifetime)
        self._open[taken] = watch
        try:
            yield watch
        finally:
            if self._open.pop(taken, None) is not None:
                # Shielded: a second cancellation (server stop) must not leave the slot taken;
                # and kept, so that close() waits for it before the Redis client goes.
                release = asyncio.ensure_future(self._slots.release(user_id, taken))
                self._releasing.add(release)
                release.add_done_callback(self._releasing.discard)
                await asyncio.shield(release)

    def remaining(self, watch: Watch) -> timedelta:
        return watch.ends_at - self._clock.now()

    def _check_instants(self, watch: Watch, claims: SessionClaims) -> float:
        """Raises when the session expired or the lifetime is over; else the seconds to wait."""
        now = self._clock.now()
        if claims.expires_at <= now:
            raise CardCheckError(Reason.UNAUTHENTICATED, "session expired")
        if watch.ends_at <= now:
            raise stream_expired()
        if self._draining.is_set():
            raise stream_expired("the gateway is stopping")
        due = min(watch.ends_at, claims.expires_at) - now
        return min(self._check_s, due.total_seconds())

    async def guarded(
        self, watch: Watch, claims: SessionClaims, upstream: AsyncGenerator[Event, None]
    ) -> AsyncGenerator[Event, None]:
        """The upstream's events, until it ends, the lifetime is over or the session is not live.
        The next event is read while one is given."""
        loop = asyncio.get_running_loop()
        checked_at = renewed_at = loop.time()
        pending = asyncio.ensure_future(anext(upstream))
        draining = asyncio.ensure_future(self._draining.wait())
        # Woken by the next event, the stop or the check's timer, whichever comes first: one
        # future per wait, which asyncio.wait's sets and callbacks cost several times over on
        # every upstream message.
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        draining.add_done_callback(wake)
        try:
            while True:
                wait_s = self._check_instants(watch, claims)
                if not pending.done():
                    waiter = loop.create_future()
                    pending.add_done_callback(wake)
                    timer = loop.call_later(wait_s, wake)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
                        pending.remove_done_callback(wake)
                if draining.done():
                    raise stream_expired("the gateway is stopping")
                if pending.done():
                    try:
                        event = pending.result()
                    except StopAsyncIteration:
                        return
                    pending = asyncio.ensure_future(anext(upstream))
                    yield event
                if loop.time() - checked_at >= self._check_s:
                    await self._sessions.ensure_live(claims)
                    checked_at = loop.time()
                if loop.time() - renewed_at >= self._renew_s:
                    await self._slots.renew(watch.user_id, watch.slot)
                    renewed_at = loop.time()
        finally:
            draining.cancel()
            pending.cancel()  # cancels the upstream call with it (ReportDesk.watch)
            await asyncio.wait((pending,))
            if not pending.cancelled():
                pending.exception()  # retrieved: the reason the stream ended is raised above
            await upstream.aclose()

    async def drain(self) -> None:
        """The server is stopping: every open stream ends now as at its lifetime (the client
        opens it again, on another replica), instead of holding the stop for its whole grace."""
        self._draining.set()

    async def close(self) -> None:
        """Releases the slots of streams still open (the server is stopping), and waits for the
        releases of streams that ended as it stopped."""
        await asyncio.gather(*self._releasing, return_exceptions=True)
        for slot, watch in list(self._open.items()):
            self._open.pop(slot, None)
            try:
                await self._slots.release(watch.user_id, slot)
            except Exception:
                log.exception("watch slot not released at shutdown; its lease will run out")
