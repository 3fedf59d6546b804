"""A notifier outage never blocks or loses a report: the real `python -m notifier` process is
stopped with SIGTERM, a query completes meanwhile (bank_sim, bank_connector and report_service
in process), the notifier starts again on the same port and database, and the "report ready"
SMS arrives, once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bank_connector.app import build as build_bank_connector
from bank_sim.app import build as build_bank_sim
from cardcheck import dataset
from cardcheck.runtime.settings import Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import (
    common_pb2,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)
from report_service.app import build as build_report_service

ROOT = Path(__file__).resolve().parent.parent
PHONE = "13812345678"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(check, within: float = 30.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in time")
        await asyncio.sleep(0.05)


class NotifierProcess:
    """`python -m notifier` on a fixed port and data dir (so a restart finds its database)."""

    def __init__(self, tmp_path: Path, port: int, database_url: str | None) -> None:
        self.tmp_path = tmp_path
        self.port = port
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CARDCHECK_", "OTEL_"))},
            "CARDCHECK_DATA_DIR": str(tmp_path),
            "CARDCHECK_NOTIFIER_ADDR": f"127.0.0.1:{port}",
            "CARDCHECK_SHUTDOWN_GRACE_S": "2",
            "CARDCHECK_SMS_POLL_INTERVAL_S": "0.1",
            "PYTHONUNBUFFERED": "1",
        }
        if database_url:
            self.env["CARDCHECK_DATABASE_URL"] = database_url
        self.process: asyncio.subprocess.Process | None = None
        self.runs = 0

    async def start(self) -> None:
        self.runs += 1
        with (self.tmp_path / f"notifier.{self.runs}.log").open("w") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "notifier", env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving():
                assert self.process.returncode is None, self.output()
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service="cardcheck.v1.Notifier"), timeout=1
                    )
                except grpc.aio.AioRpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            await eventually(serving, what="the notifier serving")

    async def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)

    def output(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp_path.glob("notifier.*.log")))

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await asyncio.wait_for(self.process.wait(), 10)


def _notifier_rows(tmp_path: Path, database_url: str | None) -> list[tuple]:
    engine = sa.create_engine(database_url or f"sqlite:///{tmp_path / 'notifier.db'}")
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text("SELECT kind, status FROM nt_messages"))]
    finally:
        engine.dispose()


@pytest.fixture
async def mesh(tmp_path, database_url, monkeypatch):
    """bank_sim, bank_connector and report_service in process; the notifier as a process."""
    # report_service asks the notifier again after a failure, after a backoff: short here.
    monkeypatch.setenv("CARDCHECK_REPORT_RETRY_FIRST_S", "0.2")
    monkeypatch.setenv("CARDCHECK_REPORT_RETRY_MAX_S", "1")
    notifier = NotifierProcess(tmp_path, _free_port(), database_url)
    base = Settings.from_env({})
    settings = base.replace(data_dir=tmp_path, database_url=database_url, per_bank_timeout_s=5.0)
    records = dataset.generate(dataset.DEFAULT_SEED, 12)
    hosts = []

    def tracer(name: str):
        return make_tracer_provider(name, tmp_path, exporter=InMemorySpanExporter())

    try:
        await notifier.start()
        sim = await build_bank_sim(
            settings.replace(addresses={**base.addresses, "bank_sim": "127.0.0.1:0"}),
            records=records,
            tracer_provider=tracer("bank_sim"),
        )
        sim_port = await sim.start()
        hosts.append(sim)
        addresses = {**base.addresses, "bank_sim": f"127.0.0.1:{sim_port}", "bank_connector": "127.0.0.1:0"}
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
        await notifier.kill()


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
