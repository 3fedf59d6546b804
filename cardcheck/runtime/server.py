"""Server bootstrap: a grpc.aio server with tracing, grpc.health.v1 and reflection, and a
graceful stop (health NOT_SERVING, streams asked to end by the `on_drain` hooks, in-flight
calls finish, then exit).

Every server is bounded (RequestBounds) so that no single caller can hurt a replica: each
service's app.py sizes the bounds to its own messages. What a caller past a bound hears, all
from grpc itself, before any of our code runs (so with no ErrorInfo and no BadRequest: nothing of
the request was parsed, there is no field to name):

- a request message larger than `max_receive_bytes`: RESOURCE_EXHAUSTED, "Received message
  larger than max (N vs. M)", refused before it is parsed, the next call served as usual;
- request headers (metadata, e.g. a huge `authorization`) larger than `max_metadata_bytes`:
  RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit";
- a call beyond `max_concurrent_rpcs` (calls and streams under way in the process, health
  checks included): RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!";
- a stream beyond `max_streams_per_connection` on one HTTP/2 connection is not refused: the
  client waits for one of its own streams to end (SETTINGS_MAX_CONCURRENT_STREAMS);
- an answer larger than `max_send_bytes` (a bug, or data beyond what the contract foresees):
  RESOURCE_EXHAUSTED, "Sent message larger than max", instead of a reply no caller accepts.

`CARDCHECK_<SERVICE>_MAX_CONCURRENT_RPCS` and `CARDCHECK_<SERVICE>_MAX_RECEIVE_BYTES` (read in
cardcheck/runtime/settings.py) override a service's own numbers.

With `security` (cardcheck/runtime/security.py, CARDCHECK_TLS on) the port serves TLS from files
reloaded when they change, an internal server checks each caller against the allow-list
(cardcheck/runtime/access.py), and grpc.health.v1 is also served alone, in plaintext, on the
health address for the kubelet's probes (docs/security.md)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.access import checking_server
from cardcheck.runtime.logs import setup_logging
from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.readiness import Dependency, Readiness
from cardcheck.runtime.security import ServerSecurity
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import server_interceptors

log = logging.getLogger(__name__)

Servicer = TypeVar("Servicer")

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port held by another process must be an error, not shared
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # A connection is asked to close after 5 minutes (calls under way get an hour), so that
    # clients resolve the name again and find replicas started since.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 3_600_000),
]


GRPC_DEFAULT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024  # what grpc accepts when told nothing


@dataclass(frozen=True)
class RequestBounds:
    """How much one caller may ask of a server at once (the module docstring says what a caller
    past each bound hears). None leaves grpc's default (no limit), which a service chooses only
    where the bound is kept elsewhere (e.g. bank_connector's admission queue)."""

    max_receive_bytes: int = GRPC_DEFAULT_MAX_RECEIVE_BYTES  # one request message
    max_send_bytes: int | None = None  # one response message
    max_concurrent_rpcs: int | None = None  # calls and streams under way in the process
    max_streams_per_connection: int | None = None  # HTTP/2 streams open on one connection
    # Request headers, HPACK-decoded, each counted as name + value + 32 bytes; grpc's own
    # ~500 bytes (:path, user-agent, te, ...) included. Refused for certain above it (grpc's
    # default refuses only some of the calls between a soft limit of 8 KiB and 16 KiB).
    max_metadata_bytes: int = 8 * 1024

    def options(self) -> list[tuple[str, int]]:
        options = [
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", self.max_metadata_bytes),
        ]
        if self.max_send_bytes is not None:
            options.append(("grpc.max_send_message_length", self.max_send_bytes))
        if self.max_streams_per_connection is not None:
            options.append(("grpc.max_concurrent_streams", self.max_streams_per_connection))
        return options

    def configured(self, settings: Settings, service: str) -> RequestBounds:
        """These bounds with the environment's overrides for `service` (Settings)."""
        return replace(
            self,
            max_concurrent_rpcs=settings.max_concurrent_rpcs.get(service, self.max_concurrent_rpcs),
            max_receive_bytes=settings.max_receive_bytes.get(service, self.max_receive_bytes),
        )


@dataclass(frozen=True)
class Registration(Generic[Servicer]):
    """A servicer and the generated function that adds it to a server."""

    add_to_server: Callable[[Servicer, grpc.aio.Server], None]
    servicer: Servicer
    service_name: str  # full proto name, e.g. cardcheck.v1.CardCheck


class StartupError(RuntimeError):
    """The service cannot start (e.g. its port is taken): said in one line, exit code 2."""


class ServiceHost:
    """Hosts one process's gRPC services. `start()` returns the bound port (0 picks one)."""

    def __init__(
        self,
        name: str,
        registrations: Sequence[Registration[Any]],
        bind_address: str,
        tracer_provider: TracerProvider,
        *,
        on_stop: Sequence[Callable[[], Awaitable[None]]] = (),
        on_drain: Sequence[Callable[[], Awaitable[None]]] = (),
        options: Sequence[tuple[str, object]] = (),
        bounds: RequestBounds | None = None,
        metrics: ServiceMetrics | None = None,
        dependencies: Sequence[Dependency] = (),
        readiness_every_s: float = 2.0,
        security: ServerSecurity | None = None,
    ) -> None:
        """`metrics` (cardcheck/runtime/metrics.py) count every call served, on /metrics
        from `start()` to `stop()`; None: none. `bounds` default to grpc's own limits (headers refused for certain past 8 KiB);
        `options` override both them and SERVER_OPTIONS (grpc itself takes the first of two
        values of an option, so they are merged here, not appended). While one of
        `dependencies` does not answer, the services' health names are NOT_SERVING and ""
        stays SERVING (cardcheck/runtime/readiness.py)."""
        self.name = name
        self.bounds = bounds or RequestBounds()
        self._registrations = list(registrations)
        self._bind_address = bind_address
        self._tracer_provider = tracer_provider
        self._on_stop = list(on_stop)
        self._on_drain = list(on_drain)  # at the start of a stop: end long-lived calls early
        self.health = health.aio.HealthServicer()
        self.metrics = metrics
        self.readiness = Readiness(
            self.health, [r.service_name for r in self._registrations], dependencies, every_s=readiness_every_s
        )
        self.security = security  # TLS and access checks (cardcheck/runtime/security.py); None: plaintext
        self.server = grpc.aio.server(
            # tracing outside; metrics and the access check wrap each method's handler (start())
            interceptors=[*server_interceptors(tracer_provider), *(security.interceptors() if security else ())],
            options=list((dict(SERVER_OPTIONS) | dict(self.bounds.options()) | dict(options)).items()),
            maximum_concurrent_rpcs=self.bounds.max_concurrent_rpcs,
        )
        self.port: int | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        # Metrics wrap each method's handler once, here (the tracing interceptor wraps them in turn).
        served = self.metrics.serving(self.server) if self.metrics is not None else self.server
        if self.security is not None and self.security.access is not None:
            served = checking_server(served, self.security.access)  # checked inside the counting
        for registration in self._registrations:
            registration.add_to_server(registration.servicer, served)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [r.service_name for r in self._registrations]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        try:
            self.port = self._add_port(self.server, self._bind_address)
        except StartupError:
            raise
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise StartupError(f"{self.name} could not bind {self._bind_address} (is the port in use?)")
        await self.server.start()
        if self.security is not None:
            await self._serve_plain_health(self.security.health_address)
        if self.metrics is not None and self.metrics.address is not None:
            try:
                self.metrics.start()
            except OSError as error:
                raise StartupError(
                    f"{self.name} could not serve /metrics on {self.metrics.address} ({error.strerror or error})"
                ) from None
            log.info("%s: metrics on %s/metrics", self.name,
                     self.metrics.address.rpartition(":")[0] + f":{self.metrics.port}")
        for service_name in ["", *names]:
            await self.health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        self.readiness.start()
        log.info("%s serving on %s (event loop: %s)", self.name,
                 self._bind_address.rpartition(":")[0] + f":{self.port}", event_loop_name())
        return self.port

    def _add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.security is None:
            return server.add_insecure_port(address)
        try:
            credentials = self.security.tls.credentials()
        except (OSError, ValueError) as error:
            raise StartupError(f"{self.name}: TLS files unusable: {error}") from None
        return server.add_secure_port(address, credentials)

    async def _serve_plain_health(self, address: str) -> None:
        """grpc.health.v1 alone, in plaintext, for the kubelet's probes (cardcheck/runtime/security.py)."""
        self.health_server = grpc.aio.server(options=SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        try:
            self.health_port = self.health_server.add_insecure_port(address)
        except RuntimeError:
            self.health_port = 0
        if not self.health_port:
            raise StartupError(f"{self.name} could not bind {address} for its health checks (is the port in use?)")
        await self.health_server.start()

    async def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.readiness.stop()
        await self.health.enter_graceful_shutdown()
        for hook in self._on_drain:
            try:
                await hook()
            except Exception:
                log.exception("%s: a drain hook failed", self.name)
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics is not None:
            self.metrics.stop()
        for hook in self._on_stop:
            try:
                await hook()
            except Exception:
                log.exception("%s: a shutdown hook failed", self.name)
        self._tracer_provider.shutdown()
        log.info("%s stopped", self.name)


async def run_until_signalled(host: ServiceHost, grace: float) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await host.start()
    except StartupError as error:
        log.error("%s", error)
        await host.stop(0)
        raise SystemExit(2) from None
    await stop_requested.wait()
    log.info("%s: stop requested, finishing in-flight calls", host.name)
    await host.stop(grace)


def event_loop_name() -> str:
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"


def run_event_loop(settings: Settings, main: Coroutine[object, object, None]) -> None:
    """Runs a service's main coroutine to the end on the configured loop. uvloop by default:
    grpc.aio hands every completion to the loop, and on uvloop a 24-bank fan-out ends a few
    milliseconds sooner (`python -m bench fanout`)."""
    if settings.event_loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


def serve_main(service: str, build_host: Callable[[Settings], Awaitable[ServiceHost]]) -> None:
    """The whole of a service's `main()`: settings from the environment, then serve until
    signalled. A configuration error, found while loading or while building, is one line on
    stderr and exit code 2, never a traceback."""
    try:
        settings = Settings.from_env()
        setup_logging(service, settings.log_level, settings.log_format)

        async def serve() -> None:
            host = await build_host(settings)
            await run_until_signalled(host, settings.shutdown_grace_s)

        run_event_loop(settings, serve())
    except SettingsError as error:
        for line in str(error).splitlines():  # several only for what production mode lacks
            print(f"{service}: {line}", file=sys.stderr)
        sys.exit(2)
