"""A small typed client of the public API (cardcheck.v1.CardCheck), for the CLI demo, tests and
other services. It needs grpc and the generated stubs only: the `cardcheck-client` distribution
(clients/python) ships it without the servers' dependencies.

Refusals come back as `CardCheckError` (reason, metadata, field violations, retry_after), as the
subclass of its reason where there is one (`except RateLimited`, `except ServiceBusy`, ...; every
one of them is still a CardCheckError with its `reason`, a `Reason`: `error.reason ==
Reason.COOLDOWN_ACTIVE`); an RpcError that carries no ErrorInfo of ours is re-raised as it is."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from cardcheck.refusals import REASONS, CardCheckError, Reason, from_rpc_error
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

T = TypeVar("T")


def _reason_class(reason: Reason) -> type[CardCheckError]:
    name = "".join(part.title() for part in reason.split("_"))
    return type(name, (CardCheckError,), {"__doc__": f"The {reason} refusal.", "__module__": __name__})


# One subclass per reason of docs/api.md's error table (and SERVICE_UNAVAILABLE), so a caller can catch one.
ERRORS: dict[Reason, type[CardCheckError]] = {reason: _reason_class(reason) for reason in REASONS}
InvalidArgument = ERRORS[Reason.INVALID_ARGUMENT]
Unauthenticated = ERRORS[Reason.UNAUTHENTICATED]
NotFound = ERRORS[Reason.NOT_FOUND]
UnknownBank = ERRORS[Reason.UNKNOWN_BANK]
ConsentRequired = ERRORS[Reason.CONSENT_REQUIRED]
VerificationFailed = ERRORS[Reason.VERIFICATION_FAILED]
RealNameCheckFailed = ERRORS[Reason.REAL_NAME_CHECK_FAILED]
AlreadyRegistered = ERRORS[Reason.ALREADY_REGISTERED]
RegionNotSupported = ERRORS[Reason.REGION_NOT_SUPPORTED]
QueryInProgress = ERRORS[Reason.QUERY_IN_PROGRESS]
CooldownActive = ERRORS[Reason.COOLDOWN_ACTIVE]
ReportNotReady = ERRORS[Reason.REPORT_NOT_READY]
ReportExpired = ERRORS[Reason.REPORT_EXPIRED]
PaymentPasswordInvalid = ERRORS[Reason.PAYMENT_PASSWORD_INVALID]
PaymentPasswordLocked = ERRORS[Reason.PAYMENT_PASSWORD_LOCKED]
ServiceBusy = ERRORS[Reason.SERVICE_BUSY]
RateLimited = ERRORS[Reason.RATE_LIMITED]
ServiceUnavailable = ERRORS[Reason.SERVICE_UNAVAILABLE]
StreamExpired = ERRORS[Reason.STREAM_EXPIRED]
CallerNotAllowed = ERRORS[Reason.CALLER_NOT_ALLOWED]

__all__ = ["ERRORS", "CardCheckClient", "CardCheckError", "Reason", "open_channel", *(cls.__name__ for cls in ERRORS.values())]


def _purpose(purpose: str | int) -> common_pb2.SmsPurpose.ValueType:
    if isinstance(purpose, int):
        return common_pb2.SmsPurpose.ValueType(purpose)
    name = purpose.upper()
    return common_pb2.SmsPurpose.Value(name if name.startswith("SMS_PURPOSE_") else f"SMS_PURPOSE_{name}")


def _typed(error: grpc.aio.AioRpcError) -> Exception:
    typed = from_rpc_error(error)
    if typed is None:
        return error
    return ERRORS.get(typed.reason, CardCheckError)(
        **{f.name: getattr(typed, f.name) for f in dataclasses.fields(typed)}
    )


def _channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    tls: bool,
) -> grpc.ChannelCredentials | None:
    """None (plaintext) unless TLS was asked for in one of the two ways, never both."""
    pem = (root_certificates, private_key, certificate_chain)
    if credentials is not None and any(part is not None for part in pem):
        raise ValueError("give credentials or the PEM parts, not both")
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("a client certificate needs its private key, and the key its certificate")
    if credentials is None and (tls or any(part is not None for part in pem)):
        return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    return credentials


def open_channel(
    address: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, str | int]] = (),
) -> grpc.aio.Channel:
    """The channel a CardCheckClient opens for itself, with the same TLS settings (see the
    class), for callers that share one channel between many clients (`channel=`), e.g. one
    client per signed-in user."""
    secure = _channel_credentials(credentials, root_certificates, private_key, certificate_chain, tls)
    if secure is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, secure, options=list(options))


class CardCheckClient:
    """`CardCheckClient("127.0.0.1:50051")` or `CardCheckClient(channel=...)`.

    TLS: `tls=True` verifies the server against the system's roots, `root_certificates=` (PEM)
    against those; `private_key=` with `certificate_chain=` (PEM) presents a client certificate
    (mTLS); or pass any `credentials=` (`grpc.ChannelCredentials`). Without them the channel is
    plaintext, as inside the mesh. `options=` are grpc channel arguments, e.g.
    `(("grpc.ssl_target_name_override", "gateway.internal"),)`.

    Register and SignIn keep the session token they return; later calls send it as
    `authorization: Bearer <token>` (or pass `session_token=` to use another one)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        session_token: str | None = None,
        timeout: float | None = 30.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        if (address is None) == (channel is None):
            raise ValueError("give an address or a channel")
        secure = _channel_credentials(credentials, root_certificates, private_key, certificate_chain, tls)
        if channel is not None and (secure is not None or options):
            raise ValueError("TLS settings and options apply to the client's own channel, not a given one")
        self._owns_channel = channel is None
        if channel is None:
            assert address is not None
            channel = open_channel(address, credentials=secure, options=options)
        self._channel = channel
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

    async def _call(self, rpc: Callable[..., Awaitable[T]], request: Message, session_token: str | None = None) -> T:
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

    async def sign_out(self, *, everywhere: bool = False, session_token: str | None = None) -> int:
        """Revokes the session (with everywhere, all of the user's): how many ended. The client
        forgets its own token when that was the one signed out."""
        response = await self._call(
            self._stub.SignOut, gateway_pb2.SignOutRequest(everywhere=everywhere), session_token
        )
        if session_token is None or session_token == self.session_token:
            self.session_token = None
        return response.sessions_ended

    async def start_face_check(self, *, session_token: str | None = None) -> gateway_pb2.StartFaceCheckResponse:
        """A face check for the signed-in user: run the liveness check with `biz_token`, then pass
        it as `face_token` to submit_query or reset_payment_password (`sandbox:pass` in the sandbox)."""
        return await self._call(self._stub.StartFaceCheck, gateway_pb2.StartFaceCheckRequest(), session_token)

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
        self,
        query_id: str,
        *,
        session_token: str | None = None,
        deadline_s: float | None = None,
        reopen: bool = True,
    ) -> AsyncGenerator[gateway_pb2.QueryEvent, None]:
        """The query's events until it leaves PENDING (no overall deadline unless `deadline_s`).

        The gateway ends a stream at its maximum lifetime (StreamExpired); the stream is then
        opened again, as its RetryInfo asks, unless `reopen` is False. The first event of each
        opening tells the state so far. Too many streams open at once: RateLimited."""
        loop = asyncio.get_running_loop()
        ends_at = None if deadline_s is None else loop.time() + deadline_s
        while True:
            call = self._stub.WatchQuery(
                gateway_pb2.WatchQueryRequest(query_id=query_id),
                metadata=self._metadata(session_token),
                timeout=None if ends_at is None else max(0.0, ends_at - loop.time()),
            )
            try:
                async for event in call:
                    yield event
                return
            except grpc.aio.AioRpcError as error:
                typed = _typed(error)
                if not reopen or not isinstance(typed, StreamExpired):
                    raise typed from error
            finally:
                call.cancel()
            await asyncio.sleep(typed.retry_after.total_seconds() if typed.retry_after else 0.0)

    async def list_queries(self, *, session_token: str | None = None) -> list[common_pb2.Query]:
        response = await self._call(self._stub.ListQueries, gateway_pb2.ListQueriesRequest(), session_token)
        return list(response.queries)

    async def get_report(
        self, query_id: str, payment_password: str, *, session_token: str | None = None
    ) -> common_pb2.Report:
        request = gateway_pb2.GetReportRequest(query_id=query_id, payment_password=payment_password)
        return await self._call(self._stub.GetReport, request, session_token)

    async def reset_payment_password(
        self,
        *,
        challenge_id: str,
        sms_code: str,
        face_token: str,
        new_payment_password: str,
        session_token: str | None = None,
    ) -> None:
        """challenge_id and sms_code from request_sms_code("QUERY_AUTH")."""
        request = gateway_pb2.ResetPaymentPasswordRequest(
            challenge_id=challenge_id,
            sms_code=sms_code,
            face_token=face_token,
            new_payment_password=new_payment_password,
        )
        await self._call(self._stub.ResetPaymentPassword, request, session_token)
