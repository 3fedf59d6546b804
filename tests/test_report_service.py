"""report_service over real grpc.aio servers: a scripted fake bank_connector, the real notifier,
on SQLite and PostgreSQL, time from a ManualClock (the rig: tests/harness/report_service.py)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import sqlalchemy as sa

from cardcheck.runtime.backoff import Backoff
from cardcheck.runtime.errors import CardCheckError, from_rpc_error
from cardcheck.runtime.settings import SettingsError
from cardcheck.v1 import (
    common_pb2,
    report_service_pb2,
)
from report_service import servicer
from report_service.config import ReportServiceConfig
from report_service.queries import Subject
from report_service.reports import NOTICE
from tests.harness.report_service import (
    ANSWERED,
    SCRIPT,
    SUBJECT,
    TIMED_OUT,
    USER,
    instant,
    scripted_outcome,
    status_is,
)
from tests.harness.waiting import eventually


def _reason(error: grpc.aio.AioRpcError) -> str:
    typed = from_rpc_error(error)
    assert typed is not None, error
    return typed.reason


# --- the journey -------------------------------------------------------------------------------


async def test_accepted_query_becomes_ready_with_its_report_and_one_sms(rig):
    accepted = await rig.create()
    assert accepted.status == common_pb2.QUERY_STATUS_PENDING
    assert accepted.banks_total == 3
    assert accepted.ready_by.ToDatetime(UTC) == rig.clock.now() + timedelta(hours=24)
    # Accepted means committed together with the work that runs it.
    assert rig.rows("SELECT kind FROM rs_work WHERE query_id = :q", q=accepted.query_id) in (
        [("EXECUTE",)],
        [],
    )

    ready = await status_is(rig, accepted.query_id, common_pb2.QUERY_STATUS_READY)
    assert ready.banks_answered == 3
    assert ready.ready_at.ToDatetime(UTC) == rig.clock.now()
    assert ready.expires_at.ToDatetime(UTC) == rig.clock.now() + timedelta(days=7)

    report = await rig.report(accepted.query_id)
    assert [(s.bank_code, s.bank_name, s.debit_count, s.credit_count) for s in report.summary] == [
        ("ICBC", "中国工商银行", 1, 1),
        ("CMB", "招商银行", 0, 0),
        ("BOC", "中国银行", 1, 0),
    ]
    assert [(c.bank_code, c.card_type, c.first4, c.last4) for c in report.cards] == [
        ("ICBC", common_pb2.CARD_TYPE_DEBIT, "6222", "4321"),
        ("ICBC", common_pb2.CARD_TYPE_CREDIT, "6253", "8765"),
        ("BOC", common_pb2.CARD_TYPE_DEBIT, "6217", "0042"),
    ]
    assert list(report.unavailable_banks) == []
    assert report.notice == NOTICE
    assert report.generated_at == ready.ready_at and report.expires_at == ready.expires_at

    messages = await eventually(rig.messages)
    await eventually(lambda: rig.rows("SELECT count(*) FROM rs_work") == [(0,)])  # all work done
    await rig.parts.worker.run_pass(wait=True)  # another pass sends nothing more
    messages = await rig.messages()
    assert [m.kind for m in messages] == ["REPORT_READY"]
    assert "4321" not in messages[0].body
    assert rig.banks.asked == [["ICBC", "CMB", "BOC"]]

    listed = await rig.stub.ListQueries(report_service_pb2.ReportServiceListQueriesRequest(user_id=USER))
    assert [q.query_id for q in listed.queries] == [accepted.query_id]

    # The execution and its fan-out belong to the trace of the request that submitted the query.
    spans = rig.spans.get_finished_spans()
    create = next(s for s in spans if s.name.endswith("CreateQuery"))
    execute = next(s for s in spans if s.name == "query.execute")
    fan_out = next(s for s in spans if s.name.endswith("FanOut"))
    assert execute.context.trace_id == create.context.trace_id == fan_out.context.trace_id


# --- the rules, enforced by the database ----------------------------------------------------------


async def test_second_concurrent_query_is_refused(rig):
    rig.banks.hold("ICBC")
    results = await asyncio.gather(*(rig.create(key=f"k{i}") for i in range(6)), return_exceptions=True)
    accepted = [r for r in results if isinstance(r, common_pb2.Query)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) == 1 and len(refused) == 5
    for error in refused:
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert _reason(error) == "QUERY_IN_PROGRESS"
    rig.banks.release("ICBC")
    await status_is(rig, accepted[0].query_id, common_pb2.QUERY_STATUS_READY)


async def test_the_database_itself_keeps_a_user_to_one_pending_query(rig):
    """Concurrent acceptances race in their own threads (own connections, own transactions); the
    partial unique index, not the read before the insert, is what lets only one through."""
    rig.banks.hold("ICBC")
    store = rig.parts.store
    subject = Subject(SUBJECT.name, SUBJECT.id_number, SUBJECT.phone)

    async def create(i: int):
        return await store.create("u-race", subject, ["ICBC"], "2026-11", f"race-{i}", {})

    results = await asyncio.gather(*(create(i) for i in range(8)), return_exceptions=True)
    accepted = [r for r in results if isinstance(r, tuple)]
    assert len(accepted) == 1, results
    assert all(
        isinstance(r, CardCheckError) and r.reason == "QUERY_IN_PROGRESS"
        for r in results
        if r not in accepted
    )
    assert rig.rows("SELECT count(*) FROM rs_queries WHERE user_id = 'u-race'") == [(1,)]

    # Bypassing the service's own check: the database refuses a second PENDING row all the same.
    [row] = rig.rows("SELECT * FROM rs_queries WHERE user_id = 'u-race'")
    columns = (
        [
            c
            for (c,) in rig.rows(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'rs_queries' "
                "AND table_schema = current_schema() ORDER BY ordinal_position"
            )
        ]
        if rig.database_url
        else [c[1] for c in rig.rows("PRAGMA table_info(rs_queries)")]
    )
    copy = dict(zip(columns, row, strict=True)) | {"query_id": "f" * 32, "idempotency_key": "other"}
    with pytest.raises(sa.exc.IntegrityError):
        rig.execute(
            f"INSERT INTO rs_queries ({', '.join(copy)}) VALUES ({', '.join(':' + c for c in copy)})", **copy
        )
    rig.banks.release("ICBC")


async def test_same_idempotency_key_returns_the_same_query(rig):
    rig.banks.hold("ICBC")
    first, second = await asyncio.gather(rig.create(key="same"), rig.create(key="same"))
    assert first.query_id == second.query_id
    rig.banks.release("ICBC")
    await status_is(rig, first.query_id, common_pb2.QUERY_STATUS_READY)
    again = await rig.create(key="same")  # after READY: still that query, not a cooldown refusal
    assert again.query_id == first.query_id
    listed = await rig.stub.ListQueries(report_service_pb2.ReportServiceListQueriesRequest(user_id=USER))
    assert len(listed.queries) == 1
    assert [e for e, _ in rig.audit_events(first.query_id)].count("query.accepted") == 1


async def test_cooldown_after_a_report(rig):
    first = await rig.create(key="1")
    ready = await status_is(rig, first.query_id, common_pb2.QUERY_STATUS_READY)
    rig.clock.advance(timedelta(days=3))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.create(key="2")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    typed = from_rpc_error(caught.value)
    assert typed.reason == "COOLDOWN_ACTIVE"
    allowed_at = ready.ready_at.ToDatetime(UTC) + timedelta(days=7)
    assert datetime.fromisoformat(typed.metadata["retry_after"]) == allowed_at
    assert typed.retry_after == timedelta(days=4)

    rig.clock.advance(timedelta(days=4) - timedelta(microseconds=1))
    with pytest.raises(grpc.aio.AioRpcError):
        await rig.create(key="2")
    rig.clock.advance(timedelta(microseconds=1))
    second = await rig.create(key="2")
    assert second.query_id != first.query_id
    listed = await rig.stub.ListQueries(report_service_pb2.ReportServiceListQueriesRequest(user_id=USER))
    assert [q.query_id for q in listed.queries] == [second.query_id, first.query_id]


# --- the 24-hour promise --------------------------------------------------------------------------


async def test_failed_banks_are_asked_again_later_until_they_answer(rig):
    rig.banks.script["BOC"] = [
        TIMED_OUT,
        scripted_outcome("BOC", common_pb2.BANK_OUTCOME_KIND_ERROR, "UNAVAILABLE"),
        SCRIPT["BOC"],
    ]
    query = await rig.create()
    await rig.between_passes(query.query_id)
    pending = await rig.get(query.query_id)
    assert pending.status == common_pb2.QUERY_STATUS_PENDING and pending.banks_answered == 2
    assert rig.banks.asked == [["ICBC", "CMB", "BOC"]]

    def wait_drawn() -> timedelta:
        [(due_at,)] = rig.rows("SELECT due_at FROM rs_work WHERE query_id = :q", q=query.query_id)
        return instant(due_at) - rig.clock.now()

    # Not inside the same fan-out, and not before the backoff: a wait drawn up to 1 minute
    # after the first pass...
    wait = wait_drawn()
    assert timedelta(0) <= wait <= timedelta(minutes=1)
    rig.clock.advance(wait - timedelta(microseconds=1))
    await rig.parts.worker.run_pass(wait=True)
    assert len(rig.banks.asked) == 1
    rig.clock.advance(timedelta(microseconds=1))
    await eventually(lambda: len(rig.banks.asked) == 2)
    await rig.between_passes(query.query_id, 2)
    assert rig.banks.asked[1] == ["BOC"]  # only the bank still missing
    assert (await rig.get(query.query_id)).status == common_pb2.QUERY_STATUS_PENDING

    # ... then up to 2 minutes after the second.
    wait = wait_drawn()
    assert timedelta(0) <= wait <= timedelta(minutes=2)
    rig.clock.advance(wait - timedelta(microseconds=1))
    await rig.parts.worker.run_pass(wait=True)
    assert len(rig.banks.asked) == 2
    rig.clock.advance(timedelta(microseconds=1))
    ready = await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    assert rig.banks.asked == [["ICBC", "CMB", "BOC"], ["BOC"], ["BOC"]]
    assert ready.banks_answered == 3
    report = await rig.report(query.query_id)
    assert list(report.unavailable_banks) == []
    assert [s.bank_code for s in report.summary] == ["ICBC", "CMB", "BOC"]
    assert [m.kind for m in await eventually(rig.messages)] == ["REPORT_READY"]

    outcomes = [
        tuple(pair) for e, d in rig.audit_events(query.query_id) if e == "bank.outcomes" for pair in d["outcomes"]
    ]
    assert outcomes == [
        ("ICBC", "ANSWERED"),
        ("CMB", "ANSWERED"),
        ("BOC", "TIMED_OUT"),
        ("BOC", "ERROR"),
        ("BOC", "ANSWERED"),
    ]


async def test_at_ready_by_the_report_lists_the_banks_that_never_answered(rig):
    await rig.stop_report_service()
    await rig.start_report_service(retry=Backoff(60.0, 3600.0, random.Random(11)))
    twin = Backoff(60.0, 3600.0, random.Random(11))  # draws the very waits the worker draws
    rig.banks.script["BOC"] = [TIMED_OUT]
    query = await rig.create()
    ready_by = query.ready_by.ToDatetime(UTC)
    passes = 1
    await rig.between_passes(query.query_id)
    # Pass after pass, each wait drawn under a doubling ceiling (at most an hour), none past
    # ready_by.
    while rig.clock.now() < ready_by:
        [(due_at,)] = rig.rows("SELECT due_at FROM rs_work WHERE query_id = :q", q=query.query_id)
        due_at = instant(due_at)
        wait = twin.delay(passes)
        assert wait <= min(timedelta(minutes=2 ** min(passes - 1, 6)), timedelta(hours=1))
        assert due_at == min(rig.clock.now() + wait, ready_by)
        assert (await rig.get(query.query_id)).status == common_pb2.QUERY_STATUS_PENDING
        rig.clock.set(due_at)
        if due_at == ready_by:
            break
        passes += 1
        await rig.parts.worker.run_pass(wait=True)  # rather than wait for the worker's next look
        await eventually(lambda n=passes: len(rig.banks.asked) == n)
        await rig.between_passes(query.query_id, passes)
    assert all(asked == ["BOC"] for asked in rig.banks.asked[1:])
    assert len(rig.banks.asked) > 24  # no wait over an hour

    ready = await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    assert len(rig.banks.asked) == passes  # at ready_by the report is made, nothing more asked
    assert ready.ready_at.ToDatetime(UTC) == ready_by
    report = await rig.report(query.query_id)
    assert [s.bank_code for s in report.summary] == ["ICBC", "CMB"]
    assert [(u.bank_code, u.reason) for u in report.unavailable_banks] == [
        ("BOC", "TIMED_OUT: DEADLINE_EXCEEDED")
    ]
    assert [m.kind for m in await eventually(rig.messages)] == ["REPORT_READY"]
    # A report was generated: the cooldown runs from it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.create(key="next")
    assert _reason(caught.value) == "COOLDOWN_ACTIVE"


async def test_failed_only_when_no_bank_answered_by_ready_by_and_no_cooldown(rig):
    for bank in ("ICBC", "CMB"):
        rig.banks.script[bank] = scripted_outcome(bank, common_pb2.BANK_OUTCOME_KIND_ERROR, "UNAVAILABLE")
    failed = await rig.create(banks=("ICBC", "CMB"), key="f")
    await rig.between_passes(failed.query_id)
    rig.clock.advance(timedelta(hours=23, minutes=59))
    await rig.parts.worker.run_pass(wait=True)
    await rig.between_passes(failed.query_id, 2)
    assert (await rig.get(failed.query_id)).status == common_pb2.QUERY_STATUS_PENDING  # not before ready_by
    rig.clock.advance(timedelta(minutes=1))
    await status_is(rig, failed.query_id, common_pb2.QUERY_STATUS_FAILED)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.report(failed.query_id)
    assert _reason(caught.value) == "NOT_FOUND"
    assert rig.rows("SELECT count(*) FROM rs_reports") == [(0,)]
    assert rig.rows("SELECT length(subject_sealed) FROM rs_queries") == [(0,)]  # nothing left to ask
    assert await rig.messages() == []
    # No cooldown: the user may submit again at once.
    rig.banks.script.update(SCRIPT)
    retried = await rig.create(key="g")
    assert retried.status == common_pb2.QUERY_STATUS_PENDING
    await status_is(rig, retried.query_id, common_pb2.QUERY_STATUS_READY)
    assert [e for e, _ in rig.audit_events(failed.query_id)][-1] == "query.failed"


async def test_report_not_ready_while_pending(rig):
    rig.banks.hold("BOC")
    query = await rig.create()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.report(query.query_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(caught.value) == "REPORT_NOT_READY"
    rig.banks.release("BOC")


# --- encrypted, then forgotten --------------------------------------------------------------------


async def test_report_expires_after_seven_natural_days(rig):
    query = await rig.create()
    ready = await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    generated_at = ready.ready_at.ToDatetime(UTC)
    # 7 × 24 h to the microsecond, weekends included (2026-03-02 is a Monday).
    assert ready.expires_at.ToDatetime(UTC) == generated_at + timedelta(hours=168)
    rig.clock.advance(timedelta(days=7) - timedelta(microseconds=1))
    assert await rig.parts.worker.sweep() == []
    assert (await rig.report(query.query_id)).query_id == query.query_id

    rig.clock.advance(timedelta(microseconds=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # expired even before the sweeper ran
        await rig.report(query.query_id)
    assert _reason(caught.value) == "REPORT_EXPIRED"
    assert await rig.parts.worker.sweep() == [query.query_id]
    assert (await rig.get(query.query_id)).status == common_pb2.QUERY_STATUS_EXPIRED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.report(query.query_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(caught.value) == "REPORT_EXPIRED"
    # Data key and ciphertext gone, and with them the subject and the banks' sealed cards.
    assert rig.rows("SELECT count(*) FROM rs_reports") == [(0,)]
    assert rig.rows("SELECT length(subject_sealed) FROM rs_queries") == [(0,)]
    assert rig.rows("SELECT count(*) FROM rs_bank_outcomes WHERE cards_sealed IS NOT NULL") == [(0,)]
    listed = await rig.stub.ListQueries(report_service_pb2.ReportServiceListQueriesRequest(user_id=USER))
    assert [q.status for q in listed.queries] == [common_pb2.QUERY_STATUS_EXPIRED]
    assert await rig.parts.worker.sweep() == []
    assert [e for e, _ in rig.audit_events(query.query_id)][-1] == "report.deleted"


async def test_retention_is_configurable(rig):
    await rig.stop_report_service()
    config = ReportServiceConfig.from_env({"CARDCHECK_REPORT_RETENTION_DAYS": "3"})
    assert config.retention == timedelta(days=3)
    await rig.start_report_service(retention=config.retention)
    query = await rig.create()
    ready = await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    assert ready.expires_at.ToDatetime(UTC) == ready.ready_at.ToDatetime(UTC) + timedelta(days=3)
    rig.clock.advance(timedelta(days=3))
    assert await rig.parts.worker.sweep() == [query.query_id]
    # The cooldown is a rule of its own: still 7 days from the report.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.create(key="next")
    assert _reason(caught.value) == "COOLDOWN_ACTIVE"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"CARDCHECK_REPORT_RETENTION_DAYS": "0"}, "above 0"),
        ({"CARDCHECK_REPORT_RETENTION_DAYS": "seven"}, "not a number"),
        ({"CARDCHECK_REPORT_LEASE_S": "-1"}, "above 0"),
        ({"CARDCHECK_REPORT_MAX_RUNNING": "2.5"}, "whole number"),
        ({"CARDCHECK_REPORT_MAX_RUNNING": "-1"}, "whole number"),
    ],
)
def test_bad_configuration_is_refused(env, problem):
    with pytest.raises(SettingsError, match=problem):
        ReportServiceConfig.from_env(env)


async def test_nothing_personal_in_clear_in_the_database(rig):
    query = await rig.create()
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    await rig.report(query.query_id)
    [(wrapped_key, ciphertext)] = rig.rows("SELECT wrapped_key, ciphertext FROM rs_reports")
    report_bytes = bytes(wrapped_key) + bytes(ciphertext)
    for digits in (b"6222", b"4321", b"6253", b"8765"):
        assert digits not in report_bytes
    stored = b"".join(
        bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
        for table in ("rs_queries", "rs_bank_outcomes", "rs_reports", "rs_work", "rs_audit")
        for row in rig.rows(f"SELECT * FROM {table}")
        for value in row
    )
    if rig.database_url is None:  # and the SQLite files themselves, free pages and journal too
        stored += b"".join(p.read_bytes() for p in rig.tmp_path.glob("report_service.db*") if p.is_file())
    assert query.query_id.encode() in stored  # we are looking at the right rows
    for secret in (SUBJECT.id_number, SUBJECT.phone, SUBJECT.name):
        assert secret.encode() not in stored
        assert secret.encode("utf-8") not in stored
    for masked in ('"6222"', '"4321"', '"6253"', '"8765"'):  # as clear JSON of the cards would hold them
        assert masked.encode() not in stored
    assert (await rig.report(query.query_id)).cards[0].last4 == "4321"  # and it still opens


# --- access ---------------------------------------------------------------------------------------


async def test_another_users_query_is_not_found(rig):
    query = await rig.create()
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    for call, request in (
        (rig.stub.GetQuery, report_service_pb2.GetQueryRequest),
        (rig.stub.GetReport, report_service_pb2.ReportServiceGetReportRequest),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request(user_id="u-2", query_id=query.query_id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert _reason(caught.value) == "NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in rig.stub.WatchQuery(
            report_service_pb2.ReportServiceWatchQueryRequest(user_id="u-2", query_id=query.query_id)
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await rig.stub.ListQueries(report_service_pb2.ReportServiceListQueriesRequest(user_id="u-2"))
    assert list(listed.queries) == []
    assert "report.viewed" not in [e for e, _ in rig.audit_events(query.query_id)]


@pytest.mark.parametrize(
    ("banks", "status", "reason"),
    [
        ((), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (("ICBC", "NOSUCH"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_BANK"),
    ],
)
async def test_bad_bank_codes_are_refused(rig, banks, status, reason):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.create(banks=banks)
    assert caught.value.code() == status
    assert _reason(caught.value) == reason
    assert rig.rows("SELECT count(*) FROM rs_queries") == [(0,)]
    assert rig.rows("SELECT count(*) FROM rs_work") == [(0,)]


# --- WatchQuery -----------------------------------------------------------------------------------


async def _watch(stub, query_id: str, events: list) -> None:
    request = report_service_pb2.ReportServiceWatchQueryRequest(user_id=USER, query_id=query_id)
    async for event in stub.WatchQuery(request):
        events.append(event)


def _banks_in(events: list) -> list[str]:
    return [o.bank_code for e in events for o in e.new_outcomes]


async def test_watch_streams_each_outcome_until_the_query_leaves_pending(rig):
    rig.banks.hold("ICBC", "CMB", "BOC")
    query = await rig.create()
    events = []
    watcher = asyncio.create_task(_watch(rig.stub, query.query_id, events))
    await eventually(lambda: len(events) == 1)
    assert events[0].query.status == common_pb2.QUERY_STATUS_PENDING and not events[0].new_outcomes
    for bank in ("ICBC", "CMB", "BOC"):
        rig.banks.release(bank)
        await eventually(lambda bank=bank: bank in _banks_in(events))
    await asyncio.wait_for(watcher, 15)
    with_outcome = [e for e in events if e.new_outcomes]
    # Each message has only what is new: the watcher keeps the state so far.
    assert [[o.bank_code for o in e.new_outcomes] for e in with_outcome] == [["ICBC"], ["CMB"], ["BOC"]]
    assert [e.query.banks_answered for e in with_outcome] == [1, 2, 3]
    # Progress only: the stream has no field for a card; the cards are in the report.
    assert "cards" not in type(events[0]).DESCRIPTOR.fields_by_name
    assert "cards" not in report_service_pb2.BankProgress.DESCRIPTOR.fields_by_name
    assert [o.kind for e in with_outcome for o in e.new_outcomes] == [ANSWERED] * 3
    report = await rig.report(query.query_id)
    assert sorted(c.last4 for c in report.cards) == ["0042", "4321", "8765"]
    assert events[-1].query.status == common_pb2.QUERY_STATUS_READY

    # A late watcher gets the whole state in one event, and the stream ends.
    late = [
        e
        async for e in rig.stub.WatchQuery(
            report_service_pb2.ReportServiceWatchQueryRequest(user_id=USER, query_id=query.query_id)
        )
    ]
    assert len(late) == 1 and len(late[0].new_outcomes) == 3


async def test_watch_on_another_replica_sees_what_the_first_records(rig):
    """Replica B has no worker of its own to wake its watchers (max_running=0): what it streams
    comes from the database, recorded by replica A, including a failed bank answering later."""
    _, other = await rig.start_replica(max_running=0)
    rig.banks.script["BOC"] = [TIMED_OUT, SCRIPT["BOC"]]
    rig.banks.hold("CMB", "ICBC")
    query = await rig.create(banks=("CMB", "BOC", "ICBC"))  # on replica A
    events = []
    watcher = asyncio.create_task(_watch(other, query.query_id, events))
    await eventually(lambda: events)
    rig.banks.release("CMB")
    await eventually(lambda: "BOC" in _banks_in(events))
    late_events = []
    late = asyncio.create_task(_watch(other, query.query_id, late_events))
    await eventually(lambda: late_events)
    assert sorted(o.bank_code for o in late_events[0].new_outcomes) == ["BOC", "CMB"]  # the state so far
    rig.banks.release("ICBC")
    await rig.between_passes(query.query_id)
    await eventually(lambda: "ICBC" in _banks_in(events))
    rig.clock.advance(timedelta(minutes=1))
    await asyncio.wait_for(asyncio.gather(watcher, late), 15)
    changes = [(o.bank_code, o.kind) for e in events[1:] for o in e.new_outcomes]
    assert changes == [
        ("CMB", ANSWERED),
        ("BOC", common_pb2.BANK_OUTCOME_KIND_TIMED_OUT),
        ("ICBC", ANSWERED),
        ("BOC", ANSWERED),
    ]
    assert events[-1].query.status == common_pb2.QUERY_STATUS_READY
    assert late_events[-1].query.status == common_pb2.QUERY_STATUS_READY


async def test_a_watch_on_another_replica_is_woken_by_the_change_not_a_poll(rig, monkeypatch):
    """With the safety poll an hour away, only the change notification (NOTIFY on PostgreSQL,
    in-process on the one SQLite file) can bring what replica A records to a watcher on B."""
    monkeypatch.setattr(servicer, "WATCH_SAFETY_POLL_S", 3600.0)
    _, other = await rig.start_replica(max_running=0)
    rig.banks.hold("ICBC", "CMB", "BOC")
    query = await rig.create()  # on replica A, which runs it
    events = []
    watcher = asyncio.create_task(_watch(other, query.query_id, events))
    await eventually(lambda: events)
    loop = asyncio.get_running_loop()
    for n, bank in enumerate(("ICBC", "CMB", "BOC"), start=2):
        released = loop.time()
        rig.banks.release(bank)
        await eventually(lambda n=n: len(events) >= n, within=5)
        assert loop.time() - released < 1.0
        assert [o.bank_code for o in events[-1].new_outcomes] == [bank]
    await asyncio.wait_for(watcher, 5)
    assert events[-1].query.status == common_pb2.QUERY_STATUS_READY


# --- durability (in-process; the real-process crashes are in test_report_service_durability) ----


async def test_resumes_after_restart_asking_only_the_missing_banks(rig):
    rig.banks.hold("BOC")
    query = await rig.create()

    async def two_recorded():
        return (await rig.get(query.query_id)).banks_answered == 2

    await eventually(two_recorded)
    await rig.stop_report_service()  # gives its lease back: the next one need not wait for it
    rig.banks.release("BOC")
    await rig.start_report_service()
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    assert rig.banks.asked == [["ICBC", "CMB", "BOC"], ["BOC"]]
    report = await rig.report(query.query_id)
    assert [s.bank_code for s in report.summary] == ["ICBC", "CMB", "BOC"]
    assert rig.rows("SELECT count(*) FROM rs_reports") == [(1,)]
    await eventually(rig.messages)
    await eventually(lambda: rig.rows("SELECT count(*) FROM rs_work") == [(0,)])
    await rig.parts.worker.run_pass(wait=True)
    assert len(await rig.messages()) == 1


async def test_a_worker_that_claims_back_its_own_running_work_carries_it_on(rig):
    """Its lease ran out unrenewed while it waited on a bank and its own next pass claimed the
    work again: the work under way goes on under the new lease (the old one is fenced out), and
    no bank is asked twice."""
    rig.banks.hold("BOC")
    query = await rig.create()

    async def two_recorded():
        return (await rig.get(query.query_id)).banks_answered == 2

    await eventually(two_recorded)
    rig.clock.advance(rig.parts.worker.lease)
    await rig.parts.worker.run_pass()  # claims it back: passes 2, the same owner
    sql = "SELECT lease_owner, passes FROM rs_work WHERE query_id = :q"
    assert rig.rows(sql, q=query.query_id) == [(rig.parts.worker.owner, 2)]
    rig.banks.release("BOC")
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    assert rig.banks.asked == [["ICBC", "CMB", "BOC"]]


async def test_report_ready_sms_survives_a_notifier_outage(rig):
    await rig.stop_notifier()
    query = await rig.create()
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    sql = "SELECT kind, lease_owner FROM rs_work WHERE query_id = :q"
    # The notifier is down: the SMS stays owed, to be tried again a minute later.
    await eventually(lambda: rig.rows(sql, q=query.query_id) == [("NOTIFY", None)])
    await rig.parts.worker.run_pass(wait=True)
    assert rig.rows(sql, q=query.query_id) == [("NOTIFY", None)]

    await rig.start_notifier()

    async def delivered():  # time moves on to each retry, until the notifier takes the SMS
        due = rig.rows(
            "SELECT due_at FROM rs_work WHERE query_id = :q AND lease_owner IS NULL", q=query.query_id
        )
        if due:
            rig.clock.set(max(rig.clock.now(), instant(due[0][0])))
        return await rig.messages()

    messages = await eventually(delivered, within=30)
    assert [m.kind for m in messages] == ["REPORT_READY"]
    await eventually(lambda: rig.rows(sql, q=query.query_id) == [])
    await rig.parts.worker.run_pass(wait=True)
    assert len(await rig.messages()) == 1


async def test_stray_work_is_dropped_rather_than_claimed_forever(rig):
    query = await rig.create()
    await status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    await eventually(lambda: rig.rows("SELECT count(*) FROM rs_work") == [(0,)])
    rig.clock.advance(timedelta(days=7))
    assert await rig.parts.worker.sweep() == [query.query_id]
    # Work left behind for a query that has nothing more to do (here: by hand).
    rig.execute(
        "INSERT INTO rs_work (query_id, kind, due_at, passes, created_at) VALUES (:q, 'NOTIFY', :t, 0, :t)",
        q=query.query_id,
        t=rig.clock.now(),
    )
    await rig.parts.worker.run_pass(wait=True)  # (or the worker's own pass claims it first)
    await eventually(lambda: rig.rows("SELECT count(*) FROM rs_work") == [(0,)])
    assert rig.parts.worker.running == set()
    assert len(await rig.messages()) == 1


async def test_outcomes_arriving_in_a_burst_are_one_batch_and_a_pause_ends_it() -> None:
    from report_service.reports import BankOutcome
    from report_service.worker import _Arrivals

    arrivals = _Arrivals(gather_s=0.05, gather_max_s=1.0)

    async def arrive() -> None:
        for code in ("ICBC", "CCB", "ABC", "BOC"):  # 30 ms apart: past 50 ms of the first at the third
            arrivals.put(BankOutcome(bank_code=code, kind="ANSWERED"))
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.2)  # a pause: what comes after is the next batch
        arrivals.put(BankOutcome(bank_code="CMB", kind="ANSWERED"))

    arriving = asyncio.create_task(arrive())
    first = await arrivals.batch(5)
    second = await arrivals.batch(1)
    await arriving
    assert [o.bank_code for o in first] == ["ICBC", "CCB", "ABC", "BOC"]
    assert [o.bank_code for o in second] == ["CMB"]
