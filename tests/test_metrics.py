"""Metrics served in process: where /metrics listens, turned off, the RPC counts of a real call,
the code each way of ending a call is counted under, and the refusals by reason."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bank_sim.app import build as build_bank_sim
from cardcheck import dataset
from cardcheck.refusals import CardCheckError, Reason
from cardcheck.runtime.errors import abort, refuse
from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.server import Registration, ServiceHost
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import (
    bank_pb2,
    bank_pb2_grpc,
    gateway_pb2,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)
from tests.harness.gateway import ALICE
from tests.harness.metrics import promtool_check, scrape, value
from tests.harness.settings import settings_for
from tests.harness.waiting import eventually

PEOPLE = dataset.generate(dataset.DEFAULT_SEED, 20)


def test_metrics_listen_at_the_grpc_port_plus_1000_unless_moved_or_off() -> None:
    settings = Settings.from_env({})
    assert settings.metrics_address("gateway") == "127.0.0.1:51051"
    assert settings.metrics_address("bank_sim") == "127.0.0.1:51060"
    moved = Settings.from_env({"CARDCHECK_NOTIFIER_METRICS_ADDR": "0.0.0.0:9100", "CARDCHECK_BIND_HOST": "0.0.0.0"})
    assert moved.metrics_address("notifier") == "0.0.0.0:9100"
    assert moved.metrics_address("report_service") == "0.0.0.0:51052"
    assert Settings.from_env({"CARDCHECK_METRICS": "off"}).metrics_address("gateway") is None
    assert Settings.from_env({"CARDCHECK_GATEWAY_ADDR": "127.0.0.1:0"}).metrics_address("gateway") == "127.0.0.1:0"
    with pytest.raises(SettingsError, match="CARDCHECK_METRICS='maybe' is not a boolean"):
        Settings.from_env({"CARDCHECK_METRICS": "maybe"})
    with pytest.raises(SettingsError, match="CARDCHECK_GATEWAY_METRICS_ADDR='9100' is not host:port"):
        Settings.from_env({"CARDCHECK_GATEWAY_METRICS_ADDR": "9100"})


async def test_calls_and_refusals_are_counted_and_the_port_closes_on_stop(tmp_path) -> None:
    host = await build_bank_sim(settings_for(tmp_path, addresses={"bank_sim": "127.0.0.1:0"}), records=PEOPLE)
    port = await host.start()
    try:
        record = PEOPLE[0]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = bank_pb2_grpc.IssuingBankStub(channel)
            await stub.LookupCards(bank_pb2.LookupCardsRequest(
                bank_code=record.bank, id_number=record.id_number, name=record.holder_name))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.LookupCards(bank_pb2.LookupCardsRequest())
        metrics_port = host.metrics.port
        text = scrape(metrics_port)
    finally:
        await host.stop(0)
    labels = dict(grpc_service="cardcheck.v1.IssuingBank", grpc_method="LookupCards", grpc_type="unary")
    assert value(text, "grpc_server_started_total", **labels) == 2
    assert value(text, "grpc_server_handled_total", grpc_code="OK", **labels) == 1
    assert value(text, "grpc_server_handling_seconds_count", **labels) == 2
    assert record.id_number not in text and record.holder_name not in text
    promtool_check(text)
    with pytest.raises(OSError):  # nothing left listening
        socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()


async def test_metrics_off_serves_nothing(tmp_path) -> None:
    grpc_port = _free_port_pair()
    settings = settings_for(tmp_path, addresses={"bank_sim": f"127.0.0.1:{grpc_port}"}, metrics=False)
    host = await build_bank_sim(settings, records=PEOPLE)
    await host.start()
    try:
        assert host.metrics is not None and host.metrics.port is None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", grpc_port + 1000), timeout=1).close()
    finally:
        await host.stop(0)


def _free_port_pair() -> int:
    """A free port whose +1000 is free too."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + 1000 > 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1000))
                except OSError:
                    continue
                return port
    raise AssertionError("no free pair of ports")


async def test_gateway_counts_refusals_by_reason_and_limit_decisions(stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.gateway.SubmitQuery(gateway_pb2.SubmitQueryRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await stack.register(ALICE)
    text = scrape(stack.host.metrics.port)
    assert value(text, "cardcheck_refusals_total", grpc_method="SubmitQuery", reason="UNAUTHENTICATED") == 1
    assert value(text, "grpc_server_handled_total", grpc_method="Register", grpc_code="OK") == 1
    assert value(text, "grpc_client_handled_total", grpc_service="cardcheck.v1.Notifier", grpc_code="OK") >= 1
    assert value(text, "cardcheck_gateway_sessions_active") == 1
    assert value(text, "cardcheck_gateway_redis_fallback") == 0
    for personal in (ALICE.phone, ALICE.id_number, ALICE.card_number, ALICE.name):
        assert personal not in text


class EndsEachWay(report_service_pb2_grpc.ReportServiceServicer):
    """One method for each way a call ends."""

    def __init__(self) -> None:
        self.held = asyncio.Event()

    async def CreateQuery(self, request, context):  # the status set, nothing raised
        refuse(context, CardCheckError(Reason.SERVICE_BUSY, "busy"))
        return report_service_pb2.CreateQueryResponse()

    async def GetQuery(self, request, context):  # aborted
        await abort(context, CardCheckError(Reason.NOT_FOUND, "no such query"))

    async def ListQueries(self, request, context):  # a bug
        raise ZeroDivisionError

    async def GetReport(self, request, context):  # the caller goes away meanwhile
        self.held.set()
        await asyncio.Event().wait()

    async def WatchQuery(self, request, context):
        for _ in range(3):
            yield report_service_pb2.ReportServiceWatchQueryResponse()


class Answers(notifier_pb2_grpc.NotifierServicer):
    async def Send(self, request, context):
        return notifier_pb2.SendResponse()


def add_generic_only(servicer: Answers, server: grpc.aio.Server) -> None:
    """Registers the Notifier as older generated code did: a generic handler alone."""

    class GenericOnly:
        def add_generic_rpc_handlers(self, handlers) -> None:
            server.add_generic_rpc_handlers(handlers)

        def add_registered_method_handlers(self, service, handlers) -> None:
            pass

    notifier_pb2_grpc.add_NotifierServicer_to_server(servicer, GenericOnly())  # type: ignore[arg-type]


async def test_each_way_a_call_ends_is_counted_under_its_code(tmp_path) -> None:
    servicer = EndsEachWay()
    host = ServiceHost(
        "ends",
        [
            Registration(report_service_pb2_grpc.add_ReportServiceServicer_to_server, servicer, "cardcheck.v1.ReportService"),
            Registration(add_generic_only, Answers(), "cardcheck.v1.Notifier"),
        ],
        "127.0.0.1:0",
        make_tracer_provider("ends", tmp_path, exporter=InMemorySpanExporter()),  # tracing in the path too
        metrics=ServiceMetrics("ends", "127.0.0.1:0"),
    )
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = report_service_pb2_grpc.ReportServiceStub(channel)
            for call, request in (
                (stub.CreateQuery, report_service_pb2.CreateQueryRequest()),
                (stub.GetQuery, report_service_pb2.GetQueryRequest()),
                (stub.ListQueries, report_service_pb2.ReportServiceListQueriesRequest()),
            ):
                with pytest.raises(grpc.aio.AioRpcError):
                    await call(request)
            assert len([r async for r in stub.WatchQuery(report_service_pb2.ReportServiceWatchQueryRequest())]) == 3
            held = stub.GetReport(report_service_pb2.ReportServiceGetReportRequest())
            await servicer.held.wait()
            held.cancel()
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            for _ in range(2):
                await notifier_pb2_grpc.NotifierStub(channel).Send(notifier_pb2.SendRequest())
            assert host.metrics is not None and host.metrics.port is not None
            metrics_port = host.metrics.port

            def handled(method: str, code: str) -> float:
                return value(scrape(metrics_port), "grpc_server_handled_total", grpc_method=method, grpc_code=code)

            await eventually(lambda: handled("GetReport", "CANCELLED") == 1, what="the cancelled call counted")
        text = scrape(metrics_port)
    finally:
        await host.stop(0)
    counted = {
        ("CreateQuery", "unary", "RESOURCE_EXHAUSTED"),
        ("GetQuery", "unary", "NOT_FOUND"),
        ("ListQueries", "unary", "UNKNOWN"),
        ("WatchQuery", "server_stream", "OK"),
        ("GetReport", "unary", "CANCELLED"),
    }
    for method, grpc_type, code in counted:
        labels = dict(grpc_service="cardcheck.v1.ReportService", grpc_method=method, grpc_type=grpc_type)
        assert value(text, "grpc_server_started_total", **labels) == 1, method
        assert value(text, "grpc_server_handled_total", grpc_code=code, **labels) == 1, (method, code)
        assert value(text, "grpc_server_handled_total", **labels) == 1, method  # under no other code
        assert value(text, "grpc_server_handling_seconds_count", **labels) == 1, method
    assert value(text, "cardcheck_refusals_total", grpc_method="CreateQuery", reason="SERVICE_BUSY") == 1
    assert value(text, "cardcheck_refusals_total", grpc_method="GetQuery", reason="NOT_FOUND") == 1
    assert value(text, "cardcheck_refusals_total") == 2
    notifier = dict(grpc_service="cardcheck.v1.Notifier", grpc_method="Send", grpc_type="unary")
    assert value(text, "grpc_server_handled_total", grpc_code="OK", **notifier) == 2
    assert "grpc.health" not in text  # probes are not the service's work
    promtool_check(text)
