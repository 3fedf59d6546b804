"""The notifier's first schema: nt_messages as the first release's create_all made it (each
SMS recorded once per idempotency key; the sandbox inbox).

A database made by create_all, of any release, already has nt_messages: it is adopted as it
is, and 0002 brings it up to date. Constraint and index names are spelled out; the primary and
unique keys carry the names PostgreSQL gave them under create_all, so an adopted database and a
fresh one agree on every name a later revision may need."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("nt_messages"):
        return  # made by create_all before migrations: adopted
    op.create_table(
        "nt_messages",
        sa.Column("seq", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("message_id", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("phone_hash", sa.String(64), nullable=False),
        sa.Column("phone_sealed", sa.LargeBinary, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("template", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="nt_messages_pkey"),
        sa.UniqueConstraint("message_id", name="nt_messages_message_id_key"),
        sa.UniqueConstraint("idempotency_key", name="nt_messages_idempotency_key_key"),
    )
    op.create_index("ix_nt_messages_phone_hash", "nt_messages", ["phone_hash"])


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
