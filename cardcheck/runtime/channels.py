"""Long-lived client channels to the other services, traced.

Each channel takes answers up to `max_receive_bytes`, which the caller sizes to what it expects
from that service (a larger answer fails the call with RESOURCE_EXHAUSTED, "Received message
larger than max", before it is parsed); grpc's default is 4 MiB."""

from __future__ import annotations

import grpc
from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.renewing import RenewingChannel
from cardcheck.runtime.security import credentials_of
from cardcheck.runtime.telemetry import RequestHook, client_interceptors
from cardcheck.runtime.tls import TlsFiles

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
    max_receive_bytes: int | None = None,
    options: list[tuple[str, object]] | None = None,
    request_hook: RequestHook | None = None,
    metrics: ServiceMetrics | None = None,
    tls: TlsFiles | None = None,
) -> grpc.aio.Channel:
    """`options` are added to (and override) the defaults, e.g. a shorter reconnect backoff.
    `max_receive_bytes` unset keeps grpc's default. `metrics`: the calling service's, which
    then count and time each call (the innermost interceptor, so it sees grpc's own call).
    `tls`: the CA the server is checked against and the certificate presented (mutual TLS),
    followed when they change (cardcheck/runtime/renewing.py); None: plaintext. SettingsError
    when they cannot be used."""
    interceptors: list[grpc.aio.ClientInterceptor] = [
        *(client_interceptors(provider, request_hook) if provider is not None else ()),
        *(metrics.client_interceptors() if metrics is not None else ()),
    ]
    limits = {} if max_receive_bytes is None else {"grpc.max_receive_message_length": max_receive_bytes}
    merged = dict(CHANNEL_OPTIONS) | limits | dict(options or ())
    if tls is not None:
        return RenewingChannel(tls, credentials_of, lambda credentials: grpc.aio.secure_channel(
            address, credentials, options=list(merged.items()), interceptors=interceptors or None
        ))
    return grpc.aio.insecure_channel(address, options=list(merged.items()), interceptors=interceptors or None)
