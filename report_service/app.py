"""Builds and runs the report_service process."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.changes import ChangeHub
from cardcheck.runtime.channels import open_channel
from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import load_keyring
from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.runtime.production import require_ready
from cardcheck.runtime.readiness import database
from cardcheck.runtime.security import mesh_tls, server_security
from cardcheck.runtime.server import Registration, RequestBounds, ServiceHost, serve_main
from cardcheck.runtime.settings import Settings
from cardcheck.runtime.telemetry import make_tracer_provider, service_tracer, trace_engine
from cardcheck.v1 import report_service_pb2_grpc
from report_service.audit import AuditChain
from report_service.clients import BankConnectorFanOut, NotifierReportReady
from report_service.config import ReportServiceConfig
from report_service.execution import ExecutionStore
from report_service.metrics import instrument
from report_service.queries import IDEMPOTENCY_KEY, QueryStore
from report_service.reports import ReportVault
from report_service.servicer import ReportServiceServicer
from report_service.storage import Storage
from report_service.worker import QueryWorker

SERVICE = "report_service"
MIGRATIONS = "report_service.migrations"

KIB, MIB = 1024, 1024 * 1024
# Requests come from the gateway: the largest, CreateQuery, is under 1 KB (a user id, the
# subject's name of at most 30 characters, ID number and phone, at most 24 distinct bank codes,
# the agreement version and an idempotency key of at most 128 characters); the others name a
# user and a query. 16 KiB leaves room and still refuses junk before it is parsed.
MAX_REQUEST_BYTES = 16 * KIB
# Answers: Reports carry masked cards (some 50 bytes each), progress the outcomes new since the last; the gateway takes
# up to 4 MiB of them (gateway/app.py), so more is a bug to refuse here.
MAX_RESPONSE_BYTES = 4 * MIB
# Every gateway replica's watches (each holds one call here while its query runs) and its other
# calls: room for two gateways' worth (gateway/app.py allows 2000 each) on one replica.
MAX_CONCURRENT_RPCS = 4000
# No bound per connection: a gateway replica carries all its calls on one connection to each
# replica here, and its long watches must not hold up its short calls; the cap above bounds it.
BOUNDS = RequestBounds(
    max_receive_bytes=MAX_REQUEST_BYTES,
    max_send_bytes=MAX_RESPONSE_BYTES,
    max_concurrent_rpcs=MAX_CONCURRENT_RPCS,
)
# bank_connector streams one outcome per bank (its masked cards; bank_connector/app.py sends at
# most 1 MiB); the notifier answers with a message id and a status.
MAX_OUTCOME_BYTES = 1 * MIB
MAX_NOTIFIER_ANSWER_BYTES = 64 * KIB


@dataclass(frozen=True)
class ReportServiceParts:
    """The host plus what tests drive directly: the worker (run_pass, sweep) and the stores."""

    host: ServiceHost
    worker: QueryWorker
    store: QueryStore
    execution: ExecutionStore
    db: Database


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    config: ReportServiceConfig | None = None,
    pass_interval_s: float | None = None,
    sweep_interval_s: float | None = None,
) -> ServiceHost:
    """report_service, not started; its worker runs from here until the host stops."""
    parts = await build_parts(
        settings,
        clock=clock,
        tracer_provider=tracer_provider,
        config=config,
        pass_interval_s=pass_interval_s,
        sweep_interval_s=sweep_interval_s,
    )
    return parts.host


async def build_parts(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    config: ReportServiceConfig | None = None,
    pass_interval_s: float | None = None,
    sweep_interval_s: float | None = None,
    worker_name: str | None = None,
) -> ReportServiceParts:
    """Migrates the database to the newest schema first. `config` defaults to the environment's
    (report_service.config); `pass_interval_s` (how often the worker looks for work it was not
    woken for) and `sweep_interval_s` (how often expired reports are deleted) override it."""
    config = config or ReportServiceConfig.from_env()
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE, settings.data_dir)
    clock = clock or SystemClock()
    keyring = load_keyring(settings.master_key, settings.retired_master_keys, settings.data_dir)
    db = Database(make_engine(settings.database_url, settings.data_dir, SERVICE))
    try:
        await asyncio.to_thread(upgrade_to_head, db.engine, MIGRATIONS, SERVICE)
    except BaseException:
        db.dispose()
        raise
    trace_engine(db.engine, tracer_provider)
    storage = Storage(db)
    chain = AuditChain.from_keyring(keyring)
    store = QueryStore(
        storage,
        keyring.sealer("subject"),
        ReportVault(keyring.sealer("report-kek")),
        clock,
        outcome_sealer=keyring.sealer("bank-outcome"),
        audit_chain=chain,
        idempotency_hash=keyring.hasher(IDEMPOTENCY_KEY),
        retention=config.retention,
    )
    hub = ChangeHub(db.engine)
    work_changes = hub.channel("rs.work")
    changes = hub.channel("rs.queries")
    execution = ExecutionStore(
        storage,
        store,
        clock,
        lease=timedelta(seconds=config.lease_s),
        work_changes=work_changes,
        query_changes=changes,
    )
    metrics = ServiceMetrics(SERVICE, settings.metrics_address(SERVICE))
    instrument(metrics, chain, db.engine, clock, timedelta(seconds=config.lease_s))
    tls = mesh_tls(settings, SERVICE)
    bank_channel = open_channel(
        settings.addresses["bank_connector"], tracer_provider, max_receive_bytes=MAX_OUTCOME_BYTES, metrics=metrics,
        tls=tls,
    )
    notifier_channel = open_channel(
        settings.addresses["notifier"], tracer_provider, max_receive_bytes=MAX_NOTIFIER_ANSWER_BYTES, metrics=metrics,
        tls=tls,
    )
    worker = QueryWorker(
        execution,
        BankConnectorFanOut(bank_channel, settings.per_bank_timeout_s),
        NotifierReportReady(notifier_channel),
        changes,
        service_tracer(tracer_provider, SERVICE),
        sweep=store.sweep,
        audit_head=store.audit_head,
        owner=worker_name,
        lease_s=config.lease_s,
        retry=config.retry,
        pass_interval_s=config.poll_s if pass_interval_s is None else pass_interval_s,
        sweep_interval_s=config.sweep_s if sweep_interval_s is None else sweep_interval_s,
        max_running=config.max_running,
    )

    async def close() -> None:
        await worker.stop()
        await hub.close()
        await bank_channel.close()
        await notifier_channel.close()
        storage.close()

    host = ServiceHost(
        SERVICE,
        [
            Registration(
                report_service_pb2_grpc.add_ReportServiceServicer_to_server,
                ReportServiceServicer(store, worker, changes),
                "cardcheck.v1.ReportService",
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
    worker.start()  # resumes whatever work a previous run left, once its leases are free
    return ReportServiceParts(host, worker, store, execution, db)


async def _build_from_env(settings: Settings) -> ServiceHost:
    config = ReportServiceConfig.from_env()
    require_ready(settings, SERVICE)
    return await build(settings, config=config)


def main() -> None:
    serve_main(SERVICE, _build_from_env)
