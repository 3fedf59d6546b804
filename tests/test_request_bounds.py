"""Every service, built by its own app.py and served by a real grpc.aio server on port 0, is
bounded: a request over its receive limit, or with headers over its metadata limit, is refused
RESOURCE_EXHAUSTED by grpc before it is parsed, and the next call is served; a request under the
limit full of junk gets one bounded INVALID_ARGUMENT; calls beyond the concurrency cap (streams
included) are refused until one ends. The gateway's own cases are in tests/test_gateway.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cardcheck import dataset
from cardcheck.numbers import id_check_digit
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import CardCheckError, from_rpc_error
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import (
    bank_connector_pb2,
    bank_connector_pb2_grpc,
    bank_pb2,
    bank_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    notifier_pb2,
    notifier_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)

ID_NUMBER = "22010219900307123" + id_check_digit("22010219900307123")
SUBJECT = report_service_pb2.Subject(name="张三", id_number=ID_NUMBER, phone="13812345678")
BIG = "x" * 40_000  # over every service's receive limit (16 KiB internal, 32 KiB at the edge)
JUNK_CODES = ["Z"] * 4000  # 12 KB: under the internal services' 16 KiB, far over the 96 codes allowed


def _settings(tmp_path: Path, service: str, **overrides) -> Settings:
    # Every other service unreachable: nothing here needs them to answer.
    addresses = {name: "127.0.0.1:1" for name in DEFAULT_PORTS}
    addresses[service] = "127.0.0.1:0"
    return Settings(addresses=addresses, data_dir=tmp_path / service).replace(**overrides)


async def _build(service: str, settings: Settings, tmp_path: Path):
    provider = make_tracer_provider(service, tmp_path, exporter=InMemorySpanExporter())
    clock = ManualClock()
    if service == "gateway":
        from gateway.app import build
        from gateway.config import GatewayConfig

        return await build(settings, clock=clock, tracer_provider=provider, config=GatewayConfig())
    if service == "report_service":
        from report_service.app import build
        from report_service.config import ReportServiceConfig

        return await build(
            settings, clock=clock, tracer_provider=provider, config=ReportServiceConfig(),
            pass_interval_s=3600, sweep_interval_s=3600,
        )
    if service == "bank_connector":
        from bank_connector.app import build
        from bank_connector.config import ConnectorConfig

        return await build(settings, clock=clock, tracer_provider=provider, config=ConnectorConfig())
    if service == "notifier":
        from notifier.app import build
        from notifier.config import NotifierConfig

        return await build(settings, clock=clock, tracer_provider=provider, config=NotifierConfig())
    from bank_sim.app import build

    return await build(settings, records=dataset.generate(7, 5), clock=clock, tracer_provider=provider)


@pytest.fixture
async def serve(tmp_path: Path):
    """A factory: the named service, started on port 0, and a channel to it."""
    running = []

    async def start(service: str, **overrides) -> grpc.aio.Channel:
        host = await _build(service, _settings(tmp_path, service, **overrides), tmp_path)
        port = await host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running.append((host, channel))
        return channel

    yield start
    for host, channel in reversed(running):
        await channel.close()
        await host.stop(0)


def _unary(result) -> Awaitable:
    """A unary call as is; a server stream as its first message."""
    return result if not hasattr(result, "read") else result.read()


@dataclass(frozen=True)
class Case:
    service: str
    oversized: Callable[[grpc.aio.Channel], object]  # a request past the receive limit
    served: Callable[[grpc.aio.Channel], object]  # a normal call, answered
    junk: Callable[[grpc.aio.Channel], object] | None = None  # under the limit, full of junk
    junk_field: str = ""


CASES = [
    Case(
        "gateway",
        lambda ch: gateway_pb2_grpc.CardCheckStub(ch).Register(gateway_pb2.RegisterRequest(name=BIG)),
        lambda ch: gateway_pb2_grpc.CardCheckStub(ch).GetAgreement(gateway_pb2.GetAgreementRequest()),
    ),
    Case(
        "report_service",
        lambda ch: report_service_pb2_grpc.ReportServiceStub(ch).CreateQuery(
            report_service_pb2.CreateQueryRequest(
                user_id="u1", subject=report_service_pb2.Subject(name=BIG), bank_codes=["ICBC"]
            )
        ),
        lambda ch: report_service_pb2_grpc.ReportServiceStub(ch).ListQueries(
            report_service_pb2.ReportServiceListQueriesRequest(user_id="u1")
        ),
        lambda ch: report_service_pb2_grpc.ReportServiceStub(ch).CreateQuery(
            report_service_pb2.CreateQueryRequest(
                user_id="u1", subject=SUBJECT, bank_codes=JUNK_CODES, agreement_version="v1"
            )
        ),
        "bank_codes",
    ),
    Case(
        "bank_connector",
        lambda ch: bank_connector_pb2_grpc.BankConnectorStub(ch).FanOut(
            bank_connector_pb2.FanOutRequest(id_number=ID_NUMBER, name=BIG, bank_codes=["ICBC"])
        ),
        lambda ch: bank_connector_pb2_grpc.BankConnectorStub(ch).GetBankHealth(
            bank_connector_pb2.GetBankHealthRequest()
        ),
        lambda ch: bank_connector_pb2_grpc.BankConnectorStub(ch).FanOut(
            bank_connector_pb2.FanOutRequest(id_number=ID_NUMBER, name="张三", bank_codes=JUNK_CODES)
        ),
        "bank_codes",
    ),
    Case(
        "notifier",
        lambda ch: notifier_pb2_grpc.NotifierStub(ch).Send(
            notifier_pb2.SendRequest(idempotency_key="k", params={"code": BIG})
        ),
        lambda ch: notifier_pb2_grpc.NotifierStub(ch).ListMessages(notifier_pb2.ListMessagesRequest(phone="13812345678")),
        lambda ch: notifier_pb2_grpc.NotifierStub(ch).Send(
            notifier_pb2.SendRequest(
                idempotency_key="k", phone="13812345678", kind=notifier_pb2.MESSAGE_KIND_REPORT_READY,
                params={f"p{i}": "v" for i in range(1000)},
            )
        ),
        "params",
    ),
    Case(
        "bank_sim",
        lambda ch: bank_pb2_grpc.IssuingBankStub(ch).LookupCards(
            bank_pb2.LookupCardsRequest(bank_code="ICBC", id_number=ID_NUMBER, name=BIG)
        ),
        lambda ch: bank_pb2_grpc.BankSimControlStub(ch).GetBehaviour(bank_pb2.GetBehaviourRequest(bank_codes=["ICBC"])),
        lambda ch: bank_pb2_grpc.BankSimControlStub(ch).SetBehaviour(
            bank_pb2.SetBehaviourRequest(bank_codes=JUNK_CODES, behaviour=bank_pb2.BankBehaviour(down=True))
        ),
        "bank_codes",
    ),
]


async def _status(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(call)
    return caught.value


@pytest.mark.parametrize("case", CASES, ids=[case.service for case in CASES])
async def test_an_oversized_request_is_refused_cleanly_and_the_next_call_is_served(serve, case: Case) -> None:
    channel = await serve(case.service)
    for _ in range(3):
        error = await _status(case.oversized(channel))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "Received message larger than max" in error.details()
    await _unary(case.served(channel))


@pytest.mark.parametrize("case", CASES, ids=[case.service for case in CASES])
async def test_huge_request_headers_are_refused_and_the_next_call_is_served(serve, case: Case) -> None:
    channel = await serve(case.service)
    for size in (10_000, 1_000_000):  # every service takes 8 KiB of headers
        error = await _status(case.served(_WithHeader(channel, ("authorization", "Bearer " + "a" * size))))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (size, error)
    await _unary(case.served(channel))


class _WithHeader:
    """A channel whose every call carries one more header (the stubs take it as a channel)."""

    def __init__(self, channel: grpc.aio.Channel, header: tuple[str, str]) -> None:
        self._channel = channel
        self._header = header

    def unary_unary(self, *args, **kwargs):
        return self._wrap(self._channel.unary_unary(*args, **kwargs))

    def unary_stream(self, *args, **kwargs):
        return self._wrap(self._channel.unary_stream(*args, **kwargs))

    def _wrap(self, multicallable):
        header = self._header

        def invoke(request, **kwargs):
            return multicallable(request, metadata=(header,), **kwargs)

        return invoke


@pytest.mark.parametrize("case", [c for c in CASES if c.junk], ids=[c.service for c in CASES if c.junk])
async def test_junk_under_the_limit_gets_one_bounded_refusal(serve, case: Case) -> None:
    channel = await serve(case.service)
    error = await _status(case.junk(channel))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    refusal = from_rpc_error(error)
    assert isinstance(refusal, CardCheckError) and refusal.reason == "INVALID_ARGUMENT"
    assert [v.field for v in refusal.violations] == [case.junk_field]
    assert len(error.details()) <= 300
    await _unary(case.served(channel))


async def test_watches_count_towards_the_concurrency_cap_which_recovers_when_one_ends(serve) -> None:
    channel = await serve("report_service", max_concurrent_rpcs={"report_service": 3})
    stub = report_service_pb2_grpc.ReportServiceStub(channel)
    created = await stub.CreateQuery(
        report_service_pb2.CreateQueryRequest(
            user_id="u1", subject=SUBJECT, bank_codes=["ICBC"], agreement_version="v1", idempotency_key="k1"
        )
    )
    watch = report_service_pb2.ReportServiceWatchQueryRequest(user_id="u1", query_id=created.query.query_id)
    watches = [stub.WatchQuery(watch) for _ in range(3)]
    for watch in watches:
        await watch.read()  # each under way: the query stays PENDING (bank_connector is unreachable)
    for _ in range(3):
        error = await _status(stub.ListQueries(report_service_pb2.ReportServiceListQueriesRequest(user_id="u1")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "Concurrent RPC limit exceeded" in error.details()
    watches[0].cancel()
    for _ in range(100):  # the server sees the cancellation a moment later
        try:
            listed = await stub.ListQueries(report_service_pb2.ReportServiceListQueriesRequest(user_id="u1"))
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.02)
    else:
        pytest.fail("the cap never let a call through again")
    assert [q.query_id for q in listed.queries] == [created.query.query_id]
    for watch in watches[1:]:
        watch.cancel()
