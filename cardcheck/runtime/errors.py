"""How the servers refuse: one place that builds the status with its details (`to_status`,
`refuse`, `abort`) and the servicer decorator that applies it.

The reasons, the typed exception and the way back from a status (`from_rpc_error`) live in
`cardcheck.refusals`, which the client shares; they are imported here under their old names."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from cardcheck.refusals import (
    DOMAIN,
    MAX_VIOLATIONS,
    REASONS,
    CardCheckError,
    FieldViolation,
    Reason,
    ReasonSpec,
    from_rpc_error,
)

log = logging.getLogger(__name__)

# The reason of the refusal the current call ends with (set by `refuse` and `abort`), which
# cardcheck/runtime/metrics.py counts once the handler returns.
refusal_reason: ContextVar[str | None] = ContextVar("cardcheck_refusal_reason", default=None)

Context = grpc.aio.ServicerContext[Any, Any]
Method = TypeVar("Method", bound=Callable[..., Any])


def invalid_argument(violations: Sequence[FieldViolation]) -> CardCheckError:
    """INVALID_ARGUMENT naming the fields (the first MAX_VIOLATIONS of them, and how many more)."""
    fields = ", ".join(v.field for v in violations[:MAX_VIOLATIONS])
    more = len(violations) - MAX_VIOLATIONS
    message = f"invalid: {fields}" + (f" and {more} more" if more > 0 else "")
    return CardCheckError(Reason.INVALID_ARGUMENT, message, violations=violations)


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: CardCheckError) -> status_pb2.Status:
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=dict(error.metadata))),
        _pack(error_details_pb2.LocalizedMessage(locale="zh-CN", message=error.message_zh)),
    ]
    if error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(max(error.retry_after, timedelta(0)))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(
        code=error.code.value[0], message=error.message or error.message_zh, details=details
    )


def refuse(context: Context, error: CardCheckError) -> None:
    """Sets the refusal's status, with its details, on the call, which then ends with it.

    Set rather than raised (`context.abort` raises AbortError): the tracing interceptor records
    a raised error with a formatted traceback, which made each refusal cost several times a
    plain call, and refusing cheaply is what shedding load depends on."""
    refusal_reason.set(error.reason)
    status = rpc_status.to_status(to_status(error))
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


async def abort(context: Context, error: CardCheckError) -> None:
    """Ends the call with the refusal by raising, as `context.abort` does."""
    refusal_reason.set(error.reason)
    await context.abort_with_status(rpc_status.to_status(to_status(error)))


def downstream_error(error: grpc.aio.AioRpcError, service: str) -> CardCheckError:
    """Relays a refusal from an internal service; anything else becomes SERVICE_UNAVAILABLE."""
    typed = from_rpc_error(error)
    if typed is not None:
        return typed
    log.warning("call to %s failed: %s", service, error.code().name)
    return CardCheckError(Reason.SERVICE_UNAVAILABLE, f"{service} is unavailable ({error.code().name})")


def handles_errors(method: Method) -> Method:
    """Servicer decorator: a CardCheckError raised by the method, or a downstream service's
    AioRpcError, becomes the call's status. Anything else is a bug and propagates (UNKNOWN).
    The method keeps its type: a refused unary call returns None, which grpc never sends."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: object, request: Message, context: Context) -> AsyncIterator[Message]:
            try:
                async for item in method(self, request, context):
                    yield item
            except CardCheckError as error:
                refuse(context, error)
            except grpc.aio.AioRpcError as error:
                refuse(context, downstream_error(error, "a dependency"))

        return cast(Method, stream)

    @functools.wraps(method)
    async def unary(self: object, request: Message, context: Context) -> Any:
        try:
            return await method(self, request, context)
        except CardCheckError as error:
            refuse(context, error)
        except grpc.aio.AioRpcError as error:
            refuse(context, downstream_error(error, "a dependency"))
        return None  # with a non-OK code set, grpc sends no message

    return cast(Method, unary)


__all__ = [
    "DOMAIN",
    "REASONS",
    "Reason",
    "ReasonSpec",
    "abort",
    "CardCheckError",
    "FieldViolation",
    "MAX_VIOLATIONS",
    "downstream_error",
    "from_rpc_error",
    "handles_errors",
    "invalid_argument",
    "refuse",
    "to_status",
]
