"""bank_sim over a real channel: every case of FORMAT.md's "What a bank answers", the real-name
check, and the process refusing a malformed dataset and stopping cleanly on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bank_sim.app import build
from bank_sim.process import clean_env, free_port
from cardcheck.dataset import CardRecord
from cardcheck.numbers import luhn_check_digit
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import bank_pb2, bank_pb2_grpc, common_pb2
from tests.harness.processes import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
NAME = "龚明凯"
ID = "12010119730702747X"  # a check digit X, held lower-case by one bank
PHONE = "15852732467"
OLD_PHONE = "13802153651"
EXPIRY = date(2026, 3, 1)


def pan(prefix: str, length: int = 16) -> str:
    body = prefix + "0" * (length - 1 - len(prefix))
    return body + luhn_check_digit(body)


def card(bank: str, number: str, **changes) -> CardRecord:
    base = CardRecord(
        bank=bank, pan=number, card_type="DEBIT", holder_name=NAME, id_number=ID, id_expiry=None,
        reserved_phone=PHONE, cnp_enabled=True, status="ACTIVE", opened_on=date(2015, 6, 1),
    )
    return replace(base, **changes)


ACTIVE = card("ICBC", pan("6212261", 19))
CREDIT = card("ICBC", pan("6253301"), card_type="CREDIT")
CLOSED = card("ICBC", pan("6212262", 19), status="CLOSED")
DORMANT = card("ABC", pan("6228481", 19), status="DORMANT")
FROZEN = card("ABC", pan("6228361"), status="FROZEN", card_type="CREDIT")
NO_PHONE = card("BOC", pan("6216611", 19), reserved_phone=None)
OLD_PHONE_CARD = card("BOC", pan("6259071"), reserved_phone=OLD_PHONE, card_type="CREDIT")
EXPIRING = card("CCB", pan("6217001", 19), id_expiry=EXPIRY)
NO_CNP = card("CCB", pan("6253621"), cnp_enabled=False)
LOWER_X = card("CMB", pan("6214851"), id_number=ID.lower())
OTHER_NAME = card("CMB", pan("6214852"), holder_name="龚明")  # same ID, another name on record
SOMEONE_ELSE = card("ICBC", pan("6212263", 19), holder_name="郑磊", id_number="110105199906138211")
RECORDS = [ACTIVE, CREDIT, CLOSED, DORMANT, FROZEN, NO_PHONE, OLD_PHONE_CARD, EXPIRING, NO_CNP, LOWER_X,
           OTHER_NAME, SOMEONE_ELSE]

# 23:30 in Beijing on the day the ID on CCB's record expires: still valid that whole day.
START = datetime(2026, 3, 1, 15, 30, tzinfo=UTC)


def sim_settings(tmp_path) -> Settings:
    addresses = {service: f"127.0.0.1:{port}" for service, port in DEFAULT_PORTS.items()}
    addresses["bank_sim"] = "127.0.0.1:0"
    return Settings(addresses=addresses, data_dir=tmp_path)


@pytest.fixture
async def bank(tmp_path):
    clock = ManualClock(START)
    spans = InMemorySpanExporter()
    provider = make_tracer_provider("bank_sim", tmp_path, exporter=spans)
    host = await build(sim_settings(tmp_path), records=RECORDS, clock=clock, tracer_provider=provider)
    port = await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield bank_pb2_grpc.IssuingBankStub(channel), clock, spans
    await channel.close()
    await host.stop(0)


async def lookup(stub, bank_code: str, id_number: str = ID, name: str = NAME) -> set[tuple[str, int]]:
    response = await stub.LookupCards(
        bank_pb2.LookupCardsRequest(bank_code=bank_code, id_number=id_number, name=name), timeout=5
    )
    return {(c.pan, c.card_type) for c in response.cards}


DEBIT, CREDIT_TYPE = common_pb2.CARD_TYPE_DEBIT, common_pb2.CARD_TYPE_CREDIT


async def test_active_cards_are_found_and_closed_ones_are_not(bank):
    stub, _, _ = bank
    assert await lookup(stub, "ICBC") == {(ACTIVE.pan, DEBIT), (CREDIT.pan, CREDIT_TYPE)}


async def test_dormant_and_frozen_cards_are_found(bank):
    stub, _, _ = bank
    assert await lookup(stub, "ABC") == {(DORMANT.pan, DEBIT), (FROZEN.pan, CREDIT_TYPE)}


async def test_a_card_without_reserved_phone_is_not_found_but_an_old_phone_is(bank):
    stub, _, _ = bank
    assert await lookup(stub, "BOC") == {(OLD_PHONE_CARD.pan, CREDIT_TYPE)}


async def test_an_expired_id_hides_the_card_from_the_day_after_expiry_in_beijing(bank):
    stub, clock, _ = bank
    assert await lookup(stub, "CCB") == {(EXPIRING.pan, DEBIT)}  # cnp-disabled card never found
    clock.advance(timedelta(hours=1))  # 00:30 on 2 March in Beijing, still 1 March in UTC
    assert await lookup(stub, "CCB") == set()


async def test_the_check_digit_is_compared_case_insensitively_and_the_name_exactly(bank):
    stub, _, _ = bank
    assert await lookup(stub, "CMB") == {(LOWER_X.pan, DEBIT)}
    assert await lookup(stub, "CMB", id_number=ID.lower()) == {(LOWER_X.pan, DEBIT)}
    assert await lookup(stub, "CMB", name="龚明") == {(OTHER_NAME.pan, DEBIT)}
    assert await lookup(stub, "ICBC", name="郑磊") == set()  # right name, wrong ID
    assert await lookup(stub, "ICBC", id_number="110105199906138211", name="郑磊") == {(SOMEONE_ELSE.pan, DEBIT)}


async def test_a_bank_without_cards_for_the_person_answers_empty(bank):
    stub, _, _ = bank
    assert await lookup(stub, "GDRCC") == set()


async def test_an_unknown_bank_code_is_not_found(bank):
    stub, _, _ = bank
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await lookup(stub, "NOSUCH")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(caught.value).reason == "NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.VerifyCard(bank_pb2.VerifyCardRequest(bank_code="", card_number=ACTIVE.pan), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_lookup_without_id_is_invalid_argument(bank):
    stub, _, _ = bank
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await lookup(stub, "ICBC", id_number="")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(caught.value).violations] == ["id_number"]


async def verify(stub, bank_code, number, name=NAME, id_number=ID, phone=PHONE):
    response = await stub.VerifyCard(
        bank_pb2.VerifyCardRequest(
            bank_code=bank_code, card_number=number, name=name, id_number=id_number, phone=phone
        ),
        timeout=5,
    )
    return response.holds_card, response.confirmed


async def test_verify_card_confirms_only_when_card_name_id_and_reserved_phone_match(bank):
    stub, _, _ = bank
    assert await verify(stub, "ICBC", ACTIVE.pan) == (True, True)
    assert await verify(stub, "ICBC", ACTIVE.pan, id_number=ID.lower()) == (True, True)
    assert await verify(stub, "CMB", LOWER_X.pan) == (True, True)  # record has x, query has X
    assert await verify(stub, "ABC", DORMANT.pan) == (True, True)
    assert await verify(stub, "ICBC", ACTIVE.pan, phone=OLD_PHONE) == (True, False)
    assert await verify(stub, "ICBC", ACTIVE.pan, name="龚明") == (True, False)
    assert await verify(stub, "ICBC", ACTIVE.pan, id_number="110105199906138211") == (True, False)
    assert await verify(stub, "BOC", OLD_PHONE_CARD.pan) == (True, False)
    assert await verify(stub, "BOC", OLD_PHONE_CARD.pan, phone=OLD_PHONE) == (True, True)
    assert await verify(stub, "BOC", NO_PHONE.pan) == (True, False)
    assert await verify(stub, "ICBC", CLOSED.pan) == (False, False)
    assert await verify(stub, "ABC", ACTIVE.pan) == (False, False)  # another bank's card
    assert await verify(stub, "ICBC", pan("6212269", 19)) == (False, False)


async def test_spans_carry_the_bank_code_and_no_personal_data(bank):
    stub, _, spans = bank
    await lookup(stub, "ICBC")
    await verify(stub, "ICBC", ACTIVE.pan)
    finished = spans.get_finished_spans()
    assert [s.attributes.get("cardcheck.bank_code") for s in finished] == ["ICBC", "ICBC"]
    dumped = "".join(s.to_json() for s in finished)
    for secret in (ID, NAME, PHONE, ACTIVE.pan, CREDIT.pan):
        assert secret not in dumped and json.dumps(secret)[1:-1] not in dumped


async def test_a_bank_records_spans_only_of_a_callers_sampled_trace(tmp_path):
    host = await build(sim_settings(tmp_path), records=RECORDS, clock=ManualClock(START))  # its own tracing
    port = await host.start()
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = bank_pb2_grpc.IssuingBankStub(channel)
            request = bank_pb2.LookupCardsRequest(bank_code="ICBC", id_number=ID, name=NAME)
            await stub.LookupCards(request, timeout=5)  # no caller's trace: nothing recorded
            await stub.LookupCards(request, timeout=5, metadata=(("traceparent", f"00-{'1' * 32}-{'2' * 16}-00"),))
            await stub.LookupCards(request, timeout=5, metadata=(("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),))
    finally:
        await host.stop(0)  # flushes the span file
    spans = [json.loads(line) for line in (tmp_path / "spans" / "bank_sim.jsonl").read_text().splitlines()]
    assert [(s["context"]["trace_id"], s["parent_id"]) for s in spans] == [(f"0x{trace_id}", "0xb7ad6b7169203331")]


# --- the process ---------------------------------------------------------------------------


async def test_outside_sandbox_bank_sim_control_is_not_served(tmp_path):
    host = await build(sim_settings(tmp_path).replace(sandbox=False), records=RECORDS)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await lookup(bank_pb2_grpc.IssuingBankStub(channel), "ICBC")  # the banks still answer
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await bank_pb2_grpc.BankSimControlStub(channel).GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=5)
    finally:
        await host.stop(0)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_malformed_dataset_is_refused_at_start_with_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(ACTIVE.to_json(), ensure_ascii=False), json.dumps(dict(CREDIT.to_json(), pan="6253301000000001"))]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "bank_sim", "--dataset", str(bad)],
        cwd=ROOT, env=clean_env(tmp_path / "var", CARDCHECK_BANK_SIM_ADDR=f"127.0.0.1:{free_port()}"), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "line 2: pan fails the Luhn check" in result.stderr
    assert "Traceback" not in result.stderr
    assert "6253301000000001" not in result.stderr


async def test_sigterm_stops_the_process_with_exit_code_0(tmp_path):
    process = ServiceProcess(
        "bank_sim", tmp_path / "var", args=("--seed", "5", "--people", "10"), health_service="cardcheck.v1.IssuingBank"
    )
    await process.start()
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = bank_pb2_grpc.IssuingBankStub(channel)
            request = bank_pb2.LookupCardsRequest(bank_code="ICBC", id_number=ID, name=NAME)
            assert list((await stub.LookupCards(request, timeout=5)).cards) == []
        assert await process.terminate() == 0
        assert "Traceback" not in process.output()
    finally:
        await process.stop()


# --- the compact index answers as the rules say ----------------------------------------------


def naive_lookup(records, bank, id_number, name, day):
    return [
        (r.pan, r.card_type) for r in records
        if r.bank == bank and r.id_number.upper() == id_number.upper() and r.holder_name == name
        and r.status != "CLOSED" and r.reserved_phone is not None and r.cnp_enabled
        and (r.id_expiry is None or r.id_expiry >= day)
    ]


def test_the_compact_index_answers_like_the_rules_for_every_person_bank_and_day():
    from bank_sim.issuers import Issuers
    from cardcheck import dataset
    from cardcheck.banks import BANK_CODES

    odd = [
        card("ICBC", pan("0212261", 19)),  # a leading zero survives
        card("ICBC", pan("6212264", 19), reserved_phone="+86 158-5273-2467"),  # a phone not all digits
        card("ICBC", pan("6212265", 19), reserved_phone="0158527324"),  # a leading zero in a phone
        card("ABC", ACTIVE.pan),  # the same number at another bank is another card
    ]
    records = dataset.generate(11, 150) + RECORDS + odd
    issuers = Issuers(records)
    assert len(issuers) == len(records)
    people = dict.fromkeys((r.id_number, r.holder_name) for r in records)
    days = [date(2016, 6, 1), date(2024, 3, 1), date(2026, 3, 1), date(2026, 3, 2), date(2045, 1, 1)]
    for id_number, name in people:
        for bank in BANK_CODES:
            for day in days:
                expected = naive_lookup(records, bank, id_number, name, day)
                got = [(c.pan, c.card_type) for c in issuers.lookup(bank, id_number.lower(), name, day)]
                assert got == expected
    for r in records:
        phone = r.reserved_phone or "13800000000"
        verdict = issuers.verify(r.bank, r.pan, r.holder_name, r.id_number.swapcase(), phone)
        assert verdict.holds_card == (r.status != "CLOSED")
        assert verdict.confirmed == (r.status != "CLOSED" and r.reserved_phone is not None)
        assert not issuers.verify(r.bank, r.pan, r.holder_name, r.id_number, phone + "1").confirmed
    assert not issuers.verify("ICBC", odd[0].pan.lstrip("0"), NAME, ID, PHONE).holds_card
    assert issuers.lookup("ICBC", "not an id", NAME, START.date()) == []
    assert issuers.lookup("NOSUCH", ID, NAME, START.date()) == []
