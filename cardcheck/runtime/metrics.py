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
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from grpc.aio import ServicerContext
from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cardcheck.runtime.errors import refusal_reason
from cardcheck.runtime.handlers import Handler, wrapping_server

log = logging.getLogger(__name__)

# `_created` series double every counter's exposition and say nothing a dashboard needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds: from a cached lookup (~1 ms) to the 60 s deadline of a long fan-out.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_NOT_OUR_WORK = ("/grpc.health.v1.", "/grpc.reflection.")
_OK = grpc.StatusCode.OK
_now = time.perf_counter



def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


class ServiceMetrics:
    """One service's registry and RPC metrics, and its `/metrics` server (`address` None: no
    exposition, nothing counted). `start()` binds the address (port 0 picks one)."""

    def __init__(self, service: str, address: str | None) -> None:
        self.service = service
        self.address = address
        # Collectors are not run to learn their names: some read the database when run.
        self.registry = CollectorRegistry(auto_describe=False)
        # Plain counts kept on the event loop's thread and read by the scrape's (a
        # prometheus_client child takes a lock on every increment: on a refused call that
        # answers in tens of microseconds, it showed).
        self.server_rpcs: dict[str, _Rpc] = {}
        self.client_rpcs: dict[str, _Rpc] = {}
        self.registry.register(_RpcCollector(self))
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.port: int | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def serving(self, server: grpc.aio.Server) -> grpc.aio.Server:
        """`server` for a generated `add_*_to_server`: the methods it adds are counted (health
        and reflection, added to `server` itself, are not). Off: `server` itself."""
        return wrapping_server(server, lambda method, handler: _counted(self, method, handler)) if self.enabled else server

    def client_calls(self) -> ClientCalls | None:
        """What counts the calls of the channels `open_channel` opens; None when off."""
        return ClientCalls(self) if self.enabled else None

    def register(self, collector: Any) -> None:
        """A collector read at each scrape (values computed then, e.g. from the database)."""
        self.registry.register(collector)

    def start(self) -> int | None:
        """Serves `/metrics` on `address`; the bound port, or None when off. OSError when the
        address cannot be bound."""
        if self.address is None or self._http is not None:
            return self.port
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        server_class = _Ipv6Server if ":" in host else ThreadingWSGIServer
        httpd = make_server(host, int(port), make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler)
        # A short poll: stopping waits for the serving loop to look up (0.5 s by default).
        thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"{self.service}-metrics", daemon=True
        )
        thread.start()
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


class _Ipv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log line for each scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Rpc:
    """One method's counts, by the labels grpc-prometheus gives them."""

    __slots__ = ("handled", "labels", "method", "refused", "seconds", "service", "started")

    def __init__(self, grpc_type: str, method: str) -> None:
        self.service, self.method = _split(method)
        self.labels = (grpc_type, self.service, self.method)
        self.started = 0
        # By the code as the call left it (a StatusCode; on the server, None for OK, or a
        # number from some grpc versions): named once, at the scrape, not on every call.
        self.handled: dict[object, int] = {}
        self.refused: dict[str, int] = {}  # by ErrorInfo reason
        self.seconds = Buckets(RPC_BUCKETS)

    def done(self, code: object, started_at: float) -> None:
        self.seconds.observe(_now() - started_at)
        handled = self.handled
        handled[code] = handled.get(code, 0) + 1

    def served(self, code: object, started_at: float) -> None:
        """A served call's end, with the refusal it ended with, if any."""
        self.done(code, started_at)
        reason = refusal_reason.get()
        if reason is not None:
            refused = self.refused
            refused[reason] = refused.get(reason, 0) + 1

    def by_code(self) -> dict[str, int]:
        named: dict[str, int] = {}
        for code, count in list(self.handled.items()):
            name = _code(code).name
            named[name] = named.get(name, 0) + count
        return named


class Buckets:
    """A histogram's counts without a lock (prometheus_client's take one per observation):
    observed on the event loop's thread, read by the scrape's."""

    __slots__ = ("bounds", "counts", "le", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.le = [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: Sequence[str]) -> None:
        family.add_metric(labels, list(zip(self.le, accumulate(list(self.counts)), strict=True)), sum_value=self.sum)


class _RpcCollector(Collector):
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        metrics = self._metrics
        for side, rpcs, help_started, help_handled, help_seconds in (
            ("server", metrics.server_rpcs, "RPCs started on the server.",
             "RPCs completed on the server, by status code.", "Time the server took to handle an RPC, in seconds."),
            ("client", metrics.client_rpcs, "RPCs started by this service's clients.",
             "RPCs this service made that completed, by status code.", "Time an RPC this service made took, in seconds."),
        ):
            started = CounterMetricFamily(f"grpc_{side}_started", help_started, labels=labels)
            handled = CounterMetricFamily(f"grpc_{side}_handled", help_handled, labels=[*labels, "grpc_code"])
            seconds = HistogramMetricFamily(f"grpc_{side}_handling_seconds", help_seconds, labels=labels)
            for rpc in list(rpcs.values()):
                if not rpc.started:  # a method registered and not called yet: no series, as before a call
                    continue
                started.add_metric(rpc.labels, rpc.started)
                for code, count in rpc.by_code().items():
                    handled.add_metric([*rpc.labels, code], count)
                rpc.seconds.add_to(seconds, rpc.labels)
            yield from (started, handled, seconds)
        refusals = CounterMetricFamily(
            "cardcheck_refusals", "Calls refused with a cardcheck.v1 ErrorInfo, by reason.",
            labels=["grpc_service", "grpc_method", "reason"])
        for rpc in list(metrics.server_rpcs.values()):
            for reason, count in list(rpc.refused.items()):
                refusals.add_metric([rpc.service, rpc.method, reason], count)
        yield refusals


def _code(code: object) -> grpc.StatusCode:
    """A call's code as grpc's context gives it: None before one is set (OK), a number in some
    grpc versions."""
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return _OK


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _counted(metrics: ServiceMetrics, method: str, handler: Handler) -> Handler:
    """`handler` with every call counted and timed."""
    if method.startswith(_NOT_OUR_WORK):
        return handler
    grpc_type = _grpc_type(handler.request_streaming, handler.response_streaming)
    rpc = metrics.server_rpcs.get(method)
    if rpc is None:
        rpc = metrics.server_rpcs[method] = _Rpc(grpc_type, method)
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def failed(context: ServicerContext[Any, Any], started_at: float, error: BaseException) -> None:
        if isinstance(error, grpc.aio.AbortError | grpc.RpcError):
            code = _code(context.code())
            code = grpc.StatusCode.UNKNOWN if code is _OK else code
        elif not isinstance(error, Exception):
            code = grpc.StatusCode.CANCELLED  # CancelledError: the caller went away
        else:
            code = grpc.StatusCode.UNKNOWN  # a bug: grpc answers UNKNOWN
        rpc.served(code, started_at)

    def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def measured(request: Any, context: ServicerContext[Any, Any]) -> Any:
            rpc.started += 1
            refusal_reason.set(None)
            started_at = _now()
            try:
                response = await behavior(request, context)
            except BaseException as error:
                failed(context, started_at, error)
                raise
            rpc.served(context.code(), started_at)
            return response

        return measured

    def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write
            return unary(behavior)

        async def measured(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            rpc.started += 1
            refusal_reason.set(None)
            started_at = _now()
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as error:
                failed(context, started_at, error)
                raise
            rpc.served(context.code(), started_at)

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


class ClientCalls:
    """Counts and times the calls this service makes: cardcheck/runtime/channels.py calls
    `begin` as a call starts and `watch` with the call, whose done callback counts it."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._rpcs: dict[tuple[str, str], _Rpc] = {}
        self._pending: set[Any] = set()

    def begin(self, method: str, grpc_type: str) -> _Rpc | None:
        """The method's counts, one more call started; None for health checks and reflection."""
        rpc = self._rpcs.get((method, grpc_type))
        if rpc is None:
            if method.startswith(_NOT_OUR_WORK):
                return None
            rpc = self._rpcs[(method, grpc_type)] = _Rpc(grpc_type, method)
            self._metrics.client_rpcs[method] = rpc
        rpc.started += 1
        return rpc

    def watch(self, rpc: _Rpc, started_at: float, call: Any) -> None:
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


def no_metrics() -> ServiceMetrics:
    """A registry with nothing served (code and tests that build a part alone)."""
    return ServiceMetrics("none", None)


def families(metrics: ServiceMetrics) -> Iterable[str]:
    """The names of the metric families in the registry (docs/metrics.md is made from these)."""
    return [family.name for family in metrics.registry.collect()]
