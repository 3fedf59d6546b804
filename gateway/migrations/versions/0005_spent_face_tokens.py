"""gw_face_tokens: the face-verification tokens already used (a keyed hash of each), so that a
vendor's result is accepted once over every gateway replica (gateway/face_tokens.py)."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "gw_face_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("spent_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name="gw_face_tokens_pkey"),
    )
    op.create_index("ix_gw_face_tokens_spent_at", "gw_face_tokens", ["spent_at"])


def downgrade() -> None:
    op.drop_table("gw_face_tokens")
