"""The payment password's escalating lockout: how many times it has locked since the last right
password, and whether only a reset by SMS and face check unlocks it (gateway/users.py). Existing
rows start with no locks. A database that create_all made from this release's models already
has both columns."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

TABLE = "gw_users"
COLUMNS = (
    sa.Column("payment_password_locks", sa.Integer, nullable=False, server_default="0"),
    sa.Column("payment_password_reset_required", sa.Boolean, nullable=False, server_default=sa.false()),
)


def upgrade() -> None:
    existing = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(TABLE)}
    for column in COLUMNS:
        if column.name not in existing:
            op.add_column(TABLE, column)


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
