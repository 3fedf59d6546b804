"""Wiring: one channel per bank address, opened at build and closed on stop."""

from __future__ import annotations

import random

from opentelemetry.sdk.trace import TracerProvider

from bank_connector.admission import Admission
from bank_connector.config import ConnectorConfig
from bank_connector.connector import BankConnector
from bank_connector.metrics import instrument
from bank_connector.servicer import BankConnectorServicer
from cardcheck.banks import BANK_CODES
from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.production import require_ready
from cardcheck.runtime.security import bank_files, server_security
from cardcheck.runtime.server import Registration, RequestBounds, ServiceHost, serve_main
from cardcheck.runtime.settings import Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.runtime.tls import TlsFiles
from cardcheck.v1 import bank_connector_pb2_grpc

SERVICE = "bank_connector"

KIB, MIB = 1024, 1024 * 1024
# Requests: FanOut names a person (ID number, name) and at most 24 distinct banks, VerifyRealName
# a card, a name, an ID number and a phone: under 1 KB each. 16 KiB leaves room.
MAX_REQUEST_BYTES = 16 * KIB
# Answers: one FanOut outcome holds one bank's masked cards (49 bytes each at most), from a bank
# answer of at most MAX_BANK_ANSWER_BYTES (bank_connector/connector.py, 22 bytes a card at
# least), so under 600 KB; report_service takes 1 MiB.
MAX_RESPONSE_BYTES = 1 * MIB
# Streams per connection are not bounded: report_service carries all its fan-outs on one
# connection, and admission (CARDCHECK_BANK_CONNECTOR_MAX_ACTIVE/_MAX_QUEUED) bounds them.


def bank_addresses(settings: Settings) -> dict[str, str]:
    """Where each bank is reached: its own override, else the bank simulator."""
    return {code: settings.bank_addresses.get(code, settings.addresses["bank_sim"]) for code in BANK_CODES}


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    config: ConnectorConfig | None = None,
    rng: random.Random | None = None,
) -> ServiceHost:
    """`config` defaults to ConnectorConfig.from_env() (SettingsError when malformed); `rng`
    draws the retry backoffs' jitter."""
    config = config or ConnectorConfig.from_env()
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE, settings.data_dir)
    connector = BankConnector(
        bank_addresses(settings),
        bank_tls=bank_tls(settings),
        tracer_provider=tracer_provider,
        clock=clock or SystemClock(),
        default_timeout_s=settings.per_bank_timeout_s,
        config=config,
        rng=rng,
    )
    admission = Admission(config.max_active, config.max_queued)
    metrics = ServiceMetrics(SERVICE, settings.metrics_address(SERVICE))
    instrument(metrics, connector, admission)
    return ServiceHost(
        SERVICE,
        [
            Registration(
                bank_connector_pb2_grpc.add_BankConnectorServicer_to_server,
                BankConnectorServicer(connector, admission),
                "cardcheck.v1.BankConnector",
            )
        ],
        settings.bind_address(SERVICE),
        tracer_provider,
        on_stop=[connector.close],
        bounds=RequestBounds(
            max_receive_bytes=MAX_REQUEST_BYTES,
            max_send_bytes=MAX_RESPONSE_BYTES,
            # the last guard: what admission queues, plus room for health, ListBanks and GetBankHealth
            max_concurrent_rpcs=config.max_active + config.max_queued + 64,
        ).configured(settings, SERVICE),
        metrics=metrics,
        security=server_security(settings, SERVICE),
    )


def bank_tls(settings: Settings) -> dict[str, TlsFiles]:
    """Each bank's TLS with TLS on (cardcheck/runtime/security.py `bank_files`): the bank's CA
    and the client certificate it requires; none with TLS off."""
    out = {}
    for code in BANK_CODES:
        files = bank_files(settings, code)
        if files is not None:
            out[code] = files
    return out


async def _build_from_env(settings: Settings) -> ServiceHost:
    config = ConnectorConfig.from_env()
    require_ready(settings, SERVICE)
    return await build(settings, config=config)


def main() -> None:
    serve_main(SERVICE, _build_from_env)
