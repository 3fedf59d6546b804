"""Builds and runs the notifier process."""

from __future__ import annotations

import asyncio
import logging
import sys

from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.logs import setup_logging
from cardcheck.runtime.server import Registration, ServiceHost, run_until_signalled
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import notifier_pb2_grpc
from notifier.messages import MessageRow, Outbox, SandboxProvider, SmsProvider
from notifier.servicer import NotifierServicer
from notifier.templates import load_templates

SERVICE = "notifier"
log = logging.getLogger(__name__)


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    provider: SmsProvider | None = None,
) -> ServiceHost:
    """The notifier, not started. Outside sandbox an SMS provider must be given: none is built in."""
    if provider is None:
        if not settings.sandbox:
            raise SettingsError("CARDCHECK_SANDBOX is off but no SMS provider is configured")
        provider = SandboxProvider()
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE, settings.data_dir)
    keyring = Keyring(load_master_key(settings.master_key, settings.data_dir))
    db = Database(make_engine(settings.database_url, settings.data_dir, SERVICE))
    await asyncio.to_thread(db.create_tables, [MessageRow])
    outbox = Outbox(
        db,
        load_templates(),
        provider,
        keyring.hasher("phone"),
        keyring.sealer("notifier-phone"),
        clock or SystemClock(),
        sandbox=settings.sandbox,
    )

    async def close_db() -> None:
        db.dispose()

    return ServiceHost(
        SERVICE,
        [
            Registration(
                notifier_pb2_grpc.add_NotifierServicer_to_server,
                NotifierServicer(outbox),
                "cardcheck.v1.Notifier",
            )
        ],
        settings.bind_address(SERVICE),
        tracer_provider,
        on_stop=[close_db],
    )


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"notifier: {error}", file=sys.stderr)
        sys.exit(2)
    setup_logging(SERVICE, settings.log_level)

    async def serve() -> None:
        host = await build(settings)
        await run_until_signalled(host, settings.shutdown_grace_s)

    try:
        asyncio.run(serve())
    except SettingsError as error:
        print(f"notifier: {error}", file=sys.stderr)
        sys.exit(2)
