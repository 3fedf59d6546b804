"""cardcheck.v1.IssuingBank for all 24 banks: the request's bank_code says which is asked."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace

from bank_sim.issuers import BankBehaviour, Issuers, bank_day, behaviour_for
from cardcheck.banks import BY_CODE
from cardcheck.runtime.clock import Clock
from cardcheck.runtime.errors import CardCheckError, FieldViolation, handles_errors, invalid_argument
from cardcheck.v1 import bank_pb2, bank_pb2_grpc, common_pb2

CARD_TYPES = {"DEBIT": common_pb2.CARD_TYPE_DEBIT, "CREDIT": common_pb2.CARD_TYPE_CREDIT}


def _known_bank(code: str) -> str:
    if code not in BY_CODE:
        raise CardCheckError("NOT_FOUND", "no such bank here", metadata={"bank_code": code[:32]})
    trace.get_current_span().set_attribute("cardcheck.bank_code", code)
    return code


def _require(**fields: str) -> None:
    missing = [FieldViolation(name, "required") for name, value in fields.items() if not value]
    if missing:
        raise invalid_argument(missing)


class IssuingBankServicer(bank_pb2_grpc.IssuingBankServicer):
    def __init__(self, issuers: Issuers, clock: Clock, behaviours: Mapping[str, BankBehaviour]) -> None:
        self._issuers = issuers
        self._clock = clock
        self._behaviours = behaviours

    @handles_errors
    async def LookupCards(self, request, context):
        bank = _known_bank(request.bank_code)
        _require(id_number=request.id_number, name=request.name)
        await behaviour_for(self._behaviours, bank).before_answer()
        day = bank_day(self._clock.now())
        cards = self._issuers.lookup(bank, request.id_number, request.name, day)
        return bank_pb2.LookupCardsResponse(
            cards=[bank_pb2.BankCard(pan=card.pan, card_type=CARD_TYPES[card.card_type]) for card in cards]
        )

    @handles_errors
    async def VerifyCard(self, request, context):
        bank = _known_bank(request.bank_code)
        _require(card_number=request.card_number)
        await behaviour_for(self._behaviours, bank).before_answer()
        result = self._issuers.verify(
            bank, request.card_number, request.name, request.id_number, request.phone
        )
        return bank_pb2.VerifyCardResponse(holds_card=result.holds_card, confirmed=result.confirmed)
