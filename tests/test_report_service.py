"""report_service over real grpc.aio servers: a scripted fake bank_connector, the real notifier,
on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.settings import Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import (
    bank_connector_pb2_grpc,
    common_pb2,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)
from notifier.app import build as build_notifier
from report_service.app import ReportServiceParts, build_parts
from report_service.reports import NOTICE

USER = "u-1"
PHONE = "13912345678"
SUBJECT = report_service_pb2.Subject(name="张三", id_number="220102199003071234", phone=PHONE)

ANSWERED = common_pb2.BANK_OUTCOME_KIND_ANSWERED


def _card(bank: str, card_type: int, first4: str, last4: str) -> common_pb2.MaskedCard:
    return common_pb2.MaskedCard(bank_code=bank, card_type=card_type, first4=first4, last4=last4)


SCRIPT = {
    "ICBC": common_pb2.BankOutcome(
        bank_code="ICBC",
        kind=ANSWERED,
        cards=[
            _card("ICBC", common_pb2.CARD_TYPE_DEBIT, "6222", "4321"),
            _card("ICBC", common_pb2.CARD_TYPE_CREDIT, "6253", "8765"),
        ],
    ),
    "CMB": common_pb2.BankOutcome(bank_code="CMB", kind=ANSWERED),  # answered: no cards
    "BOC": common_pb2.BankOutcome(
        bank_code="BOC", kind=common_pb2.BANK_OUTCOME_KIND_TIMED_OUT, detail="no answer within 5s"
    ),
}


class FakeBankConnector(bank_connector_pb2_grpc.BankConnectorServicer):
    """Streams scripted outcomes in the order asked; a closed gate holds a bank back."""

    def __init__(self) -> None:
        self.script = dict(SCRIPT)
        self.gates: dict[str, asyncio.Event] = {}
        self.asked: list[list[str]] = []

    def hold(self, *banks: str) -> None:
        for bank in banks:
            self.gates[bank] = asyncio.Event()

    def release(self, *banks: str) -> None:
        for bank in banks:
            self.gates.pop(bank).set()

    async def FanOut(self, request, context):
        self.asked.append(list(request.bank_codes))
        assert request.id_number == SUBJECT.id_number and request.name == SUBJECT.name
        for bank in request.bank_codes:
            gate = self.gates.get(bank)
            if gate is not None:
                await gate.wait()
            yield self.script.get(bank, common_pb2.BankOutcome(bank_code=bank, kind=ANSWERED))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Rig:
    """The fake bank_connector, the real notifier and report_service, on one database."""

    def __init__(self, tmp_path: Path, database_url: str | None) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.clock = ManualClock(datetime(2026, 3, 2, 8, 0, tzinfo=UTC))
        self.banks = FakeBankConnector()
        self.spans = InMemorySpanExporter()
        self.notifier_port = _free_port()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.parts: ReportServiceParts | None = None
        self.notifier_host = None

    def settings(self, **addresses: str) -> Settings:
        base = Settings.from_env({})
        return dataclasses.replace(
            base,
            data_dir=self.tmp_path,
            database_url=self.database_url,
            addresses={**base.addresses, **addresses},
        )

    async def start_banks(self) -> None:
        server = grpc.aio.server()
        bank_connector_pb2_grpc.add_BankConnectorServicer_to_server(self.banks, server)
        self.bank_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._closers.append(lambda: server.stop(0))

    async def start_notifier(self) -> None:
        settings = self.settings(notifier=f"127.0.0.1:{self.notifier_port}")
        self.notifier_host = await build_notifier(settings, clock=self.clock)
        await self.notifier_host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.notifier_port}")
        self.inbox = notifier_pb2_grpc.NotifierStub(channel)
        self._closers.append(channel.close)

    async def stop_notifier(self) -> None:
        await self.notifier_host.stop(0)

    async def start_report_service(self) -> report_service_pb2_grpc.ReportServiceStub:
        settings = self.settings(
            report_service="127.0.0.1:0",
            bank_connector=f"127.0.0.1:{self.bank_port}",
            notifier=f"127.0.0.1:{self.notifier_port}",
        )
        provider = make_tracer_provider("report_service", self.tmp_path, exporter=self.spans)
        self.parts = await build_parts(
            settings, clock=self.clock, tracer_provider=provider, pass_interval_s=0.2, sweep_interval_s=3600
        )
        port = await self.parts.host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._closers.append(channel.close)
        self.stub = report_service_pb2_grpc.ReportServiceStub(channel)
        return self.stub

    async def stop_report_service(self) -> None:
        await self.parts.host.stop(0)

    async def close(self) -> None:
        if self.parts is not None:
            await self.parts.host.stop(0)
        if self.notifier_host is not None:
            await self.notifier_host.stop(0)
        for close in reversed(self._closers):
            await close()

    async def create(self, banks=("ICBC", "CMB", "BOC"), key="k-1", user=USER) -> common_pb2.Query:
        return await self.stub.CreateQuery(
            report_service_pb2.CreateQueryRequest(
                user_id=user,
                subject=SUBJECT,
                bank_codes=list(banks),
                agreement_version="v1",
                idempotency_key=key,
            )
        )

    async def get(self, query_id: str, user: str = USER) -> common_pb2.Query:
        return await self.stub.GetQuery(report_service_pb2.GetQueryRequest(user_id=user, query_id=query_id))

    async def report(self, query_id: str, user: str = USER) -> common_pb2.Report:
        return await self.stub.GetReport(report_service_pb2.GetQueryRequest(user_id=user, query_id=query_id))

    async def messages(self) -> list[notifier_pb2.Message]:
        return list((await self.inbox.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))).messages)

    def rows(self, sql: str) -> list[tuple]:
        url = self.database_url or f"sqlite:///{self.tmp_path / 'report_service.db'}"
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(sa.text(sql))]
        finally:
            engine.dispose()


async def eventually(check: Callable[[], object], within: float = 15.0):
    """Polls `check` (plain or async) until it returns something truthy, within a bounded deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def _status_is(rig: Rig, query_id: str, status: int):
    async def check():
        query = await rig.get(query_id)
        return query if query.status == status else None

    return await eventually(check)


@pytest.fixture
async def rig(tmp_path, database_url):
    rig = Rig(tmp_path, database_url)
    await rig.start_banks()
    await rig.start_notifier()
    await rig.start_report_service()
    yield rig
    await rig.close()


def _reason(error: grpc.aio.AioRpcError) -> str:
    typed = from_rpc_error(error)
    assert typed is not None, error
    return typed.reason


async def test_accepted_query_becomes_ready_with_its_report_and_one_sms(rig):
    accepted = await rig.create()
    assert accepted.status == common_pb2.QUERY_STATUS_PENDING
    assert accepted.banks_total == 3
    assert accepted.ready_by.ToDatetime(UTC) == rig.clock.now() + timedelta(hours=24)

    ready = await _status_is(rig, accepted.query_id, common_pb2.QUERY_STATUS_READY)
    assert ready.banks_answered == 3
    assert ready.ready_at.ToDatetime(UTC) == rig.clock.now()
    assert ready.expires_at.ToDatetime(UTC) == rig.clock.now() + timedelta(days=7)

    report = await rig.report(accepted.query_id)
    assert [(s.bank_code, s.bank_name, s.debit_count, s.credit_count) for s in report.summary] == [
        ("ICBC", "中国工商银行", 1, 1),
        ("CMB", "招商银行", 0, 0),
    ]
    assert [(c.bank_code, c.card_type, c.first4, c.last4) for c in report.cards] == [
        ("ICBC", common_pb2.CARD_TYPE_DEBIT, "6222", "4321"),
        ("ICBC", common_pb2.CARD_TYPE_CREDIT, "6253", "8765"),
    ]
    assert [u.bank_code for u in report.unavailable_banks] == ["BOC"]
    assert "TIMED_OUT" in report.unavailable_banks[0].reason
    assert report.notice == NOTICE
    assert report.generated_at == ready.ready_at and report.expires_at == ready.expires_at

    messages = await eventually(rig.messages)
    await rig.parts.worker.run_pass()  # another pass sends nothing more
    messages = await rig.messages()
    assert [m.kind for m in messages] == ["REPORT_READY"]
    assert "4321" not in messages[0].body

    listed = await rig.stub.ListQueries(report_service_pb2.ListUserQueriesRequest(user_id=USER))
    assert [q.query_id for q in listed.queries] == [accepted.query_id]

    # The execution and its fan-out belong to the trace of the request that submitted the query.
    spans = rig.spans.get_finished_spans()
    create = next(s for s in spans if s.name.endswith("CreateQuery"))
    execute = next(s for s in spans if s.name == "query.execute")
    fan_out = next(s for s in spans if s.name.endswith("FanOut"))
    assert execute.context.trace_id == create.context.trace_id == fan_out.context.trace_id


async def test_second_concurrent_query_is_refused(rig):
    rig.banks.hold("ICBC")
    results = await asyncio.gather(
        rig.create(key="a"), rig.create(key="b"), rig.create(key="c"), return_exceptions=True
    )
    accepted = [r for r in results if isinstance(r, common_pb2.Query)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) == 1 and len(refused) == 2
    for error in refused:
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert _reason(error) == "QUERY_IN_PROGRESS"
    rig.banks.release("ICBC")
    await _status_is(rig, accepted[0].query_id, common_pb2.QUERY_STATUS_READY)


async def test_same_idempotency_key_returns_the_same_query(rig):
    rig.banks.hold("ICBC")
    first, second = await asyncio.gather(rig.create(key="same"), rig.create(key="same"))
    assert first.query_id == second.query_id
    rig.banks.release("ICBC")
    await _status_is(rig, first.query_id, common_pb2.QUERY_STATUS_READY)
    again = await rig.create(key="same")  # after READY: still that query, not a cooldown refusal
    assert again.query_id == first.query_id
    listed = await rig.stub.ListQueries(report_service_pb2.ListUserQueriesRequest(user_id=USER))
    assert len(listed.queries) == 1


async def test_cooldown_after_a_report(rig):
    first = await rig.create(key="1")
    ready = await _status_is(rig, first.query_id, common_pb2.QUERY_STATUS_READY)
    rig.clock.advance(timedelta(days=3))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.create(key="2")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    typed = from_rpc_error(caught.value)
    assert typed.reason == "COOLDOWN_ACTIVE"
    allowed_at = ready.ready_at.ToDatetime(UTC) + timedelta(days=7)
    assert datetime.fromisoformat(typed.metadata["retry_after"]) == allowed_at
    assert typed.retry_after == timedelta(days=4)

    rig.clock.advance(timedelta(days=4))
    second = await rig.create(key="2")
    assert second.query_id != first.query_id
    listed = await rig.stub.ListQueries(report_service_pb2.ListUserQueriesRequest(user_id=USER))
    assert [q.query_id for q in listed.queries] == [second.query_id, first.query_id]


async def test_failed_query_has_no_report_and_no_cooldown(rig):
    for bank in ("ICBC", "CMB"):
        rig.banks.script[bank] = common_pb2.BankOutcome(
            bank_code=bank, kind=common_pb2.BANK_OUTCOME_KIND_ERROR
        )
    failed = await rig.create(banks=("ICBC", "CMB"), key="f")
    await _status_is(rig, failed.query_id, common_pb2.QUERY_STATUS_FAILED)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.report(failed.query_id)
    assert _reason(caught.value) == "NOT_FOUND"
    rig.banks.script.update(SCRIPT)
    retried = await rig.create(key="g")
    assert retried.status == common_pb2.QUERY_STATUS_PENDING
    await _status_is(rig, retried.query_id, common_pb2.QUERY_STATUS_READY)


async def test_report_not_ready_while_pending(rig):
    rig.banks.hold("BOC")
    query = await rig.create()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.report(query.query_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(caught.value) == "REPORT_NOT_READY"
    rig.banks.release("BOC")


async def test_report_expires_after_seven_days(rig):
    query = await rig.create()
    await _status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    rig.clock.advance(timedelta(days=7) - timedelta(seconds=1))
    assert await rig.parts.worker.sweep() == []
    assert (await rig.report(query.query_id)).query_id == query.query_id

    rig.clock.advance(timedelta(seconds=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # expired even before the sweeper ran
        await rig.report(query.query_id)
    assert _reason(caught.value) == "REPORT_EXPIRED"
    assert await rig.parts.worker.sweep() == [query.query_id]
    assert (await rig.get(query.query_id)).status == common_pb2.QUERY_STATUS_EXPIRED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rig.report(query.query_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(caught.value) == "REPORT_EXPIRED"
    assert rig.rows(f"SELECT count(*) FROM rs_reports WHERE query_id = '{query.query_id}'") == [(0,)]
    listed = await rig.stub.ListQueries(report_service_pb2.ListUserQueriesRequest(user_id=USER))
    assert [q.status for q in listed.queries] == [common_pb2.QUERY_STATUS_EXPIRED]


async def test_another_users_query_is_not_found(rig):
    query = await rig.create()
    await _status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    for call in (
        rig.stub.GetQuery,
        rig.stub.GetReport,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(report_service_pb2.GetQueryRequest(user_id="u-2", query_id=query.query_id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert _reason(caught.value) == "NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in rig.stub.WatchQuery(
            report_service_pb2.GetQueryRequest(user_id="u-2", query_id=query.query_id)
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await rig.stub.ListQueries(report_service_pb2.ListUserQueriesRequest(user_id="u-2"))
    assert list(listed.queries) == []


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


async def test_watch_streams_each_outcome_until_the_query_leaves_pending(rig):
    rig.banks.hold("ICBC", "CMB", "BOC")
    query = await rig.create()
    events = []

    async def watch():
        async for event in rig.stub.WatchQuery(
            report_service_pb2.GetQueryRequest(user_id=USER, query_id=query.query_id)
        ):
            events.append(event)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: len(events) == 1)
    assert events[0].query.status == common_pb2.QUERY_STATUS_PENDING and not events[0].outcomes
    for bank in ("ICBC", "CMB", "BOC"):
        rig.banks.release(bank)
        await eventually(lambda bank=bank: any(e.outcome.bank_code == bank for e in events))
    await asyncio.wait_for(watcher, 15)
    with_outcome = [e for e in events if e.HasField("outcome")]
    assert [e.outcome.bank_code for e in with_outcome] == ["ICBC", "CMB", "BOC"]
    assert [len(e.outcomes) for e in with_outcome] == [1, 2, 3]
    assert with_outcome[0].outcome.cards[0].last4 == "4321"
    assert events[-1].query.status == common_pb2.QUERY_STATUS_READY

    # A late watcher gets the whole state in one event, and the stream ends.
    late = [
        e
        async for e in rig.stub.WatchQuery(
            report_service_pb2.GetQueryRequest(user_id=USER, query_id=query.query_id)
        )
    ]
    assert len(late) == 1 and len(late[0].outcomes) == 3


async def test_resumes_after_restart_asking_only_the_missing_banks(rig):
    rig.banks.hold("BOC")
    query = await rig.create()

    async def two_recorded():
        return (await rig.get(query.query_id)).banks_answered == 2

    await eventually(two_recorded)
    await rig.stop_report_service()
    rig.banks.release("BOC")
    await rig.start_report_service()
    await _status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    assert rig.banks.asked == [["ICBC", "CMB", "BOC"], ["BOC"]]
    report = await rig.report(query.query_id)
    assert [s.bank_code for s in report.summary] == ["ICBC", "CMB"]
    assert rig.rows("SELECT count(*) FROM rs_reports") == [(1,)]
    await eventually(rig.messages)
    await rig.parts.worker.run_pass()
    assert len(await rig.messages()) == 1


async def test_report_ready_sms_survives_a_notifier_outage(rig):
    await rig.stop_notifier()
    query = await rig.create()
    await _status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    await rig.parts.worker.run_pass()  # the notifier is down: nothing accepted, nothing lost
    sql = f"SELECT report_ready_sms_sent FROM rs_queries WHERE query_id = '{query.query_id}'"
    assert [bool(v) for (v,) in rig.rows(sql)] == [False]

    await rig.start_notifier()
    messages = await eventually(rig.messages, within=30)
    assert [m.kind for m in messages] == ["REPORT_READY"]

    await eventually(lambda: [bool(v) for (v,) in rig.rows(sql)] == [True])
    await rig.parts.worker.run_pass()
    assert len(await rig.messages()) == 1


async def test_nothing_personal_in_clear_in_the_database(rig):
    query = await rig.create()
    await _status_is(rig, query.query_id, common_pb2.QUERY_STATUS_READY)
    [(wrapped_key, ciphertext)] = rig.rows("SELECT wrapped_key, ciphertext FROM rs_reports")
    report_bytes = bytes(wrapped_key) + bytes(ciphertext)
    for digits in (b"6222", b"4321", b"6253", b"8765"):
        assert digits not in report_bytes
    stored = b"".join(
        bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
        for table in ("rs_queries", "rs_bank_outcomes", "rs_reports")
        for row in rig.rows(f"SELECT * FROM {table}")
        for value in row
    )
    if rig.database_url is None:  # and the SQLite files themselves, free pages and journal too
        stored += b"".join(p.read_bytes() for p in rig.tmp_path.glob("report_service.db*") if p.is_file())
    assert query.query_id.encode() in stored  # we are looking at the right rows
    for secret in (SUBJECT.id_number, SUBJECT.phone, SUBJECT.name):
        assert secret.encode() not in stored
    assert (await rig.report(query.query_id)).cards[0].last4 == "4321"  # and it still opens
