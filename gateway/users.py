"""Users: one account per resident ID and per phone. The ID number and phone are held as keyed
hashes for lookup, and together with the name only sealed; the bound card's number is never
stored, only the code of the bank that confirmed it.

After a master key rotation rows stored before it hold a retired key's digests and seal until
`python -m gateway.rewrap` writes them again (gateway/rewrap.py): lookups match every key's
digest, so such a person can neither register again nor lose the account; new rows are written
under the current key alone.

The payment password is kept as a keyed hash (gateway/payment_passwords.py says why and how).
Wrong passwords lock it, more each time: `max_password_attempts` wrong in a row lock it for the
first of `password_locks` (30 minutes), the next run of wrong ones without a right one between
for the second (4 hours), and the one after that until the user resets it by SMS code and face
check (ResetPaymentPassword). A right password forgives everything before it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Column, ColumnElement, Connection, DateTime, LargeBinary, Row, Select, bindparam
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database, table_of
from cardcheck.runtime.errors import CardCheckError, Reason
from cardcheck.runtime.keys import Keyring, Sealer
from cardcheck.runtime.statements import Statement
from gateway.payment_passwords import PaymentPasswords
from gateway.sessions import live_joined

# What each key of the keyring is for (the subkeys derived from the master key).
ID_NUMBER_KEY = "id-number"
PHONE_KEY = "phone"
IDENTITY_KEY = "identity"


class UserRow(SQLModel, table=True):
    __tablename__ = "gw_users"

    user_id: str = Field(primary_key=True, max_length=36)
    id_hash: str = Field(unique=True, index=True, max_length=64)
    phone_hash: str = Field(unique=True, index=True, max_length=64)
    identity_sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    region: str = Field(max_length=8)
    payment_password_hash: str = Field(max_length=255)
    bound_bank_code: str = Field(max_length=32)
    wrong_password_count: int = 0
    locked_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    # Locks since the last right payment password; and whether only a reset unlocks it.
    payment_password_locks: int = 0
    payment_password_reset_required: bool = False
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


_USERS = table_of(UserRow)
_USER_BY_ID = Statement(sa_select(_USERS).where(_USERS.c.user_id == bindparam("user_id")))


def _user_row(connection: Connection, user_id: str) -> UserRow | None:
    """The user's row as a Core row of every column (read as the ORM object would be, without
    its identity map and loading)."""
    return cast("UserRow | None", _USER_BY_ID.run(connection, {"user_id": user_id}).first())


def live_user(*columns: ColumnElement[Any]) -> Statement[Select[Any]]:
    """The revocation check and the user's row (of every column, then `columns`) in one
    statement (Sessions.live_row): the first read of a QUERY_AUTH code, a SubmitQuery (with its
    key's earlier query) and a GetReport."""
    return live_joined(_USERS, *columns)


LIVE_USER = live_user()


class _Unread:
    """No row given: the method reads it."""


_UNREAD = _Unread()


@dataclass(frozen=True)
class Identity:
    name: str
    id_number: str
    phone: str


def seal_identity(sealer: Sealer, user_id: str, identity: Identity) -> bytes:
    """The identity sealed under the current key, bound to its row by the user id."""
    plain = json.dumps(
        {"name": identity.name, "id_number": identity.id_number.upper(), "phone": identity.phone},
        ensure_ascii=False,
    ).encode()
    return sealer.seal(plain, user_id.encode())


def open_identity(sealer: Sealer, row: UserRow) -> Identity:
    """The row's identity, sealed under the current key or a retired one (InvalidTag if none)."""
    data = json.loads(sealer.open(row.identity_sealed, row.user_id.encode()))
    return Identity(data["name"], data["id_number"], data["phone"])


@dataclass(frozen=True)
class User:
    user_id: str
    region: str
    bound_bank_code: str


class Users:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        clock: Clock,
        *,
        passwords: PaymentPasswords | None = None,
        max_password_attempts: int = 5,
        password_locks: Sequence[timedelta] = (timedelta(minutes=30), timedelta(hours=4)),
    ) -> None:
        self._db = db
        self._id_hash = keyring.hasher(ID_NUMBER_KEY)
        self._phone_hash = keyring.hasher(PHONE_KEY)
        self._sealer = keyring.sealer(IDENTITY_KEY)
        self._clock = clock
        self._passwords = passwords or PaymentPasswords(keyring)
        self._max_attempts = max_password_attempts
        self._locks = tuple(password_locks)

    def id_hash(self, id_number: str) -> str:
        """The digest stored from now on (current key)."""
        return self._id_hash.digest(id_number.upper())

    def phone_hash(self, phone: str) -> str:
        """The digest stored from now on (current key)."""
        return self._phone_hash.digest(phone)

    def id_hashes(self, id_number: str) -> tuple[str, ...]:
        """The digests a stored row may hold: current key first, then the retired ones."""
        return self._id_hash.digests(id_number.upper())

    def phone_hashes(self, phone: str) -> tuple[str, ...]:
        """The digests a stored row may hold: current key first, then the retired ones."""
        return self._phone_hash.digests(phone)

    async def ensure_not_registered(self, id_number: str, phone: str) -> None:
        id_hashes, phone_hashes = self.id_hashes(id_number), self.phone_hashes(phone)

        def work(session: Session) -> bool:
            row = session.exec(
                select(UserRow.user_id).where(
                    col(UserRow.id_hash).in_(id_hashes) | col(UserRow.phone_hash).in_(phone_hashes)
                )
            ).first()
            return row is not None

        if await self._db.run(work):
            raise CardCheckError(Reason.ALREADY_REGISTERED, "an account exists for this ID number or phone")

    async def create(
        self, identity: Identity, region: str, payment_password: str, bound_bank_code: str
    ) -> User:
        user_id = str(uuid.uuid4())
        password_hash = await self._passwords.hash(user_id, payment_password)
        row = UserRow(
            user_id=user_id,
            id_hash=self.id_hash(identity.id_number),
            phone_hash=self.phone_hash(identity.phone),
            identity_sealed=seal_identity(self._sealer, user_id, identity),
            region=region,
            payment_password_hash=password_hash,
            bound_bank_code=bound_bank_code,
            created_at=self._clock.now(),
        )

        def work(session: Session) -> None:
            session.add(row)
            session.flush()

        try:
            await self._db.run(work)
        except IntegrityError:
            # Another registration for the same ID or phone won the race.
            raise CardCheckError(
                Reason.ALREADY_REGISTERED, "an account exists for this ID number or phone"
            ) from None
        return User(user_id, region, bound_bank_code)

    async def get(self, user_id: str) -> User | None:
        row = await self._db.run_core(lambda connection: _user_row(connection, user_id))
        return None if row is None else User(row.user_id, row.region, row.bound_bank_code)

    async def find_by_phone(self, phone: str) -> User | None:
        phone_hashes = self.phone_hashes(phone)
        row = await self._db.run(
            lambda session: session.exec(
                select(UserRow).where(col(UserRow.phone_hash).in_(phone_hashes))
            ).first()
        )
        return None if row is None else User(row.user_id, row.region, row.bound_bank_code)

    @staticmethod
    def row_of(joined: Row[Any]) -> UserRow | None:
        """The user's row of a `live_user` statement's row (None: the session's user is gone)."""
        return None if joined.user_id is None else cast(UserRow, joined)

    async def with_identity(self, user_id: str) -> tuple[User, Identity] | None:
        """The user and their identity, opened, from one read; None for no such user."""
        return self.user_and_identity(await self._db.run_core(lambda connection: _user_row(connection, user_id)))

    def user_and_identity(self, row: UserRow | None) -> tuple[User, Identity] | None:
        """What `with_identity` gives, of a row read with the session (`row_of`)."""
        if row is None:
            return None
        return User(row.user_id, row.region, row.bound_bank_code), open_identity(self._sealer, row)

    async def identity(self, user_id: str) -> Identity:
        return self.identity_of(await self._db.run_core(lambda connection: _user_row(connection, user_id)))

    def identity_of(self, row: UserRow | None) -> Identity:
        """What `identity` gives, of a row read with the session (`row_of`)."""
        if row is None:
            raise CardCheckError(Reason.UNAUTHENTICATED, "the session's user no longer exists")
        return open_identity(self._sealer, row)

    async def check_payment_password(self, user_id: str, password: str, row: UserRow | None | _Unread = _UNREAD) -> None:
        """Raises PAYMENT_PASSWORD_INVALID (counted), PAYMENT_PASSWORD_LOCKED (with the time
        left, or `reset_required`) or SERVICE_BUSY (too many checks at once, not counted); a
        right password resets the count and the locks, and upgrades a hash of the old scheme or
        of a retired key. `row`: the user's row as the call just read it (`row_of`), else it is read."""
        now = self._clock.now()
        if isinstance(row, _Unread):
            row = await self._db.run_core(lambda connection: _user_row(connection, user_id))
        if row is None:
            raise CardCheckError(Reason.UNAUTHENTICATED, "the session's user no longer exists")
        refusal = self._lock_of(row, now)
        if refusal is not None:
            raise refusal

        checked = await self._passwords.verify(user_id, row.payment_password_hash, password)
        if checked.unverifiable:
            # Made under a master key no longer configured: not the user's fault, not counted.
            raise self._reset_required(
                "the payment password was stored under a retired master key", {"cause": "key_retired"}
            )
        rehash = await self._passwords.hash(user_id, password) if checked.rehash else None
        if checked.right and rehash is None and not (
            row.wrong_password_count or row.locked_until is not None or row.payment_password_locks
        ):
            return  # right, with no count, lock or hash to change: nothing to write

        def record(session: Session) -> tuple[int, CardCheckError | None]:
            current = session.exec(select(UserRow).where(UserRow.user_id == user_id).with_for_update()).one()
            refusal = self._lock_of(current, now)
            if refusal is not None:
                return current.wrong_password_count, refusal  # locked meanwhile
            if checked.right:
                current.wrong_password_count = 0
                current.locked_until = None
                current.payment_password_locks = 0
                # Unless a reset changed it meanwhile.
                if rehash is not None and current.payment_password_hash == row.payment_password_hash:
                    current.payment_password_hash = rehash
            else:
                # An expired lock starts a fresh count.
                count = 0 if current.locked_until is not None else current.wrong_password_count
                current.wrong_password_count = count + 1
                current.locked_until = None
                if current.wrong_password_count >= self._max_attempts:
                    current.payment_password_locks += 1
                    if current.payment_password_locks > len(self._locks):
                        current.payment_password_reset_required = True
                    else:
                        current.locked_until = now + self._locks[current.payment_password_locks - 1]
            session.add(current)
            return current.wrong_password_count, self._lock_of(current, now)

        count, refusal = await self._db.run(record)
        if refusal is not None:
            raise refusal
        if not checked.right:
            raise CardCheckError(
                Reason.PAYMENT_PASSWORD_INVALID,
                "wrong payment password",
                metadata={"attempts_left": str(max(self._max_attempts - count, 0))},
            )

    async def reset_payment_password(self, user_id: str, password: str) -> None:
        """A new payment password (the caller has checked who is asking): every count and lock
        is lifted."""
        password_hash = await self._passwords.hash(user_id, password)

        def work(session: Session) -> bool:
            row = session.exec(select(UserRow).where(UserRow.user_id == user_id).with_for_update()).first()
            if row is None:
                return False
            row.payment_password_hash = password_hash
            row.wrong_password_count = 0
            row.locked_until = None
            row.payment_password_locks = 0
            row.payment_password_reset_required = False
            session.add(row)
            return True

        if not await self._db.run(work):
            raise CardCheckError(Reason.UNAUTHENTICATED, "the session's user no longer exists")

    def close(self) -> None:
        self._passwords.close()

    def _lock_of(self, row: UserRow, now: datetime) -> CardCheckError | None:
        """The refusal the row's lock calls for now, if it is locked."""
        if row.payment_password_reset_required:
            return self._reset_required(
                "too many wrong payment passwords: reset it by SMS and face check",
                {"lock_stage": str(len(self._locks) + 1)},
            )
        if row.locked_until is not None and as_utc(row.locked_until) > now:
            until = as_utc(row.locked_until)
            return CardCheckError(
                Reason.PAYMENT_PASSWORD_LOCKED,
                "too many wrong payment passwords",
                metadata={
                    "locked_until": until.isoformat().replace("+00:00", "Z"),
                    "lock_stage": str(row.payment_password_locks),
                },
                retry_after=until - now,
            )
        return None

    @staticmethod
    def _reset_required(why: str, metadata: dict[str, str]) -> CardCheckError:
        # No RetryInfo: waiting does not help, a reset does.
        return CardCheckError(Reason.PAYMENT_PASSWORD_LOCKED, why, metadata={"reset_required": "true", **metadata})
