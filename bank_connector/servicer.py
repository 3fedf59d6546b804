"""cardcheck.v1.BankConnector: translates between protobuf and the connector."""

from __future__ import annotations

from bank_connector.admission import Admission
from bank_connector.cards import MaskedCard
from bank_connector.connector import (
    BankConnector,
    BankOutcome,
    OutcomeKind,
    call_timeout,
    check_person,
    known_banks,
)
from cardcheck.runtime.errors import FieldViolation, handles_errors, invalid_argument
from cardcheck.v1 import bank_connector_pb2, bank_connector_pb2_grpc, common_pb2

OUTCOME_KINDS = {
    OutcomeKind.ANSWERED: common_pb2.BANK_OUTCOME_KIND_ANSWERED,
    OutcomeKind.TIMED_OUT: common_pb2.BANK_OUTCOME_KIND_TIMED_OUT,
    OutcomeKind.ERROR: common_pb2.BANK_OUTCOME_KIND_ERROR,
    OutcomeKind.CIRCUIT_OPEN: common_pb2.BANK_OUTCOME_KIND_CIRCUIT_OPEN,
}
CARD_TYPES = {"DEBIT": common_pb2.CARD_TYPE_DEBIT, "CREDIT": common_pb2.CARD_TYPE_CREDIT}


def _card(card: MaskedCard) -> common_pb2.MaskedCard:
    return common_pb2.MaskedCard(
        bank_code=card.bank_code, bank_name=card.bank_name, card_type=CARD_TYPES[card.card_type],
        first4=card.first4, last4=card.last4,
    )


def _outcome(outcome: BankOutcome) -> bank_connector_pb2.FanOutResponse:
    return bank_connector_pb2.FanOutResponse(
        bank_code=outcome.bank_code,
        kind=OUTCOME_KINDS[outcome.kind],
        cards=[_card(card) for card in outcome.cards],
        detail=outcome.detail,
        attempts=outcome.attempts,
        latency_ms=outcome.latency_ms,
    )


class BankConnectorServicer(bank_connector_pb2_grpc.BankConnectorServicer):
    def __init__(self, connector: BankConnector, admission: Admission) -> None:
        self._connector = connector
        self._admission = admission

    @handles_errors
    async def FanOut(self, request, context):
        check_person(request.id_number, request.name)
        if request.per_bank_timeout_ms < 0:
            raise invalid_argument([FieldViolation("per_bank_timeout_ms", "must not be negative")])
        codes = known_banks(request.bank_codes)
        async with self._admission.turn():
            timeout = call_timeout(
                request.per_bank_timeout_ms, self._connector.default_timeout_s, context.time_remaining()
            )
            async for outcome in self._connector.fan_out(request.id_number, request.name, codes, timeout):
                yield _outcome(outcome)

    @handles_errors
    async def VerifyRealName(self, request, context):
        async with self._admission.turn():
            timeout = call_timeout(0, self._connector.default_timeout_s, context.time_remaining())
            result = await self._connector.verify_real_name(
                request.card_number, request.name, request.id_number, request.phone, timeout
            )
        return bank_connector_pb2.VerifyRealNameResponse(confirmed=result.confirmed, bank_code=result.bank_code or "")

    @handles_errors
    async def ListBanks(self, request, context):
        banks = await self._connector.availability()
        return bank_connector_pb2.BankConnectorListBanksResponse(
            banks=[common_pb2.Bank(code=b.code, name=b.name, kind=b.kind, available=b.available) for b in banks]
        )

    @handles_errors
    async def GetBankHealth(self, request, context):
        return bank_connector_pb2.GetBankHealthResponse(
            banks=[
                bank_connector_pb2.BankHealth(
                    bank_code=r.bank_code, calls=r.calls, failures=r.failures, success_rate=r.success_rate,
                    latency_p50_ms=r.latency_p50_ms, latency_p99_ms=r.latency_p99_ms,
                    breaker_state=r.breaker_state, retries=r.retries, short_circuited=r.short_circuited,
                    breaker_openings=r.breaker_openings, in_flight=r.in_flight,
                    concurrency_limit=r.concurrency_limit, waiting=r.waiting,
                )
                for r in self._connector.health()
            ],
            requests_active=self._admission.active,
            requests_queued=self._admission.queued,
            requests_refused=self._admission.refused,
        )
