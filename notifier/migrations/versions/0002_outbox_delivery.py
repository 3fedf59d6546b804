"""The outbox: what the delivery worker needs to retry a message with backoff under a lease,
and to keep its text sealed outside the sandbox (all columns nullable, nothing to backfill:
a QUEUED message without next_attempt_at is due now).

Before migrations the notifier added these columns itself at start to a first-release table,
and create_all made them in a table it created; so a database adopted by 0001 may have all,
some or none of them. Each column and index is added only when missing, which brings every
one of those databases to the same shape."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

TABLE = "nt_messages"


def _instant(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


COLUMNS = (
    sa.Column("body_sealed", sa.LargeBinary, nullable=True),
    sa.Column("body_digest", sa.String(64), nullable=True),
    _instant("next_attempt_at"),
    _instant("last_attempt_at"),
    _instant("retry_until"),
    sa.Column("last_error", sa.String(40), nullable=True),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    _instant("lease_until"),
    sa.Column("trace_context", sa.Text, nullable=True),
)

INDEXES = (
    ("ix_nt_messages_due", ["status", "next_attempt_at"]),
    ("ix_nt_messages_phone_kind", ["phone_hash", "kind", "created_at"]),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = {c["name"] for c in inspector.get_columns(TABLE)}
    for column in COLUMNS:
        if column.name not in existing:
            op.add_column(TABLE, column)
    indexes = {i["name"] for i in inspector.get_indexes(TABLE)}
    for name, columns in INDEXES:
        if name not in indexes:
            op.create_index(name, TABLE, columns)


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
