"""Durable execution and the audit trail.

- rs_work: the work a query still needs (EXECUTE: ask the missing banks, finish; NOTIFY: the
  "report ready" SMS), committed with what made it necessary and claimed by workers with a lease.
  Queries left PENDING, and READY ones whose SMS the notifier had not accepted, get their work
  row here; the report_ready_sms_sent flag it replaces goes.
- banks_answered now counts the banks that ANSWERED (a failed bank is asked again later).
- Each bank's masked cards are kept sealed (cards_sealed) instead of as clear JSON. A migration
  holds no keys, so the clear copies go: a PENDING query's outcomes are deleted (its banks are
  asked again), a finished query keeps only the outcome kinds (its report has the cards, sealed).
- rs_audit + rs_audit_head: the hash-chained audit trail and the row that serializes appends."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

GENESIS = "0" * 64


def _instant(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "rs_work",
        sa.Column("query_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        _instant("due_at"),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        _instant("lease_expires_at", True),
        sa.Column("passes", sa.Integer, nullable=False),
        _instant("created_at"),
        sa.PrimaryKeyConstraint("query_id", "kind", name="pk_rs_work"),
    )
    op.create_index("ix_rs_work_due_at", "rs_work", ["due_at"])
    op.execute(
        "INSERT INTO rs_work (query_id, kind, due_at, passes, created_at) "
        "SELECT query_id, 'EXECUTE', submitted_at, 0, submitted_at FROM rs_queries WHERE status = 'PENDING'"
    )
    op.execute(
        "INSERT INTO rs_work (query_id, kind, due_at, passes, created_at) "
        "SELECT query_id, 'NOTIFY', ready_at, 0, ready_at FROM rs_queries "
        "WHERE status = 'READY' AND NOT report_ready_sms_sent"
    )
    op.drop_column("rs_queries", "report_ready_sms_sent")
    op.execute(
        "DELETE FROM rs_bank_outcomes WHERE query_id IN (SELECT query_id FROM rs_queries WHERE status = 'PENDING')"
    )
    op.execute("UPDATE rs_queries SET banks_answered = 0 WHERE status = 'PENDING'")
    op.add_column("rs_bank_outcomes", sa.Column("cards_sealed", sa.LargeBinary, nullable=True))
    op.drop_column("rs_bank_outcomes", "cards")

    op.create_table(
        "rs_audit",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        _instant("recorded_at"),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("query_id", sa.String(32), nullable=True),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_rs_audit_query_id", "rs_audit", ["query_id"])
    head = op.create_table(
        "rs_audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS}])


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
