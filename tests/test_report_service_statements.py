"""What one query costs report_service's database, pinned: the transactions and statements of
each step of a query's life (accepted, every bank's outcome recorded and the report sealed, the
progress read, the report viewed, the SMS done), on SQLite and PostgreSQL; and the shortcuts
taken on the way give what the long way gave."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
from sqlalchemy import event, orm, text

from cardcheck.banks import BANK_CODES
from cardcheck.runtime.clock import as_utc
from report_service.app import build_parts
from report_service.execution import Claim
from report_service.metrics import QueryLife
from report_service.models import EXECUTE, QueryStatus
from report_service.queries import Subject
from report_service.reports import BankOutcome, BankSummary, MaskedCard, ReportContent, UnavailableBank
from tests.harness.settings import settings_for

SUBJECT = Subject("张三", "220102199003071234", "13912345678")
CARDS = (MaskedCard("ICBC", "DEBIT", "6222", "4321"), MaskedCard("ICBC", "CREDIT", "6253", "8765"))

# Per step: (transactions, statements), BEGIN and pg_notify (PostgreSQL's change
# announcement) not counted.
EXPECTED = {
    "create": (1, 6),  # by key; pending and last report; query, work; audit head moved, entries
    "snapshot": (1, 2),  # the query; its outcomes
    "record": (1, 7),  # lease, query and outcomes stored; outcomes; report, query, work; audit x2
    "report": (1, 3),  # query and report; audit x2
    "notified": (1, 1),  # the NOTIFY work
}
# The steps whose transaction is Core statements on a connection, without an ORM session.
SESSIONLESS = {"create", "snapshot", "record", "report", "notified"}


class Counted:
    def __init__(self, engines) -> None:
        self.steps: Counter[tuple[str, str]] = Counter()
        self.step = ""
        for engine in engines:
            event.listen(engine, "before_cursor_execute", self._statement)
            event.listen(engine, "commit", self._commit)
        event.listen(orm.Session, "after_begin", self._session)

    def _statement(self, conn, cursor, statement, params, context, executemany) -> None:
        if not statement.startswith(("BEGIN", "SELECT pg_notify")):
            self.steps[(self.step, "statements")] += 1

    def _commit(self, conn) -> None:
        self.steps[(self.step, "transactions")] += 1

    def _session(self, session, transaction, conn) -> None:
        self.steps[(self.step, "sessions")] += 1

    def close(self) -> None:
        event.remove(orm.Session, "after_begin", self._session)

    def of(self, step: str) -> tuple[int, int]:
        return self.steps[(step, "transactions")], self.steps[(step, "statements")]


@pytest.fixture
async def parts(tmp_path, database_url):
    built = await build_parts(
        settings_for(tmp_path, database_url, addresses={"report_service": "127.0.0.1:0"}),
        pass_interval_s=3600,
        sweep_interval_s=3600,
    )
    await built.worker.stop()  # the steps below are the worker's, called one by one
    yield built
    built.store._db.close()


async def test_each_step_of_a_query_takes_one_transaction_and_the_statements_pinned(parts):
    store, execution = parts.store, parts.execution
    storage = store._db
    engines = {storage.db.engine, storage._reader.engine}
    # Another user's query first: the chain's first append reads the head row, the next ones
    # move it on from the head they left (report_service.audit).
    await store.create("u-0", SUBJECT, ["ICBC"], "2026-11", "k-0", {})
    counted = Counted(engines)
    outcomes = [BankOutcome(code, "ANSWERED", CARDS if code == "ICBC" else ()) for code in BANK_CODES]

    counted.step = "create"
    query, created = await store.create(
        "u-1", SUBJECT, list(BANK_CODES), "2026-11", "k-1", {}, lease_to=parts.worker.owner, lease=parts.worker.lease
    )
    assert created
    counted.step = "snapshot"
    await store.snapshot("u-1", query.query_id)
    counted.step = "record"
    claim = Claim(query.query_id, EXECUTE, 1, query, SUBJECT, missing_banks=query.bank_codes, owner=parts.worker.owner)
    recorded = await execution.record(claim, outcomes)
    assert recorded is not None and recorded.status == QueryStatus.READY and recorded.notify is not None
    counted.step = "report"
    report = await store.report("u-1", query.query_id)
    counted.step = "notified"
    await execution.notified(query.query_id)

    counted.close()
    assert {step: counted.of(step) for step in EXPECTED} == EXPECTED
    assert {step for step in EXPECTED if not counted.steps[(step, "sessions")]} == SESSIONLESS
    assert report.content.cards == CARDS
    assert [s.bank_code for s in report.content.summary] == list(BANK_CODES)
    # One audit entry per step's event, the 24 outcomes recorded together in one of them.
    with parts.db.engine.connect() as connection:
        entries = connection.execute(
            text("SELECT event, details FROM rs_audit WHERE query_id = :q ORDER BY seq"), {"q": query.query_id}
        ).all()
    assert [event for event, _ in entries] == [
        "query.accepted", "banks.asked", "bank.outcomes", "report.generated", "report.viewed"
    ]
    assert json.loads(entries[2].details) == {"outcomes": [[code, "ANSWERED"] for code in BANK_CODES]}


def test_a_report_is_sealed_as_the_json_of_its_dataclasses():
    """Reports sealed before and after read alike: the JSON is what json.dumps(asdict(...)) gave."""
    for content in (
        ReportContent(
            (BankSummary("ICBC", 1, 1), BankSummary("CMB", 0, 0)),
            CARDS,
            (UnavailableBank("BOC", "TIMED_OUT: DEADLINE_EXCEEDED"),),
        ),
        ReportContent((), (), ()),
    ):
        assert content.to_json() == json.dumps(dataclasses.asdict(content), ensure_ascii=False).encode()
        assert ReportContent.from_json(content.to_json()) == content


async def test_the_time_to_ready_is_observed_from_the_submission_told_with_the_event(parts):
    store, execution = parts.store, parts.execution
    [life] = [observer for observer in store.audit.observers if isinstance(observer, QueryLife)]
    histogram = life.time_to_ready
    before = histogram._sum.get()
    query, _ = await store.create(
        "u-2", SUBJECT, ["ICBC"], "2026-11", "k-2", {}, lease_to=parts.worker.owner, lease=parts.worker.lease
    )
    claim = Claim(query.query_id, EXECUTE, 1, query, SUBJECT, missing_banks=query.bank_codes, owner=parts.worker.owner)
    recorded = await execution.record(claim, [BankOutcome("ICBC", "ANSWERED")])
    assert recorded is not None and recorded.notify is not None
    ready_at = recorded.notify.query.ready_at
    assert ready_at is not None
    expected = (as_utc(ready_at) - as_utc(query.submitted_at)).total_seconds()
    assert histogram._sum.get() - before == pytest.approx(expected, abs=1e-6)
    # The fact told to the metric is not in the trail, which verifies as ever.
    with parts.db.engine.connect() as connection:
        [details] = connection.execute(
            text("SELECT details FROM rs_audit WHERE query_id = :q AND event = 'report.generated'"),
            {"q": query.query_id},
        ).scalars()
        assert details == "{}"
        assert store.audit.verify(connection).ok
