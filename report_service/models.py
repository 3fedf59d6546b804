"""The tables of report_service (prefix rs_), as the migrations in report_service/migrations make
them (a test keeps the two in step). Personal data only sealed: the subject with the "subject"
key bound to its query_id, the banks' masked cards with "bank-outcome" bound to query and bank,
each report with its own data key wrapped by "report-kek"; the audit trail holds opaque ids,
bank codes and outcome kinds only, never what a report says (it outlives the report)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlmodel import Field, SQLModel

from cardcheck.runtime.database import table_of


class QueryStatus(StrEnum):
    """A query's status, stored as these strings (rs_queries.status)."""

    PENDING = "PENDING"  # accepted; banks still being asked
    READY = "READY"  # the report is sealed and can be read
    FAILED = "FAILED"  # no bank answered by ready_by: no report
    EXPIRED = "EXPIRED"  # the report was kept its 7 days and deleted


EXECUTE = "EXECUTE"  # work: ask the banks still missing, finish the query when it is time
NOTIFY = "NOTIFY"  # work: have the notifier accept the "report ready" SMS

_ONE_PENDING = text("status = 'PENDING'")


def _instant(nullable: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=nullable)


class QueryRow(SQLModel, table=True):
    __tablename__ = "rs_queries"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_rs_queries_user_idempotency_key"),
        # The database, not a read-then-write, is what keeps a user to one PENDING query.
        Index(
            "ix_rs_queries_one_pending_per_user",
            "user_id",
            unique=True,
            sqlite_where=_ONE_PENDING,
            postgresql_where=_ONE_PENDING,
        ),
    )

    query_id: str = Field(sa_column=Column(String(32), primary_key=True))
    user_id: str = Field(sa_column=Column(String(64), index=True, nullable=False))
    status: str = Field(sa_column=Column(String(16), index=True, nullable=False))
    bank_codes: str = Field(sa_column=Column(Text, nullable=False))  # JSON list
    agreement_version: str = Field(sa_column=Column(String(64), nullable=False))
    # The client's idempotency key as its keyed hash (HMAC-SHA256 under the "idempotency-key"
    # subkey, hex); in clear only in rows stored before keys were hashed, marked by
    # idempotency_key_in_clear, until `python -m report_service.rewrap` hashes them.
    idempotency_key: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    idempotency_key_in_clear: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    submitted_at: datetime = Field(sa_column=_instant())
    ready_by: datetime = Field(sa_column=_instant())
    ready_at: datetime | None = Field(default=None, sa_column=_instant(True))
    expires_at: datetime | None = Field(default=None, sa_column=_instant(True))
    banks_total: int = 0
    banks_answered: int = 0  # banks whose outcome is ANSWERED
    subject_sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # b"" once erased
    trace_context: str = Field(default="{}", sa_column=Column(Text, nullable=False))  # W3C headers, JSON


class BankOutcomeRow(SQLModel, table=True):
    """Each bank's latest outcome for a query: ANSWERED is final, anything else is replaced
    when a later pass asks that bank again."""

    __tablename__ = "rs_bank_outcomes"
    __table_args__ = (UniqueConstraint("query_id", "bank_code", name="uq_rs_bank_outcomes_query_bank"),)

    id: int | None = Field(default=None, primary_key=True)
    query_id: str = Field(sa_column=Column(String(32), index=True, nullable=False))
    bank_code: str = Field(sa_column=Column(String(16), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    # The masked cards (JSON) sealed with the "bank-outcome" key bound to query and bank; erased
    # (NULL) with the report when it expires.
    cards_sealed: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    detail: str = Field(default="", sa_column=Column(Text, nullable=False))
    recorded_at: datetime = Field(sa_column=_instant())


class ReportRow(SQLModel, table=True):
    __tablename__ = "rs_reports"

    query_id: str = Field(sa_column=Column(String(32), primary_key=True))
    wrapped_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    generated_at: datetime = Field(sa_column=_instant())
    expires_at: datetime = Field(sa_column=_instant())


class WorkRow(SQLModel, table=True):
    """Work still to do for a query, committed with what made it necessary (the query's
    acceptance, its report). A worker claims a row by taking its lease; the row is deleted
    when the work is done."""

    __tablename__ = "rs_work"
    __table_args__ = (
        PrimaryKeyConstraint("query_id", "kind", name="pk_rs_work"),
        Index("ix_rs_work_due_at", "due_at"),
    )

    query_id: str = Field(sa_column=Column(String(32), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))  # EXECUTE or NOTIFY
    due_at: datetime = Field(sa_column=_instant())  # not claimed before (the backoff of a retry)
    lease_owner: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    lease_expires_at: datetime | None = Field(default=None, sa_column=_instant(True))
    passes: int = 0  # how often it was claimed
    created_at: datetime = Field(sa_column=_instant())


class AuditRow(SQLModel, table=True):
    """One event of the audit trail; `hash` = HMAC-SHA256 under the chain's key of (previous hash
    || canonical entry), see report_service.audit."""

    __tablename__ = "rs_audit"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    recorded_at: datetime = Field(sa_column=_instant())
    event: str = Field(sa_column=Column(String(32), nullable=False))
    query_id: str | None = Field(default=None, sa_column=Column(String(32), index=True, nullable=True))
    user_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))  # opaque
    details: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON
    prev_hash: str = Field(sa_column=Column(String(64), nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))


class AuditHeadRow(SQLModel, table=True):
    """The one row (id 1) naming the last entry: the lock that serializes appends, and what
    shows a deleted last entry."""

    __tablename__ = "rs_audit_head"

    id: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))


TABLES: list[type[SQLModel]] = [QueryRow, BankOutcomeRow, ReportRow, WorkRow, AuditRow, AuditHeadRow]
TABLE_NAMES = [table_of(model).name for model in TABLES]
