"""A small typed client of the public API (cardcheck.v1.CardCheck), for the CLI demo and tests.

Refusals come back as `CardCheckError` (reason, metadata, field violations, retry_after);
an RpcError that carries no ErrorInfo of ours is re-raised as it is."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from cardcheck.runtime.errors import CardCheckError, from_rpc_error
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

T = TypeVar("T")

__all__ = ["CardCheckClient", "CardCheckError"]


def _purpose(purpose: str | int) -> int:
    if isinstance(purpose, int):
        return purpose
    name = purpose.upper()
    return common_pb2.SmsPurpose.Value(name if name.startswith("SMS_PURPOSE_") else f"SMS_PURPOSE_{name}")


def _typed(error: grpc.aio.AioRpcError) -> Exception:
    typed = from_rpc_error(error)
    return typed if typed is not None else error


class CardCheckClient:
    """`CardCheckClient("127.0.0.1:50051")` or `CardCheckClient(channel=...)`.

    Register and SignIn keep the session token they return; later calls send it as
    `authorization: Bearer <token>` (or pass `session_token=` to use another one)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        session_token: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        if (address is None) == (channel is None):
            raise ValueError("give an address or a channel")
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else grpc.aio.insecure_channel(address)
        self._stub = gateway_pb2_grpc.CardCheckStub(self._channel)
        self._timeout = timeout
        self.session_token = session_token

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> CardCheckClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _metadata(self, session_token: str | None) -> tuple[tuple[str, str], ...]:
        token = session_token or self.session_token
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def _call(self, rpc: Callable[..., Awaitable[T]], request, session_token: str | None = None) -> T:
        try:
            return await rpc(request, metadata=self._metadata(session_token), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise _typed(error) from error

    # --- without a session -------------------------------------------------------------------

    async def list_banks(self) -> list[common_pb2.Bank]:
        response = await self._call(self._stub.ListBanks, gateway_pb2.ListBanksRequest())
        return list(response.banks)

    async def get_agreement(self) -> gateway_pb2.Agreement:
        return await self._call(self._stub.GetAgreement, gateway_pb2.GetAgreementRequest())

    async def request_sms_code(
        self, purpose: str | int, phone: str = "", *, session_token: str | None = None
    ) -> gateway_pb2.SmsChallenge:
        """purpose: "REGISTER", "SIGN_IN", "QUERY_AUTH" (needs the session) or the enum value."""
        request = gateway_pb2.RequestSmsCodeRequest(phone=phone, purpose=_purpose(purpose))
        return await self._call(self._stub.RequestSmsCode, request, session_token)

    async def register(
        self,
        *,
        name: str,
        id_number: str,
        phone: str,
        challenge_id: str,
        sms_code: str,
        card_number: str,
        payment_password: str,
        region: str,
    ) -> gateway_pb2.Session:
        session = await self._call(
            self._stub.Register,
            gateway_pb2.RegisterRequest(
                name=name,
                id_number=id_number,
                phone=phone,
                challenge_id=challenge_id,
                sms_code=sms_code,
                card_number=card_number,
                payment_password=payment_password,
                region=region,
            ),
        )
        self.session_token = session.session_token
        return session

    async def sign_in(self, *, phone: str, challenge_id: str, sms_code: str) -> gateway_pb2.Session:
        session = await self._call(
            self._stub.SignIn,
            gateway_pb2.SignInRequest(phone=phone, challenge_id=challenge_id, sms_code=sms_code),
        )
        self.session_token = session.session_token
        return session

    # --- with a session ----------------------------------------------------------------------

    async def submit_query(
        self,
        *,
        agreement_version: str,
        challenge_id: str,
        sms_code: str,
        face_token: str,
        bank_codes: Sequence[str] = (),
        consent_given: bool = True,
        idempotency_key: str = "",
        session_token: str | None = None,
    ) -> common_pb2.Query:
        request = gateway_pb2.SubmitQueryRequest(
            bank_codes=list(bank_codes),
            agreement_version=agreement_version,
            consent_given=consent_given,
            challenge_id=challenge_id,
            sms_code=sms_code,
            face_token=face_token,
            idempotency_key=idempotency_key,
        )
        return await self._call(self._stub.SubmitQuery, request, session_token)

    async def watch_query(
        self, query_id: str, *, session_token: str | None = None
    ) -> AsyncIterator[gateway_pb2.QueryEvent]:
        """The query's events until it leaves PENDING (no overall timeout)."""
        call = self._stub.WatchQuery(
            gateway_pb2.WatchQueryRequest(query_id=query_id), metadata=self._metadata(session_token)
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as error:
            raise _typed(error) from error
        finally:
            call.cancel()

    async def list_queries(self, *, session_token: str | None = None) -> list[common_pb2.Query]:
        response = await self._call(self._stub.ListQueries, gateway_pb2.ListQueriesRequest(), session_token)
        return list(response.queries)

    async def get_report(
        self, query_id: str, payment_password: str, *, session_token: str | None = None
    ) -> common_pb2.Report:
        request = gateway_pb2.GetReportRequest(query_id=query_id, payment_password=payment_password)
        return await self._call(self._stub.GetReport, request, session_token)
