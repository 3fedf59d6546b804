"""After a master key rotation: every message the notifier sealed or keyed under a retired key,
sealed and keyed again under the current one, so the retired key can be destroyed.

    python -m notifier.rewrap [--database-url URL] [--data-dir DIR]

For each message still under a retired key: the phone is sealed again and its lookup hash made
again, the text (while it is kept) sealed again and its digest made again; a message whose text
is gone (delivered or given up outside sandbox) loses its digest, which no key but the retired
one could check. A batch of rows per transaction, the rows locked, so it can run while the
service does; a second run changes nothing. Messages are deleted after their retention anyway;
this lets the retired key go sooner. It reads the database and the keys the notifier uses, and
never creates either; it prints counts only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from sqlalchemy import Engine, inspect, update
from sqlmodel import Session, col, select

from cardcheck.runtime.database import make_engine
from cardcheck.runtime.keys import Keyring, read_master_key, read_retired_keys
from notifier.messages import MessageRow, message_sealing

SERVICE = "notifier"
BATCH = 500


@dataclass(frozen=True)
class Rewrap:
    changed: int  # rows written again under the current key
    unreadable: int  # rows no key given opens: left as they are


def rewrap(engine: Engine, keyring: Keyring, batch: int = BATCH) -> Rewrap:
    """Rewraps nt_messages in `seq` order, `batch` rows per transaction."""
    sealing = message_sealing(keyring)
    changed = unreadable = 0
    after: int | None = None
    while True:
        with Session(engine) as session, session.begin():
            query = select(MessageRow).order_by(col(MessageRow.seq)).limit(batch)
            if after is not None:
                query = query.where(col(MessageRow.seq) > after)
            # Locked: a delivery dropping the text meanwhile must not see it written back.
            rows = list(session.exec(query.with_for_update()))
            for row in rows:
                try:
                    changes = sealing.rewrapped(row)
                except InvalidTag:
                    unreadable += 1
                    continue
                if changes:
                    session.execute(update(MessageRow).where(col(MessageRow.seq) == row.seq).values(changes))
                    changed += 1
            last = rows[-1].seq if rows else None
        if len(rows) < batch:
            return Rewrap(changed, unreadable)
        after = last


def main(argv: Sequence[str] | None = None) -> int:
    from cardcheck.runtime.settings import Settings, SettingsError

    parser = argparse.ArgumentParser(prog="python -m notifier.rewrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="default: CARDCHECK_DATABASE_URL, else the SQLite file")
    parser.add_argument("--data-dir", type=Path, help="default: CARDCHECK_DATA_DIR")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        data_dir = args.data_dir or settings.data_dir
        master_key = read_master_key(settings.master_key, data_dir)
        retired = read_retired_keys(settings.retired_master_keys, data_dir)
    except SettingsError as error:
        print(f"notifier.rewrap: {error}", file=sys.stderr)
        return 2
    if master_key is None:
        print(f"no master key: CARDCHECK_MASTER_KEY is not set and {data_dir}/keys has none", file=sys.stderr)
        return 2
    database_url = args.database_url or settings.database_url
    if not database_url and not (data_dir / f"{SERVICE}.db").is_file():
        print(f"no {SERVICE} database in {data_dir}", file=sys.stderr)
        return 2
    engine = make_engine(database_url, data_dir, SERVICE)
    try:
        if not inspect(engine).has_table(MessageRow.__tablename__):
            print(f"no {SERVICE} tables in that database", file=sys.stderr)
            return 2
        done = rewrap(engine, Keyring(master_key, retired))
    finally:
        engine.dispose()
    print(f"{SERVICE}: {done.changed} rows rewrapped under the current key")
    if done.unreadable:
        print(f"{SERVICE}: {done.unreadable} rows open under none of the keys given, left as they are", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
