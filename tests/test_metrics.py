"""Metrics served in process: where /metrics listens, turned off, the RPC counts of a real call
and the refusals by reason."""

from __future__ import annotations

import socket

import grpc
import pytest

from bank_sim.app import build as build_bank_sim
from cardcheck import dataset
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.v1 import bank_pb2, bank_pb2_grpc, gateway_pb2
from tests.harness.gateway import ALICE
from tests.harness.metrics import promtool_check, scrape, value
from tests.harness.settings import settings_for

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
