"""A notifier outage never blocks or loses a report: the real `python -m notifier` process is
stopped with SIGTERM, a query completes meanwhile (bank_sim, bank_connector and report_service
in process), the notifier starts again on the same port and database, and the "report ready"
SMS arrives, once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bank_connector.app import build as build_bank_connector
from bank_sim.app import build as build_bank_sim
from cardcheck import dataset
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import (
    common_pb2,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)
from report_service.app import build as build_report_service
from tests.harness.databases import rows
from tests.harness.processes import ServiceProcess
from tests.harness.settings import settings_for
from tests.harness.waiting import eventually

PHONE = "13812345678"


def _notifier_rows(tmp_path: Path, database_url: str | None) -> list[tuple]:
    return rows(database_url, tmp_path, "notifier", "SELECT kind, status FROM nt_messages")


@pytest.fixture
async def mesh(tmp_path, database_url, monkeypatch):
    """bank_sim, bank_connector and report_service in process; the notifier as a process."""
    # report_service asks the notifier again after a failure, after a backoff: short here.
    monkeypatch.setenv("CARDCHECK_REPORT_RETRY_FIRST_S", "0.2")
    monkeypatch.setenv("CARDCHECK_REPORT_RETRY_MAX_S", "1")
    # The same port and data directory at each start, so a restart finds its database.
    notifier = ServiceProcess(
        "notifier", tmp_path, database_url, health_service="cardcheck.v1.Notifier",
        CARDCHECK_SHUTDOWN_GRACE_S="2", CARDCHECK_SMS_POLL_INTERVAL_S="0.1",
    )
    settings = settings_for(tmp_path, database_url, per_bank_timeout_s=5.0)
    records = dataset.generate(dataset.DEFAULT_SEED, 12)
    hosts = []

    def tracer(name: str):
        return make_tracer_provider(name, tmp_path, exporter=InMemorySpanExporter())

    try:
        await notifier.start()
        sim = await build_bank_sim(
            settings.replace(addresses={**settings.addresses, "bank_sim": "127.0.0.1:0"}),
            records=records,
            tracer_provider=tracer("bank_sim"),
        )
        sim_port = await sim.start()
        hosts.append(sim)
        addresses = {**settings.addresses, "bank_sim": f"127.0.0.1:{sim_port}", "bank_connector": "127.0.0.1:0"}
        connector = await build_bank_connector(
            settings.replace(addresses=addresses), tracer_provider=tracer("bank_connector")
        )
        connector_port = await connector.start()
        hosts.append(connector)
        addresses = {
            **addresses,
            "bank_connector": f"127.0.0.1:{connector_port}",
            "notifier": f"127.0.0.1:{notifier.port}",
            "report_service": "127.0.0.1:0",
        }
        reports = await build_report_service(
            settings.replace(addresses=addresses),
            tracer_provider=tracer("report_service"),
            pass_interval_s=0.2,
        )
        reports_port = await reports.start()
        hosts.append(reports)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{reports_port}")
        yield notifier, report_service_pb2_grpc.ReportServiceStub(channel), records
        await channel.close()
    finally:
        for host in reversed(hosts):
            await host.stop(0)
        await notifier.stop()


async def test_report_ready_sms_arrives_once_after_the_notifier_process_restarts(
    mesh, tmp_path, database_url
):
    notifier, reports, records = mesh
    person = records[0]
    banks = sorted({r.bank for r in records if r.id_number == person.id_number})

    assert await notifier.terminate() == 0  # SIGTERM: a graceful stop
    created = await reports.CreateQuery(
        report_service_pb2.CreateQueryRequest(
            user_id="user-1",
            subject=report_service_pb2.Subject(
                name=person.holder_name, id_number=person.id_number, phone=PHONE
            ),
            bank_codes=banks,
            agreement_version="v1",
            idempotency_key="outage-1",
        )
    )
    query = created.query

    async def ready():
        reply = await reports.GetQuery(
            report_service_pb2.GetQueryRequest(user_id="user-1", query_id=query.query_id)
        )
        return reply.query.status == common_pb2.QUERY_STATUS_READY

    await eventually(ready, what="the query READY")  # the outage blocks nothing
    assert not any(kind == "REPORT_READY" for kind, _ in _notifier_rows(tmp_path, database_url))

    await notifier.start()  # the same port, the same database
    async with grpc.aio.insecure_channel(f"127.0.0.1:{notifier.port}") as channel:
        inbox = notifier_pb2_grpc.NotifierStub(channel)

        async def report_ready_messages():
            reply = await inbox.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))
            return [m for m in reply.messages if m.kind == "REPORT_READY"]

        [message] = await eventually(report_ready_messages, what="the report-ready SMS")
        assert "报告已生成" in message.body and "7天" in message.body
        # report_service goes on with its passes: it was accepted, nothing is sent twice.
        for _ in range(5):
            await asyncio.sleep(0.2)  # report_service's pass interval: let a few passes run
            assert len(await report_ready_messages()) == 1
        delivery = await inbox.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id=message.message_id))
        assert (delivery.status, delivery.attempts) == (notifier_pb2.DELIVERY_STATUS_DELIVERED, 1)
    assert _notifier_rows(tmp_path, database_url).count(("REPORT_READY", "DELIVERED")) == 1
    assert await notifier.terminate() == 0
