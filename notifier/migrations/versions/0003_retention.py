"""Messages are kept for a retention period and then deleted: an index on created_at lets the
sweep find the old ones without reading the whole table. A database that create_all made from
this release's models already has it."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

TABLE = "nt_messages"
INDEX = "ix_nt_messages_created"


def upgrade() -> None:
    if INDEX not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes(TABLE)}:
        op.create_index(INDEX, TABLE, ["created_at"])


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
