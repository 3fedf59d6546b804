"""How the simulated banks behave, against real `python -m bank_sim` processes: a fixed latency
from the command line or the environment, a profile file, and every fault set at runtime
through BankSimControl (down, errors, hangs, malformed answers, capacity), a port per bank."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import grpc
import pytest

from bank_sim.behaviour import BankFloor, Behaviour, BehaviourError, starting_behaviours
from bank_sim.process import ROOT, clean_env, free_port, free_port_run, start_bank_sim
from cardcheck import dataset
from cardcheck.banks import BANK_CODES
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.v1 import bank_pb2, bank_pb2_grpc

SEED, PEOPLE = 7, 50
RECORDS = dataset.generate(SEED, PEOPLE)
DEMO = dataset.pick_demo_person(RECORDS)
DEMO_BANK = next(r.bank for r in RECORDS if r.pan == DEMO.card_number)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    child = start_bank_sim(tmp_path_factory.mktemp("sim"), ["--seed", str(SEED), "--people", str(PEOPLE)])
    yield child
    assert child.stop() == 0


@pytest.fixture
async def stubs(sim):
    async with grpc.aio.insecure_channel(sim.address) as channel:
        control = bank_pb2_grpc.BankSimControlStub(channel)
        await control.SetBehaviour(bank_pb2.SetBehaviourRequest(reset=True), timeout=10)
        yield bank_pb2_grpc.IssuingBankStub(channel), control


def lookup_request(bank: str = DEMO_BANK) -> bank_pb2.LookupCardsRequest:
    return bank_pb2.LookupCardsRequest(bank_code=bank, id_number=DEMO.id_number, name=DEMO.name)


async def set_behaviour(control, banks=(), reset=False, **fields) -> bank_pb2.SetBehaviourResponse:
    request = bank_pb2.SetBehaviourRequest(bank_codes=list(banks), behaviour=bank_pb2.BankBehaviour(**fields), reset=reset)
    return await control.SetBehaviour(request, timeout=10)


async def state_of(control, bank: str) -> bank_pb2.SimulatedBankState:
    return (await control.GetBehaviour(bank_pb2.GetBehaviourRequest(bank_codes=[bank]), timeout=10)).banks[0]


async def test_a_down_bank_refuses_at_once_and_the_others_answer(stubs):
    bank, control = stubs
    await set_behaviour(control, [DEMO_BANK], down=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bank.LookupCards(lookup_request(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    other = next(code for code in BANK_CODES if code != DEMO_BANK)
    await bank.LookupCards(lookup_request(other), timeout=10)
    state = await state_of(control, DEMO_BANK)
    assert state.behaviour.down and state.failed == 1


async def test_each_rpc_is_counted_on_its_own_refused_calls_too(stubs):
    bank, control = stubs
    other = next(code for code in BANK_CODES if code != DEMO_BANK)
    before = {code: await state_of(control, code) for code in (DEMO_BANK, other)}
    verify = bank_pb2.VerifyCardRequest(bank_code=DEMO_BANK, card_number=DEMO.card_number, name=DEMO.name,
                                        id_number=DEMO.id_number, phone=DEMO.phone)
    for _ in range(2):
        await bank.LookupCards(lookup_request(), timeout=10)
    assert (await bank.VerifyCard(verify, timeout=10)).confirmed
    await set_behaviour(control, [DEMO_BANK], down=True)
    with pytest.raises(grpc.aio.AioRpcError):
        await bank.VerifyCard(verify, timeout=10)  # refused, but the card number reached the bank

    def counts(state) -> tuple[int, int, int]:
        return state.calls, state.lookup_calls, state.verify_calls

    after, was = counts(await state_of(control, DEMO_BANK)), counts(before[DEMO_BANK])
    assert tuple(a - b for a, b in zip(after, was, strict=True)) == (4, 2, 2)
    assert counts(await state_of(control, other)) == counts(before[other])
    everyone = await control.GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=10)
    assert all(b.calls == b.lookup_calls + b.verify_calls for b in everyone.banks)


async def test_an_error_rate_fails_that_share_of_calls_with_the_chosen_code(stubs):
    bank, control = stubs
    await set_behaviour(control, [DEMO_BANK], error_rate=1.0, error_code="INTERNAL")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bank.VerifyCard(bank_pb2.VerifyCardRequest(bank_code=DEMO_BANK, card_number=DEMO.card_number), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    await set_behaviour(control, [DEMO_BANK], error_rate=0.5, error_code="UNAVAILABLE")
    failed = 0
    for _ in range(200):
        try:
            await bank.LookupCards(lookup_request(), timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            failed += 1
    assert 60 <= failed <= 140


async def test_a_hanging_bank_never_answers_and_holds_its_calls(stubs):
    bank, control = stubs
    await set_behaviour(control, [DEMO_BANK], hang_rate=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bank.LookupCards(lookup_request(), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the server lets go of the call once the client has given up
    deadline = time.monotonic() + 20
    while (await state_of(control, DEMO_BANK)).in_flight:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_malformed_answers_carry_no_valid_card(stubs):
    bank, control = stubs
    await set_behaviour(control, [DEMO_BANK], malformed_rate=1.0)
    answer = await bank.LookupCards(lookup_request(), timeout=10)
    assert answer.cards and not any(card.pan.isdigit() for card in answer.cards)
    verdict = await bank.VerifyCard(
        bank_pb2.VerifyCardRequest(bank_code=DEMO_BANK, card_number=DEMO.card_number, name=DEMO.name,
                                   id_number=DEMO.id_number, phone=DEMO.phone),
        timeout=10,
    )
    assert verdict.confirmed and not verdict.holds_card  # contradicts itself
    await set_behaviour(control, [DEMO_BANK], malformed_rate=0.0)
    answer = await bank.LookupCards(lookup_request(), timeout=10)
    assert answer.cards and all(card.pan.isdigit() for card in answer.cards)


async def test_beyond_its_capacity_a_bank_refuses_with_resource_exhausted(stubs):
    bank, control = stubs
    await set_behaviour(control, [DEMO_BANK], capacity=2, latency_ms=30_000)
    async def call():
        return await bank.LookupCards(lookup_request(), timeout=30)

    held = [asyncio.create_task(call()) for _ in range(2)]
    try:
        deadline = time.monotonic() + 20
        while (await state_of(control, DEMO_BANK)).in_flight < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bank.LookupCards(lookup_request(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = next(code for code in BANK_CODES if code != DEMO_BANK)
        await bank.LookupCards(lookup_request(other), timeout=10)  # capacity is per bank
        assert (await state_of(control, DEMO_BANK)).refused == 1
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)


async def test_a_latency_delays_every_answer(stubs):
    bank, control = stubs
    await set_behaviour(control, [DEMO_BANK], latency_ms=300)
    started = time.monotonic()
    await bank.LookupCards(lookup_request(), timeout=10)
    assert time.monotonic() - started >= 0.29


async def test_set_behaviour_changes_only_the_fields_given_and_reset_restores_the_start(stubs):
    _, control = stubs
    await set_behaviour(control, ["ICBC", "ABC"], latency_ms=40, latency_p99_ms=200)
    state = await set_behaviour(control, ["ICBC"], error_rate=0.25)
    icbc = state.banks[0].behaviour
    assert (icbc.latency_ms, icbc.latency_p99_ms, icbc.error_rate, icbc.error_code) == (40, 200, 0.25, "UNAVAILABLE")
    state = await set_behaviour(control, ["ICBC"], reset=True, capacity=3)
    icbc = state.banks[0].behaviour
    assert (icbc.latency_ms, icbc.error_rate, icbc.capacity) == (0, 0, 3)
    assert (await state_of(control, "ABC")).behaviour.latency_p99_ms == 200
    everyone = await control.GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=10)
    assert [b.bank_code for b in everyone.banks] == list(BANK_CODES)


@pytest.mark.parametrize(
    ("banks", "fields", "field"),
    [
        (["ICBC"], {"error_rate": 1.5}, "behaviour.error_rate"),
        (["ICBC"], {"latency_ms": -1}, "behaviour.latency_ms"),
        (["ICBC"], {"error_code": "OK"}, "behaviour.error_code"),
        (["ICBC"], {"capacity": -2}, "behaviour.capacity"),
        (["NOSUCH"], {"down": True}, "bank_codes"),
    ],
)
async def test_an_impossible_behaviour_is_invalid_argument_and_changes_nothing(stubs, banks, fields, field):
    _, control = stubs
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_behaviour(control, banks, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(caught.value).violations] == [field]
    assert (await state_of(control, "ICBC")).behaviour == bank_pb2.BankBehaviour(
        **Behaviour().to_json()
    )


def test_the_lognormal_latency_has_the_median_and_p99_asked_for():
    floor = BankFloor({"ICBC": Behaviour(latency_ms=50, latency_p99_ms=400)}, seed=3)
    draws = []
    for _ in range(20_000):
        draws.append(floor.enter("ICBC", "LookupCards").delay_s * 1000)
        floor.leave("ICBC")
    draws.sort()
    assert draws[len(draws) // 2] == pytest.approx(50, rel=0.05)
    assert draws[int(len(draws) * 0.99)] == pytest.approx(400, rel=0.12)
    assert math.isclose(floor.counters("ICBC").calls, 20_000)


def test_a_profile_sets_a_default_then_each_bank():
    behaviours = starting_behaviours(
        25, {"default": {"error_rate": 0.1}, "banks": {"CMB": {"down": True}, "ICBC": {"latency_ms": 80}}}
    )
    assert behaviours["ABC"] == Behaviour(latency_ms=25, error_rate=0.1)
    assert behaviours["CMB"] == Behaviour(latency_ms=25, error_rate=0.1, down=True)
    assert behaviours["ICBC"].latency_ms == 80
    for bad in [{"banks": {"NOSUCH": {}}}, {"default": {"hang": 1}}, {"banks": {"ICBC": {"capacity": "x"}}}, {"x": 1}]:
        with pytest.raises(BehaviourError):
            starting_behaviours(None, bad)


# --- set at start: command line and environment ---------------------------------------------


async def test_bank_latency_from_the_command_line_applies_to_every_bank(tmp_path):
    child = start_bank_sim(tmp_path, ["--seed", "7", "--people", "5", "--bank-latency-ms", "120"])
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            state = await bank_pb2_grpc.BankSimControlStub(channel).GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=10)
            assert {b.behaviour.latency_ms for b in state.banks} == {120}
            started = time.monotonic()
            await bank_pb2_grpc.IssuingBankStub(channel).LookupCards(lookup_request("GDRCC"), timeout=10)
            assert time.monotonic() - started >= 0.115
    finally:
        assert child.stop() == 0


async def test_latency_and_profile_come_from_the_environment(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"default": {"latency_p99_ms": 90}, "banks": {"CMB": {"down": True}}}))
    env = {"CARDCHECK_BANK_LATENCY_MS": "30", "CARDCHECK_BANK_PROFILE": str(profile)}
    child = start_bank_sim(tmp_path, ["--seed", "7", "--people", "5"], env=env)
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            state = await bank_pb2_grpc.BankSimControlStub(channel).GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=10)
            behaviours = {b.bank_code: b.behaviour for b in state.banks}
            assert (behaviours["ICBC"].latency_ms, behaviours["ICBC"].latency_p99_ms, behaviours["ICBC"].down) == (30, 90, False)
            assert behaviours["CMB"].down
    finally:
        assert child.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--profile", "{profile}"], {}, "banks.NOSUCH: unknown bank code"),
        ([], {"CARDCHECK_BANK_LATENCY_MS": "fast"}, "CARDCHECK_BANK_LATENCY_MS='fast' is not a number"),
        ([], {"CARDCHECK_BANK_PROFILE": "{missing}"}, "unreadable"),
    ],
)
def test_a_bad_starting_behaviour_is_refused_with_exit_code_2(tmp_path, args, env, message):
    profile = tmp_path / "bad.json"
    profile.write_text(json.dumps({"banks": {"NOSUCH": {"down": True}}}))
    fill = {"profile": str(profile), "missing": str(tmp_path / "missing.json")}
    result = subprocess.run(
        [sys.executable, "-m", "bank_sim", *(a.format(**fill) for a in args)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=clean_env(tmp_path, CARDCHECK_BANK_SIM_ADDR=f"127.0.0.1:{free_port()}",
                      **{k: v.format(**fill) for k, v in env.items()}),
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


async def test_each_bank_can_have_a_port_of_its_own(tmp_path):
    base = free_port_run(len(BANK_CODES))
    child = start_bank_sim(tmp_path, ["--seed", str(SEED), "--people", str(PEOPLE), "--port-per-bank", str(base)])
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            control = bank_pb2_grpc.BankSimControlStub(channel)
            state = await control.GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=10)
            addresses = {b.bank_code: b.address for b in state.banks}
            assert addresses == {code: f"127.0.0.1:{base + i}" for i, code in enumerate(BANK_CODES)}
            await set_behaviour(control, [DEMO_BANK], latency_ms=5)
        async with grpc.aio.insecure_channel(addresses[DEMO_BANK]) as own:
            stub = bank_pb2_grpc.IssuingBankStub(own)
            answer = await stub.LookupCards(lookup_request(), timeout=10)
            assert answer.cards  # the demo person's card at its bank
            untagged = lookup_request()
            untagged.bank_code = ""  # a bank on its own port needs no code
            assert (await stub.LookupCards(untagged, timeout=10)).cards == answer.cards
            other = next(code for code in BANK_CODES if code != DEMO_BANK)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.LookupCards(lookup_request(other), timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        async with grpc.aio.insecure_channel(child.address) as channel:
            # the same behaviour and counters, whichever port the call came in on
            assert (await state_of(bank_pb2_grpc.BankSimControlStub(channel), DEMO_BANK)).calls == 2
    finally:
        assert child.stop() == 0
