"""cardcheck.v1.CardCheck: translates protobuf to the flows of gateway/flows.py and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from cardcheck.runtime.errors import handles_errors
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.flows import Gateway, QueryRequest, Registration
from gateway.sessions import IssuedSession, bearer_token


def _timestamp(instant: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def _token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return bearer_token(value if isinstance(value, str) else value.decode(errors="replace"))
    return None


def _purpose(value: int) -> str | None:
    if value == common_pb2.SMS_PURPOSE_UNSPECIFIED:
        return None
    try:
        return common_pb2.SmsPurpose.Name(value).removeprefix("SMS_PURPOSE_")
    except ValueError:
        return None  # an enum value this version does not know


def _session(issued: IssuedSession) -> gateway_pb2.Session:
    return gateway_pb2.Session(
        user_id=issued.user_id, session_token=issued.token, expires_at=_timestamp(issued.expires_at)
    )


class CardCheckServicer(gateway_pb2_grpc.CardCheckServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    @handles_errors
    async def ListBanks(self, request, context) -> gateway_pb2.ListBanksResponse:
        listing = await self._gateway.list_banks()
        return gateway_pb2.ListBanksResponse(
            banks=[
                common_pb2.Bank(code=b.bank.code, name=b.bank.name, kind=b.bank.kind, available=b.available)
                for b in listing
            ]
        )

    @handles_errors
    async def GetAgreement(self, request, context) -> gateway_pb2.Agreement:
        agreement = self._gateway.agreement
        return gateway_pb2.Agreement(version=agreement.version, title=agreement.title, text=agreement.text)

    @handles_errors
    async def RequestSmsCode(self, request, context) -> gateway_pb2.SmsChallenge:
        issued = await self._gateway.request_sms_code(
            request.phone, _purpose(request.purpose), _token(context)
        )
        return gateway_pb2.SmsChallenge(
            challenge_id=issued.challenge_id,
            expires_in_seconds=int(issued.expires_in.total_seconds()),
            resend_after_seconds=int(issued.resend_after.total_seconds()),
        )

    @handles_errors
    async def Register(self, request, context) -> gateway_pb2.Session:
        issued = await self._gateway.register(
            Registration(
                name=request.name,
                id_number=request.id_number,
                phone=request.phone,
                challenge_id=request.challenge_id,
                sms_code=request.sms_code,
                card_number=request.card_number,
                payment_password=request.payment_password,
                region=request.region,
            )
        )
        return _session(issued)

    @handles_errors
    async def SignIn(self, request, context) -> gateway_pb2.Session:
        return _session(await self._gateway.sign_in(request.phone, request.challenge_id, request.sms_code))

    @handles_errors
    async def SubmitQuery(self, request, context) -> common_pb2.Query:
        return await self._gateway.submit_query(
            _token(context),
            QueryRequest(
                bank_codes=list(request.bank_codes),
                agreement_version=request.agreement_version,
                consent_given=request.consent_given,
                challenge_id=request.challenge_id,
                sms_code=request.sms_code,
                face_token=request.face_token,
                idempotency_key=request.idempotency_key,
            ),
        )

    @handles_errors
    async def WatchQuery(self, request, context) -> AsyncIterator[gateway_pb2.QueryEvent]:
        async for event in self._gateway.watch_query(_token(context), request.query_id):
            yield event

    @handles_errors
    async def ListQueries(self, request, context) -> gateway_pb2.ListQueriesResponse:
        return gateway_pb2.ListQueriesResponse(queries=await self._gateway.list_queries(_token(context)))

    @handles_errors
    async def GetReport(self, request, context) -> common_pb2.Report:
        return await self._gateway.get_report(_token(context), request.query_id, request.payment_password)
