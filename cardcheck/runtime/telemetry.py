"""Tracing configured through the standard OTEL_* variables. Without an OTLP endpoint, spans
go to JSON-lines files under CARDCHECK_DATA_DIR/spans, one file per service.

Each service gets its own TracerProvider (passed to the gRPC interceptors, its engine and its
Redis client explicitly) so that several services can run in one test process and still carry
their own service.name."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import grpc
from opentelemetry import trace as trace_api
from opentelemetry.context import Context, attach, detach
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.version import __version__ as instrumentation_version
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.propagate import extract, inject
from opentelemetry.propagators.textmap import Setter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
    get_current_span,
    set_span_in_context,
    use_span,
)
from opentelemetry.util.types import Attributes

from cardcheck.runtime import statements
from cardcheck.runtime.files import private_directory, private_file

if TYPE_CHECKING:
    import redis.asyncio
    from sqlalchemy import Engine
    from sqlalchemy.engine import ExceptionContext

log = logging.getLogger(__name__)

# OpenTelemetry's semantic conventions for gRPC spans; still experimental, so the semconv package
# has them only in a private module (`_incubating`): named here as the conventions name them.
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
# The scope the instrumentation's own client spans come from, so ours read the same.
_INSTRUMENTATION = "opentelemetry.instrumentation.grpc"
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.11.0"

RequestHook = Callable[[Span, Any], None]
Request = TypeVar("Request")
Response = TypeVar("Response")


class _MetadataSetter(Setter[grpc.aio.Metadata]):
    """Trace context into a call's metadata, its keys lower-cased as grpc requires."""

    def set(self, carrier: grpc.aio.Metadata, key: str, value: str) -> None:
        carrier[key.lower()] = value


_METADATA_SETTER = _MetadataSetter()


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line (the SDK's own to_json, compacted)."""

    def __init__(self, path: Path) -> None:
        # Spans name queries and users by their ids: this user alone reads them.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_file(path)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(_json_line(span) + "\n" for span in spans)
        with self._lock, self._path.open("a", encoding="utf-8") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _json_line(span: ReadableSpan) -> str:
    """The span's to_json on one line, non-ASCII characters as they are. to_json(indent=None)
    uses the C encoder (its default indent, the pure-Python one, cost about ten times as much)
    and escapes non-ASCII: only a line with an escape is decoded and encoded again."""
    line = span.to_json(indent=None)
    return json.dumps(json.loads(line), ensure_ascii=False) if "\\u" in line else line


def make_tracer_provider(
    service_name: str,
    data_dir: Path,
    env: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
    sampler: Sampler | None = None,
) -> TracerProvider:
    """`sampler` overrides the one OTEL_TRACES_SAMPLER names."""
    env = os.environ if env is None else env
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES; the service's own name wins over a shared
    # OTEL_SERVICE_NAME, since one environment often starts every process.
    resource = Resource.create({SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource, sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        private_directory(data_dir)
        path = private_directory(data_dir / "spans") / f"{service_name}.jsonl"
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path), schedule_delay_millis=500))
    return provider


_NOT_OUR_WORK = ("/grpc.health.v1.", "/grpc.reflection.")


class _CallDetails(Protocol):
    @property
    def method(self) -> str | bytes: ...


def _not_health(details: _CallDetails) -> bool:
    """Health probes and reflection are not the service's work: no spans for them. (The
    library's `filters` check each call against a typing Protocol, a cost paid on every call.)"""
    method = details.method
    if isinstance(method, bytes):
        method = method.decode("ascii", "replace")
    return not method.startswith(_NOT_OUR_WORK)


def tracing_disabled(env: Mapping[str, str] | None = None) -> bool:
    """OTEL_SDK_DISABLED=true: the SDK hands out no-op tracers."""
    env = os.environ if env is None else env
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


# With tracing disabled no interceptor is installed: even around a no-op tracer, the server
# interceptor costs about a third of a small call's CPU (context extraction, wrappers).
def server_interceptors(provider: TracerProvider) -> list[grpc.aio.ServerInterceptor]:
    if tracing_disabled():
        return []
    roots = _RootSampling(provider)
    traced = aio_server_interceptor(tracer_provider=cast(TracerProvider, roots), filter_=_not_health)
    return [_LeanServerInterceptor(Unsampled(provider), roots, traced)]


# --- the calls of an unsampled trace ------------------------------------------------------------
# Under a sampler that follows its parent's decision (parentbased_*, OpenTelemetry's default), a
# span whose parent is not sampled is dropped: the SDK still asks the sampler, makes ids and a
# non-recording span, and the instrumentations wrap the call around it, a cost that was 10-20 %
# of every service's CPU in `bench mesh` at 1 % sampling. For such calls the span is skipped:
# the current span stays the parent's (its trace id in the logs, its context in the trace
# headers sent on, so the services called drop their spans too).


def _follows_parent(sampler: Sampler) -> bool:
    """Whether `sampler` drops every child of an unsampled parent, local or remote. Asked of a
    trace id a ratio sampler of its own would keep (the lowest)."""
    for remote in (False, True):
        parent = NonRecordingSpan(SpanContext(1, 1, is_remote=remote, trace_flags=TraceFlags(TraceFlags.DEFAULT)))
        if sampler.should_sample(set_span_in_context(parent), 1, "unsampled parent").decision != Decision.DROP:
            return False
    return True


class Unsampled:
    """Tells when a span about to start would be dropped for its parent's sake. The provider's
    sampler is looked at on each call (the gateway wraps it after start-up), asked once each."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._sampler: Sampler | None = None
        self._follows = False

    def sampler_follows(self) -> bool:
        sampler = getattr(self._provider, "sampler", None)
        if sampler is None:
            return False
        if sampler is not self._sampler:
            self._sampler, self._follows = sampler, _follows_parent(sampler)
        return self._follows

    def dropped(self) -> bool:
        """Whether a child of the current span would be dropped: no span, or an unsampled one."""
        parent = get_current_span().get_span_context()
        return not parent.is_valid or (not parent.trace_flags.sampled and self.sampler_follows())

    def parent(self, context: Context | None = None) -> SpanContext | None:
        """The parent's span context (the current span's, or `context`'s) when a child of it is
        dropped; None when the sampler is to decide."""
        parent = get_current_span(context).get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled and self.sampler_follows():
            return parent
        return None


# --- the calls that start a trace ----------------------------------------------------------------
# The public edge's calls come with no trace headers: each would be a root span, which a ratio
# sampler mostly drops, while the SDK still builds it and the instrumentation wraps the call
# around it. The sampler is asked first, with a fresh trace id: dropped, the call runs under a
# non-recording span of that trace id (in the logs and in the headers sent on, so the services
# called drop their spans too), with no span built; kept, the instrumentation starts its span
# as ever, with that trace id and that decision (the sampler is not asked twice: a shedding
# sampler's budget would be spent twice).

_Decision = tuple[int, SamplingResult]  # a trace id and the sampler's decision for its root span
_DECIDED: ContextVar[_Decision | None] = ContextVar("cardcheck_root_decision", default=None)


class _DecidedTraceIds(IdGenerator):
    """`ids`, but the trace id of the decision made for the call's root span."""

    def __init__(self, ids: IdGenerator) -> None:
        self._ids = ids

    def generate_span_id(self) -> int:
        return self._ids.generate_span_id()

    def generate_trace_id(self) -> int:
        decided = _DECIDED.get()
        return self._ids.generate_trace_id() if decided is None else decided[0]

    def is_trace_id_random(self) -> bool:
        return self._ids.is_trace_id_random()


class _DecidedSampler(Sampler):
    """`sampler`, but the decision already made for the call's root span, once."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        decided = _DECIDED.get()
        if decided is None or decided[0] != trace_id:
            return self._sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        _DECIDED.set(None)
        result = decided[1]
        # The span's own attributes, as the SDK's samplers pass them on, and the sampler's.
        merged: dict[str, Any] = dict(attributes or {})
        merged.update(result.attributes or {})
        return SamplingResult(result.decision, merged, result.trace_state)

    def get_description(self) -> str:
        return self._sampler.get_description()


class _RootSampling:
    """Decides the sampling of a root server span before it is started. Stands in for the
    provider when the instrumentation takes its tracer: a copy of the provider's, whose sampler
    and id generator take the decision made (the provider's tracer itself is shared)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._sampler: Sampler | None = None
        self._ids: IdGenerator = provider.id_generator

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace_api.Tracer:
        tracer = self._provider.get_tracer(*args, **kwargs)
        if not isinstance(tracer, SdkTracer):  # a disabled SDK: nothing to decide
            return tracer
        tracer = copy.copy(tracer)
        self._sampler, self._ids = tracer.sampler, tracer.id_generator
        tracer.sampler, tracer.id_generator = _DecidedSampler(tracer.sampler), _DecidedTraceIds(tracer.id_generator)
        return tracer

    def decide(self, name: str, context: Context) -> _Decision | None:
        """A fresh trace id and the sampler's decision for a server span `name` starting a
        trace; None when there is no sampler to ask."""
        if self._sampler is None:
            return None
        trace_id = self._ids.generate_trace_id()
        return trace_id, self._sampler.should_sample(context, trace_id, name, SpanKind.SERVER)

    def unsampled(self, decided: _Decision, context: Context) -> Context:
        """`context` with a non-recording span of the trace `decided` drops, as the SDK would
        have made it."""
        trace_id, result = decided
        flags = TraceFlags.DEFAULT | (TraceFlags.RANDOM_TRACE_ID if self._ids.is_trace_id_random() else 0)
        span = SpanContext(
            trace_id, self._ids.generate_span_id(), is_remote=False, trace_flags=TraceFlags(flags),
            trace_state=result.trace_state,
        )
        return set_span_in_context(NonRecordingSpan(span), context)


class _LeanServerInterceptor(grpc.aio.ServerInterceptor):
    """The instrumentation's server interceptor (`traced`), but with no span for a call whose
    trace headers name an unsampled parent (it runs under its caller's context), nor for a call
    that starts a trace the sampler drops (under a non-recording span of a new trace id).

    Every server stream is written with `context.write` from a coroutine that closes the
    handler's generator in the RPC's own task. When a client cancels a stream grpc leaves the
    generator suspended, and the loop's finalizer closes it later in another context, where
    the trace context the instrumentation attached cannot be detached (an error logged with a
    traceback for each cancelled stream: grpc/grpc#42295, opentelemetry-python-contrib#2357)."""

    def __init__(self, unsampled: Unsampled, roots: _RootSampling, traced: grpc.aio.ServerInterceptor) -> None:
        self._unsampled = unsampled
        self._roots = roots
        self._traced = traced

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if not is_instrumentation_enabled() or not _not_health(handler_call_details):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        context = extract({key: value for key, value in metadata}) if metadata else Context()
        if get_current_span(context).get_span_context().is_valid:
            if self._unsampled.parent(context) is not None:
                return _served(await continuation(handler_call_details), context)
            return _served(await self._traced.intercept_service(continuation, handler_call_details))
        method = handler_call_details.method
        decided = self._roots.decide(method.decode() if isinstance(method, bytes) else method, context)
        if decided is not None and decided[1].decision is Decision.DROP:
            return _served(await continuation(handler_call_details), self._roots.unsampled(decided, context))
        return _served(await self._traced.intercept_service(continuation, handler_call_details), decided=decided)


def _served(
    handler: grpc.RpcMethodHandler[Any, Any] | None, context: Context | None = None, decided: _Decision | None = None
) -> grpc.RpcMethodHandler[Any, Any] | None:
    """`handler` with its behaviour run under `context`, or with `decided` for the root span
    the instrumentation starts; a server stream written from a coroutine (see above)."""
    if handler is None or handler.request_streaming:
        return handler  # the project serves no client-streaming call: left as it is
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.response_streaming:
        streaming: Any = handler.unary_stream
        writes = not inspect.isasyncgenfunction(streaming)  # a coroutine writing with context.write

        async def stream(request: Any, servicer_context: Any) -> None:
            token = None if context is None else attach(context)
            decision = None if decided is None else _DECIDED.set(decided)
            try:
                if writes:
                    await streaming(request, servicer_context)
                    return
                responses = streaming(request, servicer_context)
                try:
                    async for response in responses:
                        await servicer_context.write(response)
                finally:
                    await responses.aclose()
            finally:
                if decision is not None:
                    _DECIDED.reset(decision)
                if token is not None:
                    detach(token)

        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if context is None and decided is None:
        return handler
    unary: Any = handler.unary_unary

    async def call(request: Any, servicer_context: Any) -> Any:
        token = None if context is None else attach(context)
        decision = None if decided is None else _DECIDED.set(decided)
        try:
            return await unary(request, servicer_context)
        finally:
            if decision is not None:
                _DECIDED.reset(decision)
            if token is not None:
                detach(token)

    return grpc.unary_unary_rpc_method_handler(call, **kwargs)


class ClientTracing:
    """What a call this service makes carries of its trace, decided as the call starts (see
    cardcheck/runtime/channels.py, which calls `begin` and `end`). Within an unsampled trace:
    no span, the trace headers carry the parent's context. Otherwise the instrumentation's
    client span (its name, kind and rpc.* attributes), whose context the headers carry, ended
    from the call's done callback with the call's status. (The instrumentation's interceptors
    await the call, and that await swallowed the caller's cancellation, which left the RPC
    running at the server until its deadline: opentelemetry-python-contrib#3271.)

    `request_hook(span, request)` may add cardcheck.* attributes to each client span."""

    def __init__(self, provider: TracerProvider, request_hook: RequestHook | None = None) -> None:
        self._tracer = provider.get_tracer(_INSTRUMENTATION, instrumentation_version, schema_url=_SCHEMA_URL)
        self._request_hook = request_hook
        self._unsampled = Unsampled(provider)
        self._ending: set[asyncio.Task[None]] = set()

    def begin(self, method: str, metadata: Any, request: Any) -> tuple[Any, Span | None]:
        """The metadata to send (the caller's, with the trace headers) and the call's span, if
        it has one."""
        if not is_instrumentation_enabled() or method.startswith(_NOT_OUR_WORK):
            return metadata, None
        if self._unsampled.parent() is not None:
            return _with_trace_headers(metadata, None), None
        service, _, name = method.lstrip("/").partition("/")
        attributes: dict[str, str | int] = {
            RPC_SYSTEM: "grpc",
            RPC_GRPC_STATUS_CODE: grpc.StatusCode.OK.value[0],
            RPC_METHOD: name,
            RPC_SERVICE: service,
        }
        span = self._tracer.start_span(
            method, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False, set_status_on_exception=False
        )
        if self._request_hook is not None:
            try:
                self._request_hook(span, request)
            except Exception:
                log.exception("request hook failed")
        return _with_trace_headers(metadata, set_span_in_context(span)), span

    def end(self, span: Span, call: grpc.aio.Call) -> None:
        """The call is done (its done callback): the span takes its status and ends."""
        task = asyncio.get_running_loop().create_task(_end_client_span(span, call))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)


def _with_trace_headers(metadata: Any, context: Context | None) -> grpc.aio.Metadata:
    """The call's metadata with the trace context (`context`'s, or the current one) added."""
    with_headers = grpc.aio.Metadata(*tuple(metadata or ()))
    inject(with_headers, context=context, setter=_METADATA_SETTER)
    return with_headers


async def _end_client_span(span: Span, call: grpc.aio.Call) -> None:
    """The call is done: its status is there without waiting."""
    try:
        code = await call.code()
        span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
    finally:
        span.end()


def client_tracing(provider: TracerProvider, request_hook: RequestHook | None = None) -> ClientTracing | None:
    """None when the SDK is disabled: the calls carry no trace."""
    return None if tracing_disabled() else ClientTracing(provider, request_hook)


# --- database and Redis calls -------------------------------------------------------------------
# One client span per SQL statement and per Redis command, children of the call's span. What
# they hold, checked against the instrumentations' code:
# - SQL: db.statement is the statement as sent, with its placeholders (%(name)s, ?); SQLAlchemy
#   passes the parameters beside it and the instrumentation records none of them. Nothing of the
#   project builds SQL from values. sqlcommenter stays off (it would append a comment with the
#   trace context to every statement sent, and defeat the server's statement caches). A failed statement's status
#   says the error's class only: a driver's message can quote a value (PostgreSQL's "DETAIL:
#   Key (...)=(...) already exists").
# - Redis: db.statement is the command name with each argument a "?" (the instrumentation
#   always sanitizes them), so no key, no script and no value; plus the server's address.
# Only within a trace: a statement outside any call (a worker polling its queue every second,
# housekeeping, the readiness check) would otherwise be a trace of its own, each time.


class _WithinTraces(Tracer):
    """A tracer whose spans exist only as children (`roots` False): with no current span, a
    non-recording one; within an unsampled trace, the parent's context in a non-recording span.
    With `roots`, a span with no parent is the sampler's to decide, as the SDK's tracer does."""

    def __init__(self, tracer: Tracer, unsampled: Unsampled, *, roots: bool = False) -> None:
        self._tracer = tracer
        self._unsampled = unsampled
        self._roots = roots

    def _dropped(self, context: Context | None) -> Span | None:
        parent = get_current_span(context).get_span_context()
        if not parent.is_valid:
            return None if self._roots else INVALID_SPAN
        if not parent.trace_flags.sampled and self._unsampled.sampler_follows():
            return NonRecordingSpan(parent)
        return None

    def start_span(self, name: str, context: Context | None = None, *args: Any, **kwargs: Any) -> Span:
        dropped = self._dropped(context)
        if dropped is not None:
            return dropped
        return self._tracer.start_span(name, context, *args, **kwargs)

    def start_as_current_span(  # type: ignore[override]
        self, name: str, context: Context | None = None, *args: Any, **kwargs: Any
    ) -> AbstractContextManager[Span]:
        dropped = self._dropped(context)
        if dropped is not None:
            return use_span(dropped)
        return self._tracer.start_as_current_span(name, context, *args, **kwargs)


class _WithinTracesProvider:
    """What the Redis instrumentation asks its tracer of (it takes a provider, not a tracer)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> Tracer:
        return _WithinTraces(self._provider.get_tracer(*args, **kwargs), Unsampled(self._provider))


def service_tracer(provider: TracerProvider, name: str) -> Tracer:
    """`provider`'s tracer for a service's own spans (query.execute, sms.deliver). Within an
    unsampled trace no span is started (the SDK would ask the sampler, make ids and a
    non-recording span, about 10 us each): the current span stays the parent's, its trace id in
    the logs and its context in the headers sent on. A span with no parent starts a trace as
    ever; with tracing off, the SDK's no-op tracer."""
    tracer = provider.get_tracer(name)
    if not isinstance(tracer, SdkTracer):
        return tracer
    return _WithinTraces(tracer, Unsampled(provider), roots=True)


def instrumentation_disabled(name: str, env: Mapping[str, str] | None = None) -> bool:
    """OTEL_PYTHON_DISABLED_INSTRUMENTATIONS, the standard list (e.g. `sqlalchemy,redis`), names
    it: its spans are left out, the calls' own still made."""
    env = os.environ if env is None else env
    return name in {n.strip() for n in env.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")}


def trace_engine(engine: Engine, provider: TracerProvider) -> None:
    """Spans for every statement `engine` runs, from `provider`'s tracer."""
    if tracing_disabled() or instrumentation_disabled("sqlalchemy"):
        return
    from opentelemetry.instrumentation.sqlalchemy import engine as sqlalchemy_tracing
    from opentelemetry.instrumentation.sqlalchemy.version import __version__ as sqlalchemy_tracing_version
    from sqlalchemy import event

    unsampled = Unsampled(provider)
    tracer = _WithinTraces(
        provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", sqlalchemy_tracing_version), unsampled
    )

    class StatementTracer(sqlalchemy_tracing.EngineTracer):
        """Looks at the statement (its name, the server's address) only for a span that is made."""

        def _before_cur_exec(self, conn: Any, cursor: Any, statement: Any, params: Any, context: Any,
                             executemany: bool) -> Any:
            if unsampled.dropped():
                return statement, params
            return super()._before_cur_exec(  # type: ignore[no-untyped-call]
                conn, cursor, statement, params, context, executemany
            )

    # The pool's connection counts are for metrics, which are not this module's: a no-op meter,
    # and no listeners on the pool to count them.
    connections = NoOpMeterProvider().get_meter(__name__).create_up_down_counter("db.client.connections.usage")
    traced = StatementTracer(tracer, engine, connections, enable_commenter=False)  # type: ignore[no-untyped-call]
    for name, listener in (("connect", traced._pool_connect), ("close", traced._pool_close),
                           ("checkin", traced._pool_checkin), ("checkout", traced._pool_checkout)):
        event.remove(engine, name, listener)
    event.remove(engine, "handle_error", sqlalchemy_tracing._handle_error)
    event.listen(engine, "handle_error", _statement_failed)
    statements.traced_by(engine, lambda: not unsampled.dropped())


def _statement_failed(context: ExceptionContext) -> None:
    span = getattr(context.execution_context, "_otel_span", None)
    if span is None:
        return
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, type(context.original_exception).__name__))
    span.end()


def trace_redis(client: redis.asyncio.Redis, provider: TracerProvider) -> None:
    """Spans for every command `client` sends, from `provider`'s tracer."""
    if tracing_disabled() or instrumentation_disabled("redis"):
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor.instrument_client(client, tracer_provider=_WithinTracesProvider(provider))  # type: ignore[arg-type]
