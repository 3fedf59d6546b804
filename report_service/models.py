"""The tables of report_service (prefix rs_). Personal data only sealed: the subject with the
"subject" key bound to its query_id, each report with its own data key wrapped by "report-kek"."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, Index, LargeBinary, String, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

PENDING = "PENDING"
READY = "READY"
FAILED = "FAILED"
EXPIRED = "EXPIRED"

_ONE_PENDING = text("status = 'PENDING'")


def _instant(nullable: bool = False) -> Column:
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
    idempotency_key: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    submitted_at: datetime = Field(sa_column=_instant())
    ready_by: datetime = Field(sa_column=_instant())
    ready_at: datetime | None = Field(default=None, sa_column=_instant(True))
    expires_at: datetime | None = Field(default=None, sa_column=_instant(True))
    banks_total: int = 0
    banks_answered: int = 0
    subject_sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    trace_context: str = Field(default="{}", sa_column=Column(Text, nullable=False))  # W3C headers, JSON
    report_ready_sms_sent: bool = False


class BankOutcomeRow(SQLModel, table=True):
    __tablename__ = "rs_bank_outcomes"
    __table_args__ = (UniqueConstraint("query_id", "bank_code", name="uq_rs_bank_outcomes_query_bank"),)

    id: int | None = Field(default=None, primary_key=True)
    query_id: str = Field(sa_column=Column(String(32), index=True, nullable=False))
    bank_code: str = Field(sa_column=Column(String(16), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    cards: str = Field(sa_column=Column(Text, nullable=False))  # JSON list of masked cards
    detail: str = Field(default="", sa_column=Column(Text, nullable=False))
    recorded_at: datetime = Field(sa_column=_instant())


class ReportRow(SQLModel, table=True):
    __tablename__ = "rs_reports"

    query_id: str = Field(sa_column=Column(String(32), primary_key=True))
    wrapped_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    generated_at: datetime = Field(sa_column=_instant())
    expires_at: datetime = Field(sa_column=_instant())


TABLES = [QueryRow, BankOutcomeRow, ReportRow]
