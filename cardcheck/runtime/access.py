"""Who may call what: each internal server authorizes every call by its caller's identity, the
URI SAN `spiffe://cardcheck/<name>` of the client certificate the TLS handshake verified (grpc
puts it in the auth context as `peer_spiffe_id`).

ALLOWED is the one table. A key is a gRPC service, or one of its methods (which then wins over
its service's row). Anyone else, and a caller with no such identity, is refused with
PERMISSION_DENIED, reason CALLER_NOT_ALLOWED (docs/api.md). tests/test_tls.py holds the table
to the calls the code makes (tests/deploy_manifests.py `code_edges`).

The gateway's public port is not here: its callers are users, authorized by their session."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc.aio import ServicerContext

from cardcheck.refusals import CardCheckError, Reason
from cardcheck.runtime.certs import spiffe_id
from cardcheck.runtime.errors import abort
from cardcheck.runtime.handlers import Handler, WrappedOnce, wrapping_server

OPERATOR = "operator"  # a person at a terminal (grpcurl, `cardcheck demo`), and `cardcheck up`


@dataclass(frozen=True)
class Allowed:
    callers: frozenset[str]
    in_sandbox: frozenset[str] = frozenset()  # callers allowed only while CARDCHECK_SANDBOX is on


def _allowed(*callers: str, in_sandbox: tuple[str, ...] = ()) -> Allowed:
    return Allowed(frozenset(callers), frozenset(in_sandbox))


ALLOWED: Mapping[str, Allowed] = {
    "cardcheck.v1.ReportService": _allowed("gateway"),
    "cardcheck.v1.BankConnector": _allowed("gateway", "report_service"),
    "cardcheck.v1.Notifier": _allowed("gateway", "report_service"),
    "cardcheck.v1.Notifier/ListMessages": _allowed("gateway", "report_service", in_sandbox=(OPERATOR,)),  # the inbox
    "cardcheck.v1.IssuingBank": _allowed("bank_connector"),
    "cardcheck.v1.BankSimControl": _allowed(in_sandbox=(OPERATOR,)),
    "grpc.health.v1.Health": _allowed(OPERATOR),
    "grpc.reflection.v1alpha.ServerReflection": _allowed(OPERATOR),
    "grpc.reflection.v1.ServerReflection": _allowed(OPERATOR),
}

_PREFIX = spiffe_id("")


def caller_of(context: ServicerContext[Any, Any]) -> str | None:
    """The mesh identity the caller's certificate names, or None (no certificate, another
    trust domain, or not exactly one SPIFFE ID)."""
    found = list(context.auth_context().get("peer_spiffe_id") or ())
    if len(found) != 1:
        return None
    uri = found[0].decode("ascii", "replace")
    name = uri.removeprefix(_PREFIX)
    return name if name != uri and name and "/" not in name else None


class Access:
    """The table as one server applies it: in sandbox or not."""

    def __init__(self, sandbox: bool, table: Mapping[str, Allowed] = ALLOWED) -> None:
        self._sandbox = sandbox
        self._table = table

    def callers(self, method: str) -> frozenset[str]:
        """Who may call `method` ("/package.Service/Method")."""
        full = method.lstrip("/")
        row = self._table.get(full) or self._table.get(full.partition("/")[0])
        if row is None:
            return frozenset()
        return row.callers | row.in_sandbox if self._sandbox else row.callers

    def refusal(self, method: str, caller: str | None) -> CardCheckError:
        who = "a caller with no mesh identity" if caller is None else f"{caller!r}"
        return CardCheckError(Reason.CALLER_NOT_ALLOWED, f"{who} may not call {method}",
                              metadata={"caller": caller or "", "method": method})


# Added to the server directly, not through `checking_server`: the interceptor checks these.
FRAMEWORK_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def checking_server(server: grpc.aio.Server, access: Access) -> grpc.aio.Server:
    """`server` for a generated `add_*_to_server`: each method handler it adds checks the caller
    first, wrapped once at registration. Given the metrics' counting server, a refused call is
    counted like any other (a refusal with its reason)."""
    return wrapping_server(server, lambda method, handler: _checking(handler, method, access))


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Checks the caller of health and reflection (FRAMEWORK_SERVICES), which are added to the
    server itself; every other method checks in its own handler (`checking_server`)."""

    def __init__(self, access: Access) -> None:
        self._checked = WrappedOnce(lambda method, handler: _checking(handler, method, access))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(FRAMEWORK_SERVICES):
            return handler
        return self._checked(handler_call_details.method, handler)


def _checking(handler: Handler, method: str, access: Access) -> Handler:
    callers = access.callers(method)

    async def check(context: ServicerContext[Any, Any]) -> None:
        caller = caller_of(context)
        if caller not in callers:
            await abort(context, access.refusal(method, caller))

    def guard(behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def checked(request: Any, context: ServicerContext[Any, Any]) -> Any:
            await check(context)
            answer = behavior(request, context)
            return await answer if inspect.isawaitable(answer) else answer

        return checked

    def guard_stream(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        # Always an async generator: the tracing interceptor outside iterates what it is given.
        async def checked_stream(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await check(context)
            answers = behavior(request, context)
            if inspect.isasyncgen(answers):
                async for item in answers:
                    yield item
            elif inspect.isawaitable(answers):  # one that writes with context.write
                await answers

        return checked_stream

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(guard_stream(handler.unary_stream), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary), **kwargs)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(guard_stream(handler.stream_stream), **kwargs)
