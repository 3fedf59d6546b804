"""The gateway's and the notifier's schemas by migrations (cardcheck.runtime.migrations), on
SQLite and PostgreSQL: a fresh database reaches head matching the models, a database made by
the create_all code that came before is adopted with its rows, replicas upgrading together
do not trip over each other."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.migrations import (
    current_revision,
    head_revision,
    schema_drift,
    upgrade_to_head,
    version_table,
)
from cardcheck.runtime.settings import Settings
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from gateway.challenges import ChallengeRow, SmsDailyRow, SmsEscalationRow, SmsThrottleRow
from gateway.face_tokens import SpentFaceTokenRow
from gateway.sessions import SessionRow
from gateway.submissions import SubmissionRow
from gateway.users import UserRow
from notifier.messages import MessageRow
from tests.harness.settings import settings_for

GATEWAY_MODELS = (
    UserRow, ChallengeRow, SmsThrottleRow, SmsDailyRow, SmsEscalationRow, SessionRow, SubmissionRow,
    SpentFaceTokenRow,
)
GATEWAY_TABLES = tuple(m.__tablename__ for m in GATEWAY_MODELS)
NOTIFIER_TABLES = ("nt_messages",)
# What the notifier's first release had; the rest of nt_messages came with the outbox.
FIRST_RELEASE_COLUMNS = (
    "seq", "message_id", "idempotency_key", "phone_hash", "phone_sealed", "kind", "template",
    "body", "status", "attempts", "created_at", "delivered_at",
)  # fmt: skip
NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
PHONE = "13812345678"

SERVICES = {
    "gateway": ("gateway.migrations", GATEWAY_TABLES, "0005"),
    "notifier": ("notifier.migrations", NOTIFIER_TABLES, "0003"),
}


def _engine(tmp_path: Path, database_url: str | None, service: str) -> sa.Engine:
    return make_engine(database_url, tmp_path, service)


def _count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_fresh_database_is_migrated_to_head_matching_the_models(tmp_path, database_url, service):
    migrations, tables, head = SERVICES[service]
    engine = _engine(tmp_path, database_url, service)
    try:
        assert current_revision(engine, service) is None
        assert upgrade_to_head(engine, migrations, service) == head_revision(migrations) == head
        assert set(tables) | {version_table(service)} <= set(sa.inspect(engine).get_table_names())
        assert schema_drift(engine, SQLModel.metadata, tables) == []
        assert upgrade_to_head(engine, migrations, service) == head  # at head: nothing to do
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT version_num FROM {version_table(service)}")).all() == [
                (head,)
            ]
    finally:
        engine.dispose()


def _gateway_rows(conn: sa.Connection, *, daily: bool) -> None:
    conn.execute(
        sa.insert(UserRow.__table__).values(
            user_id="u-1",
            id_hash="i" * 64,
            phone_hash="p" * 64,
            identity_sealed=b"\x01sealed",
            region="CN-31",
            payment_password_hash="scrypt$x",
            bound_bank_code="ICBC",
            wrong_password_count=2,
            locked_until=None,
            created_at=NOW,
        )
    )
    conn.execute(
        sa.insert(ChallengeRow.__table__).values(
            challenge_id="c" * 32,
            phone_hash="p" * 64,
            purpose="REGISTER",
            code_hash="h" * 64,
            created_at=NOW,
            expires_at=NOW + timedelta(minutes=5),
            wrong_tries=1,
            used=False,
            dead=False,
        )
    )
    conn.execute(
        sa.insert(SmsThrottleRow.__table__).values(phone_hash="p" * 64, purpose="REGISTER", last_sent_at=NOW)
    )
    if daily:
        conn.execute(sa.insert(SmsDailyRow.__table__).values(phone_hash="p" * 64, day="2026-03-02", sent=3))
    conn.execute(
        sa.insert(SessionRow.__table__).values(
            token_hash="t" * 64,
            user_id="u-1",
            created_at=NOW,
            expires_at=NOW + timedelta(hours=1),
            revoked=False,
        )
    )
    conn.execute(
        sa.insert(_first_submissions_table()).values(
            user_id="u-1", idempotency_key="k-1", query_id="q" * 32, created_at=NOW
        )
    )


def _first_submissions_table() -> sa.Table:
    """gw_submissions as create_all and revision 0001 made it: the idempotency key in clear."""
    return sa.Table(
        "gw_submissions",
        sa.MetaData(),
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("idempotency_key", sa.String(128), primary_key=True),
        sa.Column("query_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


@pytest.mark.parametrize("before_daily_cap", [False, True], ids=["current", "before-daily-cap"])
def test_a_gateway_database_made_by_create_all_is_adopted_with_its_rows(
    tmp_path, database_url, before_daily_cap
):
    """What `db.create_tables` made before migrations; also one from before gw_sms_daily existed
    (create_all added new tables to old databases, so 0001 creates what is missing)."""
    models = [
        m for m in GATEWAY_MODELS
        if m not in (SmsEscalationRow, SubmissionRow, SpentFaceTokenRow) and not (before_daily_cap and m is SmsDailyRow)
    ]
    engine = _engine(tmp_path, database_url, "gateway")
    try:
        Database(engine).create_tables(models)
        _first_submissions_table().create(engine)
        with engine.begin() as conn:
            _gateway_rows(conn, daily=not before_daily_cap)
        assert current_revision(engine, "gateway") is None

        assert upgrade_to_head(engine, "gateway.migrations", "gateway") == "0005"
        assert current_revision(engine, "gateway") == "0005"
        assert schema_drift(engine, SQLModel.metadata, GATEWAY_TABLES) == []
        with engine.connect() as conn:
            user = conn.execute(sa.select(UserRow.__table__)).one()
            assert (user.user_id, user.id_hash, user.identity_sealed, user.wrong_password_count) == (
                "u-1",
                "i" * 64,
                b"\x01sealed",
                2,
            )
            # Keys in clear cannot be hashed without the key: 0004 drops those submissions.
            assert conn.execute(sa.select(sa.func.count()).select_from(SubmissionRow.__table__)).scalar_one() == 0
        for table in ("gw_sms_challenges", "gw_sms_throttle", "gw_sessions"):
            assert _count(engine, table) == 1
        assert _count(engine, "gw_sms_daily") == (0 if before_daily_cap else 1)
        assert _count(engine, "gw_sms_escalation") == 0
        # The unique keys still hold after adoption.
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.insert(UserRow.__table__).values(
                    user_id="u-2",
                    id_hash="i" * 64,
                    phone_hash="x" * 64,
                    identity_sealed=b"",
                    region="CN-31",
                    payment_password_hash="",
                    bound_bank_code="ICBC",
                    wrong_password_count=0,
                    created_at=NOW,
                )
            )
    finally:
        engine.dispose()


async def test_a_gateway_database_at_0001_keeps_its_daily_counts_as_anonymous_ones(tmp_path, database_url):
    """0002 adopts the day's counts of gw_sms_daily (every purpose until then) as the anonymous
    counts they are from now on, so a phone that had its codes today still waits for midnight."""
    from gateway.challenges import Challenges

    engine = _engine(tmp_path, database_url, "gateway")
    try:
        upgrade_to_head(engine, "gateway.migrations", "gateway", target="0001")
        assert current_revision(engine, "gateway") == "0001"
        assert not sa.inspect(engine).has_table("gw_sms_escalation")
        keyring = Keyring(load_master_key(None, tmp_path))
        phone_hash = keyring.hasher("phone").digest(PHONE)
        with engine.begin() as conn:
            conn.execute(sa.insert(SmsDailyRow.__table__).values(phone_hash=phone_hash, day="2026-03-02", sent=8))
        assert upgrade_to_head(engine, "gateway.migrations", "gateway") == "0005"
        assert schema_drift(engine, SQLModel.metadata, GATEWAY_TABLES) == []
        db = Database(engine)
        challenges = Challenges(db, keyring, ManualClock(NOW))  # 16:00 in China, the same day
        with pytest.raises(CardCheckError) as caught:
            await challenges.issue(phone_hash, "SIGN_IN", "caller")
        assert caught.value.metadata["limit"] == "phone_daily"
        await challenges.issue(phone_hash, "QUERY_AUTH")  # not counted against the owner's codes
    finally:
        engine.dispose()


def _old_notifier_table(*, first_release: bool) -> sa.Table:
    """nt_messages as create_all made it: the current model, or the first release's (the
    current model minus the columns and indexes the outbox added)."""
    metadata = sa.MetaData()
    table = MessageRow.__table__.to_metadata(metadata)
    if first_release:
        for column in [c for c in table.columns if c.name not in FIRST_RELEASE_COLUMNS]:
            table._columns.remove(column)
        for index in [i for i in table.indexes if i.name != "ix_nt_messages_phone_hash"]:
            table.indexes.discard(index)
    return table


def _settings(tmp_path: Path, database_url: str | None) -> Settings:
    return settings_for(tmp_path, database_url, sandbox=True, addresses={"notifier": "127.0.0.1:0"})


@pytest.mark.parametrize("first_release", [True, False], ids=["first-release", "current"])
async def test_a_notifier_database_made_by_create_all_is_adopted_and_its_inbox_served(
    tmp_path, database_url, first_release
):
    """A sandbox inbox message recorded by the old code survives the upgrade that starting the
    notifier runs, and the notifier serves it next to a new one."""
    from notifier.app import build

    engine = _engine(tmp_path, database_url, "notifier")
    keyring = Keyring(load_master_key(None, tmp_path))
    table = _old_notifier_table(first_release=first_release)
    message_id = "m" * 32
    try:
        table.metadata.create_all(engine)
        columns = {c["name"] for c in sa.inspect(engine).get_columns("nt_messages")}
        assert ("lease_owner" in columns) is not first_release
        with engine.begin() as conn:
            conn.execute(
                table.insert().values(
                    message_id=message_id,
                    idempotency_key="old-key",
                    phone_hash=keyring.hasher("phone").digest(PHONE),
                    phone_sealed=keyring.sealer("notifier-phone").seal(PHONE.encode(), message_id.encode()),
                    kind="SMS_CODE",
                    template="sms_code.v1",
                    body="Your code is 111111",
                    status="DELIVERED",
                    attempts=1,
                    created_at=NOW,
                    delivered_at=NOW,
                )
            )
    finally:
        engine.dispose()

    host = await build(_settings(tmp_path, database_url), clock=ManualClock(NOW + timedelta(hours=1)))
    port = await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = notifier_pb2_grpc.NotifierStub(channel)
        await stub.Send(
            notifier_pb2.SendRequest(
                phone=PHONE,
                kind=notifier_pb2.MESSAGE_KIND_SMS_CODE,
                params={"code": "222222", "purpose": "REGISTER"},
                idempotency_key="new-key",
            )
        )
        listed = await stub.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))
        assert [m.body for m in listed.messages][-1] == "Your code is 111111"
        assert [m.message_id for m in listed.messages].count(message_id) == 1
        assert len(listed.messages) == 2
    finally:
        await channel.close()
        await host.stop(0)

    engine = _engine(tmp_path, database_url, "notifier")
    try:
        assert current_revision(engine, "notifier") == "0003"
        assert schema_drift(engine, SQLModel.metadata, NOTIFIER_TABLES) == []
        assert _count(engine, "nt_messages") == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_replicas_upgrading_together_migrate_once(tmp_path, pg_schema_url, service):
    """Engines of four replicas upgrade one fresh PostgreSQL schema at the same moment: the
    advisory lock queues them, the first migrates, the others find it at head; none fails."""
    migrations, tables, head = SERVICES[service]
    engines = [_engine(tmp_path, pg_schema_url, service) for _ in range(4)]
    start = threading.Barrier(len(engines))
    results: list[object] = [None] * len(engines)

    def upgrade(i: int) -> None:
        start.wait()
        try:
            results[i] = upgrade_to_head(engines[i], migrations, service)
        except Exception as error:  # reported below
            results[i] = error

    threads = [threading.Thread(target=upgrade, args=(i,)) for i in range(len(engines))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == [head] * len(engines)
        with engines[0].connect() as conn:
            assert conn.execute(sa.text(f"SELECT count(*) FROM {version_table(service)}")).scalar() == 1
        assert schema_drift(engines[0], SQLModel.metadata, tables) == []
    finally:
        for engine in engines:
            engine.dispose()


async def test_the_gateway_migrates_its_database_when_it_builds(tmp_path):
    """build() (what `python -m gateway` runs) leaves the database at head."""
    from gateway.app import build

    settings = _settings(tmp_path, None).replace(
        addresses={**Settings.from_env({}).addresses, "gateway": "127.0.0.1:0"}
    )
    host = await build(settings)
    await host.start()
    await host.stop(0)
    engine = _engine(tmp_path, None, "gateway")
    try:
        assert current_revision(engine, "gateway") == head_revision("gateway.migrations") == "0005"
    finally:
        engine.dispose()
