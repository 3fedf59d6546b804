"""Builds and runs the notifier process."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.backoff import Backoff
from cardcheck.runtime.changes import ChangeHub
from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import load_keyring
from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.runtime.production import require_ready
from cardcheck.runtime.readiness import database
from cardcheck.runtime.security import server_security
from cardcheck.runtime.server import Registration, RequestBounds, ServiceHost, serve_main
from cardcheck.runtime.settings import Settings
from cardcheck.runtime.telemetry import make_tracer_provider, service_tracer, trace_engine
from cardcheck.v1 import notifier_pb2_grpc
from notifier.config import NotifierConfig
from notifier.delivery import DeliveryWorker
from notifier.messages import MessageStore, message_sealing
from notifier.metrics import MeasuredProvider, OutboxDepth
from notifier.outbox import Outbox
from notifier.providers import SmsProvider, make_provider
from notifier.servicer import NotifierServicer
from notifier.templates import load_template_book

SERVICE = "notifier"
MIGRATIONS = "notifier.migrations"
log = logging.getLogger(__name__)

KIB, MIB = 1024, 1024 * 1024
# Requests: Send is under 1 KB (an idempotency key of at most 200 characters, a phone, a kind and
# at most MAX_PARAMS short template parameters, notifier/messages.py); the others name a message
# or a phone. 16 KiB leaves room.
MAX_REQUEST_BYTES = 16 * KIB
# Answers: the sandbox inbox of one phone is the largest, at most its caps' worth of messages
# over the retention (some 2,400 of ~200 bytes); 4 MiB, what a caller with grpc's defaults takes.
MAX_RESPONSE_BYTES = 4 * MIB
# A Send may wait for its first delivery attempt (the vendor's timeout + 1): room for
# every replica of the gateway and report_service sending at once, far beyond the SMS caps.
MAX_CONCURRENT_RPCS = 1000
# Streams per connection are not bounded: each caller replica carries all its calls on one
# connection; the cap above bounds them.
BOUNDS = RequestBounds(
    max_receive_bytes=MAX_REQUEST_BYTES,
    max_send_bytes=MAX_RESPONSE_BYTES,
    max_concurrent_rpcs=MAX_CONCURRENT_RPCS,
)


@dataclass(frozen=True)
class NotifierParts:
    """The host plus what tests drive directly: the delivery worker, the outbox and its store."""

    host: ServiceHost
    worker: DeliveryWorker
    outbox: Outbox
    provider: SmsProvider
    store: MessageStore


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    provider: SmsProvider | None = None,
    config: NotifierConfig | None = None,
) -> ServiceHost:
    """The notifier, not started; its delivery worker runs from here until the host stops."""
    parts = await build_parts(
        settings, clock=clock, tracer_provider=tracer_provider, provider=provider, config=config
    )
    return parts.host


async def build_parts(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    provider: SmsProvider | None = None,
    config: NotifierConfig | None = None,
    backoff: Backoff | None = None,
    start_worker: bool = True,
) -> NotifierParts:
    """`provider` overrides the configured one (config: CARDCHECK_SMS_* by default).
    `start_worker=False` leaves retries to explicit `worker.run_once()` calls (tests)."""
    config = config or NotifierConfig.from_env()
    clock = clock or SystemClock()
    provider = provider or make_provider(config, settings, clock)
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE, settings.data_dir)
    keyring = load_keyring(settings.master_key, settings.retired_master_keys, settings.data_dir)
    db = Database(make_engine(settings.database_url, settings.data_dir, SERVICE))
    await asyncio.to_thread(upgrade_to_head, db.engine, MIGRATIONS, SERVICE)
    trace_engine(db.engine, tracer_provider)
    hub = ChangeHub(db.engine)
    store = MessageStore(db, clock, lease=config.lease, changes=hub.channel("nt.messages"))
    sealing = message_sealing(keyring)
    metrics = ServiceMetrics(SERVICE, settings.metrics_address(SERVICE))
    metrics.register(OutboxDepth(db.engine, clock))
    worker = DeliveryWorker(
        store,
        sealing,
        MeasuredProvider(provider, metrics),
        config,
        service_tracer(tracer_provider, SERVICE),
        backoff=backoff,
    )
    outbox = Outbox(store, load_template_book(), provider, worker, sealing, clock, config)
    log.info("%s delivers through the %s provider", SERVICE, provider.name)

    async def close() -> None:
        await worker.stop(drain_s=min(settings.shutdown_grace_s, config.delivery_timeout_s + 1))
        await provider.close()
        await hub.close()
        db.dispose()

    host = ServiceHost(
        SERVICE,
        [
            Registration(
                notifier_pb2_grpc.add_NotifierServicer_to_server,
                NotifierServicer(outbox, send_wait_s=config.delivery_timeout_s + 1, sandbox=settings.sandbox),
                "cardcheck.v1.Notifier",
            )
        ],
        settings.bind_address(SERVICE),
        tracer_provider,
        on_stop=[close],
        bounds=BOUNDS.configured(settings, SERVICE),
        metrics=metrics,
        dependencies=[database(db.engine)],
        readiness_every_s=settings.readiness_every_s,
        security=server_security(settings, SERVICE),
    )
    await hub.start()
    if start_worker:
        worker.start()  # delivers whatever a previous run left QUEUED
    return NotifierParts(host, worker, outbox, provider, store)


async def _build_from_env(settings: Settings) -> ServiceHost:
    config = NotifierConfig.from_env()
    require_ready(settings, SERVICE, config.missing_for_production())
    config.provider_name(settings.sandbox)  # a bad combination stops here, before serving
    return await build(settings, config=config)


def main() -> None:
    serve_main(SERVICE, _build_from_env)
