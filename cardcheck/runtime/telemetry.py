"""Tracing configured through the standard OTEL_* variables. Without an OTLP endpoint, spans
go to JSON-lines files under CARDCHECK_DATA_DIR/spans, one file per service.

Each service gets its own TracerProvider (passed to the gRPC interceptors explicitly) so that
several services can run in one test process and still carry their own service.name."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

log = logging.getLogger(__name__)

ATTRIBUTE_PREFIX = "cardcheck."  # our own span attributes live in this namespace


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line (the SDK's own to_json, compacted)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(span.to_json()), ensure_ascii=False) + "\n" for span in spans)
        with self._lock, self._path.open("a", encoding="utf-8") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def make_tracer_provider(
    service_name: str,
    data_dir: Path,
    env: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    env = os.environ if env is None else env
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES; the service's own name wins over a shared
    # OTEL_SERVICE_NAME, since one environment often starts every process.
    resource = Resource.create({SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        path = data_dir / "spans" / f"{service_name}.jsonl"
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path), schedule_delay_millis=500))
    return provider


_NOT_OUR_WORK = ("/grpc.health.v1.", "/grpc.reflection.")


def _not_health(details) -> bool:
    """Health probes and reflection are not the service's work: no spans for them. (The
    library's `filters` check each call against a typing Protocol, a cost paid on every call.)"""
    method = details.method
    if isinstance(method, bytes):
        method = method.decode("ascii", "replace")
    return not method.startswith(_NOT_OUR_WORK)


def server_interceptors(provider: TracerProvider) -> list:
    return [aio_server_interceptor(tracer_provider=provider, filter_=_not_health)]


def client_interceptors(provider: TracerProvider, request_hook=None) -> list:
    """`request_hook(span, request)` may add cardcheck.* attributes to each client span."""
    return aio_client_interceptors(tracer_provider=provider, filter_=_not_health, request_hook=request_hook)
