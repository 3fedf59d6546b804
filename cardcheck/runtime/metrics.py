"""Prometheus metrics: one registry per service (several services share a test process), RED
for every RPC the service serves and makes, in grpc-prometheus's names, and the exposition on
HTTP `/metrics` from a thread of its own, so a scrape never waits for the event loop.

`grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}` and the
`grpc_server_handling_seconds` histogram for calls served; `grpc_client_*` likewise for calls
made on the channels `open_channel` opens. Health checks and reflection are not the service's
work and are left out, as they are from traces. `cardcheck_refusals_total` counts refusals by
their ErrorInfo reason. Each service adds its own metrics to `ServiceMetrics.registry`
(docs/metrics.md lists them all). No label value ever names a person: labels are methods,
status codes, reasons, bank codes, kinds and outcomes."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc.aio import ServicerContext
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import start_http_server

from cardcheck.runtime.errors import refusal_reason

log = logging.getLogger(__name__)

# `_created` series double every counter's exposition and say nothing a dashboard needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds: from a cached lookup (~1 ms) to the 60 s deadline of a long fan-out.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_NOT_OUR_WORK = ("/grpc.health.v1.", "/grpc.reflection.")
_OK = grpc.StatusCode.OK



def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


class ServiceMetrics:
    """One service's registry and RPC metrics, and its `/metrics` server (`address` None: no
    exposition, no interceptors). `start()` binds the address (port 0 picks one)."""

    def __init__(self, service: str, address: str | None) -> None:
        self.service = service
        self.address = address
        # Collectors are not run to learn their names: some read the database when run.
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.server_started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=self.registry)
        self.server_handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by status code.",
            (*labels, "grpc_code"), registry=self.registry)
        self.server_seconds = Histogram(
            "grpc_server_handling_seconds", "Time the server took to handle an RPC, in seconds.",
            labels, buckets=RPC_BUCKETS, registry=self.registry)
        self.client_started = Counter(
            "grpc_client_started", "RPCs started by this service's clients.", labels, registry=self.registry)
        self.client_handled = Counter(
            "grpc_client_handled", "RPCs this service made that completed, by status code.",
            (*labels, "grpc_code"), registry=self.registry)
        self.client_seconds = Histogram(
            "grpc_client_handling_seconds", "Time an RPC this service made took, in seconds.",
            labels, buckets=RPC_BUCKETS, registry=self.registry)
        self.refusals = Counter(
            "cardcheck_refusals", "Calls refused with a cardcheck.v1 ErrorInfo, by reason.",
            ("grpc_service", "grpc_method", "reason"), registry=self.registry)
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.port: int | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [MetricsServerInterceptor(self)] if self.enabled else []

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        if not self.enabled:
            return []
        return [_UnaryUnaryClient(self), _UnaryStreamClient(self)]

    def register(self, collector: Any) -> None:
        """A collector read at each scrape (values computed then, e.g. from the database)."""
        self.registry.register(collector)

    def start(self) -> int | None:
        """Serves `/metrics` on `address`; the bound port, or None when off. OSError when the
        address cannot be bound."""
        if self.address is None or self._http is not None:
            return self.port
        host, _, port = self.address.rpartition(":")
        httpd, thread = start_http_server(int(port), host.strip("[]") or "0.0.0.0", registry=self.registry)
        thread.name = f"{self.service}-metrics"
        self._http = (httpd, thread)
        self.port = int(httpd.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._http is None:
            return
        httpd, thread = self._http
        self._http = None
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


class _Rpc:
    """The children of one method's series, looked up once (labels() takes a lock)."""

    __slots__ = ("_server", "handled", "labels", "metrics", "method", "refused", "seconds", "service", "started")

    def __init__(self, metrics: ServiceMetrics, grpc_type: str, method: str, server: bool) -> None:
        self.metrics = metrics
        self.service, self.method = _split(method)
        self.labels = (grpc_type, self.service, self.method)
        started = metrics.server_started if server else metrics.client_started
        seconds = metrics.server_seconds if server else metrics.client_seconds
        self.started = started.labels(*self.labels)
        self.seconds = seconds.labels(*self.labels)
        self.handled: dict[grpc.StatusCode, Any] = {}
        self.refused: dict[str, Any] = {}
        self._server = server

    def refusal(self, reason: str) -> None:
        child = self.refused.get(reason)
        if child is None:
            child = self.refused[reason] = self.metrics.refusals.labels(self.service, self.method, reason)
        child.inc()

    def done(self, code: grpc.StatusCode, started_at: float) -> None:
        self.seconds.observe(time.perf_counter() - started_at)
        child = self.handled.get(code)
        if child is None:
            family = self.metrics.server_handled if self._server else self.metrics.client_handled
            child = self.handled[code] = family.labels(*self.labels, code.name)
        child.inc()


def _code_of(context: ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions hand back the number
        return _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return _OK


_CODES = {code.value[0]: code for code in grpc.StatusCode}


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


class MetricsServerInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call the server handles. The wrapped handler is made once per
    method (generated servicers hand back the same handler each call)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_NOT_OUR_WORK):
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler, method: str) -> Handler:
        rpc = _Rpc(self._metrics, _grpc_type(handler.request_streaming, handler.response_streaming), method, True)
        kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

        def finish(context: ServicerContext[Any, Any], started_at: float, error: BaseException | None) -> None:
            if error is None:
                code = _code_of(context)
            elif isinstance(error, grpc.aio.AbortError | grpc.RpcError):
                code = _code_of(context)
                code = grpc.StatusCode.UNKNOWN if code is _OK else code
            elif isinstance(error, BaseException) and not isinstance(error, Exception):
                code = grpc.StatusCode.CANCELLED  # CancelledError: the caller went away
            else:
                code = grpc.StatusCode.UNKNOWN  # a bug: grpc answers UNKNOWN
            rpc.done(code, started_at)
            reason = refusal_reason.get()
            if reason is not None:
                rpc.refusal(reason)

        def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def measured(request: Any, context: ServicerContext[Any, Any]) -> Any:
                rpc.started.inc()
                refusal_reason.set(None)
                started_at = time.perf_counter()
                try:
                    response = await behavior(request, context)
                except BaseException as error:
                    finish(context, started_at, error)
                    raise
                finish(context, started_at, None)
                return response

            return measured

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if not inspect.isasyncgenfunction(behavior):  # writes with context.write
                return unary(behavior)

            async def measured(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                rpc.started.inc()
                refusal_reason.set(None)
                started_at = time.perf_counter()
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as error:
                    finish(context, started_at, error)
                    raise
                finish(context, started_at, None)

            return measured

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
        behavior: Callable[..., Any] | None = handler.stream_stream
        assert behavior is not None
        return grpc.stream_stream_rpc_method_handler(streaming(behavior), **kwargs)


def _status_now(call: Any) -> grpc.StatusCode | None:
    """A finished call's code without awaiting: grpc keeps the status on its cython call. None
    where that is not there (then the code is awaited in a task)."""
    status = getattr(getattr(call, "_cython_call", None), "_status", None)
    if status is None:
        return None
    return _CYGRPC_CODES.get(status.code(), grpc.StatusCode.UNKNOWN)


try:
    from grpc._cython import cygrpc  # type: ignore[attr-defined]

    _CYGRPC_CODES = {getattr(cygrpc.StatusCode, code.name.lower()): code for code in grpc.StatusCode}
except (ImportError, AttributeError):  # pragma: no cover - grpc's layout changed
    _CYGRPC_CODES = {}


class _ClientInterceptor:
    def __init__(self, metrics: ServiceMetrics, grpc_type: str) -> None:
        self._metrics = metrics
        self._type = grpc_type
        self._rpcs: dict[str, _Rpc] = {}
        self._pending: set[Any] = set()

    def _begin(self, method: str | bytes) -> _Rpc | None:
        if isinstance(method, bytes):  # grpc passes bytes here, whatever its stubs say
            method = method.decode()
        rpc = self._rpcs.get(method)
        if rpc is None:
            if method.startswith(_NOT_OUR_WORK):
                return None
            rpc = self._rpcs[method] = _Rpc(self._metrics, self._type, method, False)
        rpc.started.inc()
        return rpc

    def _watch(self, rpc: _Rpc, started_at: float, call: Any) -> None:
        def done(finished: Any) -> None:
            code = _status_now(finished)
            if code is not None:
                rpc.done(code, started_at)
                return
            import asyncio

            async def later() -> None:
                rpc.done(await finished.code(), started_at)

            task = asyncio.get_running_loop().create_task(later())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(done)


class _UnaryUnaryClient(_ClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metrics: ServiceMetrics) -> None:
        super().__init__(metrics, "unary")

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        rpc = self._begin(client_call_details.method)
        if rpc is None:
            return await continuation(client_call_details, request)
        started_at = time.perf_counter()
        try:
            call = await continuation(client_call_details, request)
        except grpc.aio.AioRpcError as error:
            rpc.done(error.code(), started_at)
            raise
        self._watch(rpc, started_at, call)
        return call


class _UnaryStreamClient(_ClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metrics: ServiceMetrics) -> None:
        super().__init__(metrics, "server_stream")

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        rpc = self._begin(client_call_details.method)
        if rpc is None:
            return await continuation(client_call_details, request)
        started_at = time.perf_counter()
        call = await continuation(client_call_details, request)
        self._watch(rpc, started_at, call)
        return call


def no_metrics() -> ServiceMetrics:
    """A registry with nothing served (code and tests that build a part alone)."""
    return ServiceMetrics("none", None)


def families(metrics: ServiceMetrics) -> Iterable[str]:
    """The names of the metric families in the registry (docs/metrics.md is made from these)."""
    return [family.name for family in metrics.registry.collect()]
