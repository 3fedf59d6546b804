"""`python -m gateway.rewrap [--database-url URL] [--data-dir DIR]`: after a master key rotation,
writes every user row still under a retired key again under the current one: the identity
sealed again, the ID number's and phone's keyed hashes as the current key makes them.

It reads the settings as the gateway does (CARDCHECK_DATABASE_URL, else the SQLite file
<data_dir>/gateway.db; CARDCHECK_MASTER_KEY, else <data_dir>/keys/master.key; the retired keys
from CARDCHECK_RETIRED_MASTER_KEYS, else <data_dir>/keys/retired). It never makes a key or a
database and never migrates: without either it says so on stderr and exits 2. It works in
batches, each its own transaction, so the gateway can keep serving meanwhile; rows already under
the current key are left as they are, so a second run changes nothing. It prints one line, a
count, and exits 0; when some rows open under none of the keys given (a retired key missing),
it leaves them, says how many on stderr and exits 1.

Not rewrapped, because nothing can be: SMS challenges (their code is not known; they die within
minutes), the resend, daily and escalation counts (they restart at a rotation, see
gateway/challenges.py), submissions (only the hash of the client's idempotency key is kept;
found under the retired key while it is configured, see gateway/submissions.py), session tokens
(signed into the client's hands) and payment password hashes (a keyed hash can only be made
again from the password). A session token signed under a retired key works while that key is
configured, so remove the retired keys no sooner than the session lifetime
(CARDCHECK_SESSION_TTL_HOURS) after the rotation, or those users sign in again.
A payment password hash made under a retired key verifies while that key is configured and is
made again under the current key at its user's next right password (gateway/payment_passwords.py).
Once the retired key is removed, a hash it made cannot be checked: GetReport refuses that user
PAYMENT_PASSWORD_LOCKED with `reset_required` (metadata `cause: key_retired`, never counted as a
wrong password) and the user sets a new one with ResetPaymentPassword (SMS code and face check).
So keeping the retired key longer spares more users that reset; the choice is the operator's."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from sqlmodel import Session, select

from cardcheck.runtime.database import Database
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.maintenance import command_parser, run, service_store
from gateway.users import ID_NUMBER_KEY, IDENTITY_KEY, PHONE_KEY, UserRow, open_identity

SERVICE = "gateway"
BATCH_SIZE = 200


@dataclass(frozen=True)
class Rewrapped:
    rows: int  # written again under the current key
    unopened: int  # under none of the keys given: left as they are


def rewrap(db: Database, keyring: Keyring, *, batch_size: int = BATCH_SIZE) -> Rewrapped:
    """Seals and hashes again under the current key every user row that is not entirely under
    it, `batch_size` rows to a transaction (in user id order, locked while rewritten)."""
    sealer = keyring.sealer(IDENTITY_KEY)
    id_hash, phone_hash = keyring.hasher(ID_NUMBER_KEY), keyring.hasher(PHONE_KEY)

    def batch(session: Session, after: str) -> tuple[str | None, int, int]:
        rows = session.exec(
            select(UserRow)
            .where(UserRow.user_id > after)
            .order_by(UserRow.user_id)
            .limit(batch_size)
            .with_for_update()
        ).all()
        changed = unopened = 0
        for row in rows:
            try:
                identity = open_identity(sealer, row)
                resealed = sealer.reseal(row.identity_sealed, row.user_id.encode())
            except InvalidTag:
                unopened += 1
                continue
            # As Users.create computes them.
            current_id, current_phone = id_hash.digest(identity.id_number.upper()), phone_hash.digest(identity.phone)
            if resealed is None and row.id_hash == current_id and row.phone_hash == current_phone:
                continue
            if resealed is not None:
                row.identity_sealed = resealed
            row.id_hash, row.phone_hash = current_id, current_phone
            session.add(row)
            changed += 1
        return (rows[-1].user_id if len(rows) == batch_size else None), changed, unopened

    total = unopened_total = 0
    after: str | None = ""
    while after is not None:
        with db.session() as session:
            after, changed, unopened = batch(session, after)
        total += changed
        unopened_total += unopened
    return Rewrapped(total, unopened_total)


def main(argv: Sequence[str] | None = None) -> int:
    args = command_parser(
        "python -m gateway.rewrap", "Seal and hash the gateway's rows again under the current master key."
    ).parse_args(argv)

    def command() -> int:
        with service_store(SERVICE, UserRow.__tablename__, args) as (engine, keyring):
            done = rewrap(Database(engine), keyring)
        print(f"{SERVICE}: {done.rows} rows rewrapped under the current key")
        if done.unopened:
            print(
                f"{SERVICE}: {done.unopened} rows open under none of the keys given (a retired key missing?);"
                " left as they are",
                file=sys.stderr,
            )
            return 1
        return 0

    return run(SERVICE, command)

if __name__ == "__main__":
    sys.exit(main())
