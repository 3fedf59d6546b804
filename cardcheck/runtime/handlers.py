"""Each method handler of a server wrapped once, where a generated `add_*_to_server` adds it,
so that a call pays one wrapper and no interceptor (an interceptor is a hop through grpc's
interceptor chain on every call). Metrics count calls this way, and the access check runs so."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

Wrap = Callable[[str, Handler], Handler]  # ("/package.Service/Method", handler) -> its wrapper


def wrapping_server(server: grpc.aio.Server, wrap: Wrap) -> grpc.aio.Server:
    """`server` as a generated `add_*_to_server` sees it: each method handler it adds is
    `wrap`ped; anything else goes to `server`. Stand-ins stack: the outermost wraps last, so
    its wrapper runs first."""
    return cast(grpc.aio.Server, _WrappingServer(server, wrap))


class WrappedOnce:
    """A wrapper per method, made the first time it is asked for (and again only if the
    handler it wraps is another one)."""

    def __init__(self, wrap: Wrap) -> None:
        self._wrap = wrap
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def __call__(self, method: str, handler: Handler) -> Handler:
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _WrappingServer:
    def __init__(self, server: grpc.aio.Server, wrap: Wrap) -> None:
        self._server = server
        self._wrap = wrap

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, Handler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(f"/{service}/{name}", handler) for name, handler in method_handlers.items()}
        )

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappingGenericHandler(handler, self._wrap) for handler in generic_rpc_handlers)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _WrappingGenericHandler(grpc.GenericRpcHandler):
    """A generic handler's methods, wrapped (grpc asks it only for methods no registered
    handler serves: generated code registers its methods both ways)."""

    def __init__(self, handler: grpc.GenericRpcHandler, wrap: Wrap) -> None:
        self._handler = handler
        self._wrapped = WrappedOnce(wrap)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._handler.service(handler_call_details)
        return None if handler is None else self._wrapped(handler_call_details.method, handler)
