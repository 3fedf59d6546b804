"""Builds and runs the report_service process."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.channels import open_channel
from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.logs import setup_logging
from cardcheck.runtime.server import Registration, ServiceHost, run_until_signalled
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import report_service_pb2_grpc
from report_service.clients import BankConnectorFanOut, NotifierReportReady
from report_service.models import TABLES
from report_service.queries import Changes, QueryStore
from report_service.reports import ReportVault
from report_service.servicer import ReportServiceServicer
from report_service.worker import QueryWorker

SERVICE = "report_service"


@dataclass(frozen=True)
class ReportServiceParts:
    """The host plus what tests drive directly: the worker (run_pass, sweep) and the store."""

    host: ServiceHost
    worker: QueryWorker
    store: QueryStore


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    pass_interval_s: float = 5.0,
    sweep_interval_s: float = 60.0,
) -> ServiceHost:
    """report_service, not started; its worker runs from here until the host stops."""
    parts = await build_parts(
        settings,
        clock=clock,
        tracer_provider=tracer_provider,
        pass_interval_s=pass_interval_s,
        sweep_interval_s=sweep_interval_s,
    )
    return parts.host


async def build_parts(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    pass_interval_s: float = 5.0,
    sweep_interval_s: float = 60.0,
) -> ReportServiceParts:
    """`pass_interval_s`: how often the worker looks for work it was not woken for (queries
    left PENDING by a stop or an unreachable bank_connector, a "report ready" SMS the notifier
    did not accept); `sweep_interval_s`: how often expired reports are deleted."""
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE, settings.data_dir)
    clock = clock or SystemClock()
    keyring = Keyring(load_master_key(settings.master_key, settings.data_dir))
    db = Database(make_engine(settings.database_url, settings.data_dir, SERVICE))
    await asyncio.to_thread(db.create_tables, TABLES)
    store = QueryStore(db, keyring.sealer("subject"), ReportVault(keyring.sealer("report-kek")), clock)
    bank_channel = open_channel(settings.addresses["bank_connector"], tracer_provider)
    notifier_channel = open_channel(settings.addresses["notifier"], tracer_provider)
    changes = Changes()
    worker = QueryWorker(
        store,
        BankConnectorFanOut(bank_channel, settings.per_bank_timeout_s),
        NotifierReportReady(notifier_channel),
        changes,
        trace.get_tracer(SERVICE, tracer_provider=tracer_provider),
        pass_interval_s=pass_interval_s,
        sweep_interval_s=sweep_interval_s,
    )

    async def close() -> None:
        await worker.stop()
        await bank_channel.close()
        await notifier_channel.close()
        db.dispose()

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
    )
    worker.start()  # resumes whatever PENDING queries a previous run left
    return ReportServiceParts(host, worker, store)


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"report_service: {error}", file=sys.stderr)
        sys.exit(2)
    setup_logging(SERVICE, settings.log_level)

    async def serve() -> None:
        host = await build(settings)
        await run_until_signalled(host, settings.shutdown_grace_s)

    asyncio.run(serve())
