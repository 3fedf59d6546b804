"""Long-lived client channels to the other services, traced."""

from __future__ import annotations

import grpc
from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.telemetry import client_interceptors

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def open_channel(address: str, provider: TracerProvider | None = None) -> grpc.aio.Channel:
    interceptors = client_interceptors(provider) if provider is not None else None
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
