"""The tracing server interceptor on a real grpc.aio server: cancelled streams, and the calls
that start a trace (sampled, or dropped with no span built)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, SamplingResult

from cardcheck.runtime.telemetry import make_tracer_provider, server_interceptors

SERVICE = "test.Counter"
UNSAMPLED_PARENT = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),)


class Counter:
    """Count streams numbered blocks of 64 KiB as fast as the client takes them, until
    cancelled (so that it waits at a `yield` for the client to read); Echo answers at once.
    Notes the span each call ran under, and the one its stream's `finally` ran under."""

    def __init__(self) -> None:
        self.streaming = asyncio.Event()
        self.closed = asyncio.Event()
        self.spans: list[trace.SpanContext] = []
        self.closed_under: trace.SpanContext | None = None

    async def count(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.spans.append(trace.get_current_span().get_span_context())
        try:
            for n in range(1_000_000):
                yield str(n).encode().ljust(65536)
                self.streaming.set()
        finally:
            self.closed_under = trace.get_current_span().get_span_context()
            self.closed.set()

    async def echo(self, request: bytes, context: Any) -> bytes:
        self.spans.append(trace.get_current_span().get_span_context())
        return request


async def _serving(counter: Counter, provider: TracerProvider) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=server_interceptors(provider))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Count": grpc.unary_stream_rpc_method_handler(counter.count),
        "Echo": grpc.unary_unary_rpc_method_handler(counter.echo),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _send_failed(record: logging.LogRecord) -> bool:
    """grpc's own line for a send that failed as the client went away, when the failure is
    seen before the cancellation is (a send blocked on flow control, as these are): logged
    alike whether the handler is a generator or writes."""
    return record.name == "grpc._cython.cygrpc" and record.getMessage().startswith("ExecuteBatchError raised in core")


class CountingSampler(Sampler):
    """`sampler`, noting each trace id it is asked about."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self.asked: list[int] = []

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                      trace_state=None) -> SamplingResult:
        self.asked.append(trace_id)
        return self._sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return "counting"


@pytest.mark.parametrize(
    ("sampler", "metadata"),
    [(ALWAYS_ON, ()), (ALWAYS_OFF, ()), (ParentBased(ALWAYS_ON), UNSAMPLED_PARENT)],
    ids=["sampled", "root dropped", "parent unsampled"],
)
async def test_a_stream_the_client_cancels_is_closed_in_its_own_call_and_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sampler: Sampler, metadata: tuple
) -> None:
    counter = Counter()
    spans = InMemorySpanExporter()
    server, port = await _serving(counter, make_tracer_provider("counter", tmp_path, exporter=spans, sampler=sampler))
    try:
        with caplog.at_level(logging.ERROR):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream(f"/{SERVICE}/Count")(b"", timeout=10, metadata=metadata)
                assert (await call.read()).rstrip() == b"0"
                await asyncio.wait_for(counter.streaming.wait(), 5)
                await asyncio.sleep(0.1)  # the stream waits for the client to read on
                call.cancel()
                for _ in range(50):
                    gc.collect()  # a generator left suspended is closed now, by the loop's finalizer
                    await asyncio.sleep(0.02)
                    if counter.closed.is_set():
                        break
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and not _send_failed(r)] == []
        assert counter.closed_under == counter.spans[0]  # in the call's own context
        assert counter.spans[0].is_valid
        assert [s.name for s in spans.get_finished_spans()] == ([f"/{SERVICE}/Count"] if sampler is ALWAYS_ON else [])
    finally:
        await server.stop(0)


async def _two_echoes(tmp_path: Path, decision: Sampler) -> tuple[Counter, CountingSampler, InMemorySpanExporter]:
    """Two Echo calls with no trace headers, each a trace of its own, on a server that samples
    by `decision`."""
    counter = Counter()
    sampler = CountingSampler(decision)
    spans = InMemorySpanExporter()
    server, port = await _serving(counter, make_tracer_provider("counter", tmp_path, exporter=spans, sampler=sampler))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(2):
                assert await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5) == b"hi"
    finally:
        await server.stop(0)
    return counter, sampler, spans


async def test_a_call_starting_a_trace_the_sampler_drops_runs_under_a_new_unsampled_trace_with_no_span(
    tmp_path: Path,
) -> None:
    counter, sampler, spans = await _two_echoes(tmp_path, ALWAYS_OFF)
    first, second = counter.spans
    assert first.is_valid and second.is_valid and first.trace_id != second.trace_id
    assert not first.trace_flags.sampled and not first.is_remote
    assert sampler.asked == [first.trace_id, second.trace_id]  # once a call
    assert spans.get_finished_spans() == ()


async def test_a_call_starting_a_trace_the_sampler_keeps_has_the_instrumentations_span(tmp_path: Path) -> None:
    counter, sampler, spans = await _two_echoes(tmp_path, ALWAYS_ON)
    made = spans.get_finished_spans()
    assert len(made) == 2
    assert sampler.asked == [span.context.trace_id for span in made]  # asked once, about the span's trace
    span = made[0]
    assert span.parent is None and span.kind.name == "SERVER" and span.name == f"/{SERVICE}/Echo"
    assert span.attributes is not None
    assert span.attributes["rpc.service"] == SERVICE and span.attributes["rpc.method"] == "Echo"
    assert span.attributes["net.peer.ip"] == "127.0.0.1"
    assert counter.spans[0] == span.context


async def test_calls_on_an_opened_channel_carry_their_trace_and_are_counted(tmp_path: Path) -> None:
    from cardcheck.runtime.channels import open_channel
    from cardcheck.runtime.metrics import ServiceMetrics

    counter = Counter()
    server, port = await _serving(counter, make_tracer_provider("counter", tmp_path, exporter=InMemorySpanExporter()))
    spans = InMemorySpanExporter()
    provider = make_tracer_provider("caller", tmp_path, exporter=spans, sampler=ParentBased(ALWAYS_ON))
    metrics = ServiceMetrics("caller", "127.0.0.1:0")  # counting, not served
    channel = open_channel(f"127.0.0.1:{port}", provider, metrics=metrics)
    unsampled = trace.NonRecordingSpan(trace.SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7, False))
    try:
        with trace.use_span(unsampled):  # an unsampled trace: its context sent on, no span
            assert await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5) == b"hi"
        with provider.get_tracer("test").start_as_current_span("caller"):  # a sampled one
            assert await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5) == b"hi"
            stream = channel.unary_stream(f"/{SERVICE}/Count")(b"", timeout=5)
            assert (await stream.read()).rstrip() == b"0"
            stream.cancel()
        for _ in range(100):  # a client span ends just after its call
            if len(spans.get_finished_spans()) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await channel.close()
        await server.stop(0)
    assert counter.spans[0].trace_id == unsampled.get_span_context().trace_id and not counter.spans[0].trace_flags.sampled
    count, echo, caller = sorted(spans.get_finished_spans(), key=lambda s: s.name)
    assert caller.name == "caller" and echo.name == f"/{SERVICE}/Echo" and count.name == f"/{SERVICE}/Count"
    assert echo.kind.name == count.kind.name == "CLIENT" and echo.parent == count.parent == caller.context
    assert echo.status.status_code.name == "UNSET" and count.status.status_code.name == "ERROR"  # cancelled
    assert counter.spans[1].trace_id == caller.context.trace_id and counter.spans[1].trace_flags.sampled
    echoes, counts = metrics.client_rpcs[f"/{SERVICE}/Echo"], metrics.client_rpcs[f"/{SERVICE}/Count"]
    assert (echoes.labels[0], echoes.started, counts.labels[0], counts.started) == ("unary", 2, "server_stream", 1)
    assert echoes.by_code() == {"OK": 2} and counts.by_code() == {"CANCELLED": 1}


def test_a_service_tracer_starts_no_span_within_an_unsampled_trace(tmp_path: Path) -> None:
    from cardcheck.runtime.telemetry import service_tracer

    spans = InMemorySpanExporter()
    sampler = CountingSampler(ParentBased(ALWAYS_ON))
    tracer = service_tracer(make_tracer_provider("svc", tmp_path, exporter=spans, sampler=sampler), "svc")
    unsampled = trace.NonRecordingSpan(trace.SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7, True))
    parent = trace.set_span_in_context(unsampled)
    with tracer.start_as_current_span("query.execute", context=parent) as span:
        # the parent's context stays current: its trace id in the logs, its headers sent on
        assert trace.get_current_span().get_span_context() == unsampled.get_span_context()
        assert not span.is_recording()
    with trace.use_span(unsampled):
        dropped = tracer.start_span("sms.deliver")
        assert dropped.get_span_context() == unsampled.get_span_context() and not dropped.is_recording()
        dropped.end()
    probes = sampler.asked[:]  # whether the sampler follows parents, asked once of trace id 1
    assert set(probes) <= {1} and spans.get_finished_spans() == ()
    # a sampled parent has its child span; no parent at all: the sampler starts a trace
    with tracer.start_as_current_span("caller") as caller, tracer.start_as_current_span("query.execute"):
        pass
    root, child = sorted(spans.get_finished_spans(), key=lambda s: s.name)
    assert root.name == "caller" and root.parent is None and child.parent == caller.get_span_context()
    assert sampler.asked[len(probes):] == [root.context.trace_id, root.context.trace_id]


def test_a_service_tracer_is_the_sdks_no_op_one_with_tracing_off(tmp_path: Path, monkeypatch) -> None:
    from cardcheck.runtime.telemetry import service_tracer

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert isinstance(service_tracer(TracerProvider(), "svc"), trace.NoOpTracer)


def test_the_span_files_hold_one_compact_line_a_span_non_ascii_as_it_is(tmp_path: Path) -> None:
    from cardcheck.runtime.telemetry import JsonLinesSpanExporter

    spans = InMemorySpanExporter()
    tracer = make_tracer_provider("svc", tmp_path, exporter=spans).get_tracer("svc")
    for name, value in (("plain", "ICBC"), ("wide", "工商银行 \\u"), ("quote", 'a "b" \\ c')):
        with tracer.start_as_current_span(name, attributes={"cardcheck.bank_name": value}):
            pass
    path = tmp_path / "out" / "svc.jsonl"
    JsonLinesSpanExporter(path).export(spans.get_finished_spans())
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(json.loads(s.to_json()), ensure_ascii=False) for s in spans.get_finished_spans()]
    assert "工商银行" in lines[1] and json.loads(lines[2])["attributes"]["cardcheck.bank_name"] == 'a "b" \\ c'
