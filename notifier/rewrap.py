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

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.maintenance import command_parser, run, service_store
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
    args = command_parser("python -m notifier.rewrap", __doc__.split("\n\n")[0]).parse_args(argv)

    def command() -> int:
        with service_store(SERVICE, MessageRow.__tablename__, args) as (engine, keyring):
            done = rewrap(engine, keyring)
        print(f"{SERVICE}: {done.changed} rows rewrapped under the current key")
        if done.unreadable:
            print(f"{SERVICE}: {done.unreadable} rows open under none of the keys given, left as they are",
                  file=sys.stderr)
            return 1
        return 0

    return run(SERVICE, command)

if __name__ == "__main__":
    sys.exit(main())
