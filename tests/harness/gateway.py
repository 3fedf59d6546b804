"""The gateway for its tests: a real grpc.aio gateway on port 0, its storage on SQLite or
PostgreSQL, the real notifier (its sandbox inbox gives the SMS codes), and fakes of
report_service and bank_connector; the people who use it, and how a refusal is read."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cardcheck.client import CardCheckClient
from cardcheck.numbers import id_check_digit, luhn_check_digit
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import DOMAIN
from cardcheck.runtime.server import ServiceHost
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, notifier_pb2, notifier_pb2_grpc
from gateway.agreement import CURRENT
from gateway.app import build_parts
from gateway.config import GatewayConfig
from gateway.flows import Gateway
from tests.harness.fakes import FakeBankConnector, FakeReportService, serve

REGISTER = common_pb2.SMS_PURPOSE_REGISTER
SIGN_IN = common_pb2.SMS_PURPOSE_SIGN_IN
QUERY_AUTH = common_pb2.SMS_PURPOSE_QUERY_AUTH
PASSWORD = "135790"


def complete_id_number(first17: str) -> str:
    return first17 + id_check_digit(first17)


def complete_card_number(partial: str) -> str:
    return partial + luhn_check_digit(partial)


@dataclass(frozen=True)
class Person:
    name: str
    id_number: str
    phone: str
    card_number: str
    region: str = "CN-JL"


ALICE = Person("张三", complete_id_number("22010219900307123"), "13812345678", complete_card_number("622202100012345678"))
BOB = Person("李四", complete_id_number("11010519851231004"), "13987654321", complete_card_number("621700000011112222"))
# Ends with the check digit X: ID numbers are compared in upper case.
CAROL = Person("阿依古丽·买买提", "11010119800101007X", "15011112222", complete_card_number("622588000033334444"))
assert CAROL.id_number[-1] == id_check_digit(CAROL.id_number[:17])
BOB_USER = "00000000-0000-4000-8000-000000000000"


@dataclass
class Refusal:
    reason: str
    metadata: dict[str, str]
    violations: dict[str, str]
    retry_after: timedelta | None


def refusal_of(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> Refusal:
    """Checks the status a refusal must carry (ErrorInfo of our domain, a zh-CN message)."""
    assert error.code() == code, (error.code(), error.details())
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    info = localized = None
    violations: dict[str, str] = {}
    retry_after = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.LocalizedMessage.DESCRIPTOR):
            localized = error_details_pb2.LocalizedMessage()
            detail.Unpack(localized)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta()
    assert info is not None and info.domain == DOMAIN, status
    assert info.reason == reason, (info.reason, status.message)
    assert (
        localized is not None
        and localized.locale == "zh-CN"
        and re.search(r"[\u4e00-\u9fff]", localized.message)
    )
    return Refusal(info.reason, dict(info.metadata), violations, retry_after)


async def refused(call: Awaitable, code: grpc.StatusCode, reason: str) -> Refusal:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return refusal_of(caught.value, code, reason)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Stack:
    gateway: gateway_pb2_grpc.CardCheckStub
    notifier: notifier_pb2_grpc.NotifierStub
    notifier_host: ServiceHost
    bank: FakeBankConnector
    reports: FakeReportService
    clock: ManualClock
    settings: Settings
    spans: InMemorySpanExporter
    client: CardCheckClient
    channels: list = field(default_factory=list)
    host: ServiceHost | None = None  # the gateway's
    flows: Gateway | None = None

    async def settle(self) -> None:
        """Waits for the SIGN_IN codes the gateway is still sending after its answers."""
        if self.flows is not None:
            await self.flows.drain(10)

    async def code_for(self, phone: str, challenge_id: str | None = None, known: set[str] | None = None) -> str:
        """The newest code SMS in the phone's sandbox inbox; with `known` (the message ids there
        before the request), the first that was not there, waited for a little (a SIGN_IN code
        is sent after the answer)."""
        await self.settle()
        for _ in range(500):
            inbox = await self.notifier.ListMessages(notifier_pb2.ListMessagesRequest(phone=phone))
            codes = [m for m in inbox.messages if m.kind == "SMS_CODE" and m.message_id not in (known or ())]
            if codes or known is None:
                break
            await asyncio.sleep(0.01)
        assert codes, "no code SMS in the inbox"
        match = re.search(r"(?<!\d)\d{6}(?!\d)", codes[0].body)
        assert match is not None, "no 6-digit code in the SMS"
        return match.group(0)

    async def message_ids(self, phone: str) -> set[str]:
        return {m.message_id for m in await self.inbox(phone)}

    async def inbox(self, phone: str) -> list[notifier_pb2.Message]:
        return list(
            (await self.notifier.ListMessages(notifier_pb2.ListMessagesRequest(phone=phone))).messages
        )

    async def challenge(
        self, purpose: int, phone: str = "", token: str | None = None, metadata: tuple = ()
    ) -> tuple[str, str]:
        metadata = (*metadata, *bearer(token)) if token else metadata
        await self.settle()
        known = await self.message_ids(phone) if phone else set()
        challenge = await self.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(phone=phone, purpose=purpose), metadata=metadata
        )
        assert re.fullmatch(r"[0-9a-f]{32}", challenge.challenge_id)
        assert challenge.expires_in_seconds == 300 and challenge.resend_after_seconds >= 60
        return challenge.challenge_id, await self.code_for(phone, known=known) if phone else ""

    def register_request(
        self, person: Person, challenge_id: str, code: str, **overrides
    ) -> gateway_pb2.RegisterRequest:
        values = dict(
            name=person.name,
            id_number=person.id_number,
            phone=person.phone,
            challenge_id=challenge_id,
            sms_code=code,
            card_number=person.card_number,
            payment_password=PASSWORD,
            region=person.region,
        )
        values.update(overrides)
        return gateway_pb2.RegisterRequest(**values)

    async def register(self, person: Person, *, enrol: bool = True) -> gateway_pb2.Session:
        if enrol:
            self.bank.enrol(person)
        challenge_id, code = await self.challenge(REGISTER, person.phone)
        return await self.gateway.Register(self.register_request(person, challenge_id, code))

    async def query_auth(self, person: Person, token: str) -> tuple[str, str]:
        await self.settle()
        known = await self.message_ids(person.phone)
        challenge = await self.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(purpose=QUERY_AUTH), metadata=bearer(token)
        )
        return challenge.challenge_id, await self.code_for(person.phone, known=known)

    async def submit(self, person: Person, token: str, **overrides) -> common_pb2.Query:
        challenge_id, code = await self.query_auth(person, token)
        values = dict(
            agreement_version=CURRENT.version,
            consent_given=True,
            challenge_id=challenge_id,
            sms_code=code,
            face_token="sandbox:pass",
        )
        values.update(overrides)
        return await self.gateway.SubmitQuery(
            gateway_pb2.SubmitQueryRequest(**values), metadata=bearer(token)
        )


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[int, FakeBankConnector, FakeReportService]]:
    """The fake bank_connector and report_service, on one port: the port and both fakes."""
    bank, reports = FakeBankConnector(), FakeReportService()
    server, port = await serve(bank, reports)
    yield port, bank, reports
    await server.stop(0)


@pytest.fixture
async def start_stack(tmp_path: Path, database_url, fakes):
    """A factory: starts the notifier and a gateway (settings and config overridable)."""
    fake_port, bank, reports = fakes
    stacks: list[Stack] = []
    hosts: list[ServiceHost] = []

    async def start(
        *, config: GatewayConfig | None = None, bank_connector: str | None = None, sms_provider=None,
        **settings_overrides,
    ) -> Stack:
        clock = ManualClock()
        addresses = {service: f"127.0.0.1:{port}" for service, port in DEFAULT_PORTS.items()}
        addresses.update(
            gateway="127.0.0.1:0",
            notifier="127.0.0.1:0",
            report_service=f"127.0.0.1:{fake_port}",
            bank_connector=bank_connector or f"127.0.0.1:{fake_port}",
        )
        settings = Settings(addresses=addresses, data_dir=tmp_path, database_url=database_url)
        from notifier.app import build as build_notifier

        notifier_host = await build_notifier(
            settings,
            clock=clock,
            provider=sms_provider,
            tracer_provider=make_tracer_provider("notifier", tmp_path, exporter=InMemorySpanExporter()),
        )
        notifier_port = await notifier_host.start()
        hosts.append(notifier_host)
        settings = settings.replace(
            addresses={**addresses, "notifier": f"127.0.0.1:{notifier_port}"}, **settings_overrides
        )
        spans = InMemorySpanExporter()
        parts = await build_parts(
            settings,
            clock=clock,
            tracer_provider=make_tracer_provider("gateway", tmp_path, exporter=spans),
            config=config or GatewayConfig(),
        )
        host = parts.host
        port = await host.start()
        hosts.append(host)
        gateway_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        notifier_channel = grpc.aio.insecure_channel(f"127.0.0.1:{notifier_port}")
        stack = Stack(
            gateway=gateway_pb2_grpc.CardCheckStub(gateway_channel),
            notifier=notifier_pb2_grpc.NotifierStub(notifier_channel),
            notifier_host=notifier_host,
            bank=bank,
            reports=reports,
            clock=clock,
            settings=settings,
            spans=spans,
            client=CardCheckClient(channel=gateway_channel),
            channels=[gateway_channel, notifier_channel],
            host=host,
            # The flows behind the servicer, to wait for their background sends (no RPC says).
            flows=parts.gateway,
        )
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        for channel in stack.channels:
            await channel.close()
    for host in reversed(hosts):
        await host.stop(0)


@pytest.fixture
async def stack(start_stack) -> Stack:
    return await start_stack()
