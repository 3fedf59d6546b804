"""bank_connector against a real `python -m bank_sim` process whose banks are made slow, flaky,
hanging, down, malformed or full through BankSimControl: deadlines, retries (only what may be
retried, within the budget), the breaker opening and closing again, the bulkhead, the bank's
capacity, admission, and masking under faults. The connector runs in-process on a ManualClock
so that the breaker's open interval passes when the test says so."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import NoOpTracerProvider

from bank_connector.app import build as build_connector
from bank_connector.config import ConnectorConfig
from bank_connector.connector import BankConnector, OutcomeKind
from bank_connector.resilience import BreakerPolicy, RetryPolicy
from bank_sim.process import start_bank_sim
from cardcheck import dataset
from cardcheck.banks import BANK_CODES
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import bank_connector_pb2, bank_connector_pb2_grpc, bank_pb2, bank_pb2_grpc, common_pb2

SEED, PEOPLE = 7, 50
RECORDS = dataset.generate(SEED, PEOPLE)
DEMO = dataset.pick_demo_person(RECORDS)
DEMO_BANK = next(r.bank for r in RECORDS if r.pan == DEMO.card_number)
OTHERS = [code for code in BANK_CODES if code != DEMO_BANK]
NOW = datetime(2026, 11, 24, 4, 0, tzinfo=UTC)
ANSWERED = common_pb2.BANK_OUTCOME_KIND_ANSWERED
TIMED_OUT = common_pb2.BANK_OUTCOME_KIND_TIMED_OUT
ERROR = common_pb2.BANK_OUTCOME_KIND_ERROR
CIRCUIT_OPEN = common_pb2.BANK_OUTCOME_KIND_CIRCUIT_OPEN

# Quick retries; a breaker that only opens when a test means it to.
FAST = ConnectorConfig(
    retry=RetryPolicy(max_attempts=3, base_backoff_s=0.005, max_backoff_s=0.02),
    breaker=BreakerPolicy(consecutive_failures=1000, failure_rate=1.0, window=1000, min_calls=1000),
    budget_floor=1000,
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    child = start_bank_sim(tmp_path_factory.mktemp("sim"), ["--seed", str(SEED), "--people", str(PEOPLE)])
    yield child
    assert child.stop() == 0


class Sim:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.control = bank_pb2_grpc.BankSimControlStub(channel)

    async def set(self, banks=(DEMO_BANK,), **fields) -> None:
        behaviour = bank_pb2.BankBehaviour(**fields)
        await self.control.SetBehaviour(bank_pb2.SetBehaviourRequest(bank_codes=list(banks), behaviour=behaviour), timeout=10)

    async def state(self, bank: str = DEMO_BANK) -> bank_pb2.SimulatedBankState:
        return (await self.control.GetBehaviour(bank_pb2.GetBehaviourRequest(bank_codes=[bank]), timeout=10)).banks[0]


@pytest.fixture
async def bank_sim(sim):
    async with grpc.aio.insecure_channel(sim.address) as channel:
        handle = Sim(channel)
        await handle.control.SetBehaviour(bank_pb2.SetBehaviourRequest(reset=True), timeout=10)
        yield handle
        await handle.control.SetBehaviour(bank_pb2.SetBehaviourRequest(reset=True), timeout=10)


class Connector:
    def __init__(self, stub, channel, clock: ManualClock) -> None:
        self.stub = stub
        self.channel = channel
        self.clock = clock

    async def fan_out(self, banks=(DEMO_BANK,), per_bank_ms: int = 0, deadline_s: float = 20.0):
        request = bank_connector_pb2.FanOutRequest(
            id_number=DEMO.id_number, name=DEMO.name, bank_codes=list(banks), per_bank_timeout_ms=per_bank_ms
        )
        return [outcome async for outcome in self.stub.FanOut(request, timeout=deadline_s)]

    async def one(self, bank: str = DEMO_BANK, per_bank_ms: int = 0) -> common_pb2.BankOutcome:
        (outcome,) = await self.fan_out([bank], per_bank_ms)
        return outcome

    async def health(self, bank: str = DEMO_BANK) -> bank_connector_pb2.BankHealth:
        response = await self.stub.GetBankHealth(bank_connector_pb2.GetBankHealthRequest(), timeout=10)
        return next(h for h in response.banks if h.bank_code == bank)


@pytest.fixture(params=["traced", "untraced"])
async def start_connector(request, sim, tmp_path):
    """Each test runs with the caller's trace sampled (every bank attempt in its own span) and
    not sampled (the first attempts started by the fan-out itself, before any task runs)."""
    started = []
    sampler = ALWAYS_ON if request.param == "traced" else ALWAYS_OFF

    async def start(config: ConnectorConfig = FAST, per_bank_timeout_s: float = 5.0, rng=None) -> Connector:
        addresses = {service: f"127.0.0.1:{port}" for service, port in DEFAULT_PORTS.items()}
        addresses.update(bank_sim=sim.address, bank_connector="127.0.0.1:0")
        settings = Settings(addresses=addresses, data_dir=tmp_path, per_bank_timeout_s=per_bank_timeout_s)
        clock = ManualClock(NOW)
        host = await build_connector(
            settings, clock=clock, config=config, rng=rng,
            tracer_provider=make_tracer_provider(
                "bank_connector", tmp_path, exporter=InMemorySpanExporter(), sampler=sampler
            ),
        )
        port = await host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((host, channel))
        return Connector(bank_connector_pb2_grpc.BankConnectorStub(channel), channel, clock)

    yield start
    for host, channel in started:
        await channel.close()
        await host.stop(0)


async def wait_until(condition, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- deadlines ----------------------------------------------------------------------------------


async def test_a_hanging_bank_times_out_at_its_deadline_while_the_others_answer(bank_sim, start_connector):
    connector = await start_connector()
    await bank_sim.set(hang_rate=1.0)
    started = time.monotonic()
    outcomes = {o.bank_code: o for o in await connector.fan_out(BANK_CODES, per_bank_ms=700)}
    assert len(outcomes) == len(BANK_CODES)
    hung = outcomes[DEMO_BANK]
    assert (hung.kind, hung.detail, hung.attempts) == (TIMED_OUT, "DEADLINE_EXCEEDED", 1)
    assert hung.latency_ms >= 650 and time.monotonic() - started >= 0.65
    assert all(outcomes[code].kind == ANSWERED for code in OTHERS)
    await wait_until(lambda: _in_flight_is(bank_sim, 0))  # bank_sim let go of the call too


async def test_the_callers_deadline_bounds_the_bank_call(bank_sim, start_connector):
    connector = await start_connector(per_bank_timeout_s=30)
    await bank_sim.set(hang_rate=1.0)
    started = time.monotonic()
    (outcome,) = await connector.fan_out([DEMO_BANK], deadline_s=1.2)
    assert outcome.kind == TIMED_OUT and 800 <= outcome.latency_ms < 1200
    assert time.monotonic() - started < 1.2


# --- each fault, and what is retried -------------------------------------------------------------


async def test_a_down_bank_is_retried_up_to_the_attempt_limit_then_an_error(bank_sim, start_connector):
    connector = await start_connector()
    await bank_sim.set(down=True)
    before = (await bank_sim.state()).calls
    outcome = await connector.one()
    assert (outcome.kind, outcome.detail, outcome.attempts) == (ERROR, "UNAVAILABLE", 3)
    assert (await bank_sim.state()).calls - before == 3
    assert (await connector.health()).retries == 2


async def test_resource_exhausted_is_retried_and_a_retry_that_succeeds_answers(bank_sim, start_connector):
    connector = await start_connector(FAST.replace(retry=replace(FAST.retry, max_attempts=10)))
    await bank_sim.set(error_rate=0.5, error_code="RESOURCE_EXHAUSTED")
    outcomes = [await connector.one() for _ in range(30)]
    # A call fails all 10 attempts once in 1,024, so 3 of 30 only about once in 250,000 runs;
    # none of 30 retried into an answer, once in a billion.
    assert sum(o.kind == ANSWERED for o in outcomes) >= 28
    assert any(o.kind == ANSWERED and o.attempts > 1 for o in outcomes)
    assert all(o.cards for o in outcomes if o.kind == ANSWERED)


@pytest.mark.parametrize("code", ["INTERNAL", "PERMISSION_DENIED", "DEADLINE_EXCEEDED"])
async def test_other_errors_are_not_retried(bank_sim, start_connector, code):
    connector = await start_connector()
    await bank_sim.set(error_rate=1.0, error_code=code)
    before = (await bank_sim.state()).calls
    outcome = await connector.one()
    kind = TIMED_OUT if code == "DEADLINE_EXCEEDED" else ERROR
    assert (outcome.kind, outcome.detail, outcome.attempts) == (kind, code, 1)
    assert (await bank_sim.state()).calls - before == 1


class Jitter(random.Random):
    """Full jitter drawn always at the same point of its range."""

    def __init__(self, at: float) -> None:
        super().__init__()
        self.at = at

    def random(self) -> float:
        return self.at


async def test_no_retry_starts_after_the_deadline(bank_sim, start_connector):
    slow_backoff = FAST.replace(retry=RetryPolicy(max_attempts=5, base_backoff_s=2.0, max_backoff_s=2.0))
    await bank_sim.set(down=True)
    # A pause of 1 s would end past the 300 ms deadline: not taken, the call ends at once.
    late = await start_connector(slow_backoff, rng=Jitter(0.5))
    before = (await bank_sim.state()).calls
    outcomes = [await late.one(per_bank_ms=300) for _ in range(3)]
    assert all((o.kind, o.attempts) == (ERROR, 1) and o.latency_ms < 300 for o in outcomes), outcomes
    # Pauses of 10 ms leave time: every attempt the policy allows is made, within the deadline.
    early = await start_connector(slow_backoff, rng=Jitter(0.005))
    outcomes += [await early.one(per_bank_ms=300) for _ in range(3)]
    assert all((o.kind, o.attempts) == (ERROR, 5) and o.latency_ms < 300 for o in outcomes[3:]), outcomes
    assert (await bank_sim.state()).calls - before == 3 + 3 * 5


async def test_a_malformed_answer_is_an_error_and_carries_nothing(bank_sim, start_connector):
    connector = await start_connector()
    await bank_sim.set(malformed_rate=1.0)
    outcome = await connector.one()
    assert (outcome.kind, outcome.detail, outcome.attempts, list(outcome.cards)) == (ERROR, "MALFORMED_ANSWER", 1, [])
    # a verdict that contradicts itself counts as no answer from that bank: undecided
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connector.stub.VerifyRealName(
            bank_connector_pb2.VerifyRealNameRequest(
                card_number=DEMO.card_number, name=DEMO.name, id_number=DEMO.id_number, phone=DEMO.phone
            ),
            timeout=20,
        )
    assert from_rpc_error(caught.value).reason == "SERVICE_UNAVAILABLE"


# --- the retry budget ----------------------------------------------------------------------------


async def test_the_retry_budget_caps_retries_at_its_floor_plus_a_share_of_calls(bank_sim, start_connector):
    connector = await start_connector(FAST.replace(budget_floor=5, budget_ratio=0.1))
    await bank_sim.set(down=True)
    before = (await bank_sim.state()).calls
    for _ in range(40):
        await connector.one()
    health = await connector.health()
    assert 5 <= health.retries <= 5 + 0.1 * 40  # the floor, then one for every ten calls
    assert (await bank_sim.state()).calls - before == 40 + health.retries  # the bank saw 1.2x, not 3x


# --- the circuit breaker -------------------------------------------------------------------------


async def test_with_the_issuers_breaker_open_the_real_name_check_is_unavailable_and_asks_no_bank(
    bank_sim, start_connector
):
    breaker = BreakerPolicy(consecutive_failures=3, failure_rate=1.0, window=100, min_calls=100,
                            open_for=timedelta(seconds=30))
    connector = await start_connector(FAST.replace(breaker=breaker, retry=RetryPolicy(max_attempts=1)))
    await bank_sim.set(down=True)
    for _ in range(3):
        await connector.one()
    assert (await connector.health()).breaker_state == "OPEN"
    await bank_sim.set(down=False)  # well again, but the breaker does not know it yet

    async def verify_calls() -> dict[str, int]:
        state = await bank_sim.control.GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=10)
        return {bank.bank_code: bank.verify_calls for bank in state.banks}

    before = await verify_calls()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connector.stub.VerifyRealName(
            bank_connector_pb2.VerifyRealNameRequest(
                card_number=DEMO.card_number, name=DEMO.name, id_number=DEMO.id_number, phone=DEMO.phone
            ),
            timeout=20,
        )
    assert from_rpc_error(caught.value).reason == "SERVICE_UNAVAILABLE"
    assert await verify_calls() == before  # failed fast: neither the issuer nor any other bank asked


async def test_the_breaker_opens_fails_fast_then_probes_and_closes_again(bank_sim, start_connector):
    breaker = BreakerPolicy(consecutive_failures=3, failure_rate=1.0, window=100, min_calls=100,
                            open_for=timedelta(seconds=30))
    connector = await start_connector(FAST.replace(breaker=breaker, retry=RetryPolicy(max_attempts=1)))
    await bank_sim.set(down=True)
    assert [(await connector.one()).kind for _ in range(3)] == [ERROR] * 3
    assert (await connector.health()).breaker_state == "OPEN"

    before = (await bank_sim.state()).calls
    outcomes = await connector.fan_out(BANK_CODES)
    fast = next(o for o in outcomes if o.bank_code == DEMO_BANK)
    assert (fast.kind, fast.detail, fast.attempts) == (CIRCUIT_OPEN, "CIRCUIT_OPEN", 0)
    assert all(o.kind == ANSWERED for o in outcomes if o.bank_code != DEMO_BANK)
    assert (await bank_sim.state()).calls == before  # not asked at all
    banks = (await connector.stub.ListBanks(bank_connector_pb2.BankConnectorListBanksRequest(), timeout=10)).banks
    assert not next(b for b in banks if b.code == DEMO_BANK).available

    # open interval over, the bank still down: the probe fails and the breaker opens again
    connector.clock.advance(timedelta(seconds=31))
    assert (await connector.health()).breaker_state == "HALF_OPEN"
    assert (await connector.one()).kind == ERROR
    assert (await connector.health()).breaker_state == "OPEN"
    assert (await connector.one()).kind == CIRCUIT_OPEN

    # the bank recovers: after the interval the probe succeeds and the breaker closes
    await bank_sim.set(down=False)
    connector.clock.advance(timedelta(seconds=31))
    outcome = await connector.one()
    assert outcome.kind == ANSWERED and outcome.cards
    health = await connector.health()
    assert (health.breaker_state, health.breaker_openings, health.short_circuited) == ("CLOSED", 2, 2)
    assert (await connector.one()).kind == ANSWERED


async def test_a_high_failure_rate_opens_the_breaker_too(bank_sim, start_connector):
    breaker = BreakerPolicy(consecutive_failures=1000, failure_rate=0.5, window=20, min_calls=20)
    connector = await start_connector(FAST.replace(breaker=breaker, retry=RetryPolicy(max_attempts=1)))
    await bank_sim.set(error_rate=0.8, error_code="UNAVAILABLE")
    kinds = [(await connector.one()).kind for _ in range(40)]
    assert CIRCUIT_OPEN in kinds and kinds.index(CIRCUIT_OPEN) >= 20


# --- bulkhead and the bank's capacity -------------------------------------------------------------


async def test_the_bulkhead_holds_a_slow_bank_to_its_slots_and_the_others_are_not_starved(bank_sim, start_connector):
    config = FAST.replace(bank_concurrency={DEMO_BANK: 2})
    connector = await start_connector(config)
    await bank_sim.set(latency_ms=120_000)
    slow = [asyncio.create_task(connector.one(per_bank_ms=180_000)) for _ in range(3)]
    try:
        async def two_at_the_bank_one_waiting() -> bool:
            health = await connector.health()
            return health.in_flight == 2 and health.waiting == 1

        await wait_until(two_at_the_bank_one_waiting)
        assert (await bank_sim.state()).in_flight == 2  # the bank never sees more than its slots
        others = await connector.fan_out(OTHERS)
        assert all(o.kind == ANSWERED for o in others)  # not queued behind the slow bank
        assert not any(task.done() for task in slow)
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
    # the callers gave up: their calls are cancelled at the bank too, long before its latency
    await wait_until(lambda: _in_flight_is(bank_sim, 0))


async def test_a_bank_at_capacity_refuses_and_a_bulkhead_sized_to_it_avoids_that(bank_sim, start_connector):
    await bank_sim.set(capacity=1, latency_ms=300)
    no_retry = await start_connector(FAST.replace(retry=RetryPolicy(max_attempts=1)))
    outcomes = await asyncio.gather(*(no_retry.one() for _ in range(3)))
    assert sorted((o.kind, o.detail) for o in outcomes) == sorted(
        [(ANSWERED, ""), (ERROR, "RESOURCE_EXHAUSTED"), (ERROR, "RESOURCE_EXHAUSTED")]
    )

    refused_before = (await bank_sim.state()).refused
    sized = await start_connector(FAST.replace(retry=RetryPolicy(max_attempts=1), bank_concurrency={DEMO_BANK: 1}))
    outcomes = await asyncio.gather(*(sized.one() for _ in range(3)))
    assert [o.kind for o in outcomes] == [ANSWERED] * 3
    assert (await bank_sim.state()).refused == refused_before


# --- admission ----------------------------------------------------------------------------------


async def test_past_its_queue_the_connector_refuses_cleanly_with_service_busy(bank_sim, start_connector):
    connector = await start_connector(FAST.replace(max_active=1, max_queued=1))
    await bank_sim.set(latency_ms=800)
    first = asyncio.create_task(connector.fan_out())
    second = asyncio.create_task(connector.fan_out())
    try:
        async def one_active_one_queued() -> bool:
            health = await connector.stub.GetBankHealth(bank_connector_pb2.GetBankHealthRequest(), timeout=10)
            return (health.requests_active, health.requests_queued) == (1, 1)

        await wait_until(one_active_one_queued)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await connector.fan_out()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        error = from_rpc_error(caught.value)
        assert error.reason == "SERVICE_BUSY" and error.retry_after is not None
        health = await connector.stub.GetBankHealth(bank_connector_pb2.GetBankHealthRequest(), timeout=10)
        assert health.requests_refused == 1
        assert [o.kind for o in await first] == [ANSWERED]
        assert [o.kind for o in await second] == [ANSWERED]  # queued, then served
    finally:
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)


async def _in_flight_is(bank_sim, count: int) -> bool:
    return (await bank_sim.state()).in_flight == count


# --- masking holds under faults -----------------------------------------------------------------


async def test_no_full_card_number_leaves_even_when_banks_fail_and_are_retried(bank_sim, start_connector):
    connector = await start_connector()
    await bank_sim.set(BANK_CODES, error_rate=0.3, malformed_rate=0.2)
    raw_fan_out = connector.channel.unary_stream(
        "/cardcheck.v1.BankConnector/FanOut",
        request_serializer=bank_connector_pb2.FanOutRequest.SerializeToString,
        response_deserializer=lambda raw: raw,
    )
    frames = []
    for id_number, name in dict.fromkeys((r.id_number, r.holder_name) for r in RECORDS):
        request = bank_connector_pb2.FanOutRequest(id_number=id_number, name=name, bank_codes=BANK_CODES)
        frames.extend([raw async for raw in raw_fan_out(request, timeout=20)])
    outcomes = [common_pb2.BankOutcome.FromString(raw) for raw in frames]
    assert {o.kind for o in outcomes} >= {ANSWERED, ERROR}
    assert any(o.attempts > 1 for o in outcomes) and sum(len(o.cards) for o in outcomes) > 10
    wire = b"\n".join(frames)
    for record in RECORDS:
        assert record.pan.encode() not in wire
        assert record.pan[:8].encode() not in wire and record.pan[-8:].encode() not in wire
    assert b"not-a-card" not in wire


async def test_a_first_attempt_whose_task_never_ran_is_cancelled_and_its_slot_freed(bank_sim, sim, tmp_path):
    await bank_sim.set(latency_ms=120_000)
    connector = BankConnector(
        dict.fromkeys(BANK_CODES, sim.address), tracer_provider=make_tracer_provider("c", tmp_path),
        clock=ManualClock(NOW), default_timeout_s=5, config=FAST.replace(bank_concurrency={DEMO_BANK: 1}),
    )
    try:
        request = bank_pb2.LookupCardsRequest(bank_code=DEMO_BANK, id_number=DEMO.id_number, name=DEMO.name)
        launched = connector.launch(DEMO_BANK, "LookupCards", request, 60)
        assert launched is not None
        assert connector.launch(DEMO_BANK, "LookupCards", request, 60) is None  # its one slot is taken
        await wait_until(lambda: _in_flight_is(bank_sim, 1))
        connector._abandon([(DEMO_BANK, launched)])  # noqa: SLF001 - what a fan-out does on its way out
        await wait_until(lambda: _in_flight_is(bank_sim, 0))  # cancelled at the bank
        health = next(h for h in connector.health() if h.bank_code == DEMO_BANK)
        assert health.in_flight == 0
        again = connector.launch(DEMO_BANK, "LookupCards", request, 60)
        assert again is not None
        connector._abandon([(DEMO_BANK, again)])  # noqa: SLF001
    finally:
        await connector.close()


async def test_a_pause_while_a_first_attempt_is_made_never_shows_its_deadline_met_early(bank_sim, sim, tmp_path):
    """A launched attempt's deadline counts from the moment the call is made; its latency must
    count from no later, or a pause right after (a garbage collection, the process descheduled)
    reports a bank timed out before its deadline."""
    await bank_sim.set(hang_rate=1.0)
    connector = BankConnector(
        dict.fromkeys(BANK_CODES, sim.address), tracer_provider=NoOpTracerProvider(),  # untraced: launched
        clock=ManualClock(NOW), default_timeout_s=5, config=FAST,
    )
    stub = connector._lines[DEMO_BANK].stub  # noqa: SLF001 - the pause goes where the call is made
    make_call = stub.LookupCards

    def make_call_then_pause(*args, **kwargs):
        call = make_call(*args, **kwargs)
        time.sleep(0.2)
        return call

    stub.LookupCards = make_call_then_pause
    try:
        (outcome,) = [o async for o in connector.fan_out(DEMO.id_number, DEMO.name, [DEMO_BANK], 0.5)]
        assert (outcome.kind, outcome.detail, outcome.attempts) == (OutcomeKind.TIMED_OUT, "DEADLINE_EXCEEDED", 1)
        assert outcome.latency_ms >= 500
    finally:
        await connector.close()
