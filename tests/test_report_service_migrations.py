"""Schema by migrations: cardcheck.runtime.migrations and report_service's revisions, on SQLite
and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from cardcheck.runtime.database import make_engine
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.migrations import (
    current_revision,
    head_revision,
    schema_drift,
    upgrade_to_head,
    version_table,
)
from cardcheck.v1 import common_pb2
from report_service.app import MIGRATIONS
from report_service.models import TABLE_NAMES
from report_service.queries import Subject
from tests.harness.processes import ServiceProcess
from tests.harness.report_service import PHONE, SUBJECT, USER, Rig, status_is
from tests.harness.waiting import eventually

SERVICE = "report_service"


def _engine(tmp_path: Path, database_url: str | None) -> sa.Engine:
    return make_engine(database_url, tmp_path, SERVICE)


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_a_fresh_database_is_migrated_to_head_matching_the_models(tmp_path, database_url):
    engine = _engine(tmp_path, database_url)
    try:
        assert current_revision(engine, SERVICE) is None
        assert upgrade_to_head(engine, MIGRATIONS, SERVICE) == head_revision(MIGRATIONS) == "0003"
        assert set(TABLE_NAMES) | {version_table(SERVICE)} <= _tables(engine)
        assert version_table(SERVICE) == "alembic_version_report_service"
        # The hand-written revisions and the models describe the same schema.
        assert schema_drift(engine, SQLModel.metadata, TABLE_NAMES) == []
        # Idempotent: at head nothing changes.
        assert upgrade_to_head(engine, MIGRATIONS, SERVICE) == "0003"
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT version_num FROM {version_table(SERVICE)}")).all() == [
                ("0003",)
            ]
    finally:
        engine.dispose()


def test_drift_between_models_and_migrations_is_found(tmp_path):
    engine = _engine(tmp_path, None)
    try:
        upgrade_to_head(engine, MIGRATIONS, SERVICE)
        metadata = sa.MetaData()
        for name in TABLE_NAMES:
            SQLModel.metadata.tables[name].to_metadata(metadata)
        metadata.tables["rs_work"].append_column(sa.Column("extra", sa.Integer, nullable=True))
        drift = schema_drift(engine, metadata, TABLE_NAMES)
        assert [d[0] for d in drift] == ["add_column"] and drift[0][3].name == "extra"
    finally:
        engine.dispose()


def test_replicas_starting_together_migrate_once(tmp_path, database_url):
    """Four processes' worth of engines upgrade one fresh database at the same moment: the
    advisory lock (PostgreSQL) or the exclusive transaction (SQLite) lets one migrate and the
    others find the schema at head."""
    engines = [_engine(tmp_path, database_url) for _ in range(4)]
    start = threading.Barrier(len(engines))
    results: list[object] = [None] * len(engines)

    def upgrade(i: int) -> None:
        start.wait()
        try:
            results[i] = upgrade_to_head(engines[i], MIGRATIONS, SERVICE)
        except Exception as error:  # reported below
            results[i] = error

    threads = [threading.Thread(target=upgrade, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert results == ["0003"] * len(engines)
        with engines[0].connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version_report_service")).scalar() == 1
            assert conn.execute(sa.text("SELECT seq, hash FROM rs_audit_head")).all() == [(0, "0" * 64)]
    finally:
        for engine in engines:
            engine.dispose()


def test_each_service_keeps_its_own_version_table(tmp_path, database_url):
    """The helper as another service would use it (a directory of revisions), on the same
    database as report_service: neither sees the other's revision."""
    versions = tmp_path / "othermigrations" / "versions"
    versions.mkdir(parents=True)
    (versions / "0001_things.py").write_text(
        '"""Things."""\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        'revision = "a1"\ndown_revision = None\n\n\n'
        "def upgrade():\n"
        '    op.create_table("zz_things", sa.Column("id", sa.Integer, primary_key=True))\n'
    )
    engine = _engine(tmp_path, database_url)
    try:
        assert upgrade_to_head(engine, MIGRATIONS, SERVICE) == "0003"
        assert upgrade_to_head(engine, tmp_path / "othermigrations", "other") == "a1"
        assert current_revision(engine, "other") == "a1"
        assert current_revision(engine, SERVICE) == "0003"
        assert {"zz_things", "alembic_version_other", "alembic_version_report_service"} <= _tables(engine)
    finally:
        engine.dispose()


def test_unknown_migrations_are_refused(tmp_path):
    engine = _engine(tmp_path, None)
    try:
        with pytest.raises(ValueError, match="no migrations package"):
            upgrade_to_head(engine, "no_such_service.migrations", "x")
        with pytest.raises(ValueError, match="versions"):
            upgrade_to_head(engine, tmp_path, "x")
    finally:
        engine.dispose()


async def test_a_database_made_before_migrations_is_adopted_and_its_queries_carried_on(
    tmp_path, database_url
):
    """What the walking skeleton's create_all left behind (revision 0001's tables, no version
    table): a PENDING query with a bank recorded in clear, a READY one whose SMS was never
    accepted. Starting report_service adopts it, upgrades it, and finishes both."""
    engine = _engine(tmp_path, database_url)
    upgrade_to_head(engine, MIGRATIONS, SERVICE, target="0001")
    now = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    keyring = Keyring(load_master_key(None, tmp_path))
    subject = Subject(SUBJECT.name, SUBJECT.id_number, SUBJECT.phone).to_bytes()
    queries = sa.table(
        "rs_queries",
        *(sa.column(c) for c in ("query_id", "user_id", "status", "bank_codes", "agreement_version")),
        *(sa.column(c) for c in ("idempotency_key", "submitted_at", "ready_by", "ready_at", "expires_at")),
        *(sa.column(c) for c in ("banks_total", "banks_answered", "subject_sealed", "trace_context")),
        sa.column("report_ready_sms_sent"),
    )
    outcomes = sa.table(
        "rs_bank_outcomes",
        *(sa.column(c) for c in ("query_id", "bank_code", "kind", "cards")),
        sa.column("detail"),
        sa.column("recorded_at"),
    )
    pending, ready = "a" * 32, "b" * 32
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {version_table(SERVICE)}"))
        for query_id, user, status in ((pending, USER, "PENDING"), (ready, "u-old", "READY")):
            conn.execute(
                queries.insert().values(
                    query_id=query_id,
                    user_id=user,
                    status=status,
                    bank_codes=json.dumps(["ICBC", "CMB"]),
                    agreement_version="2026-11",
                    idempotency_key=None,
                    submitted_at=now,
                    ready_by=now + timedelta(hours=24),
                    ready_at=now if status == "READY" else None,
                    expires_at=now + timedelta(days=7) if status == "READY" else None,
                    banks_total=2,
                    banks_answered=1 if status == "PENDING" else 2,
                    subject_sealed=keyring.sealer("subject").seal(subject, query_id.encode()),
                    trace_context="{}",
                    report_ready_sms_sent=False,
                )
            )
        conn.execute(
            outcomes.insert().values(
                query_id=pending,
                bank_code="ICBC",
                kind="ANSWERED",
                recorded_at=now,
                detail="",
                cards=json.dumps(
                    [{"bank_code": "ICBC", "card_type": "DEBIT", "first4": "6222", "last4": "4321"}]
                ),
            )
        )
    assert current_revision(engine, SERVICE) is None
    engine.dispose()

    rig = Rig(tmp_path, database_url)
    rig.clock.set(now)
    try:
        await rig.start_banks()
        await rig.start_notifier()
        await rig.start_report_service()
        engine = _engine(tmp_path, database_url)
        try:
            assert current_revision(engine, SERVICE) == "0003"
            columns = {c["name"] for c in sa.inspect(engine).get_columns("rs_bank_outcomes")}
            assert "cards" not in columns and "cards_sealed" in columns  # the clear copy is gone
        finally:
            engine.dispose()
        await status_is(rig, pending, common_pb2.QUERY_STATUS_READY)
        assert rig.banks.asked == [["ICBC", "CMB"]]  # asked again: its clear outcome was dropped
        assert [s.bank_code for s in (await rig.report(pending)).summary] == ["ICBC", "CMB"]
        # One SMS each: the old READY query's owed SMS and the new report's.
        await eventually(lambda: rig.rows("SELECT count(*) FROM rs_work") == [(0,)])
        messages = await rig.messages()
        assert sorted(m.kind for m in messages) == ["REPORT_READY", "REPORT_READY"]
        assert all(m.phone == PHONE for m in messages)
    finally:
        await rig.close()


async def test_the_service_migrates_its_database_when_it_starts(tmp_path):
    """`python -m report_service` (what `cardcheck up` starts) creates and migrates the SQLite
    file under CARDCHECK_DATA_DIR before it serves."""
    process = ServiceProcess(
        "report_service", tmp_path, CARDCHECK_BANK_CONNECTOR_ADDR="127.0.0.1:9", CARDCHECK_NOTIFIER_ADDR="127.0.0.1:9"
    )
    await process.start()
    try:
        engine = make_engine(None, tmp_path, SERVICE)
        try:
            assert current_revision(engine, SERVICE) == head_revision(MIGRATIONS)
        finally:
            engine.dispose()
    finally:
        await asyncio.wait_for(process.stop(), 30)
    assert process.returncode == 0
