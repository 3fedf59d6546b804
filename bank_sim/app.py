"""Wiring: load (or generate) the dataset, serve IssuingBank for every bank on one port (and, when
asked, each bank on a port of its own too), and BankSimControl to change how the banks behave.

Start-time behaviour comes from the command line, else the environment (bank_sim/config.py):
  --bank-latency-ms N   a fixed latency on every bank
  --profile FILE        JSON: {"default": {...}, "banks": {"ICBC": {...}}}
  --port-per-bank BASE  bank number i of docs/api.md's list (0-based) also listens on BASE + i
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

from bank_sim.behaviour import BankFloor, Behaviour, BehaviourError, load_profile, starting_behaviours
from bank_sim.config import HIGHEST_BASE_PORT, HOUR_MS, BankSimConfig
from bank_sim.issuers import Issuers
from bank_sim.servicer import BankSimControlServicer, IssuingBankServicer
from cardcheck import dataset
from cardcheck.banks import BANK_CODES
from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.logs import setup_logging
from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.production import require_ready
from cardcheck.runtime.security import server_security
from cardcheck.runtime.server import (
    SERVER_OPTIONS,
    Registration,
    RequestBounds,
    ServiceHost,
    StartupError,
    run_event_loop,
    run_until_signalled,
)
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import make_tracer_provider, server_interceptors
from cardcheck.runtime.tls import ServerTlsFiles
from cardcheck.v1 import bank_pb2_grpc

SERVICE = "bank_sim"
log = logging.getLogger(__name__)

# Requests: LookupCards and VerifyCard are under 0.2 KB (a bank code, an ID number, a name, a
# card number, a phone); SetBehaviour names at most 96 bank codes and a behaviour, about 1 KB.
MAX_REQUEST_BYTES = 16 * 1024
# Answers: one person's cards at one bank, some 24 bytes each; bank_connector takes 256 KiB
# (MAX_BANK_ANSWER_BYTES there), so more is refused here first.
MAX_RESPONSE_BYTES = 256 * 1024
# Calls at once: a bank_connector replica holds up to 64 calls per bank (its bulkhead), 1,536
# over the 24 banks, and `python -m bench fanout` sends 256 fan-outs of 24 calls (6,144) from
# its reference client: 8,192 covers both. A bank's own `capacity` behaviour refuses earlier.
MAX_CONCURRENT_RPCS = 8192
# Streams per connection are not bounded: bank_connector carries every bank's calls on one
# connection when the banks share this port; the cap above bounds them.
BOUNDS = RequestBounds(
    max_receive_bytes=MAX_REQUEST_BYTES,
    max_send_bytes=MAX_RESPONSE_BYTES,
    max_concurrent_rpcs=MAX_CONCURRENT_RPCS,
)


class BankPort:
    """One bank alone on its own port: a plain server with IssuingBank and health."""

    def __init__(self, bank_code: str, servicer: IssuingBankServicer, bind_address: str, provider: TracerProvider,
                 bounds: RequestBounds = BOUNDS, tls: ServerTlsFiles | None = None):
        """`tls`: the bank's own TLS, a client certificate of its CA required, as real banks do."""
        self.bank_code = bank_code
        self._bind_address = bind_address
        self._tls = tls
        self._server = grpc.aio.server(
            interceptors=server_interceptors(provider),
            options=[*SERVER_OPTIONS, *bounds.options()],
            maximum_concurrent_rpcs=bounds.max_concurrent_rpcs,
        )
        bank_pb2_grpc.add_IssuingBankServicer_to_server(servicer, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.address = ""

    async def start(self) -> None:
        try:
            if self._tls is None:
                port = self._server.add_insecure_port(self._bind_address)
            else:
                port = self._server.add_secure_port(self._bind_address, self._tls.credentials())
        except (OSError, ValueError) as error:
            raise StartupError(f"{SERVICE}: TLS files of {self.bank_code} unusable: {error}") from None
        except RuntimeError:
            port = 0
        if not port:
            raise StartupError(f"{SERVICE} could not bind {self._bind_address} for {self.bank_code} (is the port in use?)")
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.address = f"{self._bind_address.rpartition(':')[0]}:{port}"

    async def stop(self, grace: float) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)


class BankSimHost(ServiceHost):
    """The main server (every bank, and the control service) plus a port per bank if asked."""

    def __init__(self, *args, bank_ports: Sequence[BankPort] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bank_ports = list(bank_ports)

    def bank_addresses(self) -> dict[str, str]:
        return {port.bank_code: port.address for port in self.bank_ports if port.address}

    async def start(self) -> int:
        port = await super().start()
        for bank_port in self.bank_ports:
            await bank_port.start()
        if self.bank_ports:
            log.info("%s: each bank also on its own port, %s", SERVICE, self.bank_ports[0].address + " onwards")
        return port

    async def stop(self, grace: float = 5.0) -> None:
        await asyncio.gather(*(bank_port.stop(grace) for bank_port in self.bank_ports))
        await super().stop(grace)


async def build(
    settings: Settings,
    *,
    records: Sequence[dataset.CardRecord] | None = None,
    issuers: Issuers | None = None,
    dataset_path: str | Path | None = None,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    behaviours: Mapping[str, Behaviour] | None = None,
    port_per_bank: int | None = None,
    seed: int = 0,
) -> BankSimHost:
    """The simulator, not started. Cards come from `issuers`, else `records`, else the file at
    `dataset_path` (DatasetError if it is malformed), else the default generated population.
    With `port_per_bank` set, bank i also listens on port_per_bank + i (0: any free port each)."""
    if issuers is None:
        if records is None and dataset_path is not None:
            issuers = Issuers.from_file(dataset_path)
        else:
            if records is None:
                records = dataset.generate(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE)
            issuers = Issuers(records)
    log.info("%s holds %d cards", SERVICE, len(issuers))
    clock = clock or SystemClock()
    floor = BankFloor(behaviours if behaviours is not None else starting_behaviours(), seed=seed)
    # A bank records nothing of its own accord: only spans of a caller's sampled trace.
    tracer_provider = tracer_provider or make_tracer_provider(
        SERVICE, settings.data_dir, sampler=ParentBased(root=ALWAYS_OFF)
    )
    bounds = BOUNDS.configured(settings, SERVICE)
    bank_ports = []
    if port_per_bank is not None:
        for index, code in enumerate(BANK_CODES):
            port = port_per_bank + index if port_per_bank else 0
            servicer = IssuingBankServicer(issuers, clock, floor, only_bank=code)
            tls = ServerTlsFiles(settings.bank_tls_files(code, SERVICE), require_client_auth=True) if settings.tls else None
            bank_ports.append(BankPort(code, servicer, f"{settings.bind_host}:{port}", tracer_provider, bounds, tls))
    host: BankSimHost

    def addresses() -> dict[str, str]:
        return host.bank_addresses()

    registrations: list[Registration[Any]] = [
        Registration(
            bank_pb2_grpc.add_IssuingBankServicer_to_server,
            IssuingBankServicer(issuers, clock, floor),
            "cardcheck.v1.IssuingBank",
        )
    ]
    if settings.sandbox:  # outside sandbox, how the banks behave is not anyone's to change
        registrations.append(
            Registration(
                bank_pb2_grpc.add_BankSimControlServicer_to_server,
                BankSimControlServicer(floor, addresses),
                "cardcheck.v1.BankSimControl",
            )
        )
    host = BankSimHost(
        SERVICE,
        registrations,
        settings.bind_address(SERVICE),
        tracer_provider,
        bank_ports=bank_ports,
        bounds=bounds,
        metrics=ServiceMetrics(SERVICE, settings.metrics_address(SERVICE)),
        security=server_security(settings, SERVICE),
    )
    return host


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bank_sim", description="The 24 banks, simulated.",
        epilog=f"Environment: {', '.join(BankSimConfig.variable(name) for name in BankSimConfig.model_fields)}"
        " (the options win).",
    )
    parser.add_argument("--dataset", type=Path, help=f"a {dataset.FORMAT_NAME} file")
    parser.add_argument("--seed", type=int, help=f"generate the cards from this seed (default {dataset.DEFAULT_SEED})")
    parser.add_argument("--people", type=int, help=f"how many people to generate (default {dataset.DEFAULT_PEOPLE})")
    parser.add_argument("--bank-latency-ms", type=float, help="a fixed latency on every bank's answers")
    parser.add_argument("--profile", type=Path, help="a bank behaviour profile (JSON)")
    parser.add_argument("--port-per-bank", type=int, metavar="BASE",
                        help="also serve bank i (docs/api.md order, from 0) alone on port BASE + i")
    parser.add_argument("--behaviour-seed", type=int, default=0, help="seed of the random faults and latencies")
    args = parser.parse_args(argv)
    if args.dataset is not None and (args.seed is not None or args.people is not None):
        parser.error("--dataset and --seed/--people exclude each other")
    if args.people is not None and args.people < 1:
        parser.error("--people must be at least 1")
    if args.bank_latency_ms is not None and not 0 <= args.bank_latency_ms < HOUR_MS:
        parser.error("--bank-latency-ms must be between 0 and an hour")
    if args.port_per_bank is not None and not 0 < args.port_per_bank <= HIGHEST_BASE_PORT:
        parser.error(f"--port-per-bank must be a port from 1 to {HIGHEST_BASE_PORT}")
    return args


def start_options(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[dict[str, Behaviour], int | None]:
    """The banks' starting behaviours and the per-bank base port, from the options, else the
    environment. SettingsError names what is wrong."""
    config = BankSimConfig.from_env(env)
    latency = config.latency_ms if args.bank_latency_ms is None else args.bank_latency_ms
    profile_path = args.profile or config.profile
    profile = None
    if profile_path is not None:
        try:
            profile = load_profile(profile_path)
        except OSError as error:
            raise SettingsError(f"profile {profile_path} unreadable: {error.strerror or error}") from None
        except BehaviourError as error:
            raise SettingsError(f"profile {profile_path}: {error}") from None
    try:
        behaviours = starting_behaviours(latency, profile)
    except BehaviourError as error:
        raise SettingsError(f"profile {profile_path}: {error}") from None
    base = config.port_per_bank if args.port_per_bank is None else args.port_per_bank
    return behaviours, base


def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)
    try:
        settings = Settings.from_env()
        behaviours, port_per_bank = start_options(args, os.environ)
        require_ready(settings, SERVICE)
    except SettingsError as error:
        for line in str(error).splitlines():
            print(f"{SERVICE}: {line}", file=sys.stderr)
        sys.exit(2)
    setup_logging(SERVICE, settings.log_level, settings.log_format)
    if args.dataset is not None:
        try:
            issuers = Issuers.from_file(args.dataset)
        except dataset.DatasetError as error:
            log.error("dataset %s refused: %s", args.dataset, error)
            sys.exit(2)
        except OSError as error:
            log.error("dataset %s unreadable: %s", args.dataset, error.strerror or error)
            sys.exit(2)
    else:
        issuers = Issuers(
            dataset.generate(
                dataset.DEFAULT_SEED if args.seed is None else args.seed,
                dataset.DEFAULT_PEOPLE if args.people is None else args.people,
            )
        )

    async def serve() -> None:
        host = await build(
            settings, issuers=issuers, behaviours=behaviours, port_per_bank=port_per_bank, seed=args.behaviour_seed
        )
        await run_until_signalled(host, settings.shutdown_grace_s)

    run_event_loop(settings, serve())
