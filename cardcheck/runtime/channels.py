"""Long-lived client channels to the other services, traced.

Each channel takes answers up to `max_receive_bytes`, which the caller sizes to what it expects
from that service (a larger answer fails the call with RESOURCE_EXHAUSTED, "Received message
larger than max", before it is parsed); grpc's default is 4 MiB."""

from __future__ import annotations

import functools
import time
from typing import Any, cast

import grpc
from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.metrics import ClientCalls, ServiceMetrics
from cardcheck.runtime.renewing import RenewingChannel
from cardcheck.runtime.security import credentials_of
from cardcheck.runtime.telemetry import ClientTracing, RequestHook, client_tracing
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
    `max_receive_bytes` unset keeps grpc's default. `provider`: each call carries its trace
    (cardcheck/runtime/telemetry.py, ClientTracing). `metrics`: the calling service's, which
    then count and time each call. `tls`: the CA the server is checked against and the
    certificate presented (mutual TLS), followed when they change
    (cardcheck/runtime/renewing.py); None: plaintext. SettingsError when they cannot be used."""
    limits = {} if max_receive_bytes is None else {"grpc.max_receive_message_length": max_receive_bytes}
    merged = dict(CHANNEL_OPTIONS) | limits | dict(options or ())
    channel: grpc.aio.Channel
    if tls is not None:
        channel = RenewingChannel(tls, credentials_of, lambda credentials: grpc.aio.secure_channel(
            address, credentials, options=list(merged.items())
        ))
    else:
        channel = grpc.aio.insecure_channel(address, options=list(merged.items()))
    tracing = client_tracing(provider, request_hook) if provider is not None else None
    calls = metrics.client_calls() if metrics is not None else None
    if tracing is None and calls is None:
        return channel
    return cast(grpc.aio.Channel, _InstrumentedChannel(channel, tracing, calls))


# Tracing and counting wrap each call as it starts, not through grpc's client interceptors: an
# intercepted call runs the interceptors in a task of its own and wraps the call grpc makes,
# which cost a call of this mesh more than what the interceptors themselves do.


class _InstrumentedChannel:
    """`channel`, whose unary-unary and unary-stream calls carry their trace and are counted
    (the project makes no client-streaming call: those are `channel`'s own)."""

    def __init__(self, channel: grpc.aio.Channel, tracing: ClientTracing | None, calls: ClientCalls | None) -> None:
        self._channel = channel
        self._tracing = tracing
        self._calls = calls

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _InstrumentedCall:
        return _InstrumentedCall(self._channel.unary_unary(method, *args, **kwargs), method, "unary", self)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _InstrumentedCall:
        return _InstrumentedCall(self._channel.unary_stream(method, *args, **kwargs), method, "server_stream", self)

    async def __aenter__(self) -> _InstrumentedChannel:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._channel.close()

    def __getattr__(self, name: str) -> Any:  # close, channel_ready, get_state, stream_*, ...
        return getattr(self._channel, name)


class _InstrumentedCall:
    """One method's multicallable: the call starts with its trace headers (and span), counted."""

    def __init__(self, multicallable: Any, method: str | bytes, grpc_type: str, channel: _InstrumentedChannel) -> None:
        self._multicallable = multicallable
        self._method = method.decode() if isinstance(method, bytes) else method
        self._type = grpc_type
        self._tracing = channel._tracing
        self._calls = channel._calls

    def __call__(self, request: Any, *, metadata: Any = None, **kwargs: Any) -> Any:
        span = None
        tracing = self._tracing
        if tracing is not None:
            metadata, span = tracing.begin(self._method, metadata, request)
        rpc = self._calls.begin(self._method, self._type) if self._calls is not None else None
        started_at = time.perf_counter()
        try:
            call = self._multicallable(request, metadata=metadata, **kwargs)
        except BaseException:
            if span is not None:
                span.end()
            raise
        if tracing is not None and span is not None:
            call.add_done_callback(functools.partial(tracing.end, span))
        if rpc is not None and self._calls is not None:
            self._calls.watch(rpc, started_at, call)
        return call

