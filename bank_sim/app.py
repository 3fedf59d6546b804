"""Wiring: load (or generate) the dataset, serve IssuingBank for every bank on one port."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from bank_sim.issuers import BankBehaviour, Issuers, default_behaviours
from bank_sim.servicer import IssuingBankServicer
from cardcheck import dataset
from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.logs import setup_logging
from cardcheck.runtime.server import Registration, ServiceHost, run_until_signalled
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import bank_pb2_grpc

SERVICE = "bank_sim"
log = logging.getLogger(__name__)


async def build(
    settings: Settings,
    *,
    records: Sequence[dataset.CardRecord] | None = None,
    dataset_path: str | Path | None = None,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    behaviours: Mapping[str, BankBehaviour] | None = None,
) -> ServiceHost:
    """The simulator, not started. Cards come from `records`, else the file at `dataset_path`
    (DatasetError if it is malformed), else the default generated population."""
    if records is None:
        if dataset_path is not None:
            records = dataset.load(dataset_path)
        else:
            records = dataset.generate(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE)
    issuers = Issuers(records)
    log.info("%s holds %d cards", SERVICE, len(issuers))
    servicer = IssuingBankServicer(
        issuers, clock or SystemClock(), behaviours if behaviours is not None else default_behaviours()
    )
    return ServiceHost(
        SERVICE,
        [Registration(bank_pb2_grpc.add_IssuingBankServicer_to_server, servicer, "cardcheck.v1.IssuingBank")],
        settings.bind_address(SERVICE),
        tracer_provider or make_tracer_provider(SERVICE, settings.data_dir),
    )


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bank_sim", description="The 24 banks, simulated.")
    parser.add_argument("--dataset", type=Path, help=f"a {dataset.FORMAT_NAME} file")
    parser.add_argument("--seed", type=int, help=f"generate the cards from this seed (default {dataset.DEFAULT_SEED})")
    parser.add_argument("--people", type=int, help=f"how many people to generate (default {dataset.DEFAULT_PEOPLE})")
    args = parser.parse_args(argv)
    if args.dataset is not None and (args.seed is not None or args.people is not None):
        parser.error("--dataset and --seed/--people exclude each other")
    if args.people is not None and args.people < 1:
        parser.error("--people must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"{SERVICE}: {error}", file=sys.stderr)
        sys.exit(2)
    setup_logging(SERVICE, settings.log_level)
    if args.dataset is not None:
        try:
            records = dataset.load(args.dataset)
        except dataset.DatasetError as error:
            log.error("dataset %s refused: %s", args.dataset, error)
            sys.exit(2)
        except OSError as error:
            log.error("dataset %s unreadable: %s", args.dataset, error.strerror or error)
            sys.exit(2)
    else:
        records = dataset.generate(
            dataset.DEFAULT_SEED if args.seed is None else args.seed,
            dataset.DEFAULT_PEOPLE if args.people is None else args.people,
        )

    async def serve() -> None:
        host = await build(settings, records=records)
        await run_until_signalled(host, settings.shutdown_grace_s)

    asyncio.run(serve())
