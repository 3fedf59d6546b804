"""report_service for its tests: a scripted fake bank_connector, the real notifier and
report_service (one or more replicas) over real grpc.aio servers, on SQLite or PostgreSQL,
time from a ManualClock."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bank_sim.process import free_port
from cardcheck.runtime.backoff import Backoff
from cardcheck.runtime.clock import ManualClock, as_utc
from cardcheck.runtime.settings import Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import (
    bank_connector_pb2,
    common_pb2,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)
from notifier.app import build as build_notifier
from report_service.app import ReportServiceParts, build_parts
from report_service.config import ReportServiceConfig
from tests.harness import databases
from tests.harness.fakes import FakeBankConnector, serve
from tests.harness.settings import settings_for
from tests.harness.waiting import eventually

USER = "u-1"
PHONE = "13912345678"
SUBJECT = report_service_pb2.Subject(name="张三", id_number="220102199003071234", phone=PHONE)

ANSWERED = common_pb2.BANK_OUTCOME_KIND_ANSWERED


def _card(bank: str, card_type: int, first4: str, last4: str) -> common_pb2.MaskedCard:
    return common_pb2.MaskedCard(bank_code=bank, card_type=card_type, first4=first4, last4=last4)


SCRIPT = {
    "ICBC": bank_connector_pb2.FanOutResponse(
        bank_code="ICBC",
        kind=ANSWERED,
        cards=[
            _card("ICBC", common_pb2.CARD_TYPE_DEBIT, "6222", "4321"),
            _card("ICBC", common_pb2.CARD_TYPE_CREDIT, "6253", "8765"),
        ],
    ),
    "CMB": bank_connector_pb2.FanOutResponse(bank_code="CMB", kind=ANSWERED),  # answered: no cards
    "BOC": bank_connector_pb2.FanOutResponse(
        bank_code="BOC", kind=ANSWERED, cards=[_card("BOC", common_pb2.CARD_TYPE_DEBIT, "6217", "0042")]
    ),
}
TIMED_OUT = bank_connector_pb2.FanOutResponse(
    bank_code="BOC", kind=common_pb2.BANK_OUTCOME_KIND_TIMED_OUT, detail="DEADLINE_EXCEEDED"
)


def scripted_outcome(bank: str, kind: int, detail: str = "") -> bank_connector_pb2.FanOutResponse:
    return bank_connector_pb2.FanOutResponse(bank_code=bank, kind=kind, detail=detail)


TEST_CONFIG = ReportServiceConfig(lease_s=30.0, retry=Backoff(60.0, 3600.0), poll_s=0.1, sweep_s=3600.0)


class Rig:
    """The fake bank_connector, the real notifier and report_service (one or more replicas), on
    one database, all on one ManualClock."""

    def __init__(self, tmp_path: Path, database_url: str | None) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.clock = ManualClock(datetime(2026, 3, 2, 8, 0, tzinfo=UTC))
        self.banks = FakeBankConnector(script=SCRIPT, subject=SUBJECT)
        self.spans = InMemorySpanExporter()
        self.notifier_port = free_port()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.parts: ReportServiceParts | None = None
        self.replicas: list[ReportServiceParts] = []
        self.notifier_host = None

    def settings(self, **addresses: str) -> Settings:
        return settings_for(self.tmp_path, self.database_url, addresses=addresses)

    async def start_banks(self) -> None:
        server, self.bank_port = await serve(self.banks)
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

    async def start_replica(
        self, config: ReportServiceConfig = TEST_CONFIG, **overrides
    ) -> tuple[ReportServiceParts, report_service_pb2_grpc.ReportServiceStub]:
        settings = self.settings(
            report_service="127.0.0.1:0",
            bank_connector=f"127.0.0.1:{self.bank_port}",
            notifier=f"127.0.0.1:{self.notifier_port}",
        )
        provider = make_tracer_provider("report_service", self.tmp_path, exporter=self.spans)
        parts = await build_parts(
            settings,
            clock=self.clock,
            tracer_provider=provider,
            config=config.replace(**overrides),
        )
        self.replicas.append(parts)
        port = await parts.host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._closers.append(channel.close)
        return parts, report_service_pb2_grpc.ReportServiceStub(channel)

    async def start_report_service(self, config: ReportServiceConfig = TEST_CONFIG, **overrides):
        self.parts, self.stub = await self.start_replica(config, **overrides)
        return self.stub

    async def stop_report_service(self) -> None:
        await self.parts.host.stop(0)

    async def close(self) -> None:
        for parts in self.replicas:
            await parts.host.stop(0)
        if self.notifier_host is not None:
            await self.notifier_host.stop(0)
        for close in reversed(self._closers):
            await close()

    async def create(self, banks=("ICBC", "CMB", "BOC"), key="k-1", user=USER, stub=None) -> common_pb2.Query:
        response = await (stub or self.stub).CreateQuery(
            report_service_pb2.CreateQueryRequest(
                user_id=user,
                subject=SUBJECT,
                bank_codes=list(banks),
                agreement_version="2026-11",
                idempotency_key=key,
            )
        )
        return response.query

    async def get(self, query_id: str, user: str = USER) -> common_pb2.Query:
        return (await self.stub.GetQuery(report_service_pb2.GetQueryRequest(user_id=user, query_id=query_id))).query

    async def report(self, query_id: str, user: str = USER) -> common_pb2.Report:
        request = report_service_pb2.ReportServiceGetReportRequest(user_id=user, query_id=query_id)
        return (await self.stub.GetReport(request)).report

    async def messages(self) -> list[notifier_pb2.Message]:
        return list((await self.inbox.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))).messages)

    def rows(self, sql: str, **params) -> list[tuple]:
        return databases.rows(self.database_url, self.tmp_path, "report_service", sql, **params)

    def execute(self, sql: str, **params) -> int:
        return databases.execute(self.database_url, self.tmp_path, "report_service", sql, **params)

    async def between_passes(self, query_id: str, passes: int = 1) -> None:
        """Waits until the query's EXECUTE work has been claimed `passes` times and no worker
        holds it now (that pass ended), or it is gone (the query finished)."""

        def idle() -> bool:
            held = self.rows(
                "SELECT lease_owner, passes FROM rs_work WHERE query_id = :q AND kind = 'EXECUTE'", q=query_id
            )
            return all(owner is None and done >= passes for (owner, done) in held) and not any(
                (query_id, "EXECUTE") in parts.worker.running for parts in self.replicas
            )

        await eventually(idle)

    def audit_events(self, query_id: str) -> list[tuple[str, dict]]:
        return [
            (event, json.loads(details))
            for event, details in self.rows(
                "SELECT event, details FROM rs_audit WHERE query_id = :q ORDER BY seq", q=query_id
            )
        ]


def instant(value: datetime | str) -> datetime:
    """A timestamp as read back with plain SQL (SQLite gives text)."""
    return as_utc(value if isinstance(value, datetime) else datetime.fromisoformat(value))


async def status_is(rig: Rig, query_id: str, status: int, within: float = 15.0):
    async def check():
        query = await rig.get(query_id)
        return query if query.status == status else None

    return await eventually(check, within=within)


@pytest.fixture
async def rig(tmp_path, database_url):
    rig = Rig(tmp_path, database_url)
    await rig.start_banks()
    await rig.start_notifier()
    await rig.start_report_service()
    yield rig
    await rig.close()
