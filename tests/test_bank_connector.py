"""bank_connector against a real bank_sim (both started in-process on port 0): fan-out streams
one masked outcome per bank as it arrives, slow and unreachable banks become TIMED_OUT and
ERROR, the real-name check, availability and health, and no full card number on the wire."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bank_connector.app import build as build_connector
from bank_connector.connector import UNKNOWN_ISSUER, call_timeout
from bank_sim.app import build as build_sim
from bank_sim.process import free_port
from cardcheck import bins, dataset
from cardcheck.banks import BANK_CODES, BY_CODE
from cardcheck.numbers import luhn_check_digit
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import (
    bank_connector_pb2,
    bank_connector_pb2_grpc,
    bank_pb2,
    bank_pb2_grpc,
    common_pb2,
)
from tests.harness.processes import ServiceProcess

TODAY = datetime(2026, 11, 24, 4, 0, tzinfo=UTC)  # noon in Beijing
RECORDS = dataset.generate(424242, 40)
DEMO = dataset.pick_demo_person(RECORDS)
DEMO_BANK = next(r.bank for r in RECORDS if r.pan == DEMO.card_number)
ANSWERED = common_pb2.BANK_OUTCOME_KIND_ANSWERED
TIMED_OUT = common_pb2.BANK_OUTCOME_KIND_TIMED_OUT
ERROR = common_pb2.BANK_OUTCOME_KIND_ERROR
CARD_TYPES = {"DEBIT": common_pb2.CARD_TYPE_DEBIT, "CREDIT": common_pb2.CARD_TYPE_CREDIT}


def findable(r: dataset.CardRecord) -> bool:
    """FORMAT.md's rules, written out again independently of bank_sim."""
    day = TODAY.date()  # noon in Beijing is the same calendar day
    return (
        r.status != "CLOSED" and r.reserved_phone is not None and r.cnp_enabled
        and (r.id_expiry is None or r.id_expiry >= day)
    )


def expected_cards(id_number: str, name: str, bank: str) -> list[tuple]:
    return sorted(
        (r.bank, BY_CODE[r.bank].name, CARD_TYPES[r.card_type], r.pan[:4], r.pan[-4:])
        for r in RECORDS
        if r.bank == bank and r.id_number.upper() == id_number.upper() and r.holder_name == name and findable(r)
    )


def people() -> list[tuple[str, str]]:
    return list(dict.fromkeys((r.id_number.upper(), r.holder_name) for r in RECORDS))


def make_settings(tmp_path, sim_port: int, **bank_addresses: str) -> Settings:
    addresses = {service: f"127.0.0.1:{port}" for service, port in DEFAULT_PORTS.items()}
    addresses["bank_sim"] = f"127.0.0.1:{sim_port}"
    addresses["bank_connector"] = "127.0.0.1:0"
    return Settings(addresses=addresses, data_dir=tmp_path, bank_addresses=bank_addresses, per_bank_timeout_s=5.0)


class SilentBank(bank_pb2_grpc.IssuingBankServicer):
    """A bank that accepts calls and never answers them."""

    async def LookupCards(self, request, context):
        await asyncio.Event().wait()

    async def VerifyCard(self, request, context):
        await asyncio.Event().wait()


@pytest.fixture
def sim_spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def sim_port(tmp_path, sim_spans):
    host = await build_sim(
        make_settings(tmp_path, 0),
        records=RECORDS,
        clock=ManualClock(TODAY),
        tracer_provider=make_tracer_provider("bank_sim", tmp_path, exporter=sim_spans),
    )
    port = await host.start()
    yield port
    await host.stop(0)


@pytest.fixture
async def silent_bank():
    server = grpc.aio.server()
    bank_pb2_grpc.add_IssuingBankServicer_to_server(SilentBank(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


class Connector:
    """A started bank_connector and a channel to it."""

    def __init__(self, host, channel, spans: InMemorySpanExporter, clock: ManualClock) -> None:
        self.host = host
        self.channel = channel
        self.stub = bank_connector_pb2_grpc.BankConnectorStub(channel)
        self.spans = spans
        self.clock = clock

    async def fan_out(self, id_number=DEMO.id_number, name=DEMO.name, bank_codes=BANK_CODES, deadline_s=10.0, **kw):
        request = bank_connector_pb2.FanOutRequest(id_number=id_number, name=name, bank_codes=bank_codes, **kw)
        return [outcome async for outcome in self.stub.FanOut(request, timeout=deadline_s)]


@pytest.fixture
async def start_connector(tmp_path, sim_port):
    started: list[Connector] = []

    async def start(**bank_addresses: str) -> Connector:
        spans = InMemorySpanExporter()
        clock = ManualClock(TODAY)
        host = await build_connector(
            make_settings(tmp_path, sim_port, **bank_addresses),
            clock=clock,
            tracer_provider=make_tracer_provider("bank_connector", tmp_path, exporter=spans),
        )
        port = await host.start()
        connector = Connector(host, grpc.aio.insecure_channel(f"127.0.0.1:{port}"), spans, clock)
        started.append(connector)
        return connector

    yield start
    for connector in started:
        await connector.channel.close()
        await connector.host.stop(0)


def as_tuples(outcome) -> list[tuple]:
    return sorted((c.bank_code, c.bank_name, c.card_type, c.first4, c.last4) for c in outcome.cards)


async def test_fan_out_gives_every_bank_its_masked_cards(start_connector):
    connector = await start_connector()
    for id_number, name in [(DEMO.id_number, DEMO.name), *people()[1:8]]:
        outcomes = await connector.fan_out(id_number, name)
        assert sorted(o.bank_code for o in outcomes) == sorted(BANK_CODES)
        for outcome in outcomes:
            assert outcome.kind == ANSWERED and outcome.attempts == 1 and outcome.detail == ""
            assert as_tuples(outcome) == expected_cards(id_number, name, outcome.bank_code)
    demo = await connector.fan_out()
    found = [card for outcome in demo for card in outcome.cards]
    assert len(found) >= 5 and len({c.bank_code for c in found}) >= 4


async def test_fan_out_finds_a_lower_case_x_record_and_only_the_banks_asked(start_connector):
    connector = await start_connector()
    lower = next(r for r in RECORDS if r.id_number.endswith("x") and findable(r))
    outcomes = await connector.fan_out(lower.id_number.upper(), lower.holder_name, [lower.bank, "ICBC", lower.bank])
    assert sorted(o.bank_code for o in outcomes) == sorted({lower.bank, "ICBC"})
    by_bank = {o.bank_code: o for o in outcomes}
    assert (lower.pan[:4], lower.pan[-4:]) in {(c.first4, c.last4) for c in by_bank[lower.bank].cards}


async def test_an_unknown_bank_is_refused_as_unknown_bank(start_connector):
    connector = await start_connector()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connector.fan_out(bank_codes=["ICBC", "NOSUCH"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert error.reason == "UNKNOWN_BANK" and error.metadata == {"bank_code": "NOSUCH"}


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"bank_codes": []}, ["bank_codes"]),
        ({"id_number": ""}, ["id_number"]),
        ({"id_number": "110105199906138212"}, ["id_number"]),
        ({"name": " "}, ["name"]),
        ({"per_bank_timeout_ms": -1}, ["per_bank_timeout_ms"]),
    ],
)
async def test_bad_fan_out_requests_are_invalid_argument(start_connector, changes, fields):
    connector = await start_connector()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connector.fan_out(**changes)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert error.reason == "INVALID_ARGUMENT" and [v.field for v in error.violations] == fields


async def test_an_unreachable_bank_is_an_error_while_the_others_answer(start_connector):
    demo_bank = next(r.bank for r in RECORDS if r.pan == DEMO.card_number)
    connector = await start_connector(**{demo_bank: f"127.0.0.1:{free_port()}"})
    outcomes = {o.bank_code: o for o in await connector.fan_out()}
    assert len(outcomes) == len(BANK_CODES)
    assert outcomes[demo_bank].kind == ERROR and outcomes[demo_bank].detail == "UNAVAILABLE"
    assert not outcomes[demo_bank].cards
    others = [o for code, o in outcomes.items() if code != demo_bank]
    assert all(o.kind == ANSWERED for o in others)
    assert sum(len(o.cards) for o in others) >= 4


async def test_a_silent_bank_times_out_after_the_others_have_streamed(start_connector, silent_bank):
    connector = await start_connector(ICBC=silent_bank)
    request = bank_connector_pb2.FanOutRequest(
        id_number=DEMO.id_number, name=DEMO.name, bank_codes=BANK_CODES, per_bank_timeout_ms=600
    )
    started = time.monotonic()
    arrivals = []
    async for outcome in connector.stub.FanOut(request, timeout=10):
        arrivals.append((time.monotonic() - started, outcome))
    assert len(arrivals) == len(BANK_CODES)
    last_at, last = arrivals[-1]
    assert last.bank_code == "ICBC" and last.kind == TIMED_OUT and last.detail == "DEADLINE_EXCEEDED"
    assert last.latency_ms >= 550 and last_at >= 0.55
    # The answering banks were streamed as they came, not held back for the slow one.
    assert arrivals[0][0] < 0.5
    assert all(o.kind == ANSWERED for _, o in arrivals[:-1])


async def test_the_callers_deadline_caps_every_bank_call(start_connector, silent_bank):
    connector = await start_connector(CMB=silent_bank)
    # No per-bank deadline (the default is 5 s) but the caller allows only 1.5 s: the silent
    # bank's TIMED_OUT still reaches the caller in time.
    outcomes = {o.bank_code: o for o in await connector.fan_out(bank_codes=["CMB", "ICBC"], deadline_s=1.5)}
    assert outcomes["CMB"].kind == TIMED_OUT and 1000 <= outcomes["CMB"].latency_ms < 1500
    assert outcomes["ICBC"].kind == ANSWERED


def test_call_timeout_rules():
    assert call_timeout(0, 5.0, None) == 5.0
    assert call_timeout(250, 5.0, None) == 0.25
    assert call_timeout(0, 5.0, 2.0) == pytest.approx(1.75)
    assert call_timeout(300, 5.0, 2.0) == pytest.approx(0.3)
    assert call_timeout(0, 5.0, 0.5) == pytest.approx(0.4)
    assert call_timeout(0, 5.0, -1.0) > 0


async def verify(connector, card_number=DEMO.card_number, name=DEMO.name, id_number=DEMO.id_number,
                 phone=DEMO.phone):
    return await connector.stub.VerifyRealName(
        bank_connector_pb2.VerifyRealNameRequest(card_number=card_number, name=name, id_number=id_number, phone=phone),
        timeout=10,
    )


async def test_verify_real_name_confirms_with_the_bank_that_holds_the_card(start_connector):
    connector = await start_connector()
    result = await verify(connector)
    assert result.confirmed
    assert result.bank_code == next(r.bank for r in RECORDS if r.pan == DEMO.card_number)
    assert (await verify(connector, id_number=DEMO.id_number.lower())).confirmed


async def test_verify_real_name_denies_a_mismatch(start_connector):
    connector = await start_connector()
    other_phone = "13" + DEMO.phone[2:][::-1] if DEMO.phone[2:][::-1] != DEMO.phone[2:] else "13900000000"
    closed = next(r for r in RECORDS if r.status == "CLOSED")
    unknown = "6212261" + "0" * 11  # an ICBC BIN, a card ICBC never issued
    for result in [
        await verify(connector, phone=other_phone),
        await verify(connector, name=DEMO.name + "某"),
        await verify(connector, card_number=closed.pan, name=closed.holder_name, id_number=closed.id_number,
                     phone=closed.reserved_phone or DEMO.phone),
        await verify(connector, card_number=unknown + luhn_check_digit(unknown)),
    ]:
        assert not result.confirmed and result.bank_code == ""


async def test_verify_real_name_refuses_a_bad_card_number(start_connector):
    connector = await start_connector()
    body = "621226000000000000"
    wrong_check = body + str((int(luhn_check_digit(body)) + 1) % 10)
    for bad in [wrong_check, "621226", "6212x60000000000000", "6" * 20, ""]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await verify(connector, card_number=bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in from_rpc_error(caught.value).violations] == ["card_number"]


async def test_verify_real_name_is_undecided_only_when_the_issuer_cannot_be_asked(start_connector):
    connector = await start_connector(GDRCC=f"127.0.0.1:{free_port()}")
    assert DEMO_BANK != "GDRCC"
    assert (await verify(connector)).confirmed  # the card's bank answered: decided
    held = next(r for r in RECORDS if r.bank == "GDRCC" and r.status == "ACTIVE" and r.reserved_phone)
    unknown = "6217281" + "0" * 11  # a GDRCC BIN, a card GDRCC never issued: only GDRCC can say so
    for number, holder in [(held.pan, held), (unknown + luhn_check_digit(unknown), held)]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await verify(connector, card_number=number, name=holder.holder_name, id_number=holder.id_number,
                         phone=holder.reserved_phone)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert from_rpc_error(caught.value).reason == "SERVICE_UNAVAILABLE"


# --- need to know: the real-name check asks the card's issuer and no other bank ----------------


@pytest.fixture
async def sim_control(sim_port):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim_port}") as channel:
        yield bank_pb2_grpc.BankSimControlStub(channel)


async def counts(control) -> dict[str, tuple[int, int]]:
    """Each bank's (VerifyCard, LookupCards) calls so far."""
    state = await control.GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=5)
    return {bank.bank_code: (bank.verify_calls, bank.lookup_calls) for bank in state.banks}


async def asked(control, before: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The banks that got VerifyCard calls since `before`, with how many; no lookups either."""
    after = await counts(control)
    assert all(after[code][1] == before[code][1] for code in BANK_CODES)
    return {code: after[code][0] - before[code][0] for code in BANK_CODES if after[code][0] != before[code][0]}


def unclaimed_card(length: int = 16) -> str:
    body = "623999" + "4" * (length - 7)
    number = body + luhn_check_digit(body)
    assert bins.default_table().issuer_of(number) is None
    return number


async def test_a_verification_reaches_the_issuer_and_no_other_bank(start_connector, sim_control):
    connector = await start_connector()
    one_per_bank = {}
    for r in RECORDS:
        one_per_bank.setdefault(r.bank, r)
    assert len(one_per_bank) == len(BANK_CODES)
    for record in [*one_per_bank.values(), next(r for r in RECORDS if r.pan == DEMO.card_number)]:
        before = await counts(sim_control)
        result = await verify(connector, card_number=record.pan, name=record.holder_name,
                              id_number=record.id_number, phone=record.reserved_phone or DEMO.phone)
        assert await asked(sim_control, before) == {record.bank: 1}, record.bank
        if record.status != "CLOSED" and record.reserved_phone:
            assert (result.confirmed, result.bank_code) == (True, record.bank)
        else:
            assert (result.confirmed, result.bank_code) == (False, "")


async def test_a_card_of_no_known_issuer_is_refused_without_asking_any_bank(start_connector, sim_control):
    connector = await start_connector()
    for number in [unclaimed_card(16), unclaimed_card(19), "9" * 15 + luhn_check_digit("9" * 15)]:
        before = await counts(sim_control)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await verify(connector, card_number=number)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = from_rpc_error(caught.value)
        assert (error.reason, error.metadata) == ("INVALID_ARGUMENT", {"cause": "UNKNOWN_ISSUER"})
        assert [(v.field, v.description) for v in error.violations] == [("card_number", UNKNOWN_ISSUER)]
        assert await asked(sim_control, before) == {}


async def test_the_issuer_down_is_service_unavailable_and_no_other_bank_is_asked(start_connector, sim_control):
    connector = await start_connector()
    await sim_control.SetBehaviour(
        bank_pb2.SetBehaviourRequest(bank_codes=[DEMO_BANK], behaviour=bank_pb2.BankBehaviour(down=True)), timeout=5
    )
    before = await counts(sim_control)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await verify(connector)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(caught.value).reason == "SERVICE_UNAVAILABLE"
    tries = await asked(sim_control, before)
    assert list(tries) == [DEMO_BANK] and 1 <= tries[DEMO_BANK] <= 3  # retried at the issuer alone


async def test_a_silent_issuer_is_service_unavailable_within_the_callers_deadline(start_connector, silent_bank):
    connector = await start_connector(**{DEMO_BANK: silent_bank})
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connector.stub.VerifyRealName(
            bank_connector_pb2.VerifyRealNameRequest(
                card_number=DEMO.card_number, name=DEMO.name, id_number=DEMO.id_number, phone=DEMO.phone
            ),
            timeout=1.5,
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert from_rpc_error(caught.value).reason == "SERVICE_UNAVAILABLE"
    assert time.monotonic() - started < 1.5


async def test_a_card_its_issuer_holds_under_another_name_is_not_confirmed(start_connector, sim_control):
    connector = await start_connector()
    other = next(r for r in RECORDS if r.id_number.upper() != DEMO.id_number.upper() and r.bank != DEMO_BANK)
    before = await counts(sim_control)
    for name, id_number, phone in [
        (other.holder_name, other.id_number, other.reserved_phone or DEMO.phone),  # someone else
        (other.holder_name, DEMO.id_number, DEMO.phone),  # another name alone
    ]:
        result = await verify(connector, name=name, id_number=id_number, phone=phone)
        assert (result.confirmed, result.bank_code) == (False, "")
    assert await asked(sim_control, before) == {DEMO_BANK: 2}  # never the other person's banks


async def test_list_banks_marks_unreachable_banks_unavailable(start_connector):
    dead = f"127.0.0.1:{free_port()}"
    connector = await start_connector(JLYLB=dead)
    response = await connector.stub.ListBanks(bank_connector_pb2.BankConnectorListBanksRequest(), timeout=5)
    banks = {b.code: b for b in response.banks}
    assert list(banks) == list(BANK_CODES)
    assert not banks["JLYLB"].available
    assert all(b.available for code, b in banks.items() if code != "JLYLB")
    assert banks["JLYLB"].name == "吉林亿联银行" and banks["JLYLB"].kind == common_pb2.BANK_KIND_REGIONAL
    assert banks["ICBC"].kind == common_pb2.BANK_KIND_NATIONAL


async def test_list_banks_caches_reachability_for_a_few_seconds(start_connector):
    # A bank server that comes up later: unavailable until the cached answer has expired.
    port = free_port()
    connector = await start_connector(JLYLB=f"127.0.0.1:{port}")
    request = bank_connector_pb2.BankConnectorListBanksRequest()

    async def jlylb_available() -> bool:
        response = await connector.stub.ListBanks(request, timeout=5)
        return next(b for b in response.banks if b.code == "JLYLB").available

    assert not await jlylb_available()
    late = grpc.aio.server()
    bank_pb2_grpc.add_IssuingBankServicer_to_server(SilentBank(), late)
    assert late.add_insecure_port(f"127.0.0.1:{port}") == port
    await late.start()
    try:
        assert not await jlylb_available()  # still the cached answer
        connector.clock.advance(timedelta(seconds=5))
        deadline = time.monotonic() + 10
        while not await jlylb_available():  # reachable (no health service: UNIMPLEMENTED)
            assert time.monotonic() < deadline
            connector.clock.advance(timedelta(seconds=5))
            await asyncio.sleep(0.05)
    finally:
        await late.stop(0)


async def test_bank_health_counts_calls_failures_and_latency(start_connector):
    connector = await start_connector(CCB=f"127.0.0.1:{free_port()}")
    for _ in range(3):
        await connector.fan_out(bank_codes=["ICBC", "CCB"])
    response = await connector.stub.GetBankHealth(bank_connector_pb2.GetBankHealthRequest(), timeout=5)
    health = {h.bank_code: h for h in response.banks}
    assert list(health) == list(BANK_CODES)
    assert (health["ICBC"].calls, health["ICBC"].failures, health["ICBC"].success_rate) == (3, 0, 1.0)
    assert 0 < health["ICBC"].latency_p50_ms <= health["ICBC"].latency_p99_ms
    # CCB is unreachable: UNAVAILABLE is retried (3 attempts, then 2 more) until five failures
    # in a row open its breaker, which then fails the rest fast, the third fan-out included.
    ccb = health["CCB"]
    assert (ccb.calls, ccb.failures, ccb.success_rate, ccb.retries) == (5, 5, 0.0, 3)
    assert (ccb.breaker_state, ccb.breaker_openings, ccb.short_circuited) == ("OPEN", 1, 2)
    assert health["ABC"].calls == 0
    assert {h.breaker_state for code, h in health.items() if code != "CCB"} == {"CLOSED"}
    assert {h.concurrency_limit for h in health.values()} == {64}


async def test_no_full_card_number_crosses_the_wire_or_reaches_a_span(start_connector):
    connector = await start_connector()
    fan_out_raw = connector.channel.unary_stream(
        "/cardcheck.v1.BankConnector/FanOut",
        request_serializer=bank_connector_pb2.FanOutRequest.SerializeToString,
        response_deserializer=lambda raw: raw,  # the bytes exactly as they crossed the wire
    )
    frames: list[bytes] = []
    for id_number, name in people():
        request = bank_connector_pb2.FanOutRequest(id_number=id_number, name=name, bank_codes=BANK_CODES)
        frames.extend([raw async for raw in fan_out_raw(request, timeout=10)])
    assert len(frames) == len(people()) * len(BANK_CODES)
    wire = b"\n".join(frames)
    masked = Counter()
    for raw in frames:
        outcome = bank_connector_pb2.FanOutResponse.FromString(raw)
        masked[outcome.kind] += 1
        assert all(len(c.first4) == 4 and len(c.last4) == 4 for c in outcome.cards)
    assert masked[ANSWERED] == len(frames)
    assert sum(len(bank_connector_pb2.FanOutResponse.FromString(raw).cards) for raw in frames) > 50
    for record in RECORDS:
        assert record.pan.encode() not in wire
        assert record.pan[:8].encode() not in wire and record.pan[-8:].encode() not in wire
    connector.host._tracer_provider.force_flush()
    spans = "".join(span.to_json() for span in connector.spans.get_finished_spans())
    assert '"cardcheck.bank_code": "ICBC"' in spans
    for record in RECORDS:
        for secret in (record.pan, record.id_number, record.reserved_phone or record.pan, record.holder_name):
            assert secret not in spans and json.dumps(secret)[1:-1] not in spans


async def test_each_bank_call_is_a_client_span_under_the_fan_out_and_the_parent_of_the_banks_span(
    start_connector, sim_spans
):
    connector = await start_connector()
    await connector.fan_out(bank_codes=["ICBC", "CMB", "GDRCC"])
    spans = connector.spans.get_finished_spans()
    (fan_out,) = [s for s in spans if s.name == "/cardcheck.v1.BankConnector/FanOut"]
    calls = {s.context.span_id: s for s in spans if s.name == "/cardcheck.v1.IssuingBank/LookupCards"}
    assert {s.attributes["cardcheck.bank_code"] for s in calls.values()} == {"ICBC", "CMB", "GDRCC"}
    assert all(s.kind.name == "CLIENT" and s.parent.span_id == fan_out.context.span_id for s in calls.values())
    served = [s for s in sim_spans.get_finished_spans() if s.name == "/cardcheck.v1.IssuingBank/LookupCards"]
    assert len(served) == 3
    assert all(s.parent.span_id in calls and s.context.trace_id == fan_out.context.trace_id for s in served)


class RecordingBank(bank_pb2_grpc.IssuingBankServicer):
    """A bank that answers no cards and keeps the traceparent each call arrived with."""

    def __init__(self) -> None:
        self.traceparents: list[str | None] = []

    async def LookupCards(self, request, context):
        self.traceparents.append(dict(context.invocation_metadata()).get("traceparent"))
        return bank_pb2.LookupCardsResponse()


async def test_under_an_unsampled_trace_banks_get_no_trace_headers_and_no_span_is_made(start_connector):
    bank = RecordingBank()
    server = grpc.aio.server()
    bank_pb2_grpc.add_IssuingBankServicer_to_server(bank, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        connector = await start_connector(**dict.fromkeys(BANK_CODES[:6], address))
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        unsampled = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-00"),)
        request = bank_connector_pb2.FanOutRequest(id_number=DEMO.id_number, name=DEMO.name, bank_codes=BANK_CODES[:6])
        outcomes = [o async for o in connector.stub.FanOut(request, timeout=10, metadata=unsampled)]
        assert [o.kind for o in outcomes] == [ANSWERED] * 6
        assert bank.traceparents == [None] * 6
        assert connector.spans.get_finished_spans() == ()

        sampled = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
        [o async for o in connector.stub.FanOut(request, timeout=10, metadata=sampled)]
        calls = [s for s in connector.spans.get_finished_spans() if s.name == "/cardcheck.v1.IssuingBank/LookupCards"]
        assert len(calls) == 6 and all(s.context.trace_id == int(trace_id, 16) for s in calls)
        assert {tp.split("-")[2] for tp in bank.traceparents[6:]} == {format(s.context.span_id, "016x") for s in calls}
    finally:
        await server.stop(0)


async def test_the_process_serves_and_stops_with_exit_code_0_on_sigterm(tmp_path):
    process = ServiceProcess(
        "bank_connector", tmp_path / "var", health_service="cardcheck.v1.BankConnector",
        CARDCHECK_BANK_SIM_ADDR=f"127.0.0.1:{free_port()}",  # no bank there: every bank unavailable
    )
    await process.start()
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = bank_connector_pb2_grpc.BankConnectorStub(channel)
            banks = (await stub.ListBanks(bank_connector_pb2.BankConnectorListBanksRequest(), timeout=5)).banks
            assert len(banks) == len(BANK_CODES) and not any(b.available for b in banks)
        assert await process.terminate() == 0
        assert "Traceback" not in process.output()
    finally:
        await process.stop()
