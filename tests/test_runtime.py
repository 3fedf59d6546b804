"""The shared runtime: settings, errors over a real channel, keys, span files, graceful stop."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.exceptions import InvalidTag
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cardcheck.runtime.errors import (
    CardCheckError,
    FieldViolation,
    from_rpc_error,
    handles_errors,
    invalid_argument,
)
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.server import Registration, ServiceHost
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc


def test_settings_defaults_follow_the_contract() -> None:
    settings = Settings.from_env({})
    assert settings.addresses["gateway"] == "127.0.0.1:50051"
    assert settings.addresses["bank_sim"] == "127.0.0.1:50060"
    assert settings.bind_address("report_service") == "127.0.0.1:50052"
    assert settings.data_dir == Path("var")
    assert len(settings.enabled_regions) == 31


@pytest.mark.parametrize(
    "env",
    [
        {"CARDCHECK_GATEWAY_ADDR": "localhost"},
        {"CARDCHECK_NOTIFIER_ADDR": "127.0.0.1:notaport"},
        {"CARDCHECK_ENABLED_REGIONS": "CN-JL,CN-XX"},
        {"CARDCHECK_SANDBOX": "maybe"},
        {"CARDCHECK_PER_BANK_TIMEOUT_S": "-1"},
    ],
)
def test_bad_settings_fail_fast(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(env)


def test_per_bank_addresses_come_from_the_environment() -> None:
    settings = Settings.from_env({"CARDCHECK_BANK_ADDR_ICBC": "10.1.2.3:443"})
    assert settings.bank_addresses == {"ICBC": "10.1.2.3:443"}


def test_master_key_is_generated_once_and_reused(tmp_path: Path) -> None:
    first = load_master_key(None, tmp_path)
    assert load_master_key(None, tmp_path) == first
    assert (tmp_path / "keys" / "master.key").stat().st_mode & 0o077 == 0
    keyring = Keyring(first)
    sealed = keyring.sealer("report").seal(b"6222 secret", b"q1")
    assert b"secret" not in sealed
    assert keyring.sealer("report").open(sealed, b"q1") == b"6222 secret"
    with pytest.raises(InvalidTag):  # bound to its row: another row's associated data fails
        keyring.sealer("report").open(sealed, b"q2")
    with pytest.raises(InvalidTag):  # and to its purpose
        keyring.sealer("other").open(sealed, b"q1")
    assert keyring.hasher("phone").digest("13800000000") != keyring.hasher("id").digest("13800000000")


class Refusing(notifier_pb2_grpc.NotifierServicer):
    """A servicer that refuses in each of the ways a real one can."""

    @handles_errors
    async def Send(self, request, context):
        if request.phone == "":
            raise invalid_argument([FieldViolation("phone", "required")])
        if request.phone == "busy":
            raise CardCheckError("SERVICE_BUSY", "too many", retry_after=timedelta(seconds=3))
        if request.phone == "bug":
            raise ZeroDivisionError
        raise CardCheckError("COOLDOWN_ACTIVE", metadata={"retry_after": "2026-01-12T09:00:00Z"})


@pytest.fixture
async def refusing_server(tmp_path: Path):
    exporter = InMemorySpanExporter()
    host = ServiceHost(
        "test",
        [Registration(notifier_pb2_grpc.add_NotifierServicer_to_server, Refusing(), "cardcheck.v1.Notifier")],
        "127.0.0.1:0",
        make_tracer_provider("test", tmp_path, exporter=exporter),
    )
    port = await host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield host, channel, exporter
    await host.stop(0)


async def test_refusals_carry_error_details(refusing_server) -> None:
    _, channel, _ = refusing_server
    stub = notifier_pb2_grpc.NotifierStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Send(notifier_pb2.SendRequest(phone=""))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert error.reason == "INVALID_ARGUMENT"
    assert error.violations == [FieldViolation("phone", "required")]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Send(notifier_pb2.SendRequest(phone="busy"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = from_rpc_error(caught.value)
    assert (error.reason, error.retry_after) == ("SERVICE_BUSY", timedelta(seconds=3))
    assert error.message_zh == "申请人数过多，服务繁忙，请稍后再试"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Send(notifier_pb2.SendRequest(phone="later"))
    error = from_rpc_error(caught.value)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.metadata == {"retry_after": "2026-01-12T09:00:00Z"}


async def test_a_bug_is_internal_without_details(refusing_server) -> None:
    _, channel, _ = refusing_server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await notifier_pb2_grpc.NotifierStub(channel).Send(notifier_pb2.SendRequest(phone="bug"))
    assert caught.value.code() == grpc.StatusCode.UNKNOWN or caught.value.code() == grpc.StatusCode.INTERNAL
    assert from_rpc_error(caught.value) is None


async def test_health_reflection_and_spans(refusing_server) -> None:
    host, channel, exporter = refusing_server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "cardcheck.v1.Notifier"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError):
        await notifier_pb2_grpc.NotifierStub(channel).Send(notifier_pb2.SendRequest(phone="busy"))
    names = [span.name for span in exporter.get_finished_spans()]
    assert names == ["/cardcheck.v1.Notifier/Send"]  # health checks make no spans
    assert exporter.get_finished_spans()[0].resource.attributes["service.name"] == "test"


async def test_graceful_stop_finishes_in_flight_calls(tmp_path: Path) -> None:
    started = asyncio.Event()

    class Slow(notifier_pb2_grpc.NotifierServicer):
        async def Send(self, request, context):
            started.set()
            await asyncio.sleep(0.5)
            return notifier_pb2.SendResponse(message_id="done")

    host = ServiceHost(
        "slow",
        [Registration(notifier_pb2_grpc.add_NotifierServicer_to_server, Slow(), "cardcheck.v1.Notifier")],
        "127.0.0.1:0",
        make_tracer_provider("slow", tmp_path, exporter=InMemorySpanExporter()),
    )
    port = await host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        async def send():
            return await notifier_pb2_grpc.NotifierStub(channel).Send(notifier_pb2.SendRequest())

        call = asyncio.create_task(send())
        await started.wait()
        stopping = asyncio.create_task(host.stop(5))
        await asyncio.sleep(0.1)
        # Draining: health already says NOT_SERVING (asked of the servicer: the port takes no new calls).
        assert (await host.health.Check(health_pb2.HealthCheckRequest(), None)).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert (await call).message_id == "done"
        await stopping


def test_span_files_are_json_lines(tmp_path: Path) -> None:
    provider = make_tracer_provider("unit", tmp_path)
    with provider.get_tracer("t").start_as_current_span("work") as span:
        span.set_attribute("cardcheck.bank_code", "ICBC")
    provider.shutdown()
    lines = (tmp_path / "spans" / "unit.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert record["name"] == "work"
    assert record["resource"]["attributes"]["service.name"] == "unit"


async def test_spans_go_to_the_otlp_collector_the_environment_names(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            provider = make_tracer_provider("report_service", tmp_path, env=env)
            with provider.get_tracer("t").start_as_current_span("query.execute"):
                pass
            await asyncio.to_thread(provider.shutdown)  # flushes the batch to the collector
    finally:
        await server.stop(0)
    spans = [
        (resource.resource, span.name)
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [name for _, name in spans] == ["query.execute"]
    attributes = {a.key: a.value.string_value for a in spans[0][0].attributes}
    assert attributes["service.name"] == "report_service"
    assert not (tmp_path / "spans").exists()  # not to the local files as well


def test_check_digits_take_ascii_digits_only() -> None:
    from cardcheck.numbers import card_number_valid, id_number_valid, luhn_valid

    assert card_number_valid("6222021234567890128") is luhn_valid("6222021234567890128")
    assert id_number_valid("11010519491231002X")
    assert not id_number_valid("١١٠١٠٥١٩٤٩١٢٣١٠٠٢X")  # Arabic-Indic digits
    assert not card_number_valid("²" * 16)  # superscripts: refused, never an exception
    assert not luhn_valid("٠٠")
