"""What an operator sees: JSON log lines that lead to their call's trace, readiness that follows
the database and Redis through real outages, and spans of database and Redis calls that hold
neither personal data nor statement parameters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from bank_sim.process import free_port
from cardcheck.runtime.logs import JsonFormatter, mask_phone
from cardcheck.runtime.readiness import Dependency, Readiness
from cardcheck.runtime.telemetry import make_tracer_provider, trace_engine
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from gateway.config import GatewayConfig
from notifier.app import build as build_notifier
from tests.conftest import _unavailable
from tests.harness.gateway import ALICE, PASSWORD
from tests.harness.processes import ServiceProcess
from tests.harness.settings import settings_for
from tests.harness.waiting import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PHONE = "13912345678"
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# --- logs --------------------------------------------------------------------------------------


async def test_json_log_lines_carry_the_trace_of_their_call(tmp_path: Path) -> None:
    notifier = ServiceProcess(
        "notifier", tmp_path, health_service="cardcheck.v1.Notifier",
        CARDCHECK_LOG_FORMAT="json", CARDCHECK_SHUTDOWN_GRACE_S="1",
    )
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    await notifier.start()
    try:
        async with grpc.aio.insecure_channel(notifier.address) as channel:
            await notifier_pb2_grpc.NotifierStub(channel).Send(
                notifier_pb2.SendRequest(
                    idempotency_key="k1", phone=PHONE, kind=notifier_pb2.MESSAGE_KIND_SMS_CODE,
                    params={"code": "246810", "purpose": "REGISTER"},
                ),
                metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
                timeout=10,
            )
    finally:
        await notifier.stop()  # the span file is complete once it stopped
    output = notifier.output()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    for line in lines:
        assert {"time", "level", "service", "logger", "message"} <= line.keys(), line
        assert RFC3339_UTC.fullmatch(line["time"]) and line["service"] == "notifier", line
    assert any("serving on" in line["message"] and "trace_id" not in line for line in lines)
    (recorded,) = [line for line in lines if line["message"].endswith("recorded")]
    assert mask_phone(PHONE) in recorded["message"] and PHONE not in output

    spans = [json.loads(line) for line in (tmp_path / "spans" / "notifier.jsonl").read_text().splitlines()]
    (served,) = [s for s in spans if s["name"] == "/cardcheck.v1.Notifier/Send"]
    assert served["context"]["trace_id"] == f"0x{trace_id}"
    assert recorded["trace_id"] == trace_id
    assert recorded["span_id"] == served["context"]["span_id"].removeprefix("0x")


def test_a_json_line_holds_the_exception_and_the_span_it_was_written_in() -> None:
    formatter = JsonFormatter("gateway")
    tracer = TracerProvider().get_tracer(__name__)
    with tracer.start_as_current_span("call") as span:
        try:
            raise ValueError("bad row")
        except ValueError:
            record = logging.getLogger("gateway.flows").makeRecord(
                "gateway.flows", logging.ERROR, __file__, 1, "failed for %s", ("138****5678",), sys.exc_info()
            )
        line = json.loads(formatter.format(record))
    context = span.get_span_context()
    assert line["message"] == "failed for 138****5678" and line["level"] == "ERROR"
    assert line["logger"] == "gateway.flows" and "ValueError: bad row" in line["exception"]
    assert (line["trace_id"], line["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert "\n" not in formatter.format(record)  # a traceback stays on its line


# --- readiness ---------------------------------------------------------------------------------


async def health_of(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return reply.status


async def becomes(address: str, service: str, status: int) -> None:
    async def there() -> bool:
        return await health_of(address, service) == status

    await eventually(there, within=15, every=0.05, what=f"{service!r} {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")


@contextlib.asynccontextmanager
async def redis_server(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Redis of this test's own on `port`, stopped on leaving."""
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server", FileNotFoundError("redis-server"))
    process = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_gateway_is_not_ready_while_its_redis_is_down(start_stack) -> None:
    port = free_port()
    async with redis_server(port) as first:
        stack = await start_stack(redis_url=f"redis://127.0.0.1:{port}/0", readiness_every_s=0.1)
        gateway = f"127.0.0.1:{stack.host.port}"
        await becomes(gateway, "cardcheck.v1.CardCheck", SERVING)
        first.kill()
        await first.wait()
        await becomes(gateway, "cardcheck.v1.CardCheck", NOT_SERVING)
        assert await health_of(gateway, "") == SERVING  # alive: no restart would bring Redis back
    async with redis_server(port):
        await becomes(gateway, "cardcheck.v1.CardCheck", SERVING)
        assert await health_of(gateway, "") == SERVING


async def test_a_check_that_hangs_counts_as_down_and_is_not_asked_again_meanwhile() -> None:
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("cardcheck.v1.Notifier", SERVING)
    answer, asked = asyncio.Event(), []

    async def hangs_until_answered() -> None:
        asked.append(1)
        await answer.wait()

    readiness = Readiness(
        health_servicer, ["", "cardcheck.v1.Notifier"], [Dependency("database", hangs_until_answered)],
        every_s=0.01, timeout_s=0.01,
    )

    async def status(name: str) -> int:
        request = health_pb2.HealthCheckRequest(service=name)
        return (await health_servicer.Check(request, None)).status

    for _ in range(3):
        await readiness.check_once()
    assert await status("cardcheck.v1.Notifier") == NOT_SERVING and await status("") == SERVING
    assert len(asked) == 1  # one worker held, not one per round
    answer.set()
    await readiness.check_once()
    assert await status("cardcheck.v1.Notifier") == SERVING and readiness.ready
    await readiness.stop()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a server; `close()` stops it and cuts every connection, as
    a database host that goes away would; `open()` listens on the same port again."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


async def test_the_notifier_is_not_ready_while_its_database_is_down(tmp_path: Path, pg_schema_url: str) -> None:
    url = make_url(pg_schema_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.open()
    through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    host = await build_notifier(
        settings_for(tmp_path, through_proxy, addresses={"notifier": "127.0.0.1:0"}, readiness_every_s=0.1)
    )
    port = await host.start()
    notifier = f"127.0.0.1:{port}"
    try:
        await becomes(notifier, "cardcheck.v1.Notifier", SERVING)
        await proxy.close()
        await becomes(notifier, "cardcheck.v1.Notifier", NOT_SERVING)
        assert await health_of(notifier, "") == SERVING
        await proxy.open()
        await becomes(notifier, "cardcheck.v1.Notifier", SERVING)
    finally:
        await host.stop(0)
        with contextlib.suppress(AssertionError, RuntimeError):
            await proxy.close()


# --- spans of database and Redis calls ---------------------------------------------------------


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_database_and_redis_spans_hold_no_parameters(start_stack, redis_url: str, redis_prefix: str) -> None:
    sent: list[str] = []

    def parameters(conn, cursor, statement, params, context, executemany) -> None:
        if not trace.get_current_span().get_span_context().is_valid:
            return  # not a call's (the migrations at start): no span
        for row in params if executemany else [params]:
            values = row.values() if isinstance(row, dict) else row or ()
            # Long strings only: ids, hashes, tokens, sealed values (short ones, a status or a
            # count, may well appear anywhere for other reasons).
            sent.extend(v for v in values if isinstance(v, str) and len(v) >= 12)

    event.listen(Engine, "before_cursor_execute", parameters)
    try:
        stack = await start_stack(redis_url=redis_url, config=GatewayConfig(redis_key_prefix=redis_prefix))
        session = await stack.register(ALICE)
        await stack.settle()
    finally:
        event.remove(Engine, "before_cursor_execute", parameters)
    assert session.session_token and sent

    spans = stack.spans.get_finished_spans()
    sql = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
    redis = [s for s in spans if s.attributes.get("db.system") == "redis"]
    assert sql and redis, sorted({s.name for s in spans})
    for span in sql + redis:
        assert span.parent is not None, f"{span.name}: a database span outside any call"
        recorded = span.to_json()
        for value in sent:
            assert value not in recorded, f"{span.name} records a statement parameter"
    assert any(s.attributes["db.statement"].startswith(("EVALSHA ?", "EVAL ?")) for s in redis)
    personal = (ALICE.name, ALICE.id_number, ALICE.phone, ALICE.card_number, PASSWORD)
    for span in spans:
        recorded = json.dumps(json.loads(span.to_json()), ensure_ascii=False)
        for value in personal:
            assert value not in recorded, f"{span.name} records personal data"


def test_the_standard_variable_leaves_the_statement_spans_out(tmp_path: Path, monkeypatch) -> None:
    exporter = InMemorySpanExporter()
    provider = make_tracer_provider("gateway", tmp_path, exporter=exporter)
    for disabled, expected in (("redis, sqlalchemy", []), ("redis", ["SELECT"])):
        monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", disabled)
        engine = create_engine(f"sqlite:///{tmp_path}/t.db")
        trace_engine(engine, provider)
        with provider.get_tracer(__name__).start_as_current_span("call"), engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        assert [s.name.split()[0] for s in exporter.get_finished_spans() if s.name != "call"] == expected
        exporter.clear()


def test_a_failed_statement_span_names_the_error_not_the_values(pg_schema_url: str) -> None:
    # PostgreSQL's message for a duplicate quotes the row's values ("DETAIL: Key (phone_hash)=...").
    exporter = InMemorySpanExporter()
    provider = make_tracer_provider("gateway", Path("/nonexistent"), exporter=exporter)
    engine = create_engine(pg_schema_url, hide_parameters=True)
    trace_engine(engine, provider)
    value = secrets.token_hex(8)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE people (phone_hash TEXT PRIMARY KEY)"))
        with provider.get_tracer(__name__).start_as_current_span("call"):
            for _ in range(2):
                with contextlib.suppress(IntegrityError), engine.begin() as connection:
                    connection.execute(text("INSERT INTO people VALUES (:h)"), {"h": value})
    finally:
        engine.dispose()
    (failed,) = [s for s in exporter.get_finished_spans() if s.name.startswith("INSERT") and not s.status.is_ok]
    assert failed.status.description == "UniqueViolation"
    assert value not in failed.to_json()
