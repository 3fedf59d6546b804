"""Users: one account per resident ID and per phone. The ID number and phone are held as keyed
hashes for lookup, and together with the name only sealed; the bound card's number is never
stored, only the code of the bank that confirmed it.

After a master key rotation rows stored before it hold a retired key's digests and seal until
`python -m gateway.rewrap` writes them again (gateway/rewrap.py): lookups match every key's
digest, so such a person can neither register again nor lose the account; new rows are written
under the current key alone."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Column, DateTime, LargeBinary
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database
from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.keys import Keyring, Sealer

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
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


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
        password_hasher: PasswordHasher | None = None,
        max_password_attempts: int = 5,
        password_lock: timedelta = timedelta(minutes=30),
    ) -> None:
        self._db = db
        self._id_hash = keyring.hasher(ID_NUMBER_KEY)
        self._phone_hash = keyring.hasher(PHONE_KEY)
        self._sealer = keyring.sealer(IDENTITY_KEY)
        self._clock = clock
        self._passwords = password_hasher or PasswordHasher()
        self._max_attempts = max_password_attempts
        self._lock_for = password_lock

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
            raise CardCheckError("ALREADY_REGISTERED", "an account exists for this ID number or phone")

    async def create(
        self, identity: Identity, region: str, payment_password: str, bound_bank_code: str
    ) -> User:
        user_id = str(uuid.uuid4())
        password_hash = await asyncio.to_thread(self._passwords.hash, payment_password)
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
                "ALREADY_REGISTERED", "an account exists for this ID number or phone"
            ) from None
        return User(user_id, region, bound_bank_code)

    async def get(self, user_id: str) -> User | None:
        row = await self._db.run(lambda session: session.get(UserRow, user_id))
        return None if row is None else User(row.user_id, row.region, row.bound_bank_code)

    async def find_by_phone(self, phone: str) -> User | None:
        phone_hashes = self.phone_hashes(phone)
        row = await self._db.run(
            lambda session: session.exec(
                select(UserRow).where(col(UserRow.phone_hash).in_(phone_hashes))
            ).first()
        )
        return None if row is None else User(row.user_id, row.region, row.bound_bank_code)

    async def identity(self, user_id: str) -> Identity:
        row = await self._db.run(lambda session: session.get(UserRow, user_id))
        if row is None:
            raise CardCheckError("UNAUTHENTICATED", "the session's user no longer exists")
        return open_identity(self._sealer, row)

    async def check_payment_password(self, user_id: str, password: str) -> None:
        """Raises PAYMENT_PASSWORD_INVALID (counted) or PAYMENT_PASSWORD_LOCKED (with the time
        left); a right password resets the count."""
        now = self._clock.now()
        row = await self._db.run(lambda session: session.get(UserRow, user_id))
        if row is None:
            raise CardCheckError("UNAUTHENTICATED", "the session's user no longer exists")
        if row.locked_until is not None and as_utc(row.locked_until) > now:
            raise self._locked(as_utc(row.locked_until), now)

        def verify() -> bool:
            try:
                return self._passwords.verify(row.payment_password_hash, password)
            except (VerificationError, InvalidHashError):
                return False

        ok = await asyncio.to_thread(verify)
        rehash = (
            await asyncio.to_thread(self._passwords.hash, password)
            if ok and self._passwords.check_needs_rehash(row.payment_password_hash)
            else None
        )

        def record(session: Session) -> tuple[int, datetime | None]:
            current = session.exec(select(UserRow).where(UserRow.user_id == user_id).with_for_update()).one()
            locked_until = as_utc(current.locked_until) if current.locked_until is not None else None
            if locked_until is not None and locked_until > now:
                return current.wrong_password_count, locked_until  # locked meanwhile
            if ok:
                current.wrong_password_count = 0
                current.locked_until = None
                if rehash is not None:
                    current.payment_password_hash = rehash
            else:
                # An expired lock starts a fresh count.
                count = 0 if locked_until is not None else current.wrong_password_count
                current.wrong_password_count = count + 1
                current.locked_until = None
                if current.wrong_password_count >= self._max_attempts:
                    current.locked_until = now + self._lock_for
            session.add(current)
            return current.wrong_password_count, (
                as_utc(current.locked_until) if current.locked_until is not None else None
            )

        count, locked_until = await self._db.run(record)
        if locked_until is not None and locked_until > now:
            raise self._locked(locked_until, now)
        if not ok:
            raise CardCheckError(
                "PAYMENT_PASSWORD_INVALID",
                "wrong payment password",
                metadata={"attempts_left": str(max(self._max_attempts - count, 0))},
            )

    @staticmethod
    def _locked(until: datetime, now: datetime) -> CardCheckError:
        return CardCheckError(
            "PAYMENT_PASSWORD_LOCKED",
            "too many wrong payment passwords",
            metadata={"locked_until": until.isoformat().replace("+00:00", "Z")},
            retry_after=until - now,
        )
