"""cardcheck.v1.IssuingBank for the simulated banks (the request's bank_code says which is asked,
or the bank of the port), and cardcheck.v1.BankSimControl to change how they behave."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grpc
from opentelemetry import trace

from bank_sim.behaviour import BankFloor, Behaviour, BehaviourError, Plan, Refused
from bank_sim.issuers import Issuers, bank_day
from cardcheck.banks import BANK_CODES, BY_CODE, MAX_BANK_CODES
from cardcheck.runtime.clock import Clock
from cardcheck.runtime.errors import CardCheckError, FieldViolation, Reason, handles_errors, invalid_argument
from cardcheck.v1 import bank_pb2, bank_pb2_grpc, common_pb2

CARD_TYPES = {"DEBIT": common_pb2.CARD_TYPE_DEBIT, "CREDIT": common_pb2.CARD_TYPE_CREDIT}
# What a bank answering malformed sends back: not a card number, no card type.
MALFORMED_CARD = bank_pb2.BankCard(pan="12345-not-a-card", card_type=common_pb2.CARD_TYPE_UNSPECIFIED)


def _require(**fields: str) -> None:
    missing = [FieldViolation(name, "required") for name, value in fields.items() if not value]
    if missing:
        raise invalid_argument(missing)


class IssuingBankServicer(bank_pb2_grpc.IssuingBankServicer):
    """Every bank on one port, or (`only_bank`) the one bank of its own port."""

    def __init__(self, issuers: Issuers, clock: Clock, floor: BankFloor, *, only_bank: str | None = None) -> None:
        self._issuers = issuers
        self._clock = clock
        self._floor = floor
        self._only_bank = only_bank

    def _bank(self, code: str) -> str:
        if self._only_bank is not None and code in ("", self._only_bank):
            code = self._only_bank
        elif code not in BY_CODE or self._only_bank is not None:
            raise CardCheckError(Reason.NOT_FOUND, "no such bank here", metadata={"bank_code": code[:32]})
        trace.get_current_span().set_attribute("cardcheck.bank_code", code)
        return code

    async def _enter(self, bank: str, rpc: str, context) -> Plan:
        try:
            return self._floor.enter(bank, rpc)
        except Refused as refusal:
            await context.abort(grpc.StatusCode[refusal.code], refusal.message)
            raise  # abort raises; this only tells the type checker

    @handles_errors
    async def LookupCards(self, request, context):
        bank = self._bank(request.bank_code)
        _require(id_number=request.id_number, name=request.name)
        plan = await self._enter(bank, "LookupCards", context)
        try:
            await plan.wait()
            if plan.error_code:
                await context.abort(grpc.StatusCode[plan.error_code], "simulated bank failure")
            if plan.malformed:
                return bank_pb2.LookupCardsResponse(cards=[MALFORMED_CARD])
            day = bank_day(self._clock.now())
            cards = self._issuers.lookup(bank, request.id_number, request.name, day)
            return bank_pb2.LookupCardsResponse(
                cards=[bank_pb2.BankCard(pan=card.pan, card_type=CARD_TYPES[card.card_type]) for card in cards]
            )
        finally:
            self._floor.leave(bank)

    @handles_errors
    async def VerifyCard(self, request, context):
        bank = self._bank(request.bank_code)
        _require(card_number=request.card_number)
        plan = await self._enter(bank, "VerifyCard", context)
        try:
            await plan.wait()
            if plan.error_code:
                await context.abort(grpc.StatusCode[plan.error_code], "simulated bank failure")
            if plan.malformed:  # confirmed without holding the card: contradicts itself
                return bank_pb2.VerifyCardResponse(holds_card=False, confirmed=True)
            result = self._issuers.verify(bank, request.card_number, request.name, request.id_number, request.phone)
            return bank_pb2.VerifyCardResponse(holds_card=result.holds_card, confirmed=result.confirmed)
        finally:
            self._floor.leave(bank)


def behaviour_message(behaviour: Behaviour) -> bank_pb2.BankBehaviour:
    return bank_pb2.BankBehaviour(**behaviour.to_json())


def behaviour_changes(message: bank_pb2.BankBehaviour) -> dict[str, object]:
    """The fields set in a SetBehaviour request (unset ones keep the bank's value)."""
    return {field.name: value for field, value in message.ListFields()}  # every field is `optional`


class BankSimControlServicer(bank_pb2_grpc.BankSimControlServicer):
    def __init__(self, floor: BankFloor, addresses: Callable[[], Mapping[str, str]]) -> None:
        self._floor = floor
        self._addresses = addresses

    def _banks(self, codes) -> list[str]:
        if len(codes) > MAX_BANK_CODES:  # before any of them is looked at
            raise invalid_argument([FieldViolation("bank_codes", f"at most {MAX_BANK_CODES} bank codes")])
        unknown = [code for code in codes if code not in BY_CODE]
        if unknown:
            raise invalid_argument([FieldViolation("bank_codes", f"unknown bank code {unknown[0][:32]!r}")])
        return list(dict.fromkeys(codes)) or list(BANK_CODES)

    def _state(self, banks: list[str]) -> list[bank_pb2.SimulatedBankState]:
        addresses = self._addresses()
        states = []
        for code in banks:
            counters = self._floor.counters(code)
            states.append(
                bank_pb2.SimulatedBankState(
                    bank_code=code, behaviour=behaviour_message(self._floor.behaviour(code)),
                    calls=counters.calls, lookup_calls=counters.lookup_calls, verify_calls=counters.verify_calls,
                    refused=counters.refused, failed=counters.failed,
                    in_flight=counters.in_flight, address=addresses.get(code, ""),
                )
            )
        return states

    @handles_errors
    async def SetBehaviour(self, request, context):
        banks = self._banks(request.bank_codes)
        try:
            self._floor.set(banks, behaviour_changes(request.behaviour), reset=request.reset)
        except BehaviourError as error:
            raise invalid_argument([FieldViolation(f"behaviour.{error.field}", error.problem)]) from None
        return bank_pb2.SetBehaviourResponse(banks=self._state(banks))

    @handles_errors
    async def GetBehaviour(self, request, context):
        return bank_pb2.GetBehaviourResponse(banks=self._state(self._banks(request.bank_codes)))
