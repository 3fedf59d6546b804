"""The first schema: queries, each bank's outcome, sealed reports (what create_all made before
the schema moved to migrations; a database made that way is adopted as it is)."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _instant(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("rs_queries"):
        return  # made by create_all before migrations: the same tables, adopted
    op.create_table(
        "rs_queries",
        sa.Column("query_id", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("bank_codes", sa.Text, nullable=False),
        sa.Column("agreement_version", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        _instant("submitted_at"),
        _instant("ready_by"),
        _instant("ready_at", True),
        _instant("expires_at", True),
        sa.Column("banks_total", sa.Integer, nullable=False),
        sa.Column("banks_answered", sa.Integer, nullable=False),
        sa.Column("subject_sealed", sa.LargeBinary, nullable=False),
        sa.Column("trace_context", sa.Text, nullable=False),
        sa.Column("report_ready_sms_sent", sa.Boolean, nullable=False),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_rs_queries_user_idempotency_key"),
    )
    op.create_index("ix_rs_queries_user_id", "rs_queries", ["user_id"])
    op.create_index("ix_rs_queries_status", "rs_queries", ["status"])
    one_pending = sa.text("status = 'PENDING'")
    op.create_index(
        "ix_rs_queries_one_pending_per_user",
        "rs_queries",
        ["user_id"],
        unique=True,
        sqlite_where=one_pending,
        postgresql_where=one_pending,
    )
    op.create_table(
        "rs_bank_outcomes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("query_id", sa.String(32), nullable=False),
        sa.Column("bank_code", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("cards", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        _instant("recorded_at"),
        sa.UniqueConstraint("query_id", "bank_code", name="uq_rs_bank_outcomes_query_bank"),
    )
    op.create_index("ix_rs_bank_outcomes_query_id", "rs_bank_outcomes", ["query_id"])
    op.create_table(
        "rs_reports",
        sa.Column("query_id", sa.String(32), primary_key=True),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        _instant("generated_at"),
        _instant("expires_at"),
    )


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
