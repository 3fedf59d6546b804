"""gw_submissions holds a keyed hash of each idempotency key (key_hash) instead of the key, and
an index on created_at for the housekeeping that deletes rows once their query can no longer
have a report (gateway/submissions.py).

A migration holds no key, so the keys stored in clear cannot be hashed here: the rows holding
them are deleted with the old table. Nothing is lost that matters: a submission row only lets a
client's retry of SubmitQuery return its query without the SMS code and face again, and retries
come within minutes; report_service keeps its own record of each user's keys, so a query is
never created twice for one key."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.drop_table("gw_submissions")
    op.create_table(
        "gw_submissions",
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("query_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "key_hash", name="gw_submissions_pkey"),
    )
    op.create_index("ix_gw_submissions_created_at", "gw_submissions", ["created_at"])


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
