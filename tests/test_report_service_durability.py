"""Durable execution with real processes: `kill -9` report_service or bank_connector in the middle
of a query and start it again; two report_service processes on one PostgreSQL sharing the work.
The banks are a counting fake behind the real bank_connector, each with a latency of its own, so
"the middle of a query" is a bank still thinking; the notifier is the real one."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from bank_connector.app import build as build_bank_connector
from bank_sim.process import free_port
from cardcheck.numbers import id_check_digit
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.runtime.settings import Settings
from cardcheck.v1 import (
    common_pb2,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)
from notifier.app import build as build_notifier
from report_service import audit
from report_service.app import MIGRATIONS
from report_service.execution import ExecutionStore
from report_service.queries import IDEMPOTENCY_KEY, QueryStore, Subject
from report_service.reports import ReportVault
from report_service.storage import Storage
from tests.harness.databases import rows
from tests.harness.fakes import CountingBanks, serve
from tests.harness.processes import ServiceProcess
from tests.harness.settings import settings_for
from tests.harness.waiting import eventually

BANKS = ("ICBC", "CMB", "BOC")
# Processes here stop quickly and send no spans anywhere.
QUICK = {"CARDCHECK_SHUTDOWN_GRACE_S": "2", "OTEL_TRACES_EXPORTER": "none"}


def person(i: int) -> report_service_pb2.Subject:
    first17 = f"11010119900101{i:03d}"
    return report_service_pb2.Subject(
        name=f"测试{i}", id_number=first17 + id_check_digit(first17), phone=f"139{i:08d}"
    )


class ReportServiceProcess(ServiceProcess):
    """`python -m report_service` with short leases and backoffs, and a stub to call it."""

    def __init__(
        self, tmp_path: Path, database_url: str | None, *, bank_connector: str, notifier: str, **env: str
    ):
        defaults = {
            "CARDCHECK_BANK_CONNECTOR_ADDR": bank_connector,
            "CARDCHECK_NOTIFIER_ADDR": notifier,
            "CARDCHECK_REPORT_LEASE_S": "1.5",  # a killed worker's claims are free again soon
            "CARDCHECK_REPORT_RETRY_FIRST_S": "0.3",
            "CARDCHECK_REPORT_RETRY_MAX_S": "1",
            "CARDCHECK_REPORT_POLL_S": "0.2",
        }
        super().__init__("report_service", tmp_path, database_url, **QUICK, **(defaults | env))
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = report_service_pb2_grpc.ReportServiceStub(self.channel)

    async def stop(self) -> None:
        await super().stop()
        await self.channel.close()

    def finished(self) -> list[str]:
        return re.findall(r"query ([0-9a-f]{32}) finished READY", self.output())


def bank_connector_process(tmp_path: Path, *, banks: str) -> ServiceProcess:
    return ServiceProcess("bank_connector", tmp_path, CARDCHECK_BANK_SIM_ADDR=banks, **QUICK)


class Surroundings:
    """What the processes a test kills talk to: the counting fake banks, the real notifier in
    process, and a bank_connector in process where the test wants one; all on real ports."""

    def __init__(self, tmp_path: Path, database_url: str | None, latency_s: dict[str, float], default_s=0.0):
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.banks = CountingBanks(latency_s, default_s)
        self._stop: list = []

    def settings(self, **addresses: str) -> Settings:
        return settings_for(self.tmp_path, self.database_url, addresses=addresses)

    async def start(self) -> None:
        server, port = await serve(self.banks)
        self.bank_address = f"127.0.0.1:{port}"
        self._stop.append(lambda: server.stop(0))
        self.notifier_address = f"127.0.0.1:{free_port()}"
        notifier = await build_notifier(self.settings(notifier=self.notifier_address), clock=ManualClock())
        await notifier.start()
        self._stop.append(lambda: notifier.stop(0))
        self.notifier_channel = grpc.aio.insecure_channel(self.notifier_address)
        self.inbox = notifier_pb2_grpc.NotifierStub(self.notifier_channel)
        self._stop.append(self.notifier_channel.close)

    async def start_bank_connector_here(self) -> str:
        address = f"127.0.0.1:{free_port()}"
        host = await build_bank_connector(self.settings(bank_connector=address, bank_sim=self.bank_address))
        await host.start()
        self._stop.append(lambda: host.stop(0))
        return address

    async def close(self) -> None:
        for stop in reversed(self._stop):
            with contextlib.suppress(Exception):
                await stop()

    async def sms(self, phone: str) -> list[notifier_pb2.Message]:
        reply = await self.inbox.ListMessages(notifier_pb2.ListMessagesRequest(phone=phone))
        return [m for m in reply.messages if m.kind == "REPORT_READY"]

    def rows(self, sql: str, **params) -> list[tuple]:
        return rows(self.database_url, self.tmp_path, "report_service", sql, **params)

    def audit_ok(self) -> audit.Verdict:
        engine = make_engine(self.database_url, self.tmp_path, "report_service")
        try:
            # the key the report_service processes made in the data directory they shared
            return audit.AuditChain.from_keyring(Keyring(load_master_key(None, self.tmp_path))).verify_engine(engine)
        finally:
            engine.dispose()


async def _factory(tmp_path: Path, database_url: str | None):
    """Makes Surroundings; the processes a test appends to `.processes` are stopped first."""
    made: list[Surroundings] = []
    processes: list[ServiceProcess] = []

    async def make(latency_s: dict[str, float], default_s: float = 0.0) -> Surroundings:
        surroundings = Surroundings(tmp_path, database_url, latency_s, default_s)
        await surroundings.start()
        made.append(surroundings)
        return surroundings

    make.processes = processes
    yield make
    for process in processes:
        with contextlib.suppress(Exception):
            await process.stop()
    for surroundings in made:
        await surroundings.close()


@pytest.fixture
async def mesh_factory(tmp_path, database_url):
    async for make in _factory(tmp_path, database_url):
        yield make


async def _create(stub, i: int, banks=BANKS) -> common_pb2.Query:
    response = await stub.CreateQuery(
        report_service_pb2.CreateQueryRequest(
            user_id=f"user-{i}",
            subject=person(i),
            bank_codes=list(banks),
            agreement_version="2026-11",
            idempotency_key=f"key-{i}",
        ),
        timeout=10,
    )
    return response.query


async def _get(stub, query_id: str, i: int) -> common_pb2.Query:
    response = await stub.GetQuery(
        report_service_pb2.GetQueryRequest(user_id=f"user-{i}", query_id=query_id), timeout=5
    )
    return response.query


async def _exactly_one_report_and_sms(mesh: Surroundings, stub, query_id: str, i: int) -> None:
    async def ready():
        return (await _get(stub, query_id, i)).status == common_pb2.QUERY_STATUS_READY

    await eventually(ready)
    await eventually(
        lambda: mesh.rows("SELECT count(*) FROM rs_work WHERE query_id = :q", q=query_id) == [(0,)]
    )
    assert mesh.rows("SELECT count(*) FROM rs_reports WHERE query_id = :q", q=query_id) == [(1,)]
    assert [m.kind for m in await mesh.sms(person(i).phone)] == ["REPORT_READY"]
    request = report_service_pb2.ReportServiceGetReportRequest(user_id=f"user-{i}", query_id=query_id)
    report = (await stub.GetReport(request)).report
    assert [s.bank_code for s in report.summary] == list(BANKS) and not report.unavailable_banks


async def test_kill_9_report_service_mid_query_then_start_it_again(mesh_factory, tmp_path, database_url):
    mesh = await mesh_factory({"BOC": 1.5}, 0.02)  # BOC is still thinking when the process dies
    connector = await mesh.start_bank_connector_here()
    service = ReportServiceProcess(
        tmp_path, database_url, bank_connector=connector, notifier=mesh.notifier_address
    )
    mesh_factory.processes.append(service)
    await service.start()
    query = await _create(service.stub, 1)
    subject = person(1)

    async def two_answered():
        return (await _get(service.stub, query.query_id, 1)).banks_answered == 2

    await eventually(two_answered)
    assert (
        mesh.banks.lookups[(subject.id_number, "BOC")] == 1
        and not mesh.banks.answered[(subject.id_number, "BOC")]
    )
    service.kill()
    assert await service.wait() == -signal.SIGKILL
    [(owner,)] = mesh.rows("SELECT lease_owner FROM rs_work WHERE query_id = :q", q=query.query_id)
    assert owner is not None  # the dead process still holds its claim: it must expire

    await service.start()  # a new process, a new worker: waits out the lease, then resumes
    await _exactly_one_report_and_sms(mesh, service.stub, query.query_id, 1)
    # Only the bank still missing was asked again; the answered ones never twice.
    assert mesh.banks.lookups[(subject.id_number, "ICBC")] == 1
    assert mesh.banks.lookups[(subject.id_number, "CMB")] == 1
    assert mesh.banks.lookups[(subject.id_number, "BOC")] == 2
    assert mesh.audit_ok().ok


async def test_kill_9_bank_connector_mid_query_then_start_it_again(mesh_factory, tmp_path, database_url):
    mesh = await mesh_factory({"BOC": 1.5}, 0.02)
    connector = bank_connector_process(tmp_path, banks=mesh.bank_address)
    mesh_factory.processes.append(connector)
    await connector.start()
    service = ReportServiceProcess(
        tmp_path, database_url, bank_connector=connector.address, notifier=mesh.notifier_address
    )
    mesh_factory.processes.append(service)
    await service.start()
    query = await _create(service.stub, 2)
    subject = person(2)

    async def two_answered():
        return (await _get(service.stub, query.query_id, 2)).banks_answered == 2

    await eventually(two_answered)
    connector.kill()
    await connector.wait()
    # report_service keeps the query PENDING and keeps trying, with backoff, while the connector is gone.
    await eventually(lambda: "asking the banks failed" in service.output())
    assert (await _get(service.stub, query.query_id, 2)).status == common_pb2.QUERY_STATUS_PENDING
    await connector.start()
    await _exactly_one_report_and_sms(mesh, service.stub, query.query_id, 2)
    assert mesh.banks.lookups[(subject.id_number, "ICBC")] == 1
    assert mesh.banks.lookups[(subject.id_number, "CMB")] == 1
    assert mesh.banks.lookups[(subject.id_number, "BOC")] == 2  # lost with the connector, asked again
    assert mesh.audit_ok().ok


@pytest.fixture
async def pg_mesh_factory(tmp_path, pg_schema_url):
    """Replicas share a PostgreSQL database (SQLite is the one-process embedded default)."""
    async for make in _factory(tmp_path, pg_schema_url):
        yield make


async def test_two_replicas_share_the_work_without_doing_any_twice(pg_mesh_factory, tmp_path, pg_schema_url):
    mesh_factory, database_url = pg_mesh_factory, pg_schema_url
    mesh = await mesh_factory({}, 0.3)
    connector = await mesh.start_bank_connector_here()
    replicas = [
        ReportServiceProcess(
            tmp_path,
            database_url,
            bank_connector=connector,
            notifier=mesh.notifier_address,
            CARDCHECK_REPORT_MAX_RUNNING="2",
            CARDCHECK_REPORT_LEASE_S="5",
        )
        for _ in range(2)
    ]
    mesh_factory.processes.extend(replicas)
    await asyncio.gather(*(replica.start() for replica in replicas))
    # Submitted alternately to both; each replica runs at most 2 queries at once, so both must work.
    count = 10
    queries = await asyncio.gather(*(_create(replicas[i % 2].stub, 100 + i) for i in range(count)))
    for i, query in enumerate(queries):
        await _exactly_one_report_and_sms(mesh, replicas[i % 2].stub, query.query_id, 100 + i)
    for i in range(count):
        for bank in BANKS:
            assert mesh.banks.lookups[(person(100 + i).id_number, bank)] == 1, (i, bank)
    done = [set(replica.finished()) for replica in replicas]
    assert done[0] and done[1], done  # both did some
    assert not done[0] & done[1]  # none twice
    assert done[0] | done[1] == {q.query_id for q in queries}
    assert mesh.audit_ok().ok


async def test_claims_are_exclusive_under_contention(tmp_path, database_url):
    """Four workers claim from the same due work at once, over and over: every piece goes to
    exactly one of them (FOR UPDATE SKIP LOCKED on PostgreSQL, one writer at a time on SQLite)."""
    now = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    clock = ManualClock(now)
    storage = Storage(Database(make_engine(database_url, tmp_path, "report_service")))
    try:
        await asyncio.to_thread(upgrade_to_head, storage.engine, MIGRATIONS, "report_service")
        keyring = Keyring(load_master_key(None, tmp_path))
        store = QueryStore(
            storage,
            keyring.sealer("subject"),
            ReportVault(keyring.sealer("report-kek")),
            clock,
            outcome_sealer=keyring.sealer("bank-outcome"),
            audit_chain=audit.AuditChain.from_keyring(keyring),
            idempotency_hash=keyring.hasher(IDEMPOTENCY_KEY),
        )
        execution = ExecutionStore(storage, store, clock, lease=timedelta(seconds=30))
        for i in range(40):
            subject = person(i)
            await store.create(
                f"user-{i}",
                Subject(subject.name, subject.id_number, subject.phone),
                ["ICBC"],
                "2026-11",
                f"k{i}",
                {},
            )
        claimed: dict[str, list[str]] = {f"w{n}": [] for n in range(4)}

        async def worker(name: str) -> None:
            while True:
                got = await execution.claim(name, 3)
                if not got:
                    return
                claimed[name].extend(c.query_id for c in got)

        await asyncio.gather(*(worker(name) for name in claimed))
        everything = [q for ids in claimed.values() for q in ids]
        assert len(everything) == len(set(everything)) == 40
        assert sum(1 for ids in claimed.values() if ids) >= 2  # they did contend
        # Held leases are not claimable again until they expire...
        assert await execution.claim("late", 10) == []
        clock.advance(timedelta(seconds=30))
        # ... and then they are, each once more.
        again = [c.query_id for c in await execution.claim("late", 100)]
        assert sorted(again) == sorted(everything)
    finally:
        storage.close()
