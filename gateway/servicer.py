"""cardcheck.v1.CardCheck: translates protobuf to the flows of gateway/flows.py and back.

`add_to_server` registers the servicer so that a request that is not a valid protobuf message
of its type (corrupt wire format, bad UTF-8 in a string field) is refused INVALID_ARGUMENT with
a BadRequest, instead of the UNKNOWN that grpc answers when the generated deserializer raises."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, cast
from urllib.parse import unquote

import grpc
from google.protobuf import timestamp_pb2

from cardcheck.runtime.errors import (
    CardCheckError,
    FieldViolation,
    handles_errors,
    invalid_argument,
    refuse,
)
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.flows import Gateway, PasswordReset, QueryRequest, Registration
from gateway.sessions import IssuedSession, bearer_token

SERVICE = "cardcheck.v1.CardCheck"
log = logging.getLogger(__name__)


def _timestamp(instant: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def _token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return bearer_token(value if isinstance(value, str) else value.decode(errors="replace"))
    return None


def _metadata_value(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode(errors="replace")


def _network(host: str) -> str:
    """An IPv4 address as it is; an IPv6 address as its /64 (one subscriber's prefix)."""
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return host.strip()[:128]
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def caller_of(peer: str, metadata: Iterable[tuple[str, str | bytes]], header: str | None = None) -> str:
    """Who is calling, for the per-caller SMS limits: the peer's address (`ipv4:1.2.3.4:5678`,
    `ipv6:[::1]:5678`), or, when the gateway sits behind a proxy that sets `header`, the last
    address of its last occurrence: the proxy appends its own value (or its own header) after
    whatever the client sent, so anything before it may be the client's invention."""
    if header:
        values = [value for key, value in metadata if key.lower() == header]
        if values:
            last = _metadata_value(values[-1]).rsplit(",", 1)[-1].strip()
            if last:
                return _network(last)
    scheme, _, rest = unquote(peer or "").partition(":")
    if scheme in ("ipv4", "ipv6"):
        return _network(rest.rpartition(":")[0])
    return peer or "unknown"


def _purpose(value: common_pb2.SmsPurpose.ValueType) -> str | None:
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
    def __init__(self, gateway: Gateway, *, caller_header: str | None = None) -> None:
        self._gateway = gateway
        self._caller_header = caller_header

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

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        return caller_of(context.peer(), context.invocation_metadata() or (), self._caller_header)

    @handles_errors
    async def RequestSmsCode(self, request, context) -> gateway_pb2.SmsChallenge:
        issued = await self._gateway.request_sms_code(
            request.phone, _purpose(request.purpose), _token(context), self._caller(context)
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
            ),
            self._caller(context),
        )
        return _session(issued)

    @handles_errors
    async def SignIn(self, request, context) -> gateway_pb2.Session:
        return _session(
            await self._gateway.sign_in(
                request.phone, request.challenge_id, request.sms_code, self._caller(context)
            )
        )

    @handles_errors
    async def SignOut(self, request, context) -> gateway_pb2.SignOutResponse:
        ended = await self._gateway.sign_out(_token(context), request.everywhere)
        return gateway_pb2.SignOutResponse(sessions_ended=ended)

    @handles_errors
    async def StartFaceCheck(self, request, context) -> gateway_pb2.StartFaceCheckResponse:
        check = await self._gateway.start_face_check(_token(context))
        return gateway_pb2.StartFaceCheckResponse(
            biz_token=check.biz_token, url=check.url, expires_at=_timestamp(check.expires_at)
        )

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

    @handles_errors
    async def ResetPaymentPassword(self, request, context) -> gateway_pb2.ResetPaymentPasswordResponse:
        await self._gateway.reset_payment_password(
            _token(context),
            PasswordReset(
                challenge_id=request.challenge_id,
                sms_code=request.sms_code,
                face_token=request.face_token,
                new_payment_password=request.new_payment_password,
            ),
        )
        return gateway_pb2.ResetPaymentPasswordResponse()


# --- registration that refuses undecodable requests ---------------------------------------------


class _Undecodable:
    """Stands in for a request whose bytes are not a message of the method's type."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant_deserializer(deserialize: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any]:
    assert deserialize is not None  # the generated handlers all have one
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception:  # DecodeError, or anything else the parser may raise on garbage
            return _Undecodable(type_name)

    return parse


def _undecodable(request: _Undecodable) -> CardCheckError:
    return invalid_argument([FieldViolation("request", f"not a valid {request.type_name} message")])


# grpc's method handlers are namedtuples (`_replace`), and an aio servicer's behaviors are
# coroutines and async generators; grpc's stubs declare an ABC with the sync signatures.
def _tolerant(handler: grpc.RpcMethodHandler[Any, Any], type_name: str) -> grpc.RpcMethodHandler[Any, Any]:
    if handler.request_streaming:
        return handler  # the public API has no client streams
    if handler.response_streaming:
        behavior = cast(Callable[[Any, Any], AsyncIterator[Any]], handler.unary_stream)

        async def stream(request, context):
            if isinstance(request, _Undecodable):
                refuse(context, _undecodable(request))
                return
            async for item in behavior(request, context):
                yield item

        return handler._replace(  # type: ignore[attr-defined]
            request_deserializer=_tolerant_deserializer(handler.request_deserializer, type_name),
            unary_stream=stream,
        )
    unary_behavior = cast(Callable[[Any, Any], Awaitable[Any]], handler.unary_unary)

    async def unary(request, context):
        if isinstance(request, _Undecodable):
            refuse(context, _undecodable(request))
            return None
        return await unary_behavior(request, context)

    return handler._replace(  # type: ignore[attr-defined]
        request_deserializer=_tolerant_deserializer(handler.request_deserializer, type_name),
        unary_unary=unary,
    )


class _Collector:
    """Takes the method handlers the generated code builds, instead of a server."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers.update(handlers)


def add_to_server(servicer: CardCheckServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_CardCheckServicer_to_server, with tolerant request parsing."""
    collector = _Collector()
    # It takes the calls the generated code makes of a server.
    gateway_pb2_grpc.add_CardCheckServicer_to_server(servicer, cast(grpc.aio.Server, collector))
    methods = gateway_pb2.DESCRIPTOR.services_by_name["CardCheck"].methods_by_name
    if set(collector.handlers) != set(methods):
        raise RuntimeError("the generated CardCheck stubs no longer register every method")
    handlers = {
        name: _tolerant(handler, methods[name].input_type.full_name)
        for name, handler in collector.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
