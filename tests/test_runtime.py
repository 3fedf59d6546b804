"""The shared runtime: settings, errors over a real channel, keys, span files, graceful stop."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.exceptions import InvalidTag
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cardcheck.runtime.channels import open_channel
from cardcheck.runtime.errors import (
    MAX_VIOLATIONS,
    CardCheckError,
    FieldViolation,
    from_rpc_error,
    handles_errors,
    invalid_argument,
)
from cardcheck.runtime.keys import (
    Keyring,
    load_keyring,
    load_master_key,
    read_retired_keys,
    rotate_master_key,
)
from cardcheck.runtime.server import SERVER_OPTIONS, Registration, RequestBounds, ServiceHost
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import client_tracing, make_tracer_provider, server_interceptors
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from tests.harness.processes import ServiceProcess


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
        {"CARDCHECK_EVENT_LOOP": "trio"},
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


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_after_a_rotation_new_values_are_under_the_current_key_and_old_ones_still_open() -> None:
    old_key, new_key, unknown = bytes(range(32)), bytes(range(1, 33)), bytes(32)
    before, after = Keyring(old_key), Keyring(new_key, retired=[old_key, new_key, old_key])
    assert after.retired == 1  # the current key and repeats are not counted as retired
    old_sealed = before.sealer("identity").seal(b"name", b"u1")
    new_sealed = after.sealer("identity").seal(b"name", b"u1")
    assert after.sealer("identity").open(old_sealed, b"u1") == b"name"
    with pytest.raises(InvalidTag):  # new values only under the current key
        before.sealer("identity").open(new_sealed, b"u1")
    with pytest.raises(InvalidTag):  # still bound to the row, under a retired key too
        after.sealer("identity").open(old_sealed, b"u2")
    assert after.sealer("identity").reseal(new_sealed, b"u1") is None
    resealed = after.sealer("identity").reseal(old_sealed, b"u1")
    assert Keyring(new_key).sealer("identity").open(resealed, b"u1") == b"name"  # the old key can go
    with pytest.raises(InvalidTag):
        Keyring(unknown).sealer("identity").reseal(old_sealed, b"u1")

    old_digest = before.hasher("phone").digest("13800000000")
    hasher = after.hasher("phone")
    assert hasher.digest("13800000000") != old_digest  # stored from now on
    assert hasher.digests("13800000000") == (hasher.digest("13800000000"), old_digest)  # looked up
    assert hasher.matches("13800000000", old_digest) and not hasher.matches("13800000001", old_digest)
    assert not Keyring(new_key).hasher("phone").matches("13800000000", old_digest)


def test_retired_keys_come_from_the_environment_or_the_rotated_files(tmp_path: Path) -> None:
    a, b = bytes(range(32)), bytes(range(2, 34))
    settings = Settings.from_env({"CARDCHECK_RETIRED_MASTER_KEYS": f"{_b64(a)}, {_b64(b)}"})
    assert read_retired_keys(settings.retired_master_keys, tmp_path) == (a, b)
    assert read_retired_keys(None, tmp_path) == ()
    with pytest.raises(SettingsError, match="entry 2"):
        read_retired_keys(f"{_b64(a)},not-base64!", tmp_path)
    with pytest.raises(SettingsError, match="32 bytes"):
        read_retired_keys(_b64(b"short"), tmp_path)

    first = load_master_key(None, tmp_path)
    sealed = Keyring(first).sealer("report").seal(b"x", b"q")
    retired_file = rotate_master_key(tmp_path, datetime(2026, 11, 24, 8, 0, tzinfo=UTC))
    assert retired_file.parent == tmp_path / "keys" / "retired" and retired_file.stat().st_mode & 0o077 == 0
    keyring = load_keyring(None, None, tmp_path)
    assert keyring.subkey("report") != Keyring(first).subkey("report") and keyring.retired == 1
    assert keyring.sealer("report").open(sealed, b"q") == b"x"
    rotate_master_key(tmp_path, datetime(2026, 11, 25, 8, 0, tzinfo=UTC))
    assert load_keyring(None, None, tmp_path).retired == 2
    assert load_keyring(None, None, tmp_path).sealer("report").open(sealed, b"q") == b"x"
    # Configured keys win over the files: the operator's Secret says what is retired.
    assert load_keyring(_b64(b), _b64(a), tmp_path).retired == 1


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


async def _run_notifier(tmp_path: Path, **env: str) -> tuple[bool, int, str]:
    """Starts a real notifier and, once it serves, stops it: whether it served, its exit code
    and its output."""
    notifier = ServiceProcess("notifier", tmp_path, **env)
    await notifier.start(wait=False)
    try:
        try:
            await notifier.serving()
        except AssertionError:
            if notifier.process.returncode is None:
                raise  # still running, never serving
            return False, await notifier.wait(), notifier.output()
        return True, await notifier.terminate(), notifier.output()
    finally:
        await notifier.stop()


async def test_services_run_on_the_event_loop_the_environment_names(tmp_path: Path) -> None:
    served, code, log = await _run_notifier(tmp_path / "default")
    assert served and code == 0 and "(event loop: uvloop)" in log, log
    served, code, log = await _run_notifier(tmp_path / "asyncio", CARDCHECK_EVENT_LOOP="asyncio")
    assert served and code == 0 and "(event loop: asyncio)" in log, log
    served, code, log = await _run_notifier(tmp_path / "bogus", CARDCHECK_EVENT_LOOP="trio")
    assert not served and code == 2, log
    assert "CARDCHECK_EVENT_LOOP='trio'" in log and "Traceback" not in log


def test_no_tracing_interceptor_when_the_sdk_is_disabled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    provider = make_tracer_provider("test", tmp_path)
    assert server_interceptors(provider) and client_tracing(provider) is not None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert server_interceptors(provider) == [] and client_tracing(provider) is None


class SlowNotifier(notifier_pb2_grpc.NotifierServicer):
    """Send answers after `delay_s`, or refuses a phone of "0"; notes what each call saw."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self.cancelled = False
        self.traceparents: list[str | None] = []

    async def Send(self, request, context):
        self.traceparents.append(dict(context.invocation_metadata()).get("traceparent"))
        self.started.set()
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.ended.set()
        if request.phone == "0":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such phone")
        return notifier_pb2.SendResponse(message_id="m1")


@pytest.fixture
async def slow_notifier():
    servicer = SlowNotifier()
    server = grpc.aio.server()
    notifier_pb2_grpc.add_NotifierServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_cancelling_a_unary_call_on_a_traced_channel_cancels_it_at_the_server(slow_notifier, tmp_path) -> None:
    servicer, address = slow_notifier
    servicer.delay_s = 30
    channel = open_channel(address, make_tracer_provider("test", tmp_path, exporter=InMemorySpanExporter()))
    try:
        stub = notifier_pb2_grpc.NotifierStub(channel)

        async def send() -> None:
            await stub.Send(notifier_pb2.SendRequest(phone="13800000000"), timeout=60)

        caller = asyncio.create_task(send())
        await asyncio.wait_for(servicer.started.wait(), 5)
        caller.cancel()
        await asyncio.wait_for(servicer.ended.wait(), 5)  # not the 30 s the handler would take
        assert servicer.cancelled
    finally:
        await channel.close()


async def test_traced_unary_calls_are_client_spans_with_their_status(slow_notifier, tmp_path) -> None:
    servicer, address = slow_notifier
    spans = InMemorySpanExporter()
    channel = open_channel(address, make_tracer_provider("test", tmp_path, exporter=spans))
    try:
        stub = notifier_pb2_grpc.NotifierStub(channel)
        assert (await stub.Send(notifier_pb2.SendRequest(phone="13800000000"), timeout=5)).message_id == "m1"
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Send(notifier_pb2.SendRequest(phone="0"), timeout=5)
        for _ in range(100):  # each span ends just after its call
            if len(spans.get_finished_spans()) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await channel.close()
    ok, failed = spans.get_finished_spans()
    assert {s.name for s in (ok, failed)} == {"/cardcheck.v1.Notifier/Send"}
    assert ok.kind.name == failed.kind.name == "CLIENT"
    assert ok.attributes["rpc.grpc.status_code"] == 0 and ok.status.status_code.name == "UNSET"
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed.status.status_code.name == "ERROR"
    assert [tp.split("-")[2] for tp in servicer.traceparents] == [
        format(s.context.span_id, "016x") for s in (ok, failed)
    ]


async def test_a_channel_spreads_calls_over_every_address_of_its_target(tmp_path) -> None:
    servers, served = [], []
    for _ in range(2):
        servicer = SlowNotifier()
        server = grpc.aio.server()
        notifier_pb2_grpc.add_NotifierServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append((server, port))
        served.append(servicer)
    channel = open_channel(",".join(f"127.0.0.1:{port}" for _, port in servers).join(("ipv4:", "")))
    try:
        stub = notifier_pb2_grpc.NotifierStub(channel)
        # round_robin starts with whichever address connects first, then takes turns; with
        # pick_first every call would go to one server as long as it is up.
        for _ in range(200):
            await stub.Send(notifier_pb2.SendRequest(phone="13800000000"), timeout=5, wait_for_ready=True)
            if all(s.traceparents for s in served):
                break
        before = [len(s.traceparents) for s in served]
        for _ in range(20):
            await stub.Send(notifier_pb2.SendRequest(phone="13800000000"), timeout=5)
    finally:
        await channel.close()
        for server, _ in servers:
            await server.stop(0)
    assert all(before)
    assert [len(s.traceparents) - n for s, n in zip(served, before, strict=True)] == [10, 10]


async def test_calls_go_on_without_a_failure_while_servers_age_out_connections() -> None:
    """The servers' connection age (SERVER_OPTIONS) makes callers reconnect, so that they find
    replicas started since; a call made while its connection is closing must not fail."""
    peers: set[str] = set()

    class PeerNotifier(notifier_pb2_grpc.NotifierServicer):
        async def Send(self, request, context):
            peers.add(context.peer())
            return notifier_pb2.SendResponse(message_id="m1")

    options = [(k, v) for k, v in SERVER_OPTIONS if k != "grpc.max_connection_age_ms"]
    server = grpc.aio.server(options=[*options, ("grpc.max_connection_age_ms", 300)])
    notifier_pb2_grpc.add_NotifierServicer_to_server(PeerNotifier(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        stub = notifier_pb2_grpc.NotifierStub(channel)
        loop = asyncio.get_running_loop()
        until, calls = loop.time() + 1.5, 0
        while loop.time() < until:
            await stub.Send(notifier_pb2.SendRequest(phone="13800000000"), timeout=5)
            calls += 1
    finally:
        await channel.close()
        await server.stop(0)
    assert calls > 100
    assert len(peers) >= 3  # a new connection (another client port) after each age-out


# --- request bounds ------------------------------------------------------------------------------


class HoldingNotifier(notifier_pb2_grpc.NotifierServicer):
    """Send holds its call until released (phone "hold"); every call is counted as it starts.
    ListMessages answers a body of `int(phone)` characters, or refuses with that many violations
    when the phone starts with "bad"."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.holding = asyncio.Condition()

    async def Send(self, request, context):
        async with self.holding:
            self.started += 1
            self.holding.notify_all()
        if request.phone == "hold":
            await self.release.wait()
        return notifier_pb2.SendResponse(message_id=f"m{self.started}")

    @handles_errors
    async def ListMessages(self, request, context):
        if request.phone.startswith("bad"):
            count = int(request.phone.removeprefix("bad"))
            raise invalid_argument([FieldViolation(f"phone[{i}]", "x" * 5000) for i in range(count)])
        return notifier_pb2.ListMessagesResponse(messages=[notifier_pb2.Message(body="x" * int(request.phone))])

    async def wait_started(self, count: int) -> None:
        async with self.holding:
            await asyncio.wait_for(self.holding.wait_for(lambda: self.started >= count), 5)


@pytest.fixture
async def bounded(tmp_path: Path):
    """A factory: a ServiceHost with the given bounds around a HoldingNotifier, and a channel."""
    started = []

    async def start(bounds: RequestBounds, **channel_args):
        servicer = HoldingNotifier()
        host = ServiceHost(
            "bounded",
            [Registration(notifier_pb2_grpc.add_NotifierServicer_to_server, servicer, "cardcheck.v1.Notifier")],
            "127.0.0.1:0",
            make_tracer_provider("bounded", tmp_path, exporter=InMemorySpanExporter()),
            bounds=bounds,
        )
        port = await host.start()
        channel = open_channel(f"127.0.0.1:{port}", **channel_args)
        started.append((host, channel, servicer))
        return notifier_pb2_grpc.NotifierStub(channel), servicer

    yield start
    for host, channel, servicer in started:
        servicer.release.set()
        await channel.close()
        await host.stop(0)


async def _refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_request_over_the_receive_limit_is_refused_before_it_is_parsed(bounded) -> None:
    stub, servicer = await bounded(RequestBounds(max_receive_bytes=16 * 1024))
    await stub.Send(notifier_pb2.SendRequest(phone="1" * 16_000))  # within the limit
    error = await _refused(stub.Send(notifier_pb2.SendRequest(phone="1" * 17_000)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "larger than max" in error.details()
    assert from_rpc_error(error) is None  # grpc's own refusal: nothing was parsed, no ErrorInfo
    assert servicer.started == 1  # the oversized request never reached the servicer
    assert (await stub.Send(notifier_pb2.SendRequest(phone="13800000000"))).message_id == "m2"


async def test_a_hosts_own_options_override_its_bounds(tmp_path: Path) -> None:
    host = ServiceHost(
        "overridden",
        [Registration(notifier_pb2_grpc.add_NotifierServicer_to_server, HoldingNotifier(), "cardcheck.v1.Notifier")],
        "127.0.0.1:0",
        make_tracer_provider("overridden", tmp_path, exporter=InMemorySpanExporter()),
        bounds=RequestBounds(max_receive_bytes=16 * 1024),
        options=[("grpc.max_receive_message_length", 64 * 1024)],
    )
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await notifier_pb2_grpc.NotifierStub(channel).Send(notifier_pb2.SendRequest(phone="1" * 30_000))
    finally:
        await host.stop(0)


async def test_request_headers_over_the_metadata_limit_are_refused_every_time(bounded) -> None:
    stub, servicer = await bounded(RequestBounds(max_metadata_bytes=4096))
    await stub.Send(notifier_pb2.SendRequest(), metadata=(("authorization", "Bearer " + "a" * 3000),))
    for size in (3700, 10_000, 1_000_000):  # just past (grpc's own headers count too), and huge
        error = await _refused(stub.Send(notifier_pb2.SendRequest(), metadata=(("authorization", "a" * size),)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (size, error)
    assert servicer.started == 1
    assert (await stub.Send(notifier_pb2.SendRequest())).message_id == "m2"


async def test_calls_beyond_the_concurrency_cap_are_refused_until_one_ends(bounded) -> None:
    stub, servicer = await bounded(RequestBounds(max_concurrent_rpcs=3))
    held = [asyncio.ensure_future(stub.Send(notifier_pb2.SendRequest(phone="hold"))) for _ in range(3)]
    await servicer.wait_started(3)
    for _ in range(5):
        error = await _refused(stub.Send(notifier_pb2.SendRequest()))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert servicer.started == 3
    servicer.release.set()
    assert len(await asyncio.gather(*held)) == 3
    assert (await stub.Send(notifier_pb2.SendRequest())).message_id == "m4"  # served again


async def test_streams_beyond_the_per_connection_limit_wait_for_one_to_end(bounded) -> None:
    stub, servicer = await bounded(RequestBounds(max_streams_per_connection=2))
    held = [asyncio.ensure_future(stub.Send(notifier_pb2.SendRequest(phone="hold"))) for _ in range(2)]
    await servicer.wait_started(2)
    waiting = asyncio.ensure_future(stub.Send(notifier_pb2.SendRequest()))
    await asyncio.sleep(0.3)
    assert servicer.started == 2 and not waiting.done()  # queued by the client, not refused
    servicer.release.set()
    await asyncio.gather(*held)
    assert (await waiting).message_id == "m3"


async def test_answers_over_the_send_limit_and_over_a_channels_receive_limit_are_refused(bounded) -> None:
    stub, _ = await bounded(RequestBounds(max_send_bytes=64 * 1024), max_receive_bytes=32 * 1024)
    await stub.ListMessages(notifier_pb2.ListMessagesRequest(phone="30000"))
    error = await _refused(stub.ListMessages(notifier_pb2.ListMessagesRequest(phone="40000")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "CLIENT" in error.details(), error
    error = await _refused(stub.ListMessages(notifier_pb2.ListMessagesRequest(phone="70000")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "SERVER" in error.details(), error
    await stub.ListMessages(notifier_pb2.ListMessagesRequest(phone="10"))


async def test_a_refusal_names_at_most_ten_violations_and_counts_the_rest(bounded) -> None:
    stub, _ = await bounded(RequestBounds())
    error = await _refused(stub.ListMessages(notifier_pb2.ListMessagesRequest(phone="bad100000")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    refusal = from_rpc_error(error)
    assert refusal is not None and len(refusal.violations) == MAX_VIOLATIONS == 10
    assert [v.field for v in refusal.violations] == [f"phone[{i}]" for i in range(10)]
    assert all(len(v.description) <= 200 for v in refusal.violations)
    assert refusal.metadata == {"violations_omitted": "99990"}
    assert len(error.details()) <= 300 and error.details().endswith("and 99990 more")
    # A refusal passed on keeps what it says (a relayed one is not counted twice).
    assert CardCheckError(refusal.reason, refusal.message, refusal.metadata, refusal.violations) == refusal
    error = await _refused(stub.ListMessages(notifier_pb2.ListMessagesRequest(phone="bad3")))
    assert from_rpc_error(error).metadata == {} and len(from_rpc_error(error).violations) == 3


def test_each_services_bounds_can_be_moved_by_the_environment() -> None:
    settings = Settings.from_env(
        {"CARDCHECK_GATEWAY_MAX_RECEIVE_BYTES": "4194304", "CARDCHECK_BANK_SIM_MAX_CONCURRENT_RPCS": "20000"}
    )
    assert settings.max_receive_bytes == {"gateway": 4 * 1024 * 1024}
    assert settings.max_concurrent_rpcs == {"bank_sim": 20000}
    own = RequestBounds(max_receive_bytes=32 * 1024, max_concurrent_rpcs=100)
    assert own.configured(settings, "gateway") == RequestBounds(max_receive_bytes=4 * 1024 * 1024, max_concurrent_rpcs=100)
    assert own.configured(settings, "bank_sim") == RequestBounds(max_receive_bytes=32 * 1024, max_concurrent_rpcs=20000)
    assert own.configured(settings, "notifier") == own
    for var, value in (
        ("CARDCHECK_NOTIFIER_MAX_CONCURRENT_RPCS", "0"),
        ("CARDCHECK_NOTIFIER_MAX_CONCURRENT_RPCS", "many"),
        ("CARDCHECK_GATEWAY_MAX_RECEIVE_BYTES", "100"),
        ("CARDCHECK_GATEWAY_MAX_RECEIVE_BYTES", str(64 * 1024 * 1024)),
    ):
        with pytest.raises(SettingsError, match=var):
            Settings.from_env({var: value})


async def test_a_wait_on_an_event_cancelled_as_the_event_is_set_is_cancelled():
    """wait_for_event never drops a cancellation that comes just as the event is set (as
    asyncio.wait_for does on Python 3.11), so a service loop waiting on it always stops."""
    from cardcheck.runtime.waiting import wait_for_event

    for spins in range(3):
        event = asyncio.Event()
        waiting = asyncio.create_task(wait_for_event(event, 60))
        await asyncio.sleep(0)
        event.set()
        for _ in range(spins):
            await asyncio.sleep(0)
        if waiting.done():
            assert waiting.result() is True
            continue
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert await wait_for_event(asyncio.Event(), 0.01) is False


class Relay(notifier_pb2_grpc.NotifierServicer):
    """Send passed on downstream, on a traced channel."""

    def __init__(self, downstream: notifier_pb2_grpc.NotifierStub) -> None:
        self.downstream = downstream

    async def Send(self, request, context):
        return await self.downstream.Send(request, timeout=5)


@pytest.mark.parametrize("sampler", ["parentbased_always_on", "always_on"])
async def test_a_call_of_an_unsampled_trace_carries_it_on_and_makes_spans_only_if_the_sampler_says(
    slow_notifier, tmp_path, sampler
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    from cardcheck.runtime.telemetry import Unsampled

    servicer, address = slow_notifier
    spans = InMemorySpanExporter()
    provider = make_tracer_provider(
        "relay", tmp_path, exporter=spans, sampler=ParentBased(ALWAYS_ON) if sampler.startswith("parentbased") else ALWAYS_ON
    )
    downstream = open_channel(address, provider)
    host = ServiceHost(
        "relay",
        [Registration(notifier_pb2_grpc.add_NotifierServicer_to_server, Relay(notifier_pb2_grpc.NotifierStub(downstream)),
                      "cardcheck.v1.Notifier")],
        "127.0.0.1:0",
        provider,
    )
    port = await host.start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = notifier_pb2_grpc.NotifierStub(channel)
            for flags in ("00", "01"):
                await stub.Send(notifier_pb2.SendRequest(phone="13800000000"), timeout=5,
                                metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-{flags}"),))
            for _ in range(100):  # a client span ends just after its call
                if len(spans.get_finished_spans()) >= (2 if sampler.startswith("parentbased") else 4):
                    break
                await asyncio.sleep(0.01)
    finally:
        await host.stop(0)
        await downstream.close()
    sent_on = [tp.split("-") for tp in servicer.traceparents]
    assert [(tp[1], tp[3]) for tp in sent_on] == [(trace_id, "00" if sampler.startswith("parentbased") else "01"),
                                                  (trace_id, "01")]
    made = spans.get_finished_spans()
    assert all(f"{s.context.trace_id:032x}" == trace_id for s in made)
    if sampler.startswith("parentbased"):
        # The unsampled call: no span; the sampled one: the server's and the client's.
        assert sorted(s.kind.name for s in made) == ["CLIENT", "SERVER"]
        assert sent_on[0][2] == "00f067aa0ba902b7"  # the caller's span stays the parent
        assert Unsampled(provider).sampler_follows()
    else:
        assert sorted(s.kind.name for s in made) == ["CLIENT", "CLIENT", "SERVER", "SERVER"]
        assert not Unsampled(provider).sampler_follows()
