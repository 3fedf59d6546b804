"""Anonymous SMS codes get budgets of their own (gateway/challenges.py): gw_sms_escalation holds
each caller's escalating cooldown per phone and when it last verified one of the phone's codes.

Existing rows are adopted as they are. gw_sms_daily keeps its shape; from now on it counts only
anonymous codes (REGISTER, SIGN_IN), where it counted every purpose before: a phone's count for
the day of the upgrade may include QUERY_AUTH codes, so strangers may get fewer codes for that
phone until China's next midnight, when every count starts again. That errs on the side the cap
is there for; clearing the counts instead would hand every phone a second day's budget at the
upgrade. No caller has an escalation or a proof of the phone yet, so the ladder starts at its
first step for everyone and the daily reserve waits for a caller's next verification."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def _instant(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def upgrade() -> None:
    op.create_table(
        "gw_sms_escalation",
        sa.Column("phone_hash", sa.String(64), nullable=False),
        sa.Column("caller_hash", sa.String(64), nullable=False),
        sa.Column("streak", sa.Integer, nullable=False),
        _instant("last_sent_at"),
        _instant("next_at"),
        _instant("verified_at"),
        sa.PrimaryKeyConstraint("phone_hash", "caller_hash", name="gw_sms_escalation_pkey"),
    )


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
