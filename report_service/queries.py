"""Queries from acceptance to deletion: the rules (QueryRules) and their storage (QueryStore):
acceptance, reading, viewing and deleting reports. Running a query is report_service.execution.
Plain classes, no gRPC; time from the injected clock."""

from __future__ import annotations

import builtins
import functools
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    Connection,
    Row,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    or_,
    true,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cardcheck.banks import BY_CODE, MAX_BANK_CODES
from cardcheck.runtime.changes import Channel
from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import table_of
from cardcheck.runtime.errors import CardCheckError, FieldViolation, Reason, invalid_argument
from cardcheck.runtime.keys import KeyedHash, Sealer
from cardcheck.runtime.statements import Statement
from cardcheck.v1 import report_service_pb2
from report_service import audit
from report_service.models import (
    EXECUTE,
    BankOutcomeRow,
    QueryRow,
    QueryStatus,
    ReportRow,
    WorkRow,
)
from report_service.reports import (
    BankOutcome,
    MaskedCard,
    Report,
    ReportVault,
)
from report_service.storage import Storage

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = "idempotency-key"  # the keyring's subkey idempotency keys are hashed under


class OutcomeColumns(Protocol):
    """What an outcome is opened from: a BankOutcomeRow, or a Core row of its columns."""

    @property
    def query_id(self) -> str: ...
    @property
    def bank_code(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def cards_sealed(self) -> bytes | None: ...
    @property
    def detail(self) -> str: ...


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
    status: QueryStatus
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
        return self.status == QueryStatus.PENDING


class QueryRules:
    READY_WITHIN = timedelta(hours=24)
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
        elif len(bank_codes) > MAX_BANK_CODES:  # before any of them is looked at
            violations.append(FieldViolation("bank_codes", f"at most {MAX_BANK_CODES} bank codes"))
        if violations:
            raise invalid_argument(violations)
        unknown = [code for code in bank_codes if code not in BY_CODE]
        if unknown:
            raise CardCheckError(
                Reason.UNKNOWN_BANK,
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
            Reason.COOLDOWN_ACTIVE,
            f"the last report was generated less than {cls.COOLDOWN.days} days ago",
            metadata={"retry_after": allowed_at.isoformat().replace("+00:00", "Z")},
            retry_after=allowed_at - now,
        )

    @staticmethod
    def report_refusal(query: Query, now: datetime) -> CardCheckError | None:
        if query.status == QueryStatus.PENDING:
            return CardCheckError(Reason.REPORT_NOT_READY, "the banks have not all answered yet")
        if query.status == QueryStatus.FAILED:
            return CardCheckError(Reason.NOT_FOUND, "query failed: no report")
        if query.status == QueryStatus.EXPIRED or (query.expires_at is not None and now >= query.expires_at):
            return CardCheckError(Reason.REPORT_EXPIRED, "the report was kept its 7 days and deleted")
        return None


_QUERIES = table_of(QueryRow)
_OUTCOMES = table_of(BankOutcomeRow)
# What query_of reads, and a query's progress: the reads of every watcher's wake, built once.
_QUERY_BY_ID = Statement(sa_select(
    *(_QUERIES.c[name] for name in (
        "query_id", "user_id", "status", "bank_codes", "agreement_version", "submitted_at", "ready_by",
        "ready_at", "expires_at", "banks_answered", "banks_total",
    ))
).where(_QUERIES.c.query_id == bindparam("query_id")))
# Accepting a query, built once: the query of the same key (as _QUERY_BY_ID reads one), the
# user's pending query, the user's last report.
_BY_KEY = Statement(sa_select(*_QUERY_BY_ID.statement.selected_columns).where(
    _QUERIES.c.user_id == bindparam("user_id"),
    or_(
        and_(
            _QUERIES.c.idempotency_key_in_clear == false(),
            _QUERIES.c.idempotency_key.in_(bindparam("digests", expanding=True)),
        ),
        and_(_QUERIES.c.idempotency_key_in_clear == true(), _QUERIES.c.idempotency_key == bindparam("key")),
    ),
))
# Whether the user has a pending query, and their last report's instant, in one statement.
_PENDING_AND_LAST_REPORT = Statement(sa_select(
    func.count(case((_QUERIES.c.status == QueryStatus.PENDING, 1))),
    func.max(case((_QUERIES.c.status.in_([QueryStatus.READY, QueryStatus.EXPIRED]), _QUERIES.c.ready_at))),
).where(_QUERIES.c.user_id == bindparam("user_id")))
_INSERT_QUERY = Statement(insert(_QUERIES))
_INSERT_WORK = Statement(insert(table_of(WorkRow)))
_REPORTS = table_of(ReportRow)
# GetReport's read: the query (as _QUERY_BY_ID reads it) and its report, if any, in one statement.
_QUERY_AND_REPORT = Statement(
    sa_select(
        *_QUERY_BY_ID.statement.selected_columns,
        _REPORTS.c.wrapped_key,
        _REPORTS.c.ciphertext,
        _REPORTS.c.generated_at,
        _REPORTS.c.expires_at.label("report_expires_at"),
    )
    .select_from(_QUERIES.outerjoin(_REPORTS, _REPORTS.c.query_id == _QUERIES.c.query_id))
    .where(_QUERIES.c.query_id == bindparam("query_id"))
)
_PROGRESS = Statement(
    sa_select(_OUTCOMES.c.bank_code, _OUTCOMES.c.kind, _OUTCOMES.c.detail)
    .where(_OUTCOMES.c.query_id == bindparam("query_id"))
    .order_by(_OUTCOMES.c.id)
)


@functools.lru_cache(maxsize=256)
def _bank_codes(text: str) -> tuple[str, ...]:
    # Read at every watcher's wake; most queries ask the same few lists of banks.
    return tuple(json.loads(text))


def query_of(row: QueryRow | Row[Any]) -> Query:
    """From the ORM row or a Core row of _QUERY_BY_ID's columns."""
    return Query(
        query_id=row.query_id,
        user_id=row.user_id,
        status=QueryStatus(row.status),
        bank_codes=_bank_codes(row.bank_codes),
        agreement_version=row.agreement_version,
        submitted_at=as_utc(row.submitted_at),
        ready_by=as_utc(row.ready_by),
        ready_at=as_utc(row.ready_at) if row.ready_at else None,
        expires_at=as_utc(row.expires_at) if row.expires_at else None,
        banks_answered=row.banks_answered,
        banks_total=row.banks_total,
    )


def cards_json(cards: Sequence[MaskedCard]) -> bytes:
    return json.dumps(
        [
            {"bank_code": c.bank_code, "card_type": c.card_type, "first4": c.first4, "last4": c.last4}
            for c in cards
        ]
    ).encode()


class QueryStore:
    def __init__(
        self,
        db: Storage,
        subject_sealer: Sealer,
        vault: ReportVault,
        clock: Clock,
        *,
        outcome_sealer: Sealer,
        audit_chain: audit.AuditChain,
        idempotency_hash: KeyedHash,
        retention: timedelta = timedelta(days=7),
    ) -> None:
        self._db = db
        self._idempotency = idempotency_hash
        self.audit = audit_chain
        self._subjects = subject_sealer
        self._outcomes = outcome_sealer
        self._vault = vault
        self._clock = clock
        self.retention = retention

    def seal_subject(self, query_id: str, subject: Subject) -> bytes:
        return self._subjects.seal(subject.to_bytes(), query_id.encode())

    def open_subject(self, query_id: str, sealed: bytes) -> Subject:
        return Subject.from_bytes(self._subjects.open(sealed, query_id.encode()))

    def seal_cards(self, query_id: str, bank_code: str, cards: Sequence[MaskedCard]) -> bytes | None:
        if not cards:
            return None
        return self._outcomes.seal(cards_json(cards), f"{query_id}/{bank_code}".encode())

    def outcome_of(self, row: OutcomeColumns) -> BankOutcome:
        cards: tuple[MaskedCard, ...] = ()
        if row.cards_sealed:
            plain = self._outcomes.open(row.cards_sealed, f"{row.query_id}/{row.bank_code}".encode())
            cards = tuple(MaskedCard(**card) for card in json.loads(plain))
        return BankOutcome(bank_code=row.bank_code, kind=row.kind, cards=cards, detail=row.detail)

    @property
    def vault(self) -> ReportVault:
        return self._vault

    # --- acceptance -------------------------------------------------------------------------

    async def create(
        self,
        user_id: str,
        subject: Subject,
        bank_codes: Sequence[str],
        agreement_version: str,
        idempotency_key: str,
        trace_context: dict[str, str],
        *,
        lease_to: str | None = None,
        lease: timedelta = timedelta(seconds=30),
        work_changes: Channel | None = None,
    ) -> tuple[Query, bool]:
        """(the query, whether it is new). The same key from the same user returns its query.
        A new query, the work of running it and its audit entry are one transaction: once this
        returns, the query will be run whatever stops in between. With `lease_to`, that work
        is leased to that worker at once (its first pass, over every bank, starts now) instead
        of waiting to be claimed; without, `work_changes` wakes the workers to claim it."""
        banks = QueryRules.validate_create(user_id, subject, bank_codes, agreement_version)
        key = idempotency_key or None  # no key: every request is a new one (NULLs never collide)
        # Stored as its keyed hash under the current key; found under any key's (a rotation),
        # or in clear in a row stored before keys were hashed and not yet rewrapped.
        digests = self._idempotency.digests(key) if key is not None else ()
        now = self._clock.now()

        def by_key(connection: Connection) -> Any:
            if key is None:
                return None
            return _BY_KEY.run(connection, {"user_id": user_id, "digests": list(digests), "key": key}).first()

        # Core statements on a connection, without an ORM session (its set-up and tear-down
        # were a good part of the transaction's CPU).
        def accept(connection: Connection) -> tuple[Query, bool]:
            existing = by_key(connection)
            if existing is not None:
                return query_of(existing), False
            pending, last_report = _PENDING_AND_LAST_REPORT.run(connection, {"user_id": user_id}).one()
            if pending:
                # Read committed (PostgreSQL): a concurrent request with this key may have
                # committed between the two reads, and the pending query is then this one.
                existing = by_key(connection)
                if existing is not None:
                    return query_of(existing), False
                raise CardCheckError(Reason.QUERY_IN_PROGRESS, "another query of this user is pending")
            refusal = QueryRules.cooldown_error(as_utc(last_report) if last_report else None, now)
            if refusal is not None:
                raise refusal
            query_id = uuid.uuid4().hex
            query = Query(
                query_id=query_id,
                user_id=user_id,
                status=QueryStatus.PENDING,
                bank_codes=tuple(banks),
                agreement_version=agreement_version,
                submitted_at=now,
                ready_by=now + QueryRules.READY_WITHIN,
                ready_at=None,
                expires_at=None,
                banks_answered=0,
                banks_total=len(banks),
            )
            # Core inserts, not ORM objects: the same rows at a fraction of the cost. The
            # one-PENDING index speaks at the first, before the audit head is locked.
            _INSERT_QUERY.run(
                connection,
                {
                    "query_id": query_id,
                    "user_id": user_id,
                    "status": QueryStatus.PENDING,
                    "bank_codes": json.dumps(list(banks)),
                    "agreement_version": agreement_version,
                    "idempotency_key": digests[0] if digests else None,
                    "submitted_at": now,
                    "ready_by": query.ready_by,
                    "banks_total": len(banks),
                    "banks_answered": 0,
                    "subject_sealed": self.seal_subject(query_id, subject),
                    "trace_context": json.dumps(trace_context),
                },
            )
            _INSERT_WORK.run(
                connection,
                {
                    "query_id": query_id,
                    "kind": EXECUTE,
                    "due_at": now,
                    "lease_owner": lease_to,
                    "lease_expires_at": now + lease if lease_to else None,
                    "passes": 1 if lease_to else 0,
                    "created_at": now,
                },
            )
            events = [
                audit.AuditEvent(
                    audit.QUERY_ACCEPTED,
                    query_id,
                    user_id,
                    {"agreement_version": agreement_version, "banks": list(banks)},
                )
            ]
            if not lease_to and work_changes is not None:
                work_changes.announce(connection)
            if lease_to:
                events.append(
                    audit.AuditEvent(audit.BANKS_ASKED, query_id, user_id, {"banks": list(banks), "pass": 1})
                )
            self.audit.append(connection, events, now)
            return query, True

        try:
            return await self._db.write_core(accept)
        except IntegrityError:
            # A concurrent request won the race: the same key returns its query, anything else
            # is the one-PENDING-query-per-user rule, enforced by the unique index.
            existing = await self._db.read_core(by_key)
            if existing is not None:
                return query_of(existing), False
            raise CardCheckError(Reason.QUERY_IN_PROGRESS, "another query of this user is pending") from None

    # --- reading, for the user who owns the query -------------------------------------------

    async def get(self, user_id: str, query_id: str) -> Query:
        def find(connection: Connection) -> Any:
            return _QUERY_BY_ID.run(connection, {"query_id": query_id}).first()

        row = await self._db.read_core(find) if query_id else None
        if row is None or row.user_id != user_id or not user_id:
            raise CardCheckError(Reason.NOT_FOUND, "no such query")
        return query_of(row)

    async def list(self, user_id: str) -> list[Query]:
        def find(session: Session) -> list[QueryRow]:
            return list(
                session.exec(
                    select(QueryRow)
                    .where(QueryRow.user_id == user_id)
                    .order_by(col(QueryRow.submitted_at).desc(), col(QueryRow.query_id).desc())
                )
            )

        return [query_of(row) for row in await self._db.read(find)]

    async def snapshot(self, user_id: str, query_id: str) -> tuple[Query, builtins.list[BankOutcome]]:
        """The query and each bank's latest outcome so far, in the order first recorded, read
        together; without the cards (progress never shows them, so they stay sealed). Core
        rows: every watcher reads this on each change of its query."""

        def find(connection: Connection) -> tuple[Any, list[BankOutcome]]:
            row = _QUERY_BY_ID.run(connection, {"query_id": query_id}).first()
            outcomes = [
                BankOutcome(bank_code=bank_code, kind=kind, detail=detail)
                for bank_code, kind, detail in _PROGRESS.run(connection, {"query_id": query_id})
            ]
            return row, outcomes

        row, outcomes = await self._db.read_core(find) if query_id else (None, [])
        if row is None or row.user_id != user_id or not user_id:
            raise CardCheckError(Reason.NOT_FOUND, "no such query")
        return query_of(row), outcomes

    async def report(self, user_id: str, query_id: str) -> Report:
        """The report, opened; the view is in the audit trail before the report is returned.
        Read and audited in one transaction: the report seen is the one whose view is recorded
        (a sweep cannot come between), at the cost of one transaction, not two."""
        if not query_id or not user_id:
            raise CardCheckError(Reason.NOT_FOUND, "no such query")
        now = self._clock.now()

        def view(connection: Connection) -> Report:
            row = _QUERY_AND_REPORT.run(connection, {"query_id": query_id}).first()
            if row is None or row.user_id != user_id:
                raise CardCheckError(Reason.NOT_FOUND, "no such query")
            refusal = QueryRules.report_refusal(query_of(row), now)
            if refusal is not None:
                raise refusal
            if row.ciphertext is None:  # swept: the query row says EXPIRED once the sweep commits
                raise CardCheckError(Reason.REPORT_EXPIRED, "the report was kept its 7 days and deleted")
            content = self._vault.open(query_id, row.wrapped_key, row.ciphertext)
            self.audit.append(connection, [audit.AuditEvent(audit.REPORT_VIEWED, query_id, user_id)], now)
            return Report(query_id, as_utc(row.generated_at), as_utc(row.report_expires_at), content)

        return await self._db.write_core(view)

    # --- forgetting -------------------------------------------------------------------------

    async def audit_head(self) -> tuple[int, str] | None:
        return await self._db.read(lambda session: audit.read_head(session.connection()))

    async def sweep(self, batch: int = 500) -> builtins.list[str]:
        """Deletes every report past its expiry (wrapped data key and ciphertext together), marks
        its query EXPIRED, erases the sealed subject and the banks' sealed cards, and drops an SMS
        not yet sent. Returns the query_ids swept."""
        now = self._clock.now()

        def sweep(session: Session) -> list[str]:
            expired = list(
                session.exec(
                    select(QueryRow.query_id, QueryRow.user_id)
                    .where(QueryRow.status == QueryStatus.READY, col(QueryRow.expires_at) <= now)
                    .order_by(col(QueryRow.expires_at))
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
            )
            if not expired:
                return []
            ids = [query_id for query_id, _ in expired]
            if session.get_bind().dialect.name == "sqlite":
                # Deleted cells are overwritten with zeros instead of lingering in free pages.
                session.connection().exec_driver_sql("PRAGMA secure_delete = ON")
            session.execute(delete(ReportRow).where(col(ReportRow.query_id).in_(ids)))
            session.execute(delete(WorkRow).where(col(WorkRow.query_id).in_(ids)))
            session.execute(
                update(BankOutcomeRow).where(col(BankOutcomeRow.query_id).in_(ids)).values(cards_sealed=None)
            )
            session.execute(
                update(QueryRow)
                .where(col(QueryRow.query_id).in_(ids), col(QueryRow.status) == QueryStatus.READY)
                .values(status=QueryStatus.EXPIRED, subject_sealed=b"")
            )
            self.audit.append(
                session,
                [audit.AuditEvent(audit.REPORT_DELETED, query_id, user) for query_id, user in expired],
                now,
            )
            return ids

        swept: list[str] = []
        while True:
            ids = await self._db.write(sweep)
            swept.extend(ids)
            if len(ids) < batch:
                return swept
