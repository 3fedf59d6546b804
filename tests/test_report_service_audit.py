"""The audit trail: every event of a query, no personal data in clear, a hash chain that shows a
changed or deleted entry, appends that never fork it, and the verifier command."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.v1 import common_pb2
from report_service import audit
from report_service.app import MIGRATIONS
from tests.test_report_service import SCRIPT, SUBJECT, TIMED_OUT, USER, rig, status_is  # noqa: F401

AT = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


async def test_every_event_of_a_query_is_audited_without_personal_data(rig):  # noqa: F811
    rig.banks.script["BOC"] = [TIMED_OUT, SCRIPT["BOC"]]
    query = await rig.create()
    await rig.between_passes(query.query_id)
    rig.clock.advance(timedelta(minutes=1))
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    await rig.report(query.query_id)
    rig.clock.advance(timedelta(days=7))
    assert await rig.parts.worker.sweep() == [query.query_id]

    assert rig.audit_events(query.query_id) == [
        ("query.accepted", {"agreement_version": "2026-11", "banks": ["ICBC", "CMB", "BOC"]}),
        ("banks.asked", {"banks": ["ICBC", "CMB", "BOC"], "pass": 1}),
        ("bank.outcome", {"bank": "ICBC", "kind": "ANSWERED", "cards": 2}),
        ("bank.outcome", {"bank": "CMB", "kind": "ANSWERED", "cards": 0}),
        ("bank.outcome", {"bank": "BOC", "kind": "TIMED_OUT", "cards": 0}),
        ("banks.asked", {"banks": ["BOC"], "pass": 2}),
        ("bank.outcome", {"bank": "BOC", "kind": "ANSWERED", "cards": 1}),
        ("report.generated", {"banks_answered": 3, "unavailable": []}),
        ("report.viewed", {}),
        ("report.deleted", {}),
    ]
    assert {user for (user,) in rig.rows("SELECT user_id FROM rs_audit")} == {USER}  # the opaque id
    # (hashes and ids are hex, where four digits turn up by chance: the rest of each entry)
    dump = json.dumps(rig.rows("SELECT event, user_id, details FROM rs_audit"), ensure_ascii=False)
    for secret in (SUBJECT.name, SUBJECT.id_number, SUBJECT.phone, "6222", "4321", "6253", "8765", "0042"):
        assert secret not in dump
    verdict = audit.verify_engine(rig.parts.db.engine)
    assert verdict.ok and verdict.entries == 10


def test_details_that_look_like_personal_data_are_refused():
    with pytest.raises(ValueError, match="digit"):
        audit._check_no_personal_data({"note": "13912345678"})
    with pytest.raises(ValueError, match="digit"):
        audit._check_no_personal_data({"ids": ["22010219900307123X"]})
    audit._check_no_personal_data({"agreement_version": "2026-11", "pass": 12, "banks": ["ICBC"]})


def _trail(tmp_path, database_url, entries: int = 6) -> Database:
    db = Database(make_engine(database_url, tmp_path, "report_service"))
    upgrade_to_head(db.engine, MIGRATIONS, "report_service")
    for i in range(entries):
        event = audit.AuditEvent(
            audit.BANK_OUTCOME, f"q{i % 2}", "u-1", {"bank": "ICBC", "kind": "ANSWERED", "cards": i}
        )
        with db.session() as session:
            audit.append(session, [event], AT + timedelta(seconds=i))
    return db


def _verify_command(tmp_path, database_url) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDCHECK_")}
    env["CARDCHECK_DATA_DIR"] = str(tmp_path)
    if database_url:
        env["CARDCHECK_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "report_service.audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


TAMPERING = {
    "details changed": (
        'UPDATE rs_audit SET details = \'{"bank":"ICBC","cards":9,"kind":"ANSWERED"}\' WHERE seq = 3',
        3,
        "changed",
    ),
    "user changed": ("UPDATE rs_audit SET user_id = 'u-2' WHERE seq = 3", 3, "changed"),
    "instant changed": (
        "UPDATE rs_audit SET recorded_at = recorded_at - INTERVAL '1 hour' WHERE seq = 4",
        4,
        "changed",
    ),
    "event changed": ("UPDATE rs_audit SET event = 'report.viewed' WHERE seq = 2", 2, "changed"),
    "entry deleted": ("DELETE FROM rs_audit WHERE seq = 3", 3, "missing"),
    "first entry deleted": ("DELETE FROM rs_audit WHERE seq = 1", 1, "missing"),
    "last entry deleted": ("DELETE FROM rs_audit WHERE seq = 6", 6, "missing"),
    "entry rehashed alone": ("UPDATE rs_audit SET hash = prev_hash WHERE seq = 5", 5, "changed"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_changed_or_deleted_entry_is_found(tmp_path, database_url, case):
    sql, broken, problem = TAMPERING[case]
    db = _trail(tmp_path, database_url)
    try:
        assert audit.verify_engine(db.engine).ok
        if db.engine.dialect.name == "sqlite":
            sql = sql.replace("recorded_at - INTERVAL '1 hour'", "'2026-03-02 07:00:03.000000'")
        with db.engine.begin() as conn:
            assert conn.exec_driver_sql(sql).rowcount == 1
        verdict = audit.verify_engine(db.engine)
        assert not verdict.ok
        assert verdict.broken_seq == broken, verdict
        assert problem in verdict.problem
    finally:
        db.dispose()


def test_the_verifier_command_says_ok_or_names_the_first_broken_entry(tmp_path, database_url):
    db = _trail(tmp_path, database_url)
    try:
        done = _verify_command(tmp_path, database_url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("audit trail OK: 6 entries")
        with db.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM rs_audit WHERE seq = 4"))
            conn.exec_driver_sql("UPDATE rs_audit SET details = '{}' WHERE seq = 2")
        done = _verify_command(tmp_path, database_url)
        assert done.returncode == 1
        assert "BROKEN at entry 2" in done.stdout  # the first of the two breaks
    finally:
        db.dispose()


def test_the_verifier_command_without_a_trail(tmp_path):
    done = _verify_command(tmp_path, None)
    assert done.returncode == 2
    assert "no report_service database" in done.stderr
    assert not (tmp_path / "report_service.db").exists()  # and it did not create one


async def test_concurrent_appends_never_fork_the_chain(tmp_path, database_url):
    """Eight writers append at once, each entry in its own transaction on its own connection:
    the head row serializes them into one chain."""
    db = _trail(tmp_path, database_url, entries=0)
    try:

        def append(writer: int, n: int) -> None:
            with db.session() as session:
                audit.append(
                    session, [audit.AuditEvent(audit.REPORT_VIEWED, f"q{writer}", f"u{writer}", {"n": n})], AT
                )

        await asyncio.gather(
            *(asyncio.to_thread(append, writer, n) for writer in range(8) for n in range(15))
        )
        verdict = audit.verify_engine(db.engine)
        assert verdict.ok and verdict.entries == 120, verdict
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(DISTINCT prev_hash) FROM rs_audit")).scalar() == 120
    finally:
        db.dispose()
