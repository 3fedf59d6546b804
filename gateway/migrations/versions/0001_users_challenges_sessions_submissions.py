"""The gateway's first schema: users, SMS challenges and their throttles, sessions, submissions
(what create_all made before the schema moved to migrations).

A database made by create_all is adopted table by table: a table that exists is kept as it is,
a missing one is created (gw_sms_daily came later than the others, and create_all added it to
older databases the same way). Constraint and index names are spelled out; the primary and
unique keys carry the names PostgreSQL gave them under create_all, so an adopted database and a
fresh one agree on every name a later revision may need."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _instant(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _create(name: str, *elements: sa.schema.SchemaItem) -> bool:
    """Creates the table unless create_all made it earlier; says whether it created it."""
    if sa.inspect(op.get_bind()).has_table(name):
        return False
    op.create_table(name, *elements)
    return True


def upgrade() -> None:
    if _create(
        "gw_users",
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("phone_hash", sa.String(64), nullable=False),
        sa.Column("identity_sealed", sa.LargeBinary, nullable=False),
        sa.Column("region", sa.String(8), nullable=False),
        sa.Column("payment_password_hash", sa.String(255), nullable=False),
        sa.Column("bound_bank_code", sa.String(32), nullable=False),
        sa.Column("wrong_password_count", sa.Integer, nullable=False),
        _instant("locked_until", True),
        _instant("created_at"),
        sa.PrimaryKeyConstraint("user_id", name="gw_users_pkey"),
    ):
        op.create_index("ix_gw_users_id_hash", "gw_users", ["id_hash"], unique=True)
        op.create_index("ix_gw_users_phone_hash", "gw_users", ["phone_hash"], unique=True)

    if _create(
        "gw_sms_challenges",
        sa.Column("challenge_id", sa.String(32), nullable=False),
        sa.Column("phone_hash", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        _instant("created_at"),
        _instant("expires_at"),
        sa.Column("wrong_tries", sa.Integer, nullable=False),
        sa.Column("used", sa.Boolean, nullable=False),
        sa.Column("dead", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("challenge_id", name="gw_sms_challenges_pkey"),
    ):
        op.create_index("ix_gw_sms_challenges_phone_hash", "gw_sms_challenges", ["phone_hash"])

    _create(
        "gw_sms_throttle",
        sa.Column("phone_hash", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        _instant("last_sent_at"),
        sa.PrimaryKeyConstraint("phone_hash", "purpose", name="gw_sms_throttle_pkey"),
    )

    _create(
        "gw_sms_daily",
        sa.Column("phone_hash", sa.String(64), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("sent", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("phone_hash", name="gw_sms_daily_pkey"),
    )

    if _create(
        "gw_sessions",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        _instant("created_at"),
        _instant("expires_at"),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name="gw_sessions_pkey"),
    ):
        op.create_index("ix_gw_sessions_user_id", "gw_sessions", ["user_id"])

    _create(
        "gw_submissions",
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("query_id", sa.String(64), nullable=False),
        _instant("created_at"),
        sa.PrimaryKeyConstraint("user_id", "idempotency_key", name="gw_submissions_pkey"),
    )


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
