"""Queries from acceptance to deletion: the rules (QueryRules) and their storage (QueryStore).
Plain classes, no gRPC; time from the injected clock."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cardcheck.banks import BY_CODE
from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database
from cardcheck.runtime.errors import CardCheckError, FieldViolation, invalid_argument
from cardcheck.runtime.keys import Sealer
from cardcheck.v1 import report_service_pb2
from report_service.models import EXPIRED, FAILED, PENDING, READY, BankOutcomeRow, QueryRow, ReportRow
from report_service.reports import (
    ANSWERED,
    BankOutcome,
    MaskedCard,
    Report,
    ReportVault,
    build_report,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    """Who the banks are asked about. Never logged; stored only sealed."""

    name: str
    id_number: str
    phone: str

    def __repr__(self) -> str:  # keeps it out of tracebacks and debug output
        return "Subject(<sealed>)"

    def to_bytes(self) -> bytes:
        return report_service_pb2.Subject(
            name=self.name, id_number=self.id_number, phone=self.phone
        ).SerializeToString()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Subject:
        message = report_service_pb2.Subject.FromString(raw)
        return cls(message.name, message.id_number, message.phone)


@dataclass(frozen=True)
class Query:
    query_id: str
    user_id: str
    status: str
    bank_codes: tuple[str, ...]
    agreement_version: str
    submitted_at: datetime
    ready_by: datetime
    ready_at: datetime | None
    expires_at: datetime | None
    banks_answered: int
    banks_total: int

    @property
    def pending(self) -> bool:
        return self.status == PENDING


@dataclass(frozen=True)
class PendingWork:
    """What the worker needs to carry on a PENDING query: only the banks still missing."""

    query: Query
    subject: Subject
    trace_context: dict[str, str]
    missing_banks: tuple[str, ...]


class QueryRules:
    READY_WITHIN = timedelta(hours=24)
    REPORT_KEPT = timedelta(days=7)
    COOLDOWN = timedelta(days=7)  # counted from the last report's generation

    @staticmethod
    def validate_create(
        user_id: str, subject: Subject, bank_codes: Sequence[str], agreement_version: str
    ) -> tuple[str, ...]:
        """The banks to ask, each once, in the order given."""
        violations = []
        if not user_id:
            violations.append(FieldViolation("user_id", "required"))
        for field, value in (
            ("subject.name", subject.name),
            ("subject.id_number", subject.id_number),
            ("subject.phone", subject.phone),
        ):
            if not value.strip():
                violations.append(FieldViolation(field, "required"))
        if not agreement_version:
            violations.append(FieldViolation("agreement_version", "required"))
        if not bank_codes:
            violations.append(FieldViolation("bank_codes", "at least one bank"))
        if violations:
            raise invalid_argument(violations)
        unknown = [code for code in bank_codes if code not in BY_CODE]
        if unknown:
            raise CardCheckError(
                "UNKNOWN_BANK",
                f"unknown bank codes: {', '.join(unknown)}",
                violations=[FieldViolation("bank_codes", f"unknown bank {code}") for code in unknown],
            )
        return tuple(dict.fromkeys(bank_codes))

    @classmethod
    def cooldown_error(cls, last_report_at: datetime | None, now: datetime) -> CardCheckError | None:
        if last_report_at is None:
            return None
        allowed_at = last_report_at + cls.COOLDOWN
        if allowed_at <= now:
            return None
        return CardCheckError(
            "COOLDOWN_ACTIVE",
            f"the last report was generated less than {cls.COOLDOWN.days} days ago",
            metadata={"retry_after": allowed_at.isoformat().replace("+00:00", "Z")},
            retry_after=allowed_at - now,
        )

    @staticmethod
    def report_refusal(query: Query, now: datetime) -> CardCheckError | None:
        if query.status == PENDING:
            return CardCheckError("REPORT_NOT_READY", "the banks have not all answered yet")
        if query.status == FAILED:
            return CardCheckError("NOT_FOUND", "query failed: no report")
        if query.status == EXPIRED or (query.expires_at is not None and now >= query.expires_at):
            return CardCheckError("REPORT_EXPIRED", "the report was kept 7 days and deleted")
        return None


def _query(row: QueryRow) -> Query:
    return Query(
        query_id=row.query_id,
        user_id=row.user_id,
        status=row.status,
        bank_codes=tuple(json.loads(row.bank_codes)),
        agreement_version=row.agreement_version,
        submitted_at=as_utc(row.submitted_at),
        ready_by=as_utc(row.ready_by),
        ready_at=as_utc(row.ready_at) if row.ready_at else None,
        expires_at=as_utc(row.expires_at) if row.expires_at else None,
        banks_answered=row.banks_answered,
        banks_total=row.banks_total,
    )


def _outcome(row: BankOutcomeRow) -> BankOutcome:
    return BankOutcome(
        bank_code=row.bank_code,
        kind=row.kind,
        cards=tuple(MaskedCard(**card) for card in json.loads(row.cards)),
        detail=row.detail,
    )


def _cards_json(cards: Sequence[MaskedCard]) -> str:
    return json.dumps(
        [
            {"bank_code": c.bank_code, "card_type": c.card_type, "first4": c.first4, "last4": c.last4}
            for c in cards
        ]
    )


class Changes:
    """Wakes watchers in this process when a query changes. Watchers also poll the database,
    so changes made by another replica reach them too."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class QueryStore:
    def __init__(self, db: Database, subject_sealer: Sealer, vault: ReportVault, clock: Clock) -> None:
        self._db = db
        self._subjects = subject_sealer
        self._vault = vault
        self._clock = clock

    # --- acceptance -------------------------------------------------------------------------

    async def create(
        self,
        user_id: str,
        subject: Subject,
        bank_codes: Sequence[str],
        agreement_version: str,
        idempotency_key: str,
        trace_context: dict[str, str],
    ) -> tuple[Query, bool]:
        """(the query, whether it is new). The same key from the same user returns its query."""
        banks = QueryRules.validate_create(user_id, subject, bank_codes, agreement_version)
        key = idempotency_key or None  # no key: every request is a new one (NULLs never collide)
        now = self._clock.now()

        def by_key(session: Session) -> QueryRow | None:
            if key is None:
                return None
            return session.exec(
                select(QueryRow).where(QueryRow.user_id == user_id, QueryRow.idempotency_key == key)
            ).first()

        def accept(session: Session) -> tuple[Query, bool]:
            existing = by_key(session)
            if existing is not None:
                return _query(existing), False
            pending = session.exec(
                select(QueryRow.query_id).where(QueryRow.user_id == user_id, QueryRow.status == PENDING)
            ).first()
            if pending is not None:
                raise CardCheckError("QUERY_IN_PROGRESS", "another query of this user is pending")
            last_report = session.exec(
                select(func.max(QueryRow.ready_at)).where(
                    QueryRow.user_id == user_id, col(QueryRow.status).in_([READY, EXPIRED])
                )
            ).first()
            refusal = QueryRules.cooldown_error(as_utc(last_report) if last_report else None, now)
            if refusal is not None:
                raise refusal
            query_id = uuid.uuid4().hex
            row = QueryRow(
                query_id=query_id,
                user_id=user_id,
                status=PENDING,
                bank_codes=json.dumps(list(banks)),
                agreement_version=agreement_version,
                idempotency_key=key,
                submitted_at=now,
                ready_by=now + QueryRules.READY_WITHIN,
                banks_total=len(banks),
                banks_answered=0,
                subject_sealed=self._subjects.seal(subject.to_bytes(), query_id.encode()),
                trace_context=json.dumps(trace_context),
            )
            session.add(row)
            session.flush()
            return _query(row), True

        try:
            return await self._db.run(accept)
        except IntegrityError:
            # A concurrent request won the race: the same key returns its query, anything else
            # is the one-PENDING-query-per-user rule, enforced by the unique index.
            existing = await self._db.run(by_key)
            if existing is not None:
                return _query(existing), False
            raise CardCheckError("QUERY_IN_PROGRESS", "another query of this user is pending") from None

    # --- reading, for the user who owns the query -------------------------------------------

    async def get(self, user_id: str, query_id: str) -> Query:
        def find(session: Session) -> QueryRow | None:
            return session.get(QueryRow, query_id)

        row = await self._db.run(find) if query_id else None
        if row is None or row.user_id != user_id or not user_id:
            raise CardCheckError("NOT_FOUND", "no such query")
        return _query(row)

    async def list(self, user_id: str) -> list[Query]:
        def find(session: Session) -> list[QueryRow]:
            return list(
                session.exec(
                    select(QueryRow)
                    .where(QueryRow.user_id == user_id)
                    .order_by(col(QueryRow.submitted_at).desc(), col(QueryRow.query_id).desc())
                )
            )

        return [_query(row) for row in await self._db.run(find)]

    async def snapshot(self, user_id: str, query_id: str) -> tuple[Query, list[BankOutcome]]:
        """The query and its outcomes so far, in the order they were recorded, read together."""

        def find(session: Session) -> tuple[QueryRow | None, list[BankOutcomeRow]]:
            row = session.get(QueryRow, query_id)
            outcomes = list(
                session.exec(
                    select(BankOutcomeRow)
                    .where(BankOutcomeRow.query_id == query_id)
                    .order_by(col(BankOutcomeRow.id))
                )
            )
            return row, outcomes

        row, outcomes = await self._db.run(find) if query_id else (None, [])
        if row is None or row.user_id != user_id or not user_id:
            raise CardCheckError("NOT_FOUND", "no such query")
        return _query(row), [_outcome(o) for o in outcomes]

    async def report(self, user_id: str, query_id: str) -> Report:
        query = await self.get(user_id, query_id)
        now = self._clock.now()
        refusal = QueryRules.report_refusal(query, now)
        if refusal is not None:
            raise refusal

        def find(session: Session) -> ReportRow | None:
            return session.get(ReportRow, query_id)

        row = await self._db.run(find)
        if row is None:  # swept between the two reads
            raise CardCheckError("REPORT_EXPIRED", "the report was kept 7 days and deleted")
        content = self._vault.open(query_id, row.wrapped_key, row.ciphertext)
        return Report(query_id, as_utc(row.generated_at), as_utc(row.expires_at), content)

    # --- execution, for the worker -----------------------------------------------------------

    async def pending_query_ids(self) -> list[str]:
        def find(session: Session) -> list[str]:
            return list(
                session.exec(
                    select(QueryRow.query_id)
                    .where(QueryRow.status == PENDING)
                    .order_by(col(QueryRow.submitted_at))
                )
            )

        return await self._db.run(find)

    async def pending_work(self, query_id: str) -> PendingWork | None:
        def find(session: Session) -> tuple[QueryRow | None, list[str]]:
            row = session.get(QueryRow, query_id)
            recorded = list(
                session.exec(select(BankOutcomeRow.bank_code).where(BankOutcomeRow.query_id == query_id))
            )
            return row, recorded

        row, recorded = await self._db.run(find)
        if row is None or row.status != PENDING:
            return None
        query = _query(row)
        subject = Subject.from_bytes(self._subjects.open(row.subject_sealed, query_id.encode()))
        missing = tuple(code for code in query.bank_codes if code not in set(recorded))
        return PendingWork(query, subject, json.loads(row.trace_context or "{}"), missing)

    async def record_outcome(self, query_id: str, outcome: BankOutcome) -> bool:
        """Records one bank's outcome as it arrives. False when that bank already had one."""
        if outcome.bank_code not in BY_CODE:
            log.warning("query %s: ignoring an outcome for an unknown bank", query_id)
            return False
        now = self._clock.now()

        def record(session: Session) -> bool:
            session.add(
                BankOutcomeRow(
                    query_id=query_id,
                    bank_code=outcome.bank_code,
                    kind=outcome.kind,
                    cards=_cards_json(outcome.cards),
                    detail=outcome.detail,
                    recorded_at=now,
                )
            )
            session.flush()
            result = session.execute(
                update(QueryRow)
                .where(col(QueryRow.query_id) == query_id, col(QueryRow.status) == PENDING)
                .values(banks_answered=QueryRow.banks_answered + 1)
            )
            return result.rowcount == 1

        try:
            return await self._db.run(record)
        except IntegrityError:
            return False

    async def finish(self, query_id: str) -> str | None:
        """Once every bank has an outcome: READY with a sealed report when at least one bank
        answered, else FAILED. Returns the new status, or None while banks are missing."""
        now = self._clock.now()

        def finish(session: Session) -> str | None:
            row = session.exec(
                select(QueryRow).where(QueryRow.query_id == query_id).with_for_update()
            ).first()
            if row is None or row.status != PENDING:
                return None
            outcomes = [
                _outcome(o)
                for o in session.exec(select(BankOutcomeRow).where(BankOutcomeRow.query_id == query_id))
            ]
            banks = json.loads(row.bank_codes)
            if not set(banks) <= {o.bank_code for o in outcomes}:
                return None
            if not any(o.kind == ANSWERED for o in outcomes):
                row.status = FAILED
                session.add(row)
                return FAILED
            expires_at = now + QueryRules.REPORT_KEPT
            wrapped_key, ciphertext = self._vault.seal(query_id, build_report(banks, outcomes))
            session.add(
                ReportRow(
                    query_id=query_id,
                    wrapped_key=wrapped_key,
                    ciphertext=ciphertext,
                    generated_at=now,
                    expires_at=expires_at,
                )
            )
            row.status = READY
            row.ready_at = now
            row.expires_at = expires_at
            session.add(row)
            return READY

        return await self._db.run(finish)

    async def unsent_report_ready(self) -> list[tuple[str, str, dict[str, str]]]:
        """(query_id, phone, trace context) of READY queries whose "report ready" SMS the
        notifier has not yet accepted."""

        def find(session: Session) -> list[QueryRow]:
            return list(
                session.exec(
                    select(QueryRow).where(
                        QueryRow.status == READY, col(QueryRow.report_ready_sms_sent).is_(False)
                    )
                )
            )

        rows = await self._db.run(find)
        return [
            (
                row.query_id,
                Subject.from_bytes(self._subjects.open(row.subject_sealed, row.query_id.encode())).phone,
                json.loads(row.trace_context or "{}"),
            )
            for row in rows
        ]

    async def mark_report_ready_sent(self, query_id: str) -> None:
        def mark(session: Session) -> None:
            session.execute(
                update(QueryRow).where(col(QueryRow.query_id) == query_id).values(report_ready_sms_sent=True)
            )

        await self._db.run(mark)

    async def sweep(self) -> list[str]:
        """Deletes every report past its expiry (data key and ciphertext) and marks its query
        EXPIRED. Returns the query_ids swept."""
        now = self._clock.now()

        def sweep(session: Session) -> list[str]:
            expired = list(
                session.exec(
                    select(QueryRow.query_id).where(QueryRow.status == READY, col(QueryRow.expires_at) <= now)
                )
            )
            if expired:
                session.execute(delete(ReportRow).where(col(ReportRow.query_id).in_(expired)))
                session.execute(
                    update(QueryRow)
                    .where(col(QueryRow.query_id).in_(expired), col(QueryRow.status) == READY)
                    .values(status=EXPIRED)
                )
            return expired

        return await self._db.run(sweep)
