"""Idempotency keys are stored as keyed hashes (report_service/queries.py): rs_queries gains
idempotency_key_in_clear, which marks the rows whose idempotency_key is still the client's key.

A migration holds no key, so it cannot hash the keys already stored: it marks them instead. The
service finds a marked row by the key itself (a retry sent across the upgrade still returns its
query) and new rows by the hash; `python -m report_service.rewrap` replaces each marked key with
its hash and clears the mark. The keys are not dropped: a query's record of its key is what
keeps a user's retry from creating a second query, and they would be dropped blind."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column(
        "rs_queries",
        sa.Column("idempotency_key_in_clear", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.execute("UPDATE rs_queries SET idempotency_key_in_clear = TRUE WHERE idempotency_key IS NOT NULL")


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
