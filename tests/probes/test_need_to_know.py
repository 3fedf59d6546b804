"""Need to know, against `cardcheck up`: registering sends the full card number, name, ID
number and phone to the card's issuing bank and to no other, and a card whose BIN no
supported bank issues is refused with the documented reason before any bank sees it. The
banks' own counters (bank_sim's BankSimControl) are the witness."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from cardcheck import bins, dataset
from cardcheck.banks import BANK_CODES
from cardcheck.numbers import luhn_check_digit
from cardcheck.runtime.errors import CardCheckError
from cardcheck.v1 import bank_pb2, bank_pb2_grpc
from tests.probes.conftest import journey_of, register, registrable_people

UNKNOWN_ISSUER = "no supported bank issues cards with this BIN"  # the documented refusal
RECORDS = dataset.generate(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE)  # what `cardcheck up` serves


async def verify_calls(mesh) -> dict[str, int]:
    """Every bank's VerifyCard calls so far, as the banks count them."""
    async with grpc.aio.insecure_channel(mesh.settings.addresses["bank_sim"]) as channel:
        state = await bank_pb2_grpc.BankSimControlStub(channel).GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=10)
    assert {bank.bank_code for bank in state.banks} == set(BANK_CODES)
    return {bank.bank_code: bank.verify_calls for bank in state.banks}


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {code: after[code] - before[code] for code in BANK_CODES if after[code] != before[code]}


async def test_registering_shows_the_card_to_its_issuer_alone(probe_mesh):
    person = registrable_people(RECORDS)[3]
    issuer = next(r.bank for r in RECORDS if r.pan == person.card_number)
    assert bins.default_table().issuer_of(person.card_number) == issuer
    before = await verify_calls(probe_mesh)
    async with journey_of(probe_mesh, person) as journey:
        session = await register(journey)
    assert session.user_id
    assert moved(before, await verify_calls(probe_mesh)) == {issuer: 1}


async def test_a_card_of_no_supported_issuer_is_refused_before_any_bank_sees_it(probe_mesh):
    body = "623999" + "5" * 12
    card_number = body + luhn_check_digit(body)  # well formed (19 digits, Luhn), no bank's BIN
    assert bins.default_table().issuer_of(card_number) is None
    person = dataclasses.replace(registrable_people(RECORDS)[4], card_number=card_number)
    before = await verify_calls(probe_mesh)
    async with journey_of(probe_mesh, person) as journey:
        with pytest.raises(CardCheckError) as caught:
            await register(journey)
    refusal = caught.value
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert refusal.metadata == {"cause": "UNKNOWN_ISSUER"}
    assert [(v.field, v.description) for v in refusal.violations] == [("card_number", UNKNOWN_ISSUER)]
    assert moved(before, await verify_calls(probe_mesh)) == {}
