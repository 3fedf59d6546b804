"""The audit trail: every event of a query, no personal data in clear, a hash chain that shows a
changed or deleted entry, appends that never fork it, and the verifier command."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.v1 import common_pb2
from report_service import audit
from report_service.app import MIGRATIONS
from tests.harness.report_service import SCRIPT, SUBJECT, TIMED_OUT, USER, status_is

AT = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
MASTER_KEY = bytes(range(32))
CHAIN = audit.AuditChain.from_keyring(Keyring(MASTER_KEY))


async def test_every_event_of_a_query_is_audited_without_personal_data(rig):
    rig.banks.script["BOC"] = [TIMED_OUT, SCRIPT["BOC"]]
    query = await rig.create()
    await rig.between_passes(query.query_id)
    rig.clock.advance(timedelta(minutes=1))
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    await rig.report(query.query_id)
    rig.clock.advance(timedelta(days=7))
    assert await rig.parts.worker.sweep() == [query.query_id]

    events = rig.audit_events(query.query_id)
    # The outcomes that arrive together are one entry (how the first pass's three are gathered
    # depends on their timing): each entry's pairs, in the order recorded.
    assert [(e, d) for e, d in events if e != "bank.outcomes"] == [
        ("query.accepted", {"agreement_version": "2026-11", "banks": ["ICBC", "CMB", "BOC"]}),
        ("banks.asked", {"banks": ["ICBC", "CMB", "BOC"], "pass": 1}),
        ("banks.asked", {"banks": ["BOC"], "pass": 2}),
        ("report.generated", {}),
        ("report.viewed", {}),
        ("report.deleted", {}),
    ]
    passes = [[]]
    for event, details in events[2:]:
        if event == "banks.asked":
            passes.append([])
        elif event == "bank.outcomes":
            assert list(details) == ["outcomes"] and details["outcomes"], details
            passes[-1].extend(tuple(pair) for pair in details["outcomes"])
    assert passes == [[("ICBC", "ANSWERED"), ("CMB", "ANSWERED"), ("BOC", "TIMED_OUT")], [("BOC", "ANSWERED")]]
    assert {user for (user,) in rig.rows("SELECT user_id FROM rs_audit")} == {USER}  # the opaque id
    # (hashes and ids are hex, where four digits turn up by chance: the rest of each entry)
    dump = json.dumps(rig.rows("SELECT event, user_id, details FROM rs_audit"), ensure_ascii=False)
    for secret in (SUBJECT.name, SUBJECT.id_number, SUBJECT.phone, "6222", "4321", "6253", "8765", "0042"):
        assert secret not in dump
    verdict = rig.parts.store.audit.verify_engine(rig.parts.db.engine)
    assert verdict.ok and verdict.entries == len(events)


async def test_the_worker_logs_the_audit_head_each_time_it_moves(rig, caplog):
    caplog.set_level("INFO", logger="report_service.worker")

    def logged_heads() -> list[tuple[int, str]]:
        messages = [r.getMessage() for r in caplog.records]
        return [(int(m.split()[2].split(":")[0]), m.split(":")[1]) for m in messages if m.startswith("audit head ")]

    query = await rig.create()
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    await rig.parts.worker.sweep()
    with rig.parts.db.engine.connect() as conn:
        ready = audit.read_head(conn)
    assert logged_heads()[-1] == ready
    await rig.report(query.query_id)  # report.viewed: the head moves once more
    await rig.parts.worker.sweep()
    await rig.parts.worker.sweep()  # it did not move since: not logged again
    heads = logged_heads()
    with rig.parts.db.engine.connect() as conn:
        viewed = audit.read_head(conn)
        assert viewed[0] == ready[0] + 1 and heads[-2:] == [ready, viewed]
        assert all(a[0] < b[0] for a, b in itertools.pairwise(heads))  # each line a move
        assert rig.parts.store.audit.verify(conn, dict(heads)).ok  # every head it logged checks out


async def test_after_the_retention_sweep_no_entry_holds_what_the_report_said(rig):
    """The trail outlives the report: once the sweep deleted it (7 days on the clock), no raw
    row of rs_audit holds a card count or the report's answered/unavailable banks, and the
    chain verifies as it stands."""
    rig.banks.script["BOC"] = [TIMED_OUT, SCRIPT["BOC"]]
    query = await rig.create()
    await rig.between_passes(query.query_id)
    rig.clock.advance(timedelta(minutes=1))
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    await rig.report(query.query_id)
    rig.clock.advance(timedelta(days=7))
    assert await rig.parts.worker.sweep() == [query.query_id]
    assert rig.rows("SELECT count(*) FROM rs_reports") == [(0,)]

    rows = rig.rows("SELECT seq, event, query_id, user_id, details FROM rs_audit ORDER BY seq")
    assert [event for _, event, *_ in rows][-1] == "report.deleted"
    for seq, event, _, _, details_text in rows:
        details = json.loads(details_text)
        assert audit.REPORT_CONTENTS.isdisjoint(details), (seq, event, details)
        # No count of any kind but the pass number (the banks held 2, 0 and 1 cards).
        assert [name for name, value in details.items() if isinstance(value, int)] in ([], ["pass"]), details
    verdict = rig.parts.store.audit.verify_engine(rig.parts.db.engine)
    assert verdict.ok and verdict.entries == len(rows) and verdict.with_report_contents == 0


async def test_the_worker_logs_the_head_again_when_rekey_hashed_the_chain_again(rig, caplog):
    caplog.set_level("INFO", logger="report_service.worker")
    query = await rig.create()
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    db = rig.parts.db
    with db.engine.begin() as conn:  # an entry as recorded before card counts were left out
        assert conn.execute(
            sa.text(
                "UPDATE rs_audit SET event = 'bank.outcome', details = :d"
                " WHERE event = 'bank.outcomes' AND details LIKE :icbc"
            ),
            {"d": '{"bank":"ICBC","cards":2,"kind":"ANSWERED"}', "icbc": "%ICBC%"},
        ).rowcount == 1
    _rewrite_from(db, 1, rig.parts.store.audit.entry_hash)
    await rig.parts.worker.sweep()
    with db.engine.connect() as conn:
        before = audit.read_head(conn)
    assert rig.parts.store.audit.rekey(db.engine).redacted == 1
    await rig.parts.worker.sweep()
    with db.engine.connect() as conn:
        after = audit.read_head(conn)
    assert after[0] == before[0] and after[1] != before[1]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit head ")]
    assert logged[-2:] == [f"audit head {before[0]}:{before[1]}", f"audit head {after[0]}:{after[1]}"]


def test_details_that_look_like_personal_data_are_refused():
    with pytest.raises(ValueError, match="digit"):
        audit._check_no_personal_data({"note": "13912345678"})
    with pytest.raises(ValueError, match="digit"):
        audit._check_no_personal_data({"ids": ["22010219900307123X"]})
    audit._check_no_personal_data({"agreement_version": "2026-11", "pass": 12, "banks": ["ICBC"]})


@pytest.mark.parametrize("details", [{"bank": "ICBC", "kind": "ANSWERED", "cards": 2}, {"banks_answered": 3}])
def test_details_that_say_what_a_report_said_are_refused(tmp_path, details):
    with pytest.raises(ValueError, match="what a report says"):
        audit._check_no_personal_data(details)


def _event(i: int) -> audit.AuditEvent:
    """Every other one a bank.outcome entry as recorded before outcomes were batched: trails
    that hold both verify and rekey alike."""
    if i % 2:
        return audit.AuditEvent(audit.BANK_OUTCOMES, "q1", "u-1", {"outcomes": [["ICBC", "ANSWERED"], ["BOC", "ERROR"]]})
    return audit.AuditEvent(audit.BANK_OUTCOME, "q0", "u-1", {"bank": "ICBC", "kind": "ANSWERED", "pass": i})


def _as_recorded_before(db: Database, seqs) -> None:
    """What trails recorded before report contents were left out hold: card counts in
    bank.outcome entries and the answered/unavailable banks in report.generated ones, each
    entry keyed as it was then."""
    with db.engine.begin() as conn:
        for seq in seqs:
            details = {"bank": "ICBC", "kind": "ANSWERED", "cards": seq + 1}
            event = audit.BANK_OUTCOME
            if seq % 3 == 0:
                details, event = {"banks_answered": 2, "unavailable": ["BOC"]}, audit.REPORT_GENERATED
            conn.execute(
                sa.text("UPDATE rs_audit SET event = :e, details = :d WHERE seq = :s"),
                {"e": event, "d": audit._json(details), "s": seq},
            )
    _rewrite_from(db, 1, CHAIN.entry_hash)


def _trail(tmp_path, database_url, entries: int = 6, plain: int = 0) -> Database:
    """`entries` appended with the chain's key, after `plain` ones hashed the way entries were
    before the chain was keyed."""
    db = Database(make_engine(database_url, tmp_path, "report_service"))
    upgrade_to_head(db.engine, MIGRATIONS, "report_service")
    for i in range(plain + entries):
        with db.session() as session:
            if i < plain:
                audit._append(session, [_event(i)], AT + timedelta(seconds=i), audit.plain_hash)
            else:
                CHAIN.append(session, [_event(i)], AT + timedelta(seconds=i))
    return db


def _audit_command(
    tmp_path, database_url, command: str = "verify", master_key: bytes | None = MASTER_KEY, options=()
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDCHECK_")}
    env["CARDCHECK_DATA_DIR"] = str(tmp_path)
    if database_url:
        env["CARDCHECK_DATABASE_URL"] = database_url
    if master_key:
        env["CARDCHECK_MASTER_KEY"] = base64.b64encode(master_key).decode()
    return subprocess.run(
        [sys.executable, "-m", "report_service.audit", command, *options],
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


def _hashes(db: Database) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT seq, prev_hash, hash FROM rs_audit ORDER BY seq"))]


def _rewrite_from(db: Database, seq: int, entry_hash) -> None:
    """What a writer to the database can do: rehash every entry from `seq` on, and the head,
    with `entry_hash`, so that each links to the one before."""
    with db.engine.begin() as conn:
        rows = conn.execute(sa.text(
            "SELECT seq, recorded_at, event, query_id, user_id, details, prev_hash, hash FROM rs_audit ORDER BY seq"
        )).all()
        prev = audit.GENESIS
        for row in rows:
            if row.seq >= seq:
                recorded_at = row.recorded_at
                if isinstance(recorded_at, str):  # SQLite hands back text
                    recorded_at = datetime.fromisoformat(recorded_at).replace(tzinfo=UTC)
                digest = entry_hash(prev, audit.canonical(
                    row.seq, recorded_at, row.event, row.query_id, row.user_id, json.loads(row.details)
                ))
                conn.execute(sa.text("UPDATE rs_audit SET prev_hash = :p, hash = :h WHERE seq = :s"),
                             {"p": prev, "h": digest, "s": row.seq})
                prev = digest
            else:
                prev = row.hash
        conn.execute(sa.text("UPDATE rs_audit_head SET hash = :h"), {"h": prev})


@pytest.mark.parametrize("rehash", ["SHA-256", "another key"])
def test_a_changed_entry_with_the_chain_recomputed_without_its_key_is_found(tmp_path, database_url, rehash):
    db = _trail(tmp_path, database_url)
    try:
        with db.engine.begin() as conn:
            conn.exec_driver_sql('UPDATE rs_audit SET details = \'{"bank":"ICBC","cards":0,"kind":"ANSWERED"}\' WHERE seq = 4')
        other = audit.AuditChain.from_keyring(Keyring(bytes(32)))
        _rewrite_from(db, 4, audit.plain_hash if rehash == "SHA-256" else other.entry_hash)
        rows = _hashes(db)  # every link holds: only the key tells the forgery apart
        assert all(prev_hash == before for (_, _, before), (_, prev_hash, _) in itertools.pairwise(rows))
        verdict = CHAIN.verify_engine(db.engine)
        assert (verdict.ok, verdict.broken_seq, verdict.entries) == (False, 4, 3)
        assert "changed" in verdict.problem
    finally:
        db.dispose()


def test_rekey_hashes_a_trail_begun_before_the_key_again_under_it(tmp_path, database_url):
    db = _trail(tmp_path, database_url, entries=2, plain=4)  # an upgrade: plain ones, then keyed ones
    try:
        verdict = CHAIN.verify_engine(db.engine)
        assert (verdict.ok, verdict.broken_seq) == (False, 1)
        done = _audit_command(tmp_path, database_url, "rekey")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("audit trail keyed: 6 entries (4 were plain), 0 cleared")
        verdict = CHAIN.verify_engine(db.engine)
        assert verdict.ok and verdict.entries == 6
        keyed = _hashes(db)
        again = _audit_command(tmp_path, database_url, "rekey")  # once keyed, nothing changes
        assert again.returncode == 0 and _hashes(db) == keyed
        assert again.stdout.startswith("audit trail keyed: 6 entries (0 were plain)")
        with db.session() as session:  # and the service appends on
            CHAIN.append(session, [_event(7)], AT + timedelta(minutes=1))
        assert _audit_command(tmp_path, database_url).stdout.startswith("audit trail OK: 7 entries")
    finally:
        db.dispose()


def test_a_trail_recorded_with_report_contents_verifies_and_rekey_drops_them(tmp_path, database_url):
    """Entries from before report contents were left out still verify as they are; `rekey`
    drops the contents and hashes the chain again, after which it verifies and no row holds
    them. A second rekey changes nothing."""
    db = _trail(tmp_path, database_url, entries=6)
    try:
        _as_recorded_before(db, [2, 3, 5])
        verdict = CHAIN.verify_engine(db.engine)
        assert verdict.ok and verdict.with_report_contents == 3
        said = _audit_command(tmp_path, database_url)
        assert said.returncode == 0 and "3 still hold what a report said" in said.stdout
        before = _hashes(db)

        done = _audit_command(tmp_path, database_url, "rekey")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("audit trail keyed: 6 entries (0 were plain), 3 cleared")
        with db.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT seq, event, details FROM rs_audit ORDER BY seq")).all()
        assert all(audit.REPORT_CONTENTS.isdisjoint(json.loads(d)) for _, _, d in rows)
        assert [json.loads(d) for seq, _, d in rows if seq in (2, 3)] == [{"bank": "ICBC", "kind": "ANSWERED"}, {}]
        after = _hashes(db)
        assert after[:1] == before[:1] and after[1:] != before[1:]  # rehashed from the first changed on
        verdict = CHAIN.verify_engine(db.engine)
        assert verdict.ok and verdict.entries == 6 and verdict.with_report_contents == 0
        ok = _audit_command(tmp_path, database_url, options=["--head", f"6:{verdict.head_hash}"])
        assert ok.returncode == 0 and "still hold" not in ok.stdout

        again = _audit_command(tmp_path, database_url, "rekey")
        assert again.returncode == 0 and _hashes(db) == after and ", 0 cleared" in again.stdout
    finally:
        db.dispose()


def test_rekey_refuses_a_changed_entry_with_report_contents_and_changes_nothing(tmp_path, database_url):
    db = _trail(tmp_path, database_url, entries=4)
    try:
        _as_recorded_before(db, [1, 2])
        with db.engine.begin() as conn:
            conn.exec_driver_sql('UPDATE rs_audit SET details = \'{"bank":"ICBC","cards":7,"kind":"ANSWERED"}\' WHERE seq = 2')
        before = _details_and_hashes(db)
        done = _audit_command(tmp_path, database_url, "rekey")
        assert done.returncode == 1 and "BROKEN at entry 2" in done.stdout
        assert _details_and_hashes(db) == before
    finally:
        db.dispose()


def _details_and_hashes(db: Database) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT seq, details, hash FROM rs_audit ORDER BY seq"))]


@pytest.mark.parametrize("case", ["plain entry changed", "plain entry after a keyed one"])
def test_rekey_refuses_a_broken_trail_and_changes_nothing(tmp_path, database_url, case):
    db = _trail(tmp_path, database_url, entries=2, plain=3)
    try:
        if case == "plain entry changed":
            with db.engine.begin() as conn:
                conn.exec_driver_sql("UPDATE rs_audit SET user_id = 'u-2' WHERE seq = 2")
            broken = 2
        else:  # a keyed entry made to pass as plain: the key's protection would be lost
            _rewrite_from(db, 5, audit.plain_hash)
            broken = 5
        before = _hashes(db)
        done = _audit_command(tmp_path, database_url, "rekey")
        assert done.returncode == 1
        assert f"BROKEN at entry {broken}" in done.stdout
        assert _hashes(db) == before
    finally:
        db.dispose()


def test_the_audit_command_needs_the_master_key_and_never_makes_one(tmp_path, database_url):
    db = _trail(tmp_path, database_url)
    try:
        for command in ("verify", "rekey"):
            done = _audit_command(tmp_path, database_url, command, master_key=None)
            assert done.returncode == 2
            assert "no master key" in done.stderr
        assert not (tmp_path / "keys").exists()
        wrong = _audit_command(tmp_path, database_url, master_key=bytes(32))
        assert wrong.returncode == 1 and "BROKEN at entry 1" in wrong.stdout
    finally:
        db.dispose()


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_changed_or_deleted_entry_is_found(tmp_path, database_url, case):
    sql, broken, problem = TAMPERING[case]
    db = _trail(tmp_path, database_url)
    try:
        assert CHAIN.verify_engine(db.engine).ok
        if db.engine.dialect.name == "sqlite":
            sql = sql.replace("recorded_at - INTERVAL '1 hour'", "'2026-03-02 07:00:03.000000'")
        with db.engine.begin() as conn:
            assert conn.exec_driver_sql(sql).rowcount == 1
        verdict = CHAIN.verify_engine(db.engine)
        assert not verdict.ok
        assert verdict.broken_seq == broken, verdict
        assert problem in verdict.problem
    finally:
        db.dispose()


def test_the_verifier_command_says_ok_or_names_the_first_broken_entry(tmp_path, database_url):
    db = _trail(tmp_path, database_url)
    try:
        done = _audit_command(tmp_path, database_url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("audit trail OK: 6 entries")
        with db.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM rs_audit WHERE seq = 4"))
            conn.exec_driver_sql("UPDATE rs_audit SET details = '{}' WHERE seq = 2")
        done = _audit_command(tmp_path, database_url)
        assert done.returncode == 1
        assert "BROKEN at entry 2" in done.stdout  # the first of the two breaks
    finally:
        db.dispose()


def test_the_verifier_command_without_a_trail(tmp_path):
    done = _audit_command(tmp_path, None)
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
                CHAIN.append(
                    session, [audit.AuditEvent(audit.REPORT_VIEWED, f"q{writer}", f"u{writer}", {"n": n})], AT
                )

        await asyncio.gather(
            *(asyncio.to_thread(append, writer, n) for writer in range(8) for n in range(15))
        )
        verdict = CHAIN.verify_engine(db.engine)
        assert verdict.ok and verdict.entries == 120, verdict
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(DISTINCT prev_hash) FROM rs_audit")).scalar() == 120
    finally:
        db.dispose()


def test_an_append_after_another_writers_reads_the_head_and_chains_after_it(tmp_path, database_url, monkeypatch):
    """Each chain moves the head row on from the head its last append left; when another
    writer (a replica, a sweep elsewhere) appended since, that row no longer names it, and the
    append reads the head and chains after what it names instead (and so do its next ones, for
    a while: here one)."""
    monkeypatch.setattr(audit, "_READS_AFTER_A_MISS", 1)
    db = _trail(tmp_path, database_url, entries=0)
    try:
        mine, other = (audit.AuditChain.from_keyring(Keyring(MASTER_KEY)) for _ in range(2))
        statements: list[str] = []
        sa.event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0]))
        moved_on = []
        for i, chain in enumerate([mine, mine, other, mine, mine, other, other, mine, mine, mine]):
            statements.clear()
            with db.session() as session:
                chain.append(session, [_event(i), _event(i + 1)], AT + timedelta(seconds=i))
            assert statements in (["UPDATE", "INSERT"], ["SELECT", "INSERT", "UPDATE"],
                                  ["UPDATE", "SELECT", "INSERT", "UPDATE"]), (i, statements)
            if statements == ["UPDATE", "INSERT"]:
                moved_on.append(i)
        assert moved_on == [1, 9]  # the others followed another's append, or a guess gone wrong
        with sa.orm.Session(db.engine) as session:  # rolled back: the head it left was never committed
            session.begin()
            mine.append(session, [_event(10)], AT)
            session.rollback()
        statements.clear()
        with db.session() as session:
            mine.append(session, [_event(11)], AT)
        assert statements == ["UPDATE", "SELECT", "INSERT", "UPDATE"]
        verdict = CHAIN.verify_engine(db.engine)
        assert verdict.ok and verdict.entries == 21, verdict
    finally:
        db.dispose()


def test_a_head_recorded_earlier_shows_the_newest_entries_deleted_with_the_head_moved_back(tmp_path, database_url):
    db = _trail(tmp_path, database_url)
    try:
        with db.engine.connect() as conn:
            four = conn.execute(sa.text("SELECT hash FROM rs_audit WHERE seq = 4")).scalar()
            six = audit.read_head(conn)
        anchors = ["--head", f"4:{four}", "--head", f"{six[0]}:{six[1]}"]
        done = _audit_command(tmp_path, database_url, options=anchors)
        assert done.returncode == 0, done.stdout + done.stderr
        with db.engine.begin() as conn:  # what a writer can do without the key
            conn.exec_driver_sql("DELETE FROM rs_audit WHERE seq > 4")
            conn.execute(sa.text("UPDATE rs_audit_head SET seq = 4, hash = :h"), {"h": four})
        assert CHAIN.verify_engine(db.engine).ok  # the key alone cannot tell
        done = _audit_command(tmp_path, database_url, options=anchors)
        assert done.returncode == 1
        assert "BROKEN at entry 5: missing (a head recorded earlier named entry 6)" in done.stdout
        other = _audit_command(tmp_path, database_url, options=["--head", f"4:{'0' * 64}"])
        assert other.returncode == 1 and "BROKEN at entry 4: not the entry a head recorded earlier named" in other.stdout
        bad = _audit_command(tmp_path, database_url, options=["--head", "four:abc"])
        assert bad.returncode == 2 and "SEQ:HASH" in bad.stderr
    finally:
        db.dispose()


@pytest.mark.parametrize(
    ("seq", "event", "query_id", "user_id", "details"),
    [
        (1, audit.BANK_OUTCOME, "q1", "u1", {"kind": "ANSWERED", "bank": "ICBC"}),
        (2, audit.BANK_OUTCOMES, "q1", "u1", {"outcomes": [["ICBC", "ANSWERED"], ["BOC", "TIMED_OUT"]]}),
        (22, audit.REPORT_GENERATED, None, None, {}),
        (3, audit.QUERY_ACCEPTED, 'q"2', "用户", {"banks": ["B", "A"], "pass": 2, "z": None, "n": {"b": 1, "a": [1.5, True]}}),
    ],
)
def test_an_append_hashes_the_canonical_form_verify_reads(seq, event, query_id, user_id, details) -> None:
    at = datetime(2026, 12, 1, 14, 3, 4, 5678, tzinfo=UTC)
    spliced = audit._canonical_of(seq, audit._instant(at), event, query_id, user_id, audit._json(details))
    assert spliced == audit.canonical(seq, at, event, query_id, user_id, details)
