"""What the offline commands (`python -m <service>.rewrap`, `python -m report_service.audit`)
share: the service's database and keys, found the way the service finds them (the environment,
else the data directory) and never created, and one line on stderr with exit code 2 when they
are not there."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from cardcheck.runtime.database import make_engine
from cardcheck.runtime.keys import Keyring, read_master_key, read_retired_keys
from cardcheck.runtime.settings import Settings, SettingsError


class Refused(Exception):
    """Why the command cannot run: printed as one line, exit code 2."""


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the two options every such command takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_location_options(parser)
    return parser


def add_location_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="default: CARDCHECK_DATABASE_URL, else the SQLite file")
    parser.add_argument("--data-dir", type=Path, help="default: CARDCHECK_DATA_DIR")


@contextmanager
def service_store(
    service: str, table: str, args: argparse.Namespace, *, read_only: bool = False
) -> Iterator[tuple[Engine, Keyring]]:
    """The service's database (holding `table`) and its keyring, current and retired keys;
    Refused when either is missing. `read_only` opens a SQLite file read-only (no lock held on
    the service's writers)."""
    try:
        settings = Settings.from_env()
        data_dir = args.data_dir or settings.data_dir
        master = read_master_key(settings.master_key, data_dir)
        retired = read_retired_keys(settings.retired_master_keys, data_dir)
    except SettingsError as error:
        raise Refused(str(error)) from None
    if master is None:
        raise Refused(f"no master key: CARDCHECK_MASTER_KEY is not set and {data_dir / 'keys'} has none")
    database_url = args.database_url or settings.database_url
    path = data_dir / f"{service}.db"
    if not database_url and not path.is_file():
        raise Refused(f"no {service} database in {data_dir} (nor CARDCHECK_DATABASE_URL)")
    if database_url or not read_only:
        engine = make_engine(database_url, data_dir, service, private=False)  # modes are the service's
    else:
        engine = create_engine(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true", hide_parameters=True)
    try:
        try:
            present = inspect(engine).has_table(table)
        except SQLAlchemyError as error:
            raise Refused(f"cannot reach the database ({type(error).__name__})") from None
        if not present:
            raise Refused(f"no {service} tables in that database ({service} migrates it when it starts)")
        yield engine, Keyring(master, retired)
    finally:
        engine.dispose()


def run(service: str, command: Callable[[], int]) -> int:
    """`command()`'s exit code, or 2 with its reason on stderr when it was Refused."""
    try:
        return command()
    except Refused as reason:
        print(f"{service}: {reason}", file=sys.stderr)
        return 2
