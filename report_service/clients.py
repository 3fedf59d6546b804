"""The two services report_service depends on, behind the worker's small interfaces."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from cardcheck.v1 import (
    bank_connector_pb2,
    bank_connector_pb2_grpc,
    common_pb2,
    notifier_pb2,
    notifier_pb2_grpc,
)
from report_service.queries import Subject
from report_service.reports import BankOutcome, MaskedCard

NOTIFIER_TIMEOUT_S = 10.0


# Each outcome kind's name as recorded; UNSPECIFIED and numbers this build does not know are ERROR.
_KINDS = {
    number: name.removeprefix("BANK_OUTCOME_KIND_")
    for name, number in common_pb2.BankOutcomeKind.items()
    if number != common_pb2.BANK_OUTCOME_KIND_UNSPECIFIED
}


def outcome_from_pb(message: bank_connector_pb2.FanOutResponse) -> BankOutcome:
    kind = _KINDS.get(message.kind, "ERROR")
    cards = tuple(
        MaskedCard(
            bank_code=card.bank_code or message.bank_code,
            card_type="CREDIT" if card.card_type == common_pb2.CARD_TYPE_CREDIT else "DEBIT",
            # Never more than four digits each, whatever arrives: no full number is stored.
            first4=card.first4[:4],
            last4=card.last4[-4:],
        )
        for card in message.cards
    )
    return BankOutcome(
        bank_code=message.bank_code,
        kind=kind,
        cards=cards,
        detail=message.detail,
        attempts=message.attempts,
        latency_ms=message.latency_ms,
    )

log = logging.getLogger(__name__)


class BankConnectorFanOut:
    def __init__(self, channel: grpc.aio.Channel, per_bank_timeout_s: float) -> None:
        self._stub = bank_connector_pb2_grpc.BankConnectorStub(channel)
        self._per_bank_timeout_s = per_bank_timeout_s
        # The banks are asked in parallel, each with its own deadline and retries inside the
        # connector: the whole stream gets several per-bank deadlines, never unbounded.
        self._deadline_s = max(30.0, per_bank_timeout_s * 6)

    async def fan_out(self, subject: Subject, bank_codes: Sequence[str]) -> AsyncIterator[BankOutcome]:
        request = bank_connector_pb2.FanOutRequest(
            id_number=subject.id_number,
            name=subject.name,
            bank_codes=list(bank_codes),
            per_bank_timeout_ms=int(self._per_bank_timeout_s * 1000),
        )
        async for message in self._stub.FanOut(request, timeout=self._deadline_s):
            yield outcome_from_pb(message)


class NotifierReportReady:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = notifier_pb2_grpc.NotifierStub(channel)

    async def report_ready(self, query_id: str, phone: str) -> None:
        reply = await self._stub.Send(
            notifier_pb2.SendRequest(
                idempotency_key=f"report-ready:{query_id}",
                phone=phone,
                kind=notifier_pb2.MESSAGE_KIND_REPORT_READY,
            ),
            timeout=NOTIFIER_TIMEOUT_S,
        )
        if reply.status == notifier_pb2.DELIVERY_STATUS_FAILED:
            # The notifier gave this message up for good (its retry window passed, or the vendor
            # refused it as undeliverable): sending the key again would only ask the vendor again.
            log.warning("query %s: the notifier gave up the report-ready SMS", query_id)
