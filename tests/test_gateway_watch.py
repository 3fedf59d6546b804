"""WatchQuery streams through a real gateway and the fake report_service of tests/harness over
gRPC: each user's cap on concurrent streams (in process, on Redis across two gateways, and
falling back when Redis is down), the maximum lifetime, sign-out and expiry ending an open
stream, and the deadline and cancellation of the upstream stream. The slot leases on Redis are
tested on the real Redis with a controllable clock."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import grpc
import pytest
import redis.asyncio

from bank_sim.process import free_port
from cardcheck.client import CardCheckClient, RateLimited
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.settings import SettingsError
from cardcheck.v1 import common_pb2, gateway_pb2, report_service_pb2
from gateway.config import GatewayConfig
from gateway.downstream import WatchState
from gateway.limits import RedisStore
from gateway.watches import RedisWatchSlots
from tests.harness.gateway import ALICE, BOB, SIGN_IN, Stack, bearer, refusal_of, refused
from tests.harness.waiting import eventually

SQLITE_ONLY = pytest.mark.parametrize("database_url", [None], ids=["sqlite"])  # storage is not the point
CHECK_S = 0.1  # how often a stream reads its session again, in these tests


def watching(**overrides) -> GatewayConfig:
    return GatewayConfig(**{"watch_streams_per_user": 2, "watch_session_check_s": CHECK_S, **overrides})


def pending_query(stack: Stack, user_id: str) -> str:
    """A PENDING query of the user's in the fake report_service."""
    query = common_pb2.Query(query_id=uuid.uuid4().hex, status=common_pb2.QUERY_STATUS_PENDING, banks_total=1)
    stack.reports.queries[query.query_id] = (user_id, query)
    return query.query_id


async def open_watch(stack: Stack, token: str, query_id: str):
    """A WatchQuery stream that has given its first event (so it holds its slot)."""
    call = stack.gateway.WatchQuery(gateway_pb2.WatchQueryRequest(query_id=query_id), metadata=bearer(token))
    first = await call.read()
    assert first.query.query_id == query_id
    return call


async def ended(call, within_s: float = 5.0) -> tuple[grpc.aio.AioRpcError, float]:
    """How the stream ended (it must end with an error, no further event) and how long it took."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        event = await asyncio.wait_for(call.read(), within_s)
        raise AssertionError(f"an event instead of the end: {event}")
    return caught.value, time.monotonic() - started


async def _zcard_is(client, key: str, expected: int) -> bool:
    return await client.zcard(key) == expected


async def a_second_session(stack: Stack, phone: str) -> gateway_pb2.Session:
    stack.clock.advance(timedelta(minutes=1))  # a new SIGN_IN code may be asked for
    challenge_id, code = await stack.challenge(SIGN_IN, phone)
    return await stack.gateway.SignIn(gateway_pb2.SignInRequest(phone=phone, challenge_id=challenge_id, sms_code=code))


# --- the cap -------------------------------------------------------------------------------------


@SQLITE_ONLY
async def test_each_user_holds_at_most_the_cap_of_streams(start_stack):
    stack = await start_stack(config=watching())
    stack.reports.hold_watches = True
    alice, bob = await stack.register(ALICE), await stack.register(BOB)
    alice_query, bob_query = pending_query(stack, alice.user_id), pending_query(stack, bob.user_id)

    first = await open_watch(stack, alice.session_token, alice_query)
    stack.clock.advance(timedelta(minutes=4))
    second = await open_watch(stack, alice.session_token, alice_query)
    refusal = await refused(
        open_watch(stack, alice.session_token, alice_query), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
    )
    # A slot frees at the latest when the oldest stream reaches its lifetime (10 min).
    assert refusal.metadata == {"limit": "watch_streams", "retry_after_seconds": "360"}
    assert refusal.retry_after == timedelta(minutes=6)
    assert stack.reports.watches_open == 2  # the refused one never reached report_service

    # Another user has slots of their own; the typed client says which limit refused.
    bob_calls = [await open_watch(stack, bob.session_token, bob_query) for _ in range(2)]
    client = CardCheckClient(channel=stack.channels[0], session_token=bob.session_token)
    with pytest.raises(RateLimited) as caught:
        await anext(client.watch_query(bob_query))
    assert caught.value.metadata["limit"] == "watch_streams" and caught.value.retry_after is not None

    # A cancelled stream frees its slot (and its upstream is cancelled).
    first.cancel()
    await eventually(lambda: stack.reports.watches_cancelled == 1, within=5)
    third = await open_watch(stack, alice.session_token, alice_query)
    for call in (second, third, *bob_calls):
        call.cancel()
    await eventually(lambda: stack.reports.watches_open == 0, within=5)


@SQLITE_ONLY
async def test_streams_that_end_or_are_refused_give_their_slot_back(start_stack):
    stack = await start_stack(config=watching())
    alice = await stack.register(ALICE)
    query_id = pending_query(stack, alice.user_id)
    for _ in range(3):  # the query leaves PENDING: the stream ends OK
        call = stack.gateway.WatchQuery(
            gateway_pb2.WatchQueryRequest(query_id=query_id), metadata=bearer(alice.session_token)
        )
        assert [e.query.status for e in [event async for event in call]][-1] == common_pb2.QUERY_STATUS_READY
    for _ in range(3):  # report_service refuses: NOT_FOUND each time, never the cap
        await refused(
            open_watch(stack, alice.session_token, "q" * 32), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"
        )
    await stack.gateway.SignOut(gateway_pb2.SignOutRequest(), metadata=bearer(alice.session_token))
    for _ in range(3):  # the slot is taken before the session's read, and given back
        await refused(
            open_watch(stack, alice.session_token, query_id), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"
        )


# --- lifetime, sign-out, expiry ---------------------------------------------------------------------


@SQLITE_ONLY
async def test_a_stream_ends_at_its_maximum_lifetime_and_can_be_opened_again(start_stack):
    stack = await start_stack(config=watching(watch_max_lifetime=timedelta(minutes=10)))
    stack.reports.hold_watches = True
    alice = await stack.register(ALICE)
    query_id = pending_query(stack, alice.user_id)
    calls = [await open_watch(stack, alice.session_token, query_id) for _ in range(2)]
    stack.clock.advance(timedelta(minutes=9, seconds=59))
    await asyncio.sleep(3 * CHECK_S)
    assert not any(call.done() for call in calls)
    stack.clock.advance(timedelta(seconds=1))
    for call in calls:
        error, took = await ended(call)
        refusal = refusal_of(error, grpc.StatusCode.UNAVAILABLE, "STREAM_EXPIRED")
        assert refusal.retry_after == timedelta(0)  # open it again at once
        assert took < 2.0
    await eventually(lambda: stack.reports.watches_cancelled == 2, within=5)
    again = [await open_watch(stack, alice.session_token, query_id) for _ in range(2)]
    for call in again:
        call.cancel()


async def test_sign_out_ends_the_sessions_open_streams_within_seconds(start_stack):
    stack = await start_stack(config=watching(watch_streams_per_user=3))
    stack.reports.hold_watches = True
    alice = await stack.register(ALICE)
    other = await a_second_session(stack, ALICE.phone)
    query_id = pending_query(stack, alice.user_id)
    signed_out = [await open_watch(stack, alice.session_token, query_id) for _ in range(2)]
    staying = await open_watch(stack, other.session_token, query_id)

    await stack.gateway.SignOut(gateway_pb2.SignOutRequest(), metadata=bearer(alice.session_token))
    for call in signed_out:  # report_service sends nothing meanwhile: the timer notices
        error, took = await ended(call)
        refusal_of(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        assert took < 2.0
    await eventually(lambda: stack.reports.watches_cancelled == 2, within=5)
    await asyncio.sleep(3 * CHECK_S)
    assert not staying.done()  # the other session's stream goes on, and has its slot back
    more = [await open_watch(stack, other.session_token, query_id) for _ in range(2)]

    await stack.gateway.SignOut(gateway_pb2.SignOutRequest(everywhere=True), metadata=bearer(other.session_token))
    for call in (staying, *more):
        refusal_of((await ended(call))[0], grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


@SQLITE_ONLY
async def test_an_expiring_session_ends_its_open_stream(start_stack):
    # The session's expiry is in its token: noticed on the clock, without reading the database.
    stack = await start_stack(
        config=watching(session_ttl=timedelta(minutes=5), watch_session_check_s=0.05, watch_slot_lease=timedelta(hours=1))
    )
    stack.reports.hold_watches = True
    alice = await stack.register(ALICE)
    call = await open_watch(stack, alice.session_token, pending_query(stack, alice.user_id))
    stack.clock.advance(timedelta(minutes=5))
    error, took = await ended(call)
    refusal_of(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert took < 1.0
    await eventually(lambda: stack.reports.watches_cancelled == 1, within=5)


# --- the upstream stream ----------------------------------------------------------------------------


@SQLITE_ONLY
async def test_the_upstream_stream_has_a_deadline_and_ends_with_the_client(start_stack):
    stack = await start_stack(config=watching(watch_max_lifetime=timedelta(minutes=3)))
    stack.reports.hold_watches = True
    alice = await stack.register(ALICE)
    query_id = pending_query(stack, alice.user_id)
    call = await open_watch(stack, alice.session_token, query_id)
    # The lifetime left and a second (grpc rounds the deadline it sends up a little).
    deadline = stack.reports.watch_deadlines[-1]
    assert deadline is not None and 175 < deadline <= 183
    later = await open_watch(stack, alice.session_token, query_id)
    assert stack.reports.watches_open == 2
    call.cancel()
    await eventually(lambda: stack.reports.watches_cancelled == 1, within=5)
    later.cancel()
    await eventually(lambda: stack.reports.watches_cancelled == 2, within=5)


# --- on Redis ---------------------------------------------------------------------------------------


@pytest.mark.redis
@SQLITE_ONLY
async def test_the_cap_holds_across_two_gateways_on_one_redis(start_stack, redis_url: str, redis_prefix: str):
    config = watching(redis_key_prefix=redis_prefix, redis_timeout_s=5)
    first = await start_stack(config=config, redis_url=redis_url)
    second = await start_stack(config=config, redis_url=redis_url)  # the same database and keys
    first.reports.hold_watches = True
    alice = await first.register(ALICE)
    query_id = pending_query(first, alice.user_id)
    one = await open_watch(first, alice.session_token, query_id)
    two = await open_watch(second, alice.session_token, query_id)
    for stack in (first, second):
        refusal = await refused(
            open_watch(stack, alice.session_token, query_id), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
        )
        assert refusal.metadata["limit"] == "watch_streams"
        # Redis's clock: the earliest stream ends 10 minutes after it opened.
        assert timedelta(minutes=9) < refusal.retry_after <= timedelta(minutes=10)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        key = f"{redis_prefix}:watch:{alice.user_id}"
        assert await client.zcard(key) == 2
        assert 0 < await client.pttl(key) <= 30_000  # the leases
        two.cancel()
        await eventually(lambda: first.reports.watches_cancelled == 1, within=5)
        await eventually(lambda: _zcard_is(client, key, 1), within=5)
        three = await open_watch(first, alice.session_token, query_id)
        for call in (one, three):
            call.cancel()
        await eventually(lambda: _zcard_is(client, key, 0), within=5)
    finally:
        await client.aclose()


@SQLITE_ONLY
async def test_with_redis_down_the_cap_holds_in_process(start_stack):
    stack = await start_stack(config=watching(redis_timeout_s=0.5), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    stack.reports.hold_watches = True
    alice = await stack.register(ALICE)
    query_id = pending_query(stack, alice.user_id)
    calls = [await open_watch(stack, alice.session_token, query_id) for _ in range(2)]
    refusal = await refused(
        open_watch(stack, alice.session_token, query_id), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
    )
    assert refusal.metadata["limit"] == "watch_streams"
    calls[0].cancel()
    await eventually(lambda: stack.reports.watches_cancelled == 1, within=5)
    calls.append(await open_watch(stack, alice.session_token, query_id))
    for call in calls:
        call.cancel()


@pytest.mark.redis
async def test_redis_slots_are_leases_a_killed_replica_loses_after_they_run_out(
    redis_url: str,
    redis_prefix: str,
):
    clock = ManualClock()
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, timeout_s=5)
    try:
        slots = RedisWatchSlots(store, 2, timedelta(seconds=30), clock=clock)
        lifetime = timedelta(minutes=10)
        kept = await slots.take("u1", "a", lifetime)
        assert isinstance(kept, str)
        clock.advance(timedelta(seconds=10))
        leaked = await slots.take("u1", "b", lifetime)  # a replica that dies without releasing it
        assert isinstance(leaked, str) and isinstance(await slots.take("u2", "c", lifetime), str)
        # Full: a slot frees at the latest when the first stream reaches its end.
        assert await slots.take("u1", "d", lifetime) == timedelta(minutes=9, seconds=50)
        for _ in range(2):  # the live stream renews its lease; the dead one does not
            clock.advance(timedelta(seconds=10))
            await slots.renew("u1", kept)
        assert await slots.take("u1", "d", lifetime) == timedelta(minutes=9, seconds=30)
        clock.advance(timedelta(seconds=10))  # 30 s after the leaked slot's last lease
        taken = await slots.take("u1", "d", lifetime)
        assert isinstance(taken, str)
        assert isinstance(await slots.take("u1", "e", lifetime), timedelta)  # the kept one is live
        # The key goes with its last lease.
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            assert 29_000 < await client.pttl(slots.key("u1")) <= 30_000
        finally:
            await client.aclose()
        await slots.release("u1", kept)
        await slots.release("u1", taken)
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            assert await client.zcard(slots.key("u1")) == 0
            assert await client.zcard(slots.key("u2")) == 1  # another user's, untouched
        finally:
            await client.aclose()
    finally:
        await store.close()


# --- settings -----------------------------------------------------------------------------------------


def test_watch_settings_are_read_from_the_environment():
    defaults = GatewayConfig.from_env({})
    assert defaults.watch_streams_per_user == 4 and defaults.watch_max_lifetime == timedelta(minutes=10)
    assert defaults.watch_session_check_s == 2.0 and defaults.watch_slot_lease == timedelta(seconds=30)
    config = GatewayConfig.from_env(
        {
            "CARDCHECK_WATCH_STREAMS_PER_USER": "2",
            "CARDCHECK_WATCH_MAX_LIFETIME_S": "90",
            "CARDCHECK_WATCH_SESSION_CHECK_S": "0.5",
            "CARDCHECK_WATCH_SLOT_LEASE_S": "10",
        }
    )
    assert (config.watch_streams_per_user, config.watch_max_lifetime) == (2, timedelta(seconds=90))
    assert (config.watch_session_check_s, config.watch_slot_lease) == (0.5, timedelta(seconds=10))
    with pytest.raises(SettingsError, match="CARDCHECK_WATCH_STREAMS_PER_USER"):
        GatewayConfig.from_env({"CARDCHECK_WATCH_STREAMS_PER_USER": "1.5"})
    with pytest.raises(SettingsError, match="CARDCHECK_WATCH_SLOT_LEASE_S"):
        GatewayConfig.from_env({"CARDCHECK_WATCH_SESSION_CHECK_S": "5", "CARDCHECK_WATCH_SLOT_LEASE_S": "10"})



@pytest.mark.redis
@SQLITE_ONLY
async def test_a_stopping_gateway_releases_its_slots_and_the_upstream(start_stack, redis_url: str, redis_prefix: str):
    stack = await start_stack(config=watching(redis_key_prefix=redis_prefix, redis_timeout_s=5), redis_url=redis_url)
    stack.reports.hold_watches = True
    alice = await stack.register(ALICE)
    query_id = pending_query(stack, alice.user_id)
    calls = [await open_watch(stack, alice.session_token, query_id) for _ in range(2)]
    assert stack.host is not None
    await stack.host.stop(0)
    for call in calls:
        await ended(call)
    await eventually(lambda: stack.reports.watches_cancelled == 2, within=5)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.zcard(f"{redis_prefix}:watch:{alice.user_id}") == 0
    finally:
        await client.aclose()


@SQLITE_ONLY
async def test_a_stopping_gateway_ends_its_streams_at_once_for_the_clients_to_open_again(start_stack):
    stack = await start_stack(config=watching())
    stack.reports.hold_watches = True
    alice = await stack.register(ALICE)
    calls = [await open_watch(stack, alice.session_token, pending_query(stack, alice.user_id)) for _ in range(2)]
    assert stack.host is not None
    started = time.monotonic()
    await stack.host.stop(10)  # a long grace: the streams must not hold the stop for it
    assert time.monotonic() - started < 5
    for call in calls:
        refusal = refusal_of((await ended(call))[0], grpc.StatusCode.UNAVAILABLE, "STREAM_EXPIRED")
        assert refusal.retry_after == timedelta(0)
    # The upstream streams were cancelled too (report_service hears it a moment later).
    await eventually(lambda: stack.reports.watches_cancelled == 2, within=5)


@pytest.mark.redis
@SQLITE_ONLY
async def test_on_redis_live_streams_keep_their_slots_and_a_dead_replicas_run_out(
    start_stack, redis_url: str, redis_prefix: str
):
    lease = timedelta(seconds=0.6)  # small, so that the test waits for a few of them
    stack = await start_stack(
        config=watching(redis_key_prefix=redis_prefix, redis_timeout_s=5, watch_slot_lease=lease), redis_url=redis_url
    )
    stack.reports.hold_watches = True
    alice = await stack.register(ALICE)
    query_id = pending_query(stack, alice.user_id)
    # A replica that took a slot and was killed: nobody releases it or renews its lease.
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, timeout_s=5)
    try:
        dead = RedisWatchSlots(store, 2, lease)
        assert isinstance(await dead.take(alice.user_id, "killed", timedelta(minutes=10)), str)
    finally:
        await store.close()
    live = await open_watch(stack, alice.session_token, query_id)
    await refused(open_watch(stack, alice.session_token, query_id), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    await asyncio.sleep(1.5 * lease.total_seconds())
    other = await open_watch(stack, alice.session_token, query_id)  # the dead one's lease ran out
    await asyncio.sleep(3 * lease.total_seconds())  # the live streams renew theirs meanwhile
    await refused(open_watch(stack, alice.session_token, query_id), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert not live.done() and not other.done()
    for call in (live, other):
        call.cancel()


# --- report_service's messages, each with only what is new, as the public events -----------------

_PENDING = common_pb2.QUERY_STATUS_PENDING
_ANSWERED = common_pb2.BANK_OUTCOME_KIND_ANSWERED
_TIMED_OUT = common_pb2.BANK_OUTCOME_KIND_TIMED_OUT


def _progress(status, *outcomes, query_id="q-1") -> report_service_pb2.ReportServiceWatchQueryResponse:
    return report_service_pb2.ReportServiceWatchQueryResponse(
        query=common_pb2.Query(query_id=query_id, status=status),
        new_outcomes=[report_service_pb2.BankProgress(bank_code=b, kind=k, detail=d) for b, k, d in outcomes],
    )


def _kinds(outcomes) -> list[tuple[str, int]]:
    return [(o.bank_code, o.kind) for o in outcomes]


def test_each_public_event_carries_the_whole_state_from_messages_of_what_is_new():
    state = WatchState()
    # The first message: the state so far, with nothing new and no `outcome`.
    first = state.event(_progress(_PENDING, ("ICBC", _ANSWERED, ""), ("BOC", _TIMED_OUT, "slow")))
    assert not first.HasField("outcome") and not first.new_outcomes
    assert _kinds(first.outcomes) == [("ICBC", _ANSWERED), ("BOC", _TIMED_OUT)]
    # Two outcomes recorded together: one event with both, the last in `outcome`, and the state
    # after them; a bank answering after its failure keeps its place.
    both = state.event(_progress(_PENDING, ("BOC", _ANSWERED, ""), ("CMB", _ANSWERED, "")))
    assert _kinds(both.new_outcomes) == [("BOC", _ANSWERED), ("CMB", _ANSWERED)]
    assert both.outcome == both.new_outcomes[1]
    assert _kinds(both.outcomes) == [("ICBC", _ANSWERED), ("BOC", _ANSWERED), ("CMB", _ANSWERED)]
    assert both.outcomes[1].detail == "" and first.outcomes[1].detail == "slow"
    # A change that is not a bank's: one event, nothing new, the state unchanged.
    done = state.event(_progress(common_pb2.QUERY_STATUS_READY))
    assert not done.HasField("outcome") and not done.new_outcomes
    assert done.query.status == common_pb2.QUERY_STATUS_READY and _kinds(done.outcomes) == _kinds(both.outcomes)


@SQLITE_ONLY
async def test_outcomes_recorded_together_reach_the_watcher_in_one_event(start_stack):
    stack = await start_stack(config=watching())
    alice = await stack.register(ALICE)
    query_id = pending_query(stack, alice.user_id)
    stack.reports.progress[query_id] = [
        _progress(_PENDING, ("ICBC", _TIMED_OUT, "slow"), query_id=query_id),
        _progress(_PENDING, ("CMB", _ANSWERED, ""), ("ICBC", _ANSWERED, ""), ("BOC", _ANSWERED, ""),
                  query_id=query_id),
        _progress(_PENDING, ("CCB", _TIMED_OUT, "slow"), query_id=query_id),
        _progress(common_pb2.QUERY_STATUS_READY, query_id=query_id),
    ]
    call = stack.gateway.WatchQuery(gateway_pb2.WatchQueryRequest(query_id=query_id), metadata=bearer(alice.session_token))
    first, together, alone, done = [event async for event in call]
    assert not first.new_outcomes and _kinds(first.outcomes) == [("ICBC", _TIMED_OUT)]
    assert _kinds(together.new_outcomes) == [("CMB", _ANSWERED), ("ICBC", _ANSWERED), ("BOC", _ANSWERED)]
    assert together.outcome.bank_code == "BOC"
    assert _kinds(together.outcomes) == [("ICBC", _ANSWERED), ("CMB", _ANSWERED), ("BOC", _ANSWERED)]
    assert _kinds(alone.new_outcomes) == [("CCB", _TIMED_OUT)] and alone.outcome.detail == "slow"
    assert _kinds(alone.outcomes) == [*_kinds(together.outcomes), ("CCB", _TIMED_OUT)]
    assert done.query.status == common_pb2.QUERY_STATUS_READY and not done.new_outcomes
    assert not done.HasField("outcome") and _kinds(done.outcomes) == _kinds(alone.outcomes)
    assert not any(o.cards for e in (first, together, alone, done) for o in (*e.outcomes, *e.new_outcomes))


async def test_the_next_upstream_event_is_read_while_one_is_given():
    from datetime import UTC, datetime

    from gateway.sessions import SessionClaims
    from gateway.watches import LocalWatchSlots, Watches

    clock = ManualClock()
    watches = Watches(LocalWatchSlots(2, clock), None, clock, session_check_s=3600)  # type: ignore[arg-type]
    claims = SessionClaims("s", "u", datetime(2100, 1, 1, tzinfo=UTC))
    read: list[str] = []

    async def upstream():
        for event in "abcd":
            read.append(event)
            yield event

    given = []
    async with watches.opened("u") as watch:
        async for event in watches.guarded(watch, claims, upstream()):
            await asyncio.sleep(0)  # the read ahead runs meanwhile
            given.append((event, len(read)))
    # Each event as it comes, the next one read while it is given, never more.
    assert given == [("a", 2), ("b", 3), ("c", 4), ("d", 4)]
