"""The internal services the gateway calls, each behind a small adapter that speaks gRPC and
turns a downstream failure into a CardCheckError (a typed refusal relayed unchanged, anything
else SERVICE_UNAVAILABLE). The flows in gateway/flows.py see only these methods, which answer
in the public messages (gateway.proto, common.proto): the internal ones stop here."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc

from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.errors import downstream_error
from cardcheck.v1 import (
    bank_connector_pb2,
    bank_connector_pb2_grpc,
    common_pb2,
    gateway_pb2,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)
from gateway.users import Identity

log = logging.getLogger(__name__)

LIST_BANKS_TIMEOUT_S = 2.0  # ListBanks has a fallback; do not keep a client waiting for it
# How long SubmitQuery reuses bank_connector's last answer on which banks are available: every
# query without bank codes would otherwise cost a call, and bank_connector's own reachability
# check is already held 3 s (bank_connector.connector.AVAILABILITY_TTL).
AVAILABILITY_REUSE = timedelta(seconds=1)


@dataclass(frozen=True)
class BankAvailability:
    code: str
    available: bool


class BankDirectory:
    """bank_connector: which banks answer now, and the real-name check of a card."""

    def __init__(
        self, channel: grpc.aio.Channel, timeout_s: float, clock: Clock | None = None, *,
        reuse: timedelta = AVAILABILITY_REUSE,
    ) -> None:
        self._stub = bank_connector_pb2_grpc.BankConnectorStub(channel)
        self._timeout = timeout_s
        self._clock = clock or SystemClock()
        self._reuse = reuse
        self._last: tuple[datetime, list[BankAvailability]] | None = None

    async def availability(self) -> list[BankAvailability] | None:
        """None when bank_connector cannot be reached."""
        try:
            response = await self._stub.ListBanks(
                bank_connector_pb2.BankConnectorListBanksRequest(),
                timeout=min(self._timeout, LIST_BANKS_TIMEOUT_S),
            )
        except grpc.aio.AioRpcError as error:
            log.warning("bank_connector ListBanks failed: %s", error.code().name)
            return None
        banks = [BankAvailability(bank.code, bank.available) for bank in response.banks]
        self._last = (self._clock.now(), banks)
        return banks

    async def recent_availability(self) -> list[BankAvailability] | None:
        """`availability`, or its last answer while younger than `reuse` (an unreachable
        bank_connector's None is never reused: the next call asks again)."""
        last = self._last
        if last is not None and self._clock.now() - last[0] < self._reuse:
            return last[1]
        return await self.availability()

    async def verify_real_name(self, card_number: str, name: str, id_number: str, phone: str) -> str | None:
        """The code of the bank that confirmed card, name, ID and phone; None if not confirmed.
        bank_connector's refusals come back as they are: a card whose BIN no supported bank
        issues is INVALID_ARGUMENT on card_number (metadata cause UNKNOWN_ISSUER), an issuer
        out of reach SERVICE_UNAVAILABLE."""
        try:
            response = await self._stub.VerifyRealName(
                bank_connector_pb2.VerifyRealNameRequest(
                    card_number=card_number, name=name, id_number=id_number, phone=phone
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise downstream_error(error, "bank_connector") from None
        if not response.confirmed:
            return None
        return response.bank_code


class ReportDesk:
    """report_service: queries and reports, always on behalf of one user."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._stub = report_service_pb2_grpc.ReportServiceStub(channel)
        self._timeout = timeout_s

    async def create_query(
        self,
        user_id: str,
        subject: Identity,
        bank_codes: list[str],
        agreement_version: str,
        idempotency_key: str,
    ) -> common_pb2.Query:
        try:
            response = await self._stub.CreateQuery(
                report_service_pb2.CreateQueryRequest(
                    user_id=user_id,
                    subject=report_service_pb2.Subject(
                        name=subject.name, id_number=subject.id_number, phone=subject.phone
                    ),
                    bank_codes=bank_codes,
                    agreement_version=agreement_version,
                    idempotency_key=idempotency_key,
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise downstream_error(error, "report_service") from None
        return response.query

    async def get_query(self, user_id: str, query_id: str) -> common_pb2.Query:
        try:
            response = await self._stub.GetQuery(
                report_service_pb2.GetQueryRequest(user_id=user_id, query_id=query_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise downstream_error(error, "report_service") from None
        return response.query

    async def list_queries(self, user_id: str) -> list[common_pb2.Query]:
        try:
            response = await self._stub.ListQueries(
                report_service_pb2.ReportServiceListQueriesRequest(user_id=user_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise downstream_error(error, "report_service") from None
        return list(response.queries)

    async def get_report(self, user_id: str, query_id: str) -> common_pb2.Report:
        try:
            response = await self._stub.GetReport(
                report_service_pb2.ReportServiceGetReportRequest(user_id=user_id, query_id=query_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise downstream_error(error, "report_service") from None
        return response.report

    async def watch(
        self, user_id: str, query_id: str, deadline_s: float
    ) -> AsyncGenerator[gateway_pb2.QueryEvent, None]:
        """The query's events, one per upstream message; the upstream stream ends after
        `deadline_s` at the latest. Progress only: report_service's stream has no field for a
        card, so none can reach a watcher."""
        call = self._stub.WatchQuery(
            report_service_pb2.ReportServiceWatchQueryRequest(user_id=user_id, query_id=query_id),
            timeout=deadline_s,
        )
        state = WatchState()
        try:
            async for progress in call:
                yield state.event(progress)
        except grpc.aio.AioRpcError as error:
            raise downstream_error(error, "report_service") from None
        finally:
            call.cancel()  # the watcher went away: stop the upstream stream too


class WatchState:
    """One watch's outcomes so far, kept here since report_service sends only what is new: each
    of its messages becomes one public event, which carries the whole state (docs/api.md)."""

    def __init__(self) -> None:
        self._outcomes: dict[str, common_pb2.BankOutcome] = {}  # in the order first recorded
        self._first = True

    def event(self, progress: report_service_pb2.ReportServiceWatchQueryResponse) -> gateway_pb2.QueryEvent:
        """The first message: the state so far, with no `new_outcomes`; then the outcomes each
        message brings (recorded or changed since the one before) in `new_outcomes`, the last of
        them in `outcome`, with the state after them. Their `cards` stay empty."""
        outcomes = self._outcomes
        new = [
            common_pb2.BankOutcome(bank_code=o.bank_code, kind=o.kind, detail=o.detail) for o in progress.new_outcomes
        ]
        for outcome in new:
            outcomes[outcome.bank_code] = outcome
        if self._first or not new:
            self._first = False
            return gateway_pb2.QueryEvent(query=progress.query, outcomes=outcomes.values())
        return gateway_pb2.QueryEvent(
            query=progress.query, outcomes=outcomes.values(), new_outcomes=new, outcome=new[-1]
        )


class SmsSender:
    """notifier: the SMS messages the gateway sends."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._stub = notifier_pb2_grpc.NotifierStub(channel)
        self._timeout = timeout_s

    async def _send(self, request: notifier_pb2.SendRequest, deadline_s: float) -> bool:
        """False when the notifier gave the message up for good (the SMS vendor refused it, e.g.
        a number that cannot receive texts); True when it is delivered or on its way."""
        try:
            reply = await self._stub.Send(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as error:
            raise downstream_error(error, "notifier") from None
        return reply.status != notifier_pb2.DELIVERY_STATUS_FAILED

    async def send_code(self, phone: str, code: str, purpose: str, challenge_id: str) -> bool:
        """See `_send`: False when the code can never reach the phone."""
        return await self._send(
            notifier_pb2.SendRequest(
                idempotency_key=f"sms:{challenge_id}",
                phone=phone,
                kind=notifier_pb2.MESSAGE_KIND_SMS_CODE,
                params={"code": code, "purpose": purpose},
            ),
            self._timeout,
        )

    async def send_consent_receipt(
        self, phone: str, query_id: str, agreement_version: str, bank_count: int
    ) -> None:
        await self._send(
            notifier_pb2.SendRequest(
                idempotency_key=f"consent:{query_id}",
                phone=phone,
                kind=notifier_pb2.MESSAGE_KIND_CONSENT_RECEIPT,
                params={
                    "query_id": query_id,
                    "agreement_version": agreement_version,
                    "bank_count": str(bank_count),
                },
            ),
            min(self._timeout, 3.0),
        )
