"""The notifier's outbox: retries with backoff, giving up, restarts, two replicas on one
database, the per-phone cap, and what never leaks. Real grpc.aio servers, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from collections import Counter
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cardcheck.runtime.clock import ManualClock, SystemClock
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from notifier.app import NotifierParts, build_parts
from notifier.config import Cap, NotifierConfig
from notifier.providers import ConsoleProvider, DeliveryError, OutgoingSms, SandboxProvider, SmsProvider
from tests.harness.databases import rows
from tests.harness.waiting import eventually
from tests.test_notifier import PHONE, _code_request, _settings

QUEUED = notifier_pb2.DELIVERY_STATUS_QUEUED
DELIVERED = notifier_pb2.DELIVERY_STATUS_DELIVERED
FAILED = notifier_pb2.DELIVERY_STATUS_FAILED


class ScriptedProvider(SmsProvider):
    """Fails while `failures` says so (a count, or forever with None), can be made to hang, and
    notes any message tried twice at the same time."""

    name = "scripted"

    def __init__(
        self, failures: int | None = 0, error: Exception | None = None, delay_s: float = 0.0
    ) -> None:
        self.failures = failures
        self.error = error or DeliveryError("HTTP_503")
        self.delay_s = delay_s
        self.hang = False
        self.calls: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.sent: list[OutgoingSms] = []
        self.in_flight: set[str] = set()
        self.overlaps: list[str] = []

    def _fails(self, sms: OutgoingSms) -> bool:
        if self.failures is None:
            return True
        if self.failures > 0:
            self.failures -= 1
            return True
        return False

    async def deliver(self, sms: OutgoingSms) -> None:
        if sms.message_id in self.in_flight:
            self.overlaps.append(sms.message_id)
        self.in_flight.add(sms.message_id)
        try:
            fails = self._fails(sms)  # decided before any await: attempts run concurrently
            self.calls[sms.message_id] += 1
            if self.hang:
                await asyncio.Event().wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if fails:
                raise self.error
            self.delivered[sms.message_id] += 1
            self.sent.append(sms)
        finally:
            self.in_flight.discard(sms.message_id)


class FirstAttemptFails(ScriptedProvider):
    """Every message's first attempt fails; later ones succeed."""

    def _fails(self, sms: OutgoingSms) -> bool:
        return self.calls[sms.message_id] == 0


@dataclasses.dataclass
class Running:
    parts: NotifierParts
    stub: notifier_pb2_grpc.NotifierStub
    channel: grpc.aio.Channel

    async def delivery(self, message_id: str) -> notifier_pb2.GetDeliveryResponse:
        return await self.stub.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id=message_id))

    async def close(self) -> None:
        await self.channel.close()
        await self.parts.host.stop(0)


@pytest.fixture
async def start(tmp_path, database_url):
    running: list[Running] = []

    async def start(provider: SmsProvider, *, sandbox: bool = False, **kwargs) -> Running:
        config = kwargs.pop("config", None) or NotifierConfig(retry_base_s=10, retry_max_s=80)
        parts = await build_parts(
            _settings(tmp_path, database_url, sandbox=sandbox), provider=provider, config=config, **kwargs
        )
        port = await parts.host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        one = Running(parts, notifier_pb2_grpc.NotifierStub(channel), channel)
        running.append(one)
        return one

    yield start
    for one in reversed(running):
        await one.close()


def _rows(tmp_path: Path, database_url: str | None, sql: str) -> list[tuple]:
    return rows(database_url, tmp_path, "notifier", sql)


def _seconds(stamp, clock: ManualClock) -> float:
    return (stamp.ToDatetime().replace(tzinfo=clock.now().tzinfo) - clock.now()).total_seconds()


async def test_failing_provider_is_retried_with_backoff_until_delivered(start):
    clock = ManualClock()
    provider = ScriptedProvider(failures=3)
    node = await start(provider, clock=clock, start_worker=False)
    worker = node.parts.worker

    sent = await node.stub.Send(_code_request("b1", "135246"))
    assert sent.status == QUEUED  # recorded; the first attempt failed
    delivery = await node.delivery(sent.message_id)
    assert (delivery.attempts, delivery.last_error) == (1, "HTTP_503")
    for attempt, ceiling in ((2, 10), (3, 20), (4, 40)):
        wait = _seconds(delivery.next_attempt_at, clock)
        assert 0 <= wait <= ceiling, (attempt, wait)  # base 10 s, doubling, fully jittered
        early = min(0.5, wait)
        clock.advance(timedelta(seconds=wait - early))
        if early > 0:
            assert await worker.run_once() == 0  # not due yet: nothing is tried early
        clock.advance(timedelta(seconds=early))
        assert await worker.run_once() == 1
        delivery = await node.delivery(sent.message_id)
        assert delivery.attempts == attempt
    assert delivery.status == DELIVERED
    assert delivery.last_error == "HTTP_503"  # what the last failed attempt said
    assert not delivery.HasField("next_attempt_at")
    assert provider.calls[sent.message_id] == 4 and provider.delivered[sent.message_id] == 1
    assert "135246" in provider.sent[0].body and provider.sent[0].phone == PHONE
    # Asked again with the same key: the same message, not a second SMS.
    again = await node.stub.Send(_code_request("b1", "135246"))
    assert (again.message_id, again.status) == (sent.message_id, DELIVERED)
    assert await worker.run_once() == 0 and provider.calls[sent.message_id] == 4


async def test_a_retry_claimed_while_the_failed_attempt_winds_up_gets_an_attempt_of_its_own(start):
    # The claim loop may claim a retry come due between the moment a failed attempt records its
    # failure and the moment that attempt's task ends: the retry must run, not be taken for the
    # attempt still "running" (it would sit leased until the lease ran out, counted twice).
    clock = ManualClock()
    provider = ScriptedProvider(failures=1)
    node = await start(provider, clock=clock, start_worker=False, config=NotifierConfig(retry_base_s=1, retry_max_s=1))
    worker, store = node.parts.worker, node.parts.store
    record_failure = store.record_failure
    retries: list[asyncio.Task] = []

    async def claim_as_it_is_recorded(*args, **kwargs):
        outcome = await record_failure(*args, **kwargs)
        clock.advance(timedelta(seconds=5))  # the retry is due at once
        claimed, _ = await store.claim_due(worker.owner, 10)
        retries.extend(worker.dispatch(row) for row in claimed)
        return outcome

    store.record_failure = claim_as_it_is_recorded
    sent = await node.stub.Send(_code_request("race"))
    await eventually(lambda: len(retries) == 1, within=10)
    await asyncio.wait_for(retries[0], 10)
    delivery = await node.delivery(sent.message_id)
    assert (delivery.status, delivery.attempts) == (DELIVERED, 2)
    assert provider.calls[sent.message_id] == 2 and not provider.overlaps


async def test_background_worker_delivers_without_being_asked(start):
    provider = ScriptedProvider(failures=2)
    config = NotifierConfig(retry_base_s=0.02, retry_max_s=0.05, poll_interval_s=0.02)
    node = await start(provider, config=config)
    sent = await node.stub.Send(_code_request("bg"))
    assert sent.status == QUEUED

    async def delivered():
        return (await node.delivery(sent.message_id)).status == DELIVERED

    await eventually(delivered)
    assert (await node.delivery(sent.message_id)).attempts == 3


async def test_retries_stop_at_the_end_of_the_window_and_asking_again_retries(start, tmp_path, database_url):
    clock = ManualClock()
    provider = ScriptedProvider(failures=None, error=DeliveryError("TIMEOUT"))
    node = await start(provider, clock=clock, start_worker=False)
    sent = await node.stub.Send(_code_request("w1", "777123"))
    for _ in range(20):
        delivery = await node.delivery(sent.message_id)
        if delivery.status != QUEUED:
            break
        clock.set(delivery.next_attempt_at.ToDatetime().replace(tzinfo=clock.now().tzinfo))
        await node.parts.worker.run_once()
    assert delivery.status == FAILED and delivery.last_error == "TIMEOUT"
    # A code lives 5 minutes: the last attempt is at the end of that window, none after.
    assert delivery.last_attempt_at == delivery.retry_until
    assert _seconds(delivery.retry_until, clock) == 0
    assert delivery.retry_until.ToSeconds() - delivery.created_at.ToSeconds() == 300
    # Given up: the sealed text is gone.
    [(sealed,)] = _rows(tmp_path, database_url, "SELECT body_sealed FROM nt_messages")
    assert sealed is None

    provider.failures = 0
    again = await node.stub.Send(_code_request("w1", "777123"))
    assert again.message_id == sent.message_id
    assert again.status == DELIVERED
    assert provider.delivered[sent.message_id] == 1 and "777123" in provider.sent[0].body
    # The same key with another text is not the same message.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.Send(_code_request("w1", "999999"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_refusal_that_a_retry_cannot_mend_fails_at_once(start):
    provider = ScriptedProvider(failures=None, error=DeliveryError("HTTP_400", retryable=False))
    node = await start(provider, clock=ManualClock(), start_worker=False)
    sent = await node.stub.Send(_code_request("p1"))
    assert sent.status == FAILED
    delivery = await node.delivery(sent.message_id)
    assert (delivery.attempts, delivery.last_error) == (1, "HTTP_400")
    assert await node.parts.worker.run_once() == 0


async def test_a_message_held_by_a_dead_replica_is_delivered_after_restart(start):
    clock = ManualClock()
    stuck = ScriptedProvider()
    stuck.hang = True  # the replica hangs mid-attempt, as one that died would
    first = await start(stuck, clock=clock, start_worker=False, config=NotifierConfig(webhook_timeout_s=0.2))
    sent = await first.stub.Send(_code_request("c1"))
    assert sent.status == QUEUED
    assert stuck.calls[sent.message_id] == 1

    working = ScriptedProvider()
    second = await start(working, clock=clock, start_worker=False)
    assert await second.parts.worker.run_once() == 0  # still held by the first replica's lease
    clock.advance(first.parts.worker.lease)
    assert await second.parts.worker.run_once() == 1
    delivery = await second.delivery(sent.message_id)
    assert (delivery.status, delivery.attempts) == (DELIVERED, 2)
    assert working.delivered[sent.message_id] == 1


class GatedFailure(ScriptedProvider):
    """Every attempt waits at the provider until `gate` opens, then fails (retryably)."""

    def __init__(self) -> None:
        super().__init__(failures=None)
        self.gate = asyncio.Event()

    async def deliver(self, sms: OutgoingSms) -> None:
        self.calls[sms.message_id] += 1
        await self.gate.wait()
        raise self.error


async def test_a_stale_attempt_cannot_reschedule_a_message_another_replica_took_over(
    start, tmp_path, database_url, caplog
):
    clock = ManualClock()
    config = NotifierConfig(webhook_timeout_s=0.2, retry_base_s=10, retry_max_s=80)
    slow = GatedFailure()
    first = await start(slow, clock=clock, start_worker=False, config=config)
    sent = await first.stub.Send(_code_request("s1"))
    assert sent.status == QUEUED  # attempt 1 still at the provider
    clock.advance(first.parts.worker.lease)
    stuck = ScriptedProvider()
    stuck.hang = True
    second = await start(stuck, clock=clock, start_worker=False, config=config)
    taking = asyncio.create_task(second.parts.worker.run_once())
    try:
        await eventually(lambda: stuck.calls[sent.message_id] == 1)  # attempt 2, the second's
        with caplog.at_level(logging.INFO, logger="notifier.delivery"):
            slow.gate.set()  # attempt 1 fails now, long after its lease ran out
            await eventually(lambda: "after its lease passed on" in caplog.text)
        sql = "SELECT attempts, lease_owner, last_error FROM nt_messages"
        assert _rows(tmp_path, database_url, sql) == [(2, second.parts.worker.owner, None)]  # untouched
    finally:
        taking.cancel()


async def test_a_graceful_stop_frees_what_it_held_for_the_next_start(start):
    clock = ManualClock()
    stuck = ScriptedProvider()
    stuck.hang = True
    first = await start(stuck, clock=clock, start_worker=False, config=NotifierConfig(webhook_timeout_s=0.2))
    sent = await first.stub.Send(_code_request("g1"))
    assert sent.status == QUEUED
    await first.close()  # the attempt is cancelled and its lease released

    working = ScriptedProvider()
    second = await start(working, clock=clock)  # its worker runs: nothing to call by hand

    async def delivered():
        return (await second.delivery(sent.message_id)).status == DELIVERED

    await eventually(delivered)
    assert working.delivered[sent.message_id] == 1


async def test_two_replicas_on_one_database_never_try_one_message_at_once(start):
    provider = FirstAttemptFails(delay_s=0.02)  # shared: it sees every attempt of both replicas
    config = NotifierConfig(retry_base_s=0.01, retry_max_s=0.02, poll_interval_s=0.01)
    replicas = [await start(provider, clock=SystemClock(), config=config) for _ in range(2)]
    phones = [f"139{n:08d}" for n in range(12)]
    sent = await asyncio.gather(
        *(replicas[n % 2].stub.Send(_code_request(f"r{n}", phone=phones[n % len(phones)])) for n in range(24))
    )
    ids = {s.message_id for s in sent}

    async def all_delivered():
        deliveries = [await replicas[0].delivery(i) for i in ids]
        return all(d.status == DELIVERED for d in deliveries)

    await eventually(all_delivered, within=30)
    assert provider.overlaps == []
    assert all(provider.delivered[i] == 1 for i in ids)
    assert all(provider.calls[i] == 2 for i in ids)  # the failed first attempt and one retry


async def test_the_per_phone_cap_refuses_with_the_wait(start):
    clock = ManualClock()
    config = NotifierConfig(caps={**NotifierConfig().caps, "SMS_CODE": Cap(per_hour=3, per_day=4)})
    node = await start(ScriptedProvider(), clock=clock, config=config, start_worker=False)
    for n in range(3):
        await node.stub.Send(_code_request(f"cap{n}"))
        clock.advance(timedelta(minutes=10))
    # Asking again for a recorded message is not a new one: never refused.
    assert (await node.stub.Send(_code_request("cap0"))).status == DELIVERED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.Send(_code_request("cap3"))
    refusal = from_rpc_error(caught.value)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal.reason == "RATE_LIMITED" and refusal.metadata["window"] == "hour"
    assert refusal.retry_after == timedelta(minutes=30)  # when the first of the hour leaves it
    # Another phone, another kind: their own budgets.
    await node.stub.Send(_code_request("other-phone", phone="13900000001"))
    await node.stub.Send(
        notifier_pb2.SendRequest(
            idempotency_key="ready", phone=PHONE, kind=notifier_pb2.MESSAGE_KIND_REPORT_READY
        )
    )

    clock.advance(timedelta(minutes=30))
    await node.stub.Send(_code_request("cap3"))  # the hour moved on: allowed again
    clock.advance(timedelta(hours=2))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.Send(_code_request("cap4"))
    refusal = from_rpc_error(caught.value)
    assert refusal.metadata["window"] == "day"
    assert refusal.retry_after == timedelta(hours=24) - timedelta(hours=3)  # the first of the day


async def test_the_cap_holds_under_concurrent_sends(start):
    config = NotifierConfig(caps={**NotifierConfig().caps, "SMS_CODE": Cap(per_hour=3, per_day=None)})
    node = await start(ScriptedProvider(), clock=ManualClock(), config=config, start_worker=False)
    results = await asyncio.gather(
        *(node.stub.Send(_code_request(f"k{n}")) for n in range(8)), return_exceptions=True
    )
    accepted = [r for r in results if not isinstance(r, Exception)]
    refused = [from_rpc_error(r).reason for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) == 3 and refused == ["RATE_LIMITED"] * 5


async def test_no_phone_or_code_in_logs_spans_or_storage_outside_sandbox(
    start, tmp_path, database_url, caplog
):
    caplog.set_level(logging.DEBUG)
    spans = InMemorySpanExporter()
    clock = ManualClock()
    provider = ScriptedProvider(failures=1, error=ConnectionError(f"refused for {PHONE}"))
    node = await start(
        provider,
        clock=clock,
        start_worker=False,
        tracer_provider=make_tracer_provider("notifier", tmp_path, exporter=spans),
    )
    sent = await node.stub.Send(_code_request("leak", "482916"))
    assert sent.status == QUEUED
    # Waiting for its retry: the text is kept for it, sealed, never in clear.
    [(body, sealed)] = _rows(tmp_path, database_url, "SELECT body, body_sealed FROM nt_messages")
    assert body is None and sealed and b"482916" not in bytes(sealed)
    stored = repr(_rows(tmp_path, database_url, "SELECT * FROM nt_messages")).encode()
    if database_url is None:
        stored += b"".join(p.read_bytes() for p in tmp_path.glob("notifier.db*") if p.is_file())
    assert sent.message_id.encode() in stored
    for secret in (PHONE, "482916", "验证码"):
        assert secret.encode() not in stored

    clock.advance(timedelta(minutes=1))
    assert await node.parts.worker.run_once() == 1
    assert (await node.delivery(sent.message_id)).status == DELIVERED
    [(sealed,)] = _rows(tmp_path, database_url, "SELECT body_sealed FROM nt_messages")
    assert sealed is None  # delivered: the sealed copy is dropped too

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "138****5678" in logged and sent.message_id in logged
    assert PHONE not in logged and "482916" not in logged
    attempts = [s for s in spans.get_finished_spans() if s.name == "sms.deliver"]
    assert len(attempts) == 2
    assert {s.attributes["cardcheck.sms.phone"] for s in attempts} == {"138****5678"}
    assert [s.attributes.get("cardcheck.sms.error_class") for s in attempts] == ["ConnectionError", None]
    # The retry belongs to the trace of the Send that recorded the message.
    assert attempts[0].context.trace_id == attempts[1].context.trace_id
    everything = "".join(s.to_json() for s in spans.get_finished_spans())
    assert PHONE not in everything and "482916" not in everything


async def test_console_prints_a_masked_line_and_keeps_no_inbox(start, tmp_path, database_url):
    out = io.StringIO()
    node = await start(ConsoleProvider(out), sandbox=True)  # the inbox belongs to the sandbox provider
    sent = await node.stub.Send(_code_request("console", "605813"))
    assert sent.status == DELIVERED
    assert out.getvalue() == f"sms {sent.message_id} to 138****5678: SMS_CODE (sms_code.v1)\n"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [(body,)] = _rows(tmp_path, database_url, "SELECT body FROM nt_messages")
    assert body is None


async def test_a_table_of_the_first_release_is_brought_up_to_date(start, tmp_path, database_url):
    old = sa.MetaData()
    sa.Table(
        "nt_messages",
        old,
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("message_id", sa.String(32), unique=True, nullable=False),
        sa.Column("idempotency_key", sa.String(200), unique=True, nullable=False),
        sa.Column("phone_hash", sa.String(64), index=True, nullable=False),
        sa.Column("phone_sealed", sa.LargeBinary, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("template", sa.String(64), nullable=False),
        sa.Column("body", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
    )
    engine = sa.create_engine(database_url or f"sqlite:///{tmp_path / 'notifier.db'}")
    old.create_all(engine)
    engine.dispose()

    node = await start(ScriptedProvider(), clock=ManualClock(), start_worker=False)
    sent = await node.stub.Send(_code_request("after-upgrade"))
    delivery = await node.delivery(sent.message_id)
    assert (delivery.status, delivery.attempts) == (DELIVERED, 1)
    assert delivery.retry_until.ToSeconds() - delivery.created_at.ToSeconds() == 300


def _ready_request(key: str) -> notifier_pb2.SendRequest:
    return notifier_pb2.SendRequest(idempotency_key=key, phone=PHONE, kind=notifier_pb2.MESSAGE_KIND_REPORT_READY)


async def test_messages_are_deleted_once_past_retention_and_not_before(start, tmp_path, database_url):
    clock = ManualClock()
    provider = ScriptedProvider()
    config = NotifierConfig(retry_base_s=10, retry_max_s=80, retention=timedelta(days=30))
    node = await start(provider, clock=clock, start_worker=False, config=config)
    delivered = await node.stub.Send(_code_request("old-code", "135790"))
    assert delivered.status == DELIVERED
    provider.failures = None  # the vendor is down from now on
    provider.error = DeliveryError("HTTP_400", retryable=False)
    refused = await node.stub.Send(_code_request("old-refused", "246802"))
    provider.error = DeliveryError("HTTP_503")
    pending = await node.stub.Send(_ready_request("old-ready"))
    assert (await node.delivery(refused.message_id)).status == FAILED
    assert (await node.delivery(pending.message_id)).status == QUEUED

    clock.advance(timedelta(days=29))
    assert await node.parts.worker.purge() == 0  # nothing is 30 days old yet
    recent = await node.stub.Send(_code_request("recent", "112233"))
    clock.advance(timedelta(days=1, seconds=1))
    # Past 30 days the delivered and the refused message go; the report-ready SMS whose window
    # closed unnoticed is still QUEUED, and goes once a claim pass has given it up.
    assert await node.parts.worker.purge() == 2
    keys = {key for (key,) in _rows(tmp_path, database_url, "SELECT idempotency_key FROM nt_messages")}
    assert keys == {"old-ready", "recent"}
    await node.parts.worker.run_once()
    assert (await node.delivery(pending.message_id)).status == FAILED
    assert await node.parts.worker.purge() == 1
    keys = {key for (key,) in _rows(tmp_path, database_url, "SELECT idempotency_key FROM nt_messages")}
    assert keys == {"recent"}
    for gone in (delivered, refused, pending):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.delivery(gone.message_id)
        assert from_rpc_error(caught.value).reason == "NOT_FOUND"
    assert (await node.delivery(recent.message_id)).message_id == recent.message_id


async def test_the_worker_deletes_what_is_past_retention_by_itself(start, tmp_path, database_url):
    clock = ManualClock()
    config = NotifierConfig(retention=timedelta(days=8), purge_interval_s=0.05, poll_interval_s=0.05)
    node = await start(ScriptedProvider(), clock=clock, config=config)
    sent = await node.stub.Send(_code_request("aging", "192837"))
    assert sent.status == DELIVERED
    clock.advance(timedelta(days=8, seconds=1))
    await eventually(lambda: not _rows(tmp_path, database_url, "SELECT seq FROM nt_messages"))


@pytest.mark.parametrize("days", ["7", "0", "-3", "many"])
def test_retention_must_outlive_every_retry_window(days):
    from cardcheck.runtime.settings import SettingsError

    with pytest.raises(SettingsError, match="CARDCHECK_SMS_RETENTION_DAYS"):
        NotifierConfig.from_env({"CARDCHECK_SMS_RETENTION_DAYS": days})
    assert NotifierConfig.from_env({"CARDCHECK_SMS_RETENTION_DAYS": "8"}).retention == timedelta(days=8)


async def test_the_worker_stops_when_woken_just_as_it_is_stopped(start):
    """A stop that comes as new work wakes the delivery loop still stops it (a cancellation
    lost in the loop's wait kept the stop, and the notifier's shutdown, waiting for ever)."""
    one = await start(SandboxProvider())
    worker = one.parts.worker
    for _ in range(5):
        await asyncio.sleep(0.2)  # the loop has claimed nothing and waits to be woken
        worker.wake()
        await asyncio.sleep(0)  # the wait is over, the loop not yet back
        await asyncio.wait_for(worker.stop(drain_s=1), 5)
        worker.start()


class Statements:
    """The statements run on nt_messages meanwhile (any engine of this process), by verb."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def _note(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if "nt_messages" in statement:
            self.seen.append(statement.split(None, 1)[0].upper())

    def __enter__(self) -> Statements:
        sa.event.listen(sa.Engine, "before_cursor_execute", self._note)
        return self

    def __exit__(self, *exc) -> None:
        sa.event.remove(sa.Engine, "before_cursor_execute", self._note)


async def test_a_send_costs_two_statements_in_sandbox_and_three_outside(start, tmp_path):
    """The insert tells a new message from a retried one, the cap is counted after it; the
    sandbox's delivery is the record itself, a vendor's is written once it is done."""
    spans = InMemorySpanExporter()
    sandbox = await start(SandboxProvider(), sandbox=True, start_worker=False,
                          tracer_provider=make_tracer_provider("notifier", tmp_path, exporter=spans))
    with Statements() as statements:
        sent = await sandbox.stub.Send(_code_request("once"))
    assert sent.status == DELIVERED
    assert statements.seen == ["INSERT", "SELECT"]
    with Statements() as statements:
        again = await sandbox.stub.Send(_code_request("once"))
    assert (again.message_id, again.status) == (sent.message_id, DELIVERED)
    assert statements.seen == ["INSERT", "SELECT"]  # nothing inserted; the earlier message read
    delivery = await sandbox.delivery(sent.message_id)
    assert (delivery.status, delivery.attempts, delivery.delivered_at) == (DELIVERED, 1, delivery.created_at)
    [attempt] = [s for s in spans.get_finished_spans() if s.name == "sms.deliver"]
    assert attempt.attributes["cardcheck.message_id"] == sent.message_id
    assert attempt.attributes["cardcheck.sms.phone"] == "138****5678"
    [server] = [s for s in spans.get_finished_spans() if s.name.endswith("/Send") and s.context.trace_id
                == attempt.context.trace_id]
    assert attempt.parent.span_id == server.context.span_id  # under the Send that recorded it

    vendor = await start(ScriptedProvider(), start_worker=False)
    with Statements() as statements:
        sent = await vendor.stub.Send(_code_request("vendor", phone="13900000000"))
    assert sent.status == DELIVERED
    assert statements.seen == ["INSERT", "SELECT", "UPDATE"]
