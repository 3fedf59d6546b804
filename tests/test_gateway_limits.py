"""The gateway's rate limits: the Redis backend against the real Redis (the same decisions as the
in-process bucket, atomic, namespaced keys with TTLs), what happens when Redis is unreachable
(the global limit fails closed, per-user limits fall back in process), and two gateway processes
on one Redis holding one global admission limit between them."""

from __future__ import annotations

import asyncio
import random
import secrets
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio

from bank_sim.process import free_port
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, notifier_pb2, notifier_pb2_grpc
from gateway.config import GatewayConfig
from gateway.limits import (
    FailClosed,
    FallingBack,
    LimiterUnavailable,
    Rate,
    RedisLimiter,
    RedisStore,
    TokenBucketLimiter,
)
from tests.harness.gateway import ALICE, PASSWORD, QUERY_AUTH, SIGN_IN, Stack, bearer, refused
from tests.harness.processes import ServiceProcess


async def limited(call, limit: str) -> timedelta:
    """The call is refused RATE_LIMITED by `limit`: the wait it names."""
    refusal = await refused(call, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert refusal.metadata["limit"] == limit, refusal.metadata
    assert refusal.retry_after is not None
    return refusal.retry_after


@pytest.fixture
async def store(redis_url: str, redis_prefix: str):
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, timeout_s=5)
    yield store
    await store.close()


# --- the Redis backend -----------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_buckets_decide_as_the_in_process_ones(store: RedisStore):
    clock = ManualClock()
    rate = Rate(per_second=5.0, burst=3)
    local = TokenBucketLimiter.of(rate, clock)
    shared = RedisLimiter(store, "same", rate, clock=clock)
    randomly = random.Random(7)
    allowed = 0
    for _ in range(300):
        clock.advance(timedelta(milliseconds=randomly.choice([0, 0, 10, 90, 200, 700])))
        key = randomly.choice(["a", "b"])
        cost = randomly.choice([1, 1, 1, 2])
        expected, got = await local.acquire(key, cost), await shared.acquire(key, cost)
        if expected is None:
            assert got is None
            allowed += 1
        else:
            assert got is not None and abs(got - expected) <= timedelta(microseconds=2), (expected, got)
    assert 50 < allowed < 250  # both answers occurred


@pytest.mark.redis
async def test_redis_keys_are_namespaced_and_expire_when_the_bucket_is_full_again(
    store: RedisStore, redis_url: str, redis_prefix: str
):
    limiter = RedisLimiter(store, "submit-user", Rate.per_minute(6, burst=2))  # Redis's own clock
    assert await limiter.acquire("u1") is None
    assert await limiter.acquire("u1") is None
    wait = await limiter.acquire("u1")
    assert wait is not None and timedelta(seconds=9) < wait <= timedelta(seconds=10)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key.decode() async for key in client.scan_iter(match=f"{redis_prefix}:*")]
        assert keys == [f"{redis_prefix}:rl:submit-user:u1"]
        ttl_ms = await client.pttl(keys[0])
        assert 19_000 < ttl_ms <= 21_000  # two tokens at one per 10 s, plus a second
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_decisions_are_atomic_across_replicas(redis_url: str, redis_prefix: str):
    replicas = [RedisStore.from_url(redis_url, prefix=redis_prefix, timeout_s=5) for _ in range(2)]
    try:
        limiters = [RedisLimiter(s, "global", Rate(per_second=0.001, burst=50)) for s in replicas]
        answers = await asyncio.gather(*(limiters[i % 2].acquire("submit") for i in range(400)))
    finally:
        for s in replicas:
            await s.close()
    assert sum(answer is None for answer in answers) == 50


@pytest.mark.redis
async def test_a_burst_of_calls_does_not_open_a_connection_each(redis_url: str, redis_prefix: str):
    name = f"cardcheck-test-{secrets.token_hex(4)}"
    separator = "&" if "?" in redis_url else "?"
    store = RedisStore.from_url(
        f"{redis_url}{separator}client_name={name}", prefix=redis_prefix, timeout_s=5, max_connections=4
    )
    try:
        limiter = RedisLimiter(store, "burst", Rate(per_second=1000, burst=1000))
        answers = await asyncio.gather(*(limiter.acquire(f"k{i % 10}") for i in range(200)))
        assert answers == [None] * 200
        clients = await store.client.client_list()
        assert 1 <= sum(client.get("name") == name for client in clients) <= 4
    finally:
        await store.close()


# --- when Redis is unreachable ---------------------------------------------------------------------


async def test_an_unreachable_redis_fails_closed_or_falls_back():
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        shared = RedisLimiter(store, "global", Rate(100, 100))
        with pytest.raises(LimiterUnavailable):
            await shared.acquire("k")
        assert await FailClosed(shared).acquire("k") == timedelta(seconds=1)
        clock = ManualClock()
        falling_back = FallingBack(shared, TokenBucketLimiter(1.0, 2, clock))
        assert [await falling_back.acquire("u") for _ in range(3)] == [None, None, timedelta(seconds=1)]
    finally:
        await store.close()


class _FlakyScript:
    def __init__(self) -> None:
        self.calls = 0
        self.failing = True

    async def __call__(self, keys, args):
        self.calls += 1
        if self.failing:
            raise redis.ConnectionError("connection refused")
        return [1, "0"]


class _FakeClient:
    def __init__(self, script: _FlakyScript) -> None:
        self.script = script

    def register_script(self, text: str) -> _FlakyScript:
        return self.script


async def test_a_broken_redis_is_not_asked_again_until_the_retry_time():
    script = _FlakyScript()
    now = [100.0]
    store = RedisStore(_FakeClient(script), monotonic=lambda: now[0], retry_after_s=1.0)
    limiter = RedisLimiter(store, "global", Rate(10, 10))
    # A failure, then a success: the circuit stays closed.
    with pytest.raises(LimiterUnavailable):
        await limiter.acquire("k")
    script.failing = False
    assert await limiter.acquire("k") is None and script.calls == 2
    script.failing = True
    for _ in range(6):
        with pytest.raises(LimiterUnavailable) as caught:
            await limiter.acquire("k")
        assert caught.value.retry_after == timedelta(seconds=1)
    assert script.calls == 2 + 3  # opened after three in a row: the outage cost three attempts, not six
    script.failing = False
    now[0] += 1.0
    assert await limiter.acquire("k") is None and script.calls == 6
    assert await limiter.acquire("k") is None and script.calls == 7  # closed again


SQLITE_ONLY = pytest.mark.parametrize("database_url", [None], ids=["sqlite"])  # storage is not the point


@SQLITE_ONLY
async def test_gateway_with_redis_down_sheds_every_submission_and_keeps_users_limited(start_stack):
    stack = await start_stack(
        config=GatewayConfig(submit_user_burst=1, redis_timeout_s=0.5),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    # Registration (SMS codes per caller fall back in process) and reading go on working.
    alice = await stack.register(ALICE)
    await stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(alice.session_token))
    refusal = await refused(
        stack.submit(ALICE, alice.session_token), grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVICE_BUSY"
    )
    assert refusal.retry_after == timedelta(seconds=1)
    assert stack.reports.created == []
    # The session's own limit (the user's rate) still holds, in process.
    refusal = await refused(
        stack.gateway.SubmitQuery(gateway_pb2.SubmitQueryRequest(), metadata=bearer(alice.session_token)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert refusal.metadata["limit"] == "session"


@pytest.mark.redis
@SQLITE_ONLY
async def test_gateway_on_redis_admits_and_sheds(start_stack, redis_url: str, redis_prefix: str):
    stack = await start_stack(
        config=GatewayConfig(
            submit_global_rps=0.5, submit_global_burst=1, redis_key_prefix=redis_prefix, redis_timeout_s=5
        ),
        redis_url=redis_url,
    )
    alice = await stack.register(ALICE)
    await stack.submit(ALICE, alice.session_token)
    assert len(stack.reports.created) == 1
    stack.clock.advance(timedelta(minutes=1))  # a new QUERY_AUTH code may be asked for
    refusal = await refused(
        stack.submit(ALICE, alice.session_token), grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVICE_BUSY"
    )
    # Redis's clock, not the test's: the one token comes back within 2 s of real time.
    assert timedelta(0) < refusal.retry_after <= timedelta(seconds=2)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = {key.decode() async for key in client.scan_iter(match=f"{redis_prefix}:*")}
    finally:
        await client.aclose()
    assert f"{redis_prefix}:rl:submit-global:submit:global" in keys
    assert any(key.startswith(f"{redis_prefix}:rl:sms-caller:") for key in keys)


# --- a revoked token spends nothing of its user's ------------------------------------------------


async def _hammer_with_a_revoked_token(stack: Stack, token: str) -> None:
    """Every budgeted RPC with a signed-out token, until each is refused by the session's own
    budget before the database is asked."""
    calls = {
        "SubmitQuery": lambda: stack.gateway.SubmitQuery(gateway_pb2.SubmitQueryRequest(), metadata=bearer(token)),
        "GetReport": lambda: stack.gateway.GetReport(
            gateway_pb2.GetReportRequest(query_id="q1", payment_password="000000"), metadata=bearer(token)
        ),
        "QUERY_AUTH": lambda: stack.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(purpose=QUERY_AUTH), metadata=bearer(token)
        ),
    }
    for call in calls.values():
        for _ in range(2):  # the session's burst
            await refused(call(), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        for _ in range(5):
            await limited(call(), "session")


async def _owner_has_its_whole_budget(stack: Stack, token: str) -> None:
    empty = gateway_pb2.SubmitQueryRequest()
    for _ in range(2):  # admitted: on to validation
        await refused(
            stack.gateway.SubmitQuery(empty, metadata=bearer(token)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
        )
    await limited(stack.gateway.SubmitQuery(empty, metadata=bearer(token)), "session")  # that was all of it
    report = gateway_pb2.GetReportRequest(query_id="q1", payment_password="000000")
    for _ in range(2):  # admitted: on to the payment password
        await refused(
            stack.gateway.GetReport(report, metadata=bearer(token)),
            grpc.StatusCode.PERMISSION_DENIED,
            "PAYMENT_PASSWORD_INVALID",
        )
    for _ in range(2):
        await stack.query_auth(ALICE, token)
        stack.clock.advance(timedelta(minutes=1))


BUDGETS_OF_TWO = dict(submit_user_burst=2, sms_user_burst=2, report_user_burst=2)


async def test_a_revoked_token_leaves_its_owner_s_budgets_whole(start_stack):
    stack = await start_stack(config=GatewayConfig(**BUDGETS_OF_TWO))
    stolen = await stack.register(ALICE)
    await stack.gateway.SignOut(gateway_pb2.SignOutRequest(), metadata=bearer(stolen.session_token))
    await _hammer_with_a_revoked_token(stack, stolen.session_token)
    stack.clock.advance(timedelta(minutes=1))
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone)
    owner = await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
    )
    await _owner_has_its_whole_budget(stack, owner.session_token)


@pytest.mark.redis
@SQLITE_ONLY
async def test_on_redis_a_revoked_token_leaves_its_owner_s_budgets_whole(
    start_stack, redis_url: str, redis_prefix: str
):
    stack = await start_stack(
        config=GatewayConfig(**BUDGETS_OF_TWO, redis_key_prefix=redis_prefix, redis_timeout_s=5),
        redis_url=redis_url,
    )
    stolen = await stack.register(ALICE)
    await stack.gateway.SignOut(gateway_pb2.SignOutRequest(), metadata=bearer(stolen.session_token))
    await _hammer_with_a_revoked_token(stack, stolen.session_token)
    stack.clock.advance(timedelta(minutes=1))
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone)
    owner = await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code)
    )
    # Redis's clock, not the test's: the budgets spent above do not refill during the test.
    empty = gateway_pb2.SubmitQueryRequest()
    for _ in range(2):
        await refused(
            stack.gateway.SubmitQuery(empty, metadata=bearer(owner.session_token)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
    report = gateway_pb2.GetReportRequest(query_id="q1", payment_password="000000")
    for _ in range(2):
        await refused(
            stack.gateway.GetReport(report, metadata=bearer(owner.session_token)),
            grpc.StatusCode.PERMISSION_DENIED,
            "PAYMENT_PASSWORD_INVALID",
        )
    await stack.query_auth(ALICE, owner.session_token)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = {key.decode() async for key in client.scan_iter(match=f"{redis_prefix}:*")}
    finally:
        await client.aclose()
    limits = {key.split(":")[2] for key in keys}
    assert {"submit-session", "sms-session", "report-session", "submit-user", "sms-user", "report-user"} <= limits
    # A session's key is a digest, never the session id the token carries.
    session_id = stolen.session_token.split(".")[1]
    assert not any(session_id in key for key in keys)


# --- two gateway processes on one Redis -------------------------------------------------------------


class CodeCatcher(notifier_pb2_grpc.NotifierServicer):
    """Stands in for the notifier: keeps the last code sent to each phone."""

    def __init__(self) -> None:
        self.codes: dict[str, str] = {}

    async def Send(self, request, context):
        if "code" in request.params:
            self.codes[request.phone] = request.params["code"]
        return notifier_pb2.SendResponse()


@pytest.mark.redis
@pytest.mark.e2e
async def test_two_gateway_processes_hold_one_global_limit(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    fakes,
):
    limit = 20
    fake_port, bank, _ = fakes
    catcher = CodeCatcher()
    notifier = grpc.aio.server()
    notifier_pb2_grpc.add_NotifierServicer_to_server(catcher, notifier)
    notifier_port = notifier.add_insecure_port("127.0.0.1:0")
    await notifier.start()

    env = {
        "CARDCHECK_REPORT_SERVICE_ADDR": f"127.0.0.1:{fake_port}",
        "CARDCHECK_BANK_CONNECTOR_ADDR": f"127.0.0.1:{fake_port}",
        "CARDCHECK_NOTIFIER_ADDR": f"127.0.0.1:{notifier_port}",
        "CARDCHECK_REDIS_URL": redis_url,
        "CARDCHECK_REDIS_KEY_PREFIX": redis_prefix,
        "CARDCHECK_REDIS_TIMEOUT_S": "5",  # a loaded test machine must not look like a Redis outage
        # `limit` admissions, then one more per 1000 s; each user's own limit out of the way.
        "CARDCHECK_SUBMIT_GLOBAL_RPS": "0.001",
        "CARDCHECK_SUBMIT_GLOBAL_BURST": str(limit),
        "CARDCHECK_SUBMIT_USER_PER_MINUTE": "60000",
        "CARDCHECK_SUBMIT_USER_BURST": "10000",
    }
    # One data directory (one SQLite file and one master key) for both.
    processes = [ServiceProcess("gateway", tmp_path, health_service="cardcheck.v1.CardCheck", **env) for _ in range(2)]
    channels: list[grpc.aio.Channel] = []
    try:
        for process in processes:  # one after the other: the first creates the tables
            await process.start()
        channels = [grpc.aio.insecure_channel(process.address) for process in processes]
        gateways = [gateway_pb2_grpc.CardCheckStub(channel) for channel in channels]

        # A user registers through the first gateway; the token works on both.
        bank.enrol(ALICE)
        challenge = await gateways[0].RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(phone=ALICE.phone, purpose=common_pb2.SMS_PURPOSE_REGISTER)
        )
        session = await gateways[0].Register(
            gateway_pb2.RegisterRequest(
                name=ALICE.name,
                id_number=ALICE.id_number,
                phone=ALICE.phone,
                challenge_id=challenge.challenge_id,
                sms_code=catcher.codes[ALICE.phone],
                card_number=ALICE.card_number,
                payment_password=PASSWORD,
                region=ALICE.region,
            )
        )
        metadata = bearer(session.session_token)

        async def submit(i: int) -> tuple[int, str]:
            # Admitted submissions go on to validation (this one is empty): INVALID_ARGUMENT.
            try:
                await gateways[i % 2].SubmitQuery(
                    gateway_pb2.SubmitQueryRequest(), metadata=metadata, timeout=30
                )
            except grpc.aio.AioRpcError as error:
                typed = from_rpc_error(error)
                return i % 2, typed.reason if typed is not None else error.code().name
            return i % 2, "OK"

        answers = await asyncio.gather(*(submit(i) for i in range(6 * limit)))
    finally:
        for channel in channels:
            await channel.close()
        await asyncio.gather(*(process.stop() for process in processes))
        await notifier.stop(0)

    reasons = {reason for _, reason in answers}
    assert reasons <= {"INVALID_ARGUMENT", "SERVICE_BUSY"}, reasons
    admitted = [gateway for gateway, reason in answers if reason == "INVALID_ARGUMENT"]
    busy = [gateway for gateway, reason in answers if reason == "SERVICE_BUSY"]
    # One budget for both: each alone would have admitted `limit` (2 * limit together).
    assert limit <= len(admitted) <= limit + 1, (len(admitted), admitted.count(0), admitted.count(1))
    assert busy.count(0) >= 2 * limit and busy.count(1) >= 2 * limit
    assert [p.returncode for p in processes] == [0, 0]
