"""Messages: the durable record of every SMS, the outbox the delivery worker works from.

A phone number is stored as a keyed hash (to find a phone's messages and count them for the
cap) and a sealed copy bound to its message_id. The text is kept in clear only by the sandbox
provider, where the table is the inbox; elsewhere it is sealed until it is delivered or given
up, then dropped, and a keyed digest of it remains (a retried Send must carry the same text).

After a master key rotation, rows stored under a retired key keep working: their sealed copies
open, lookups by phone take every key's digest, and compares accept a retired key's digest. New
rows are under the current key only; `python -m notifier.rewrap` moves the old ones over.

Delivery state: QUEUED (due at next_attempt_at, or being tried by the replica holding the
lease), DELIVERED, or FAILED (refused for good, or not delivered before retry_until). The lease
is cardcheck.runtime.work's over lease_owner and lease_until, with the attempt count as its
fencing token: each attempt is one claim."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    Row,
    Select,
    String,
    Text,
    and_,
    bindparam,
    delete,
    or_,
    text,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, col, select

from cardcheck.runtime.changes import Channel
from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database, table_of
from cardcheck.runtime.errors import CardCheckError, FieldViolation, Reason, invalid_argument
from cardcheck.runtime.keys import KeyedHash, Keyring, Sealer
from cardcheck.runtime.statements import Statement
from cardcheck.runtime.work import Lease, LeaseColumns, LeaseLost, WorkQueue
from notifier.config import Cap
from notifier.providers import OutgoingSms
from notifier.templates import REQUIRED_PARAMS, param_problems

log = logging.getLogger(__name__)

PHONE = re.compile(r"^1[3-9]\d{9}$")
KINDS = tuple(REQUIRED_PARAMS)  # SMS_CODE, REPORT_READY, CONSENT_RECEIPT

QUEUED = "QUEUED"
DELIVERED = "DELIVERED"
FAILED = "FAILED"

EXPIRED = "EXPIRED"  # the error class of a message whose retry window closed before an attempt
# A message due at the very end of its window still gets that attempt when a poll comes late.
EXPIRY_SLACK = timedelta(minutes=1)

T = TypeVar("T")


class MessageRow(SQLModel, table=True):
    __tablename__ = "nt_messages"
    __table_args__ = (
        Index("ix_nt_messages_due", "status", "next_attempt_at"),
        Index("ix_nt_messages_phone_kind", "phone_hash", "kind", "created_at"),
        Index("ix_nt_messages_created", "created_at"),
    )

    seq: int | None = Field(default=None, primary_key=True)  # tie-breaker for "newest first"
    message_id: str = Field(sa_column=Column(String(32), unique=True, nullable=False))
    idempotency_key: str = Field(sa_column=Column(String(200), unique=True, nullable=False))
    phone_hash: str = Field(sa_column=Column(String(64), index=True, nullable=False))
    phone_sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    template: str = Field(sa_column=Column(String(64), nullable=False))
    body: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # sandbox inbox only
    body_sealed: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    body_digest: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    delivered_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    next_attempt_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    last_attempt_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    retry_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    last_error: str | None = Field(default=None, sa_column=Column(String(40), nullable=True))
    lease_owner: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    lease_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    trace_context: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


_MESSAGES = table_of(MessageRow)
MESSAGE_LEASES = LeaseColumns(
    _MESSAGES,
    key=(_MESSAGES.c.message_id,),
    owner=_MESSAGES.c.lease_owner,
    expires=_MESSAGES.c.lease_until,
    token=_MESSAGES.c.attempts,
)


# The statements of every Send, built once (Core, on the table).
_WRITTEN = tuple(c.name for c in _MESSAGES.columns if c.name != "seq")
_BY_KEY = Statement(sa_select(_MESSAGES).where(_MESSAGES.c.idempotency_key == bindparam("key")))
# A key recorded earlier inserts nothing (and, on PostgreSQL, waits for a concurrent Send of the
# same key to commit or roll back first): one statement tells a new message from a retried one.
_INSERT_NEW: dict[str, Statement[Any]] = {
    name: Statement(
        dialect.insert(_MESSAGES)
        .on_conflict_do_nothing(index_elements=[_MESSAGES.c.idempotency_key])
        .returning(_MESSAGES.c.seq)
    )
    for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
}


# By a phone: its one digest (the usual case, no retired key) or any of several. An expanding IN
# is compiled again on every call; the equality is not.
PhoneQueries = tuple[Statement[Select[Any]], Statement[Select[Any]]]


def _by_phone(query: Select[Any]) -> PhoneQueries:
    return (
        Statement(query.where(_MESSAGES.c.phone_hash == bindparam("hash"))),
        Statement(query.where(_MESSAGES.c.phone_hash.in_(bindparam("hashes", expanding=True)))),
    )


def _of_phone(queries: PhoneQueries, hashes: Sequence[str]) -> tuple[Statement[Select[Any]], dict[str, Any]]:
    if len(hashes) == 1:
        return queries[0], {"hash": hashes[0]}
    return queries[1], {"hashes": list(hashes)}


# A sandbox inbox, asked again and again while a code is awaited: what `inbox` reads, as rows.
_FOR_PHONE = _by_phone(
    sa_select(_MESSAGES.c.message_id, _MESSAGES.c.kind, _MESSAGES.c.body, _MESSAGES.c.created_at)
    .order_by(_MESSAGES.c.created_at.desc(), _MESSAGES.c.seq.desc())
)
# The cap: the phone's other messages of a kind inside the widest window.
_RECENT = _by_phone(
    sa_select(_MESSAGES.c.created_at)
    .where(
        _MESSAGES.c.kind == bindparam("kind"),
        _MESSAGES.c.created_at > bindparam("since"),
        _MESSAGES.c.seq != bindparam("seq"),
    )
    .order_by(_MESSAGES.c.created_at)
)
_LOCK_PHONE = text("SELECT pg_advisory_xact_lock(:key)")
_DELIVERED = Statement(
    update(_MESSAGES)
    .where(_MESSAGES.c.message_id == bindparam("id"), _MESSAGES.c.status != DELIVERED)
    .values(
        status=DELIVERED,
        delivered_at=bindparam("now"),
        body_sealed=None,
        next_attempt_at=None,
        lease_owner=None,
        lease_until=None,
    )
)


@dataclass(slots=True)
class Message:
    """A message's row as plain values: what a Send writes and hands to its first attempt, made
    for every Send without the ORM's bookkeeping (MessageRow's constructor was a good part of a
    Send's CPU)."""

    message_id: str
    idempotency_key: str
    phone_hash: str
    phone_sealed: bytes
    kind: str
    template: str
    body: str | None
    body_sealed: bytes | None
    body_digest: str | None
    status: str
    created_at: datetime
    retry_until: datetime | None
    trace_context: str | None
    attempts: int = 0
    delivered_at: datetime | None = None
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    last_error: str | None = None
    lease_owner: str | None = None
    lease_until: datetime | None = None
    seq: int | None = None


# What a delivery attempt works from: a message just written, or a row read back.
AnyMessage = Message | MessageRow


def lease_of(row: AnyMessage) -> Lease:
    """The lease `row` was read under: its holder and attempt."""
    return Lease((row.message_id,), row.lease_owner or "", row.attempts)


@dataclass(frozen=True)
class Delivery:
    message_id: str
    kind: str
    status: str
    attempts: int
    created_at: datetime
    delivered_at: datetime | None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    retry_until: datetime | None = None


@dataclass(frozen=True)
class InboxMessage:
    message_id: str
    phone: str
    kind: str
    body: str
    created_at: datetime


def _utc(instant: datetime | None) -> datetime | None:
    return as_utc(instant) if instant is not None else None


def delivery_of(row: AnyMessage) -> Delivery:
    return Delivery(
        message_id=row.message_id,
        kind=row.kind,
        status=row.status,
        attempts=row.attempts,
        created_at=as_utc(row.created_at),
        delivered_at=_utc(row.delivered_at),
        last_error=row.last_error,
        next_attempt_at=_utc(row.next_attempt_at) if row.status == QUEUED else None,
        last_attempt_at=_utc(row.last_attempt_at),
        retry_until=_utc(row.retry_until),
    )


# Template parameters a Send may carry: every kind needs at most three (notifier/templates.py);
# counted before any is looked at.
MAX_PARAMS = 8


def validate_send(idempotency_key: str, phone: str, kind: str | None, params: Mapping[str, str]) -> None:
    violations: list[FieldViolation] = []
    if not idempotency_key.strip():
        violations.append(FieldViolation("idempotency_key", "required"))
    elif len(idempotency_key) > 200:
        violations.append(FieldViolation("idempotency_key", "at most 200 characters"))
    if not PHONE.match(phone):
        violations.append(FieldViolation("phone", "must be an 11-digit mainland mobile number"))
    if kind is None:
        violations.append(FieldViolation("kind", f"must be one of {', '.join(KINDS)}"))
    elif len(params) > MAX_PARAMS:
        violations.append(FieldViolation("params", f"at most {MAX_PARAMS} parameters"))
    else:
        violations.extend(FieldViolation(f, d) for f, d in param_problems(kind, params).items())
    if violations:
        raise invalid_argument(violations)


class MessageSealing:
    """The keys of the message table: the phone's lookup hash and sealed copy, the text's
    sealed copy (outside sandbox) and digest. Everything sealed is bound to its message_id."""

    def __init__(
        self, phone_hasher: KeyedHash, phone_sealer: Sealer, body_sealer: Sealer, body_hasher: KeyedHash
    ):
        self._phone_hasher = phone_hasher
        self._phone_sealer = phone_sealer
        self._body_sealer = body_sealer
        self._body_hasher = body_hasher

    def phone_hashes(self, phone: str) -> tuple[str, ...]:
        """What a lookup takes: the digest under the current key (what a new row stores) and
        each retired one's."""
        return self._phone_hasher.digests(phone)

    def phone_matches(self, phone: str, stored: str) -> bool:
        return self._phone_hasher.matches(phone, stored)

    def body_digest(self, body: str) -> str:
        return self._body_hasher.digest(body)

    def body_matches(self, body: str, stored: str) -> bool:
        return self._body_hasher.matches(body, stored)

    def seal_phone(self, message_id: str, phone: str) -> bytes:
        return self._phone_sealer.seal(phone.encode(), message_id.encode())

    def open_phone(self, row: AnyMessage | Row[Any]) -> str:
        return self._phone_sealer.open(row.phone_sealed, row.message_id.encode()).decode()

    def seal_body(self, message_id: str, body: str, params: Sequence[str] = ()) -> bytes:
        """The text and a vendor template's values, sealed together: kept and dropped as one."""
        return self._body_sealer.seal(_envelope(body, params), message_id.encode())

    def _open_body(self, row: AnyMessage) -> tuple[str, tuple[str, ...]]:
        assert row.body_sealed is not None
        return _unwrap(self._body_sealer.open(row.body_sealed, row.message_id.encode()))

    def outgoing(self, row: AnyMessage) -> OutgoingSms | None:
        """What an attempt sends; None when the text is no longer kept."""
        params: tuple[str, ...] = ()
        if row.body is not None:
            body = row.body  # the sandbox inbox: no vendor to give parameters to
        elif row.body_sealed is not None:
            body, params = self._open_body(row)
        else:
            return None
        return OutgoingSms(row.message_id, self.open_phone(row), row.kind, row.template, body, params)

    def rewrapped(self, row: MessageRow) -> dict[str, object]:
        """The columns of `row` to write for it to be under the current key only; empty when it
        is already. InvalidTag when no key opens its phone.

        A row's values are all written under one key at once (by Send, or here), and the sealed
        phone is always kept: it tells which key the row is under. The text's digest is made
        again from the text while it is kept (the sandbox inbox, or sealed until delivered);
        once the text is gone the digest cannot be, and it is dropped: a retried Send of that
        message is then compared on its phone and kind only."""
        bound = row.message_id.encode()
        changes: dict[str, object] = {}
        phone_resealed = self._phone_sealer.reseal(row.phone_sealed, bound)
        if phone_resealed is not None:
            changes["phone_sealed"] = phone_resealed
        phone = self._phone_sealer.open(row.phone_sealed, bound).decode()
        phone_hash = self._phone_hasher.digest(phone)
        if row.phone_hash != phone_hash:
            changes["phone_hash"] = phone_hash
        text = row.body
        if row.body_sealed is not None:
            body_resealed = self._body_sealer.reseal(row.body_sealed, bound)
            if body_resealed is not None:
                changes["body_sealed"] = body_resealed
            if text is None:
                text, _ = self._open_body(row)
        if text is not None:
            digest = self._body_hasher.digest(text)
            if row.body_digest != digest:
                changes["body_digest"] = digest
        elif row.body_digest is not None and phone_resealed is not None:
            changes["body_digest"] = None
        return changes


_ENVELOPE_HEAD = '{"v":2,'


def _envelope(body: str, params: Sequence[str]) -> bytes:
    return json.dumps(
        {"v": 2, "text": body, "params": list(params)}, ensure_ascii=False, separators=(",", ":")
    ).encode()


def _unwrap(plain: bytes) -> tuple[str, tuple[str, ...]]:
    """The text and the vendor's values; a row sealed before the values were kept holds the
    text alone (our texts start with the sender's 【name】, never with the envelope's head)."""
    text = plain.decode()
    if not text.startswith(_ENVELOPE_HEAD):
        return text, ()
    data = json.loads(text)
    return str(data["text"]), tuple(str(p) for p in data["params"])


def message_sealing(keyring: Keyring) -> MessageSealing:
    """The message table's keys, from the keyring (current and retired master keys)."""
    return MessageSealing(
        keyring.hasher("phone"),
        keyring.sealer("notifier-phone"),
        keyring.sealer("notifier-body"),
        keyring.hasher("notifier-body"),
    )


@dataclass(frozen=True)
class Failure:
    """What became of a failed attempt: retried at next_attempt_at, or FAILED for good."""

    status: str
    next_attempt_at: datetime | None


class MessageStore:
    """Every read and write of nt_messages, each one transaction, times from the clock."""

    def __init__(
        self, db: Database, clock: Clock, *, lease: timedelta = timedelta(seconds=30), changes: Channel | None = None
    ) -> None:
        """`lease`: how long a replica holds a message it is trying; `changes` wakes the
        delivery workers when a message is free to try now."""
        self._db = db
        self._clock = clock
        self.queue = WorkQueue(MESSAGE_LEASES, db.run, clock, lease=lease, changes=changes)

    def _by_message_id(self, session: Session, message_id: str, *, lock: bool = False) -> MessageRow | None:
        query = select(MessageRow).where(MessageRow.message_id == message_id)
        if lock:
            query = query.with_for_update()
        return session.exec(query).first()

    async def get(self, message_id: str) -> MessageRow | None:
        return await self._db.run(lambda session: self._by_message_id(session, message_id))

    async def record(
        self,
        message: Message,
        cap: Cap,
        owner: str,
        phone_hashes: Sequence[str] = (),
        *,
        delivered: bool = False,
    ) -> tuple[Message, bool]:
        """Records a new message, QUEUED and already held by `owner` for its first attempt (or,
        `delivered`, DELIVERED by that attempt: the provider delivers by recording); or returns
        the message recorded earlier under the same idempotency key (created False).
        A new message past the phone's cap is refused with RATE_LIMITED and the wait (nothing is
        written); the cap counts the phone's messages under any of `phone_hashes` (every key's
        digest; by default the message's own)."""
        key = message.idempotency_key
        hashes = tuple(phone_hashes) or (message.phone_hash,)

        # Core statements on the path of every Send: the row is written, not loaded (the ORM's
        # unit of work and its bulk UPDATE were most of the notifier's CPU per SMS).
        def work(connection: Connection) -> tuple[Message, bool]:
            dialect = connection.dialect.name
            now = self._clock.now()
            self._serialise_phone(connection, message.phone_hash)
            message.created_at = now
            message.attempts = 1
            message.last_attempt_at = now
            if delivered:
                message.status = DELIVERED
                message.delivered_at = now
            else:
                message.status = QUEUED
                message.next_attempt_at = now
                self._grant(message, owner)
            values = {name: getattr(message, name) for name in _WRITTEN}
            seq = _INSERT_NEW[dialect].run(connection, values).scalar()
            if seq is None:
                earlier = _BY_KEY.run(connection, {"key": key}).one()
                return Message(**earlier._asdict()), False
            # Counted once the row is in: a refusal rolls the insert back with the transaction.
            self._check_cap(connection, hashes, message.kind, cap, now, seq)
            message.seq = seq
            return message, True

        return await self._db.run_core(work)

    @staticmethod
    def _serialise_phone(connection: Connection, phone_hash: str) -> None:
        """Two concurrent Sends to one phone count the cap one after the other. SQLite's
        BEGIN IMMEDIATE already makes every writer wait its turn; PostgreSQL takes a lock."""
        if connection.dialect.name == "postgresql":
            connection.execute(_LOCK_PHONE, {"key": int(phone_hash[:15], 16)})

    @staticmethod
    def _check_cap(
        connection: Connection, phone_hashes: Sequence[str], kind: str, cap: Cap, now: datetime, seq: int
    ) -> None:
        """Refuses the message `seq` when the phone's other messages of `kind` reach the cap."""
        windows = cap.windows()
        if not windows:
            return
        widest = max(window for window, _, _ in windows)
        query, params = _of_phone(_RECENT, phone_hashes)
        params.update(kind=kind, since=now - widest, seq=seq)
        recent = [as_utc(t) for (t,) in query.run(connection, params)]
        waits = []
        for window, limit, name in windows:
            inside = [t for t in recent if t > now - window]
            if len(inside) >= limit:
                # Allowed again once enough of the oldest have left the window.
                waits.append((inside[len(inside) - limit] + window - now, limit, name))
        if waits:
            wait, limit, name = max(waits)
            raise CardCheckError(
                Reason.RATE_LIMITED,
                f"at most {limit} {kind} messages to one phone per {name}",
                metadata={"kind": kind, "window": name, "limit": str(limit)},
                retry_after=wait,
            )

    def _grant(self, row: AnyMessage, owner: str) -> None:
        for column, value in self.queue.granted(owner).items():
            setattr(row, column, value)

    async def rearm(
        self, message_id: str, body_sealed: bytes | None, retry_until: datetime, owner: str
    ) -> tuple[MessageRow, bool]:
        """A FAILED message asked for again: QUEUED once more and held by `owner` for an
        attempt now (rearmed True); any other message is returned as it is."""

        def work(session: Session) -> tuple[MessageRow, bool]:
            row = self._by_message_id(session, message_id, lock=True)
            assert row is not None
            if row.status != FAILED:
                return row, False
            now = self._clock.now()
            row.status = QUEUED
            row.attempts += 1
            row.last_attempt_at = now
            row.next_attempt_at = now
            row.retry_until = retry_until
            self._grant(row, owner)
            if body_sealed is not None:
                row.body_sealed = body_sealed
            session.add(row)
            session.flush()
            return row, True

        return await self._db.run(work)

    async def claim_due(self, owner: str, limit: int) -> tuple[list[MessageRow], list[MessageRow]]:
        """Takes up to `limit` due messages no one holds (or whose holder's lease ran out, e.g.
        a replica that died mid-attempt) for an attempt by `owner` (cardcheck.runtime.work),
        oldest due first. Returns (claimed, expired): a due message past its retry window is
        not tried but FAILED as EXPIRED."""

        def work(session: Session) -> tuple[list[MessageRow], list[MessageRow]]:
            now = self._clock.now()
            free = or_(col(MessageRow.lease_until).is_(None), col(MessageRow.lease_until) <= now)
            due = and_(
                col(MessageRow.status) == QUEUED,
                or_(col(MessageRow.next_attempt_at).is_(None), col(MessageRow.next_attempt_at) <= now),
            )
            past_window = col(MessageRow.retry_until) < now - EXPIRY_SLACK
            expired = list(
                session.exec(
                    select(MessageRow).where(due, free, past_window).limit(limit).with_for_update(skip_locked=True)
                )
            )
            for row in expired:
                self._give_up(row, EXPIRED)
                session.add(row)
            leases = self.queue.claim(
                session,
                owner,
                limit,
                where=[due, or_(col(MessageRow.retry_until).is_(None), ~past_window)],
                order_by=[_MESSAGES.c.next_attempt_at, _MESSAGES.c.seq],
            )
            ids = [lease.key[0] for lease in leases]
            rows = {r.message_id: r for r in session.exec(select(MessageRow).where(col(MessageRow.message_id).in_(ids)))}
            claimed = [rows[message_id] for message_id in ids]
            for row in claimed:
                row.last_attempt_at = now
                session.add(row)
            session.flush()
            return claimed, expired

        return await self._db.run(work)

    @staticmethod
    def _give_up(row: MessageRow, error_class: str | None) -> None:
        row.status = FAILED
        if error_class is not None:
            row.last_error = error_class
        row.body_sealed = None  # nothing will be sent: the text goes
        row.next_attempt_at = None
        row.lease_owner = None
        row.lease_until = None

    def _free(self, row: MessageRow) -> None:
        for column, value in self.queue.freed().items():
            setattr(row, column, value)

    async def record_success(self, message_id: str) -> datetime | None:
        """Delivered: whoever held it, a later failure report of a lost lease changes nothing.
        Returns when it was recorded delivered; None when it was already (another attempt)."""
        now = self._clock.now()

        def work(connection: Connection) -> int:
            return _DELIVERED.run(connection, {"id": message_id, "now": now}).rowcount

        return now if await self._db.run_core(work) else None

    async def record_failure(
        self,
        lease: Lease,
        error_class: str,
        *,
        retryable: bool,
        next_delay: Callable[[int], timedelta],
    ) -> Failure | None:
        """Schedules the next attempt (`next_delay(attempts)` from now, never past the retry
        window) or gives up. None when `lease` is no longer the message's (it ran out and the
        message was claimed again, or it was delivered meanwhile): that attempt decides."""

        def work(session: Session) -> Failure | None:
            try:
                self.queue.hold(session, lease)
            except LeaseLost:
                return None
            row = self._by_message_id(session, lease.key[0])
            if row is None or row.status != QUEUED:
                return None
            now = self._clock.now()
            row.last_error = error_class
            retry_until = _utc(row.retry_until)
            if not retryable or (retry_until is not None and now >= retry_until):
                self._give_up(row, None)
            else:
                due = now + next_delay(row.attempts)
                row.next_attempt_at = min(due, retry_until) if retry_until is not None else due
                self._free(row)
            session.add(row)
            return Failure(row.status, _utc(row.next_attempt_at))

        return await self._db.run(work)

    async def release(self, owner: str) -> int:
        """On a graceful stop: the messages `owner` still holds are free for the next claim."""
        return await self.queue.release(owner, where=[col(MessageRow.status) == QUEUED])

    async def purge(self, retention: timedelta, batch: int = 500) -> int:
        """Deletes the messages created more than `retention` ago that are no longer being
        delivered, `batch` rows per transaction (a long backlog never holds one huge lock).
        Returns how many were deleted."""
        created_before = self._clock.now() - retention

        def work(session: Session) -> int:
            old = (
                select(MessageRow.seq)
                .where(col(MessageRow.created_at) < created_before, col(MessageRow.status) != QUEUED)
                .limit(batch)
            )
            seqs = list(session.exec(old))
            if not seqs:
                return 0
            session.execute(delete(MessageRow).where(col(MessageRow.seq).in_(seqs)))
            return len(seqs)

        deleted = 0
        while True:
            done = await self._db.run(work)
            deleted += done
            if done < batch:
                return deleted

    async def for_phone(self, phone_hashes: Sequence[str]) -> Sequence[Any]:
        """A phone's messages (stored under any of its `phone_hashes`), newest first: message_id,
        kind, body and created_at."""
        query, params = _of_phone(_FOR_PHONE, phone_hashes)
        return await self._db.run_core(lambda connection: query.run(connection, params).all())
