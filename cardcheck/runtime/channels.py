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
    # Calls spread over every address the target resolves to (replicas behind a headless
    # Service, `dns:///name:port`); one address behaves as before.
    ("grpc.lb_policy_name", "round_robin"),
]


def open_channel(
    address: str,
    provider: TracerProvider | None = None,
    *,
    options: list[tuple[str, object]] | None = None,
    request_hook=None,
) -> grpc.aio.Channel:
    """`options` are added to (and override) the defaults, e.g. a shorter reconnect backoff."""
    interceptors = client_interceptors(provider, request_hook) if provider is not None else None
    merged = dict(CHANNEL_OPTIONS) | dict(options or ())
    return grpc.aio.insecure_channel(address, options=list(merged.items()), interceptors=interceptors)
