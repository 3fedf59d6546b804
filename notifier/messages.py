"""Messages: validated, recorded durably, then handed to an SMS provider.

A phone number is stored as a keyed hash (to find a phone's messages) and a sealed copy bound to
its message_id; the body is kept in clear only in sandbox mode, where the table is the inbox."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Column, DateTime, LargeBinary, String, Text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database
from cardcheck.runtime.errors import CardCheckError, FieldViolation, invalid_argument
from cardcheck.runtime.keys import KeyedHash, Sealer
from cardcheck.runtime.logs import mask_phone
from notifier.templates import REQUIRED_PARAMS, SmsTemplate, param_problems

log = logging.getLogger(__name__)

PHONE = re.compile(r"^1[3-9]\d{9}$")
KINDS = tuple(REQUIRED_PARAMS)  # SMS_CODE, REPORT_READY, CONSENT_RECEIPT

QUEUED = "QUEUED"
DELIVERED = "DELIVERED"
FAILED = "FAILED"


class MessageRow(SQLModel, table=True):
    __tablename__ = "nt_messages"

    seq: int | None = Field(default=None, primary_key=True)  # tie-breaker for "newest first"
    message_id: str = Field(sa_column=Column(String(32), unique=True, nullable=False))
    idempotency_key: str = Field(sa_column=Column(String(200), unique=True, nullable=False))
    phone_hash: str = Field(sa_column=Column(String(64), index=True, nullable=False))
    phone_sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    template: str = Field(sa_column=Column(String(64), nullable=False))
    body: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # sandbox only
    status: str = Field(sa_column=Column(String(16), nullable=False))
    attempts: int = 0
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    delivered_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class SmsProvider(Protocol):
    """Whatever puts a text on a phone. Raises when the text could not be handed over."""

    async def deliver(self, phone: str, body: str) -> None: ...


class SandboxProvider:
    """Reaches no phone: the recorded message is the delivery (the inbox is the table)."""

    async def deliver(self, phone: str, body: str) -> None:
        return None


@dataclass(frozen=True)
class Delivery:
    message_id: str
    kind: str
    status: str
    attempts: int
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class InboxMessage:
    message_id: str
    phone: str
    kind: str
    body: str
    created_at: datetime


def _delivery(row: MessageRow) -> Delivery:
    return Delivery(
        message_id=row.message_id,
        kind=row.kind,
        status=row.status,
        attempts=row.attempts,
        created_at=as_utc(row.created_at),
        delivered_at=as_utc(row.delivered_at) if row.delivered_at else None,
    )


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
    else:
        violations.extend(FieldViolation(f, d) for f, d in param_problems(kind, params).items())
    if violations:
        raise invalid_argument(violations)


class Outbox:
    """Send, look up and (sandbox) list messages."""

    def __init__(
        self,
        db: Database,
        templates: Mapping[str, SmsTemplate],
        provider: SmsProvider,
        phone_hasher: KeyedHash,
        phone_sealer: Sealer,
        clock: Clock,
        *,
        sandbox: bool,
    ) -> None:
        self._db = db
        self._templates = templates
        self._provider = provider
        self._hash = phone_hasher
        self._sealer = phone_sealer
        self._clock = clock
        self.sandbox = sandbox

    async def send(
        self, idempotency_key: str, phone: str, kind: str | None, params: Mapping[str, str]
    ) -> Delivery:
        validate_send(idempotency_key, phone, kind, params)
        assert kind is not None
        template = self._templates[kind]
        body = template.render(params)
        phone_hash = self._hash.digest(phone)
        row, created = await self._record(idempotency_key, phone, phone_hash, kind, template, body)
        if row.phone_hash != phone_hash or row.kind != kind:
            raise invalid_argument(
                [FieldViolation("idempotency_key", "already used for a different phone or kind")]
            )
        if not created:
            if row.status != FAILED:
                return _delivery(row)
            # An earlier delivery failed: this retry tries again, once, whoever claims it.
            if not await self._claim_retry(row.message_id):
                return await self.delivery(row.message_id)
        return await self._deliver(row.message_id, phone, kind, body)

    async def _record(
        self, key: str, phone: str, phone_hash: str, kind: str, template: SmsTemplate, body: str
    ) -> tuple[MessageRow, bool]:
        def find(session: Session) -> MessageRow | None:
            return session.exec(select(MessageRow).where(MessageRow.idempotency_key == key)).first()

        existing = await self._db.run(find)
        if existing is not None:
            return existing, False
        message_id = uuid.uuid4().hex
        row = MessageRow(
            message_id=message_id,
            idempotency_key=key,
            phone_hash=phone_hash,
            phone_sealed=self._sealer.seal(phone.encode(), message_id.encode()),
            kind=kind,
            template=template.name,
            body=body if self.sandbox else None,
            status=QUEUED,
            attempts=0,
            created_at=self._clock.now(),
        )

        def insert(session: Session) -> MessageRow:
            session.add(row)
            session.flush()
            return row

        try:
            return await self._db.run(insert), True
        except IntegrityError:
            # A concurrent request with the same key recorded it first: that one is the message.
            winner = await self._db.run(find)
            if winner is None:
                raise
            return winner, False

    async def _claim_retry(self, message_id: str) -> bool:
        def claim(session: Session) -> bool:
            row = session.exec(
                select(MessageRow).where(MessageRow.message_id == message_id).with_for_update()
            ).one()
            if row.status != FAILED:
                return False
            row.status = QUEUED
            session.add(row)
            return True

        return await self._db.run(claim)

    async def _deliver(self, message_id: str, phone: str, kind: str, body: str) -> Delivery:
        try:
            await self._provider.deliver(phone, body)
        except Exception as error:  # the provider's failure is recorded, not raised
            log.warning(
                "sms %s (%s) to %s failed: %s", message_id, kind, mask_phone(phone), type(error).__name__
            )
            status, delivered_at = FAILED, None
        else:
            log.info("sms %s (%s) delivered to %s", message_id, kind, mask_phone(phone))
            status, delivered_at = DELIVERED, self._clock.now()

        def update(session: Session) -> MessageRow:
            row = session.exec(select(MessageRow).where(MessageRow.message_id == message_id)).one()
            row.status = status
            row.attempts += 1
            row.delivered_at = delivered_at
            session.add(row)
            session.flush()
            return row

        return _delivery(await self._db.run(update))

    async def delivery(self, message_id: str) -> Delivery:
        if not message_id:
            raise invalid_argument([FieldViolation("message_id", "required")])

        def find(session: Session) -> MessageRow | None:
            return session.exec(select(MessageRow).where(MessageRow.message_id == message_id)).first()

        row = await self._db.run(find)
        if row is None:
            raise CardCheckError("NOT_FOUND", "no such message")
        return _delivery(row)

    async def inbox(self, phone: str) -> list[InboxMessage]:
        """The sandbox inbox of one phone, newest first. The caller checks sandbox mode."""
        if not PHONE.match(phone):
            raise invalid_argument([FieldViolation("phone", "must be an 11-digit mainland mobile number")])
        phone_hash = self._hash.digest(phone)

        def find(session: Session) -> list[MessageRow]:
            query = (
                select(MessageRow)
                .where(MessageRow.phone_hash == phone_hash)
                .order_by(MessageRow.created_at.desc(), MessageRow.seq.desc())  # type: ignore[union-attr]
            )
            return list(session.exec(query))

        return [
            InboxMessage(
                message_id=row.message_id,
                phone=self._sealer.open(row.phone_sealed, row.message_id.encode()).decode(),
                kind=row.kind,
                body=row.body or "",
                created_at=as_utc(row.created_at),
            )
            for row in await self._db.run(find)
        ]
