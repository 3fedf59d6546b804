"""notifier over a real grpc.aio server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.settings import Settings
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from notifier.app import build
from notifier.providers import OutgoingSms, SmsProvider
from notifier.templates import TEMPLATE_DIR, load_template_book
from tests.harness.settings import settings_for

PHONE = "13812345678"


def _settings(tmp_path: Path, database_url: str | None, *, sandbox: bool = True) -> Settings:
    return settings_for(tmp_path, database_url, sandbox=sandbox, addresses={"notifier": "127.0.0.1:0"})


class RecordingProvider(SmsProvider):
    """Stands in for a real SMS vendor outside sandbox; can be made to fail."""

    name = "recording"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.failing = False

    async def deliver(self, sms: OutgoingSms) -> None:
        if self.failing:
            raise ConnectionError("gateway down")
        self.sent.append((sms.phone, sms.body))


async def _start(settings: Settings, **kwargs):
    host = await build(settings, **kwargs)
    port = await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return host, channel, notifier_pb2_grpc.NotifierStub(channel)


@pytest.fixture
async def notifier(tmp_path, database_url):
    clock = ManualClock()
    host, channel, stub = await _start(_settings(tmp_path, database_url), clock=clock)
    yield stub, clock
    await channel.close()
    await host.stop(0)


def _code_request(key: str, code: str = "246810", phone: str = PHONE, purpose: str = "REGISTER"):
    return notifier_pb2.SendRequest(
        idempotency_key=key,
        phone=phone,
        kind=notifier_pb2.MESSAGE_KIND_SMS_CODE,
        params={"code": code, "purpose": purpose},
    )


async def test_send_then_list_newest_first(notifier):
    stub, clock = notifier
    first = await stub.Send(_code_request("k1", "111111"))
    clock.advance(timedelta(seconds=30))
    second = await stub.Send(_code_request("k2", "222222", purpose="SIGN_IN"))
    await stub.Send(_code_request("k3", "333333", phone="13900000000"))
    assert first.status == notifier_pb2.DELIVERY_STATUS_DELIVERED

    inbox = await stub.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))
    assert [m.message_id for m in inbox.messages] == [second.message_id, first.message_id]
    newest = inbox.messages[0]
    assert newest.phone == PHONE and newest.kind == "SMS_CODE"
    assert newest.body == (
        "【云闪付】您的验证码为222222，用于登录，5分钟内有效。请勿将验证码告知任何人，工作人员不会向您索取。"
    )
    assert "注册" in inbox.messages[1].body and "111111" in inbox.messages[1].body


async def test_same_idempotency_key_gives_one_message(notifier):
    stub, _ = notifier
    replies = await asyncio.gather(*(stub.Send(_code_request("same-key")) for _ in range(4)))
    assert len({r.message_id for r in replies}) == 1
    inbox = await stub.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))
    assert len(inbox.messages) == 1


async def test_report_ready_and_consent_receipt(notifier):
    stub, _ = notifier
    await stub.Send(
        notifier_pb2.SendRequest(
            idempotency_key="r", phone=PHONE, kind=notifier_pb2.MESSAGE_KIND_REPORT_READY
        )
    )
    await stub.Send(
        notifier_pb2.SendRequest(
            idempotency_key="c",
            phone=PHONE,
            kind=notifier_pb2.MESSAGE_KIND_CONSENT_RECEIPT,
            params={"agreement_version": "2026-01"},
        )
    )
    consent, ready = (await stub.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))).messages
    assert ready.kind == "REPORT_READY"
    assert "一键查卡" in ready.body and "7天" in ready.body and "不出租、出借、出售银行卡" in ready.body
    assert consent.kind == "CONSENT_RECEIPT" and "2026-01" in consent.body


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (_code_request("k", phone="12345678901"), {"phone"}),
        (_code_request("", phone="1381234567"), {"idempotency_key", "phone"}),
        (notifier_pb2.SendRequest(idempotency_key="k", phone=PHONE), {"kind"}),
        (
            notifier_pb2.SendRequest(
                idempotency_key="k", phone=PHONE, kind=notifier_pb2.MESSAGE_KIND_SMS_CODE
            ),
            {"params[code]", "params[purpose]"},
        ),
        (_code_request("k", code="12ab56", purpose="DANCE"), {"params[code]", "params[purpose]"}),
        (
            notifier_pb2.SendRequest(
                idempotency_key="k", phone=PHONE, kind=notifier_pb2.MESSAGE_KIND_CONSENT_RECEIPT
            ),
            {"params[agreement_version]"},
        ),
    ],
)
async def test_invalid_send_is_refused_with_field_violations(notifier, request_, fields):
    stub, _ = notifier
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Send(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert {v.field for v in bad.field_violations} == fields
    assert from_rpc_error(caught.value).reason == "INVALID_ARGUMENT"


async def test_get_delivery(notifier):
    stub, clock = notifier
    sent = await stub.Send(_code_request("d1"))
    delivery = await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id=sent.message_id))
    assert delivery.message_id == sent.message_id
    assert delivery.kind == notifier_pb2.MESSAGE_KIND_SMS_CODE
    assert delivery.status == notifier_pb2.DELIVERY_STATUS_DELIVERED
    assert delivery.attempts == 1
    assert delivery.created_at.ToDatetime().replace(tzinfo=clock.now().tzinfo) == clock.now()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id="0" * 32))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(caught.value).reason == "NOT_FOUND"


def _stored_bytes(tmp_path: Path, database_url: str | None) -> bytes:
    """Everything the database holds for nt_messages, as raw as we can get it."""
    if database_url is None:
        files = [p for p in tmp_path.glob("notifier.db*") if p.is_file()]
        return b"".join(p.read_bytes() for p in files)
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM nt_messages")).all()
    finally:
        engine.dispose()
    assert rows
    return "\n".join(repr(tuple(row)) for row in rows).encode()


async def test_outside_sandbox_no_phone_or_code_in_clear(tmp_path, database_url):
    provider = RecordingProvider()
    settings = _settings(tmp_path, database_url, sandbox=False)
    host, channel, stub = await _start(settings, provider=provider)
    try:
        sent = await stub.Send(_code_request("s1", "864209"))
        assert sent.status == notifier_pb2.DELIVERY_STATUS_DELIVERED
        assert provider.sent and "864209" in provider.sent[0][1] and provider.sent[0][0] == PHONE
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListMessages(notifier_pb2.ListMessagesRequest(phone=PHONE))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # production mode: no inbox at all
    finally:
        await channel.close()
        await host.stop(0)
    stored = _stored_bytes(tmp_path, database_url)
    assert sent.message_id.encode() in stored  # we are looking at the right rows
    assert PHONE.encode() not in stored
    assert b"864209" not in stored
    assert "验证码".encode() not in stored


async def test_sandbox_keeps_the_body_but_not_the_phone(tmp_path, database_url):
    host, channel, stub = await _start(_settings(tmp_path, database_url))
    try:
        await stub.Send(_code_request("s1", "864209"))
    finally:
        await channel.close()
        await host.stop(0)
    stored = _stored_bytes(tmp_path, database_url)
    assert b"864209" in stored  # the inbox is what sandbox is for
    assert PHONE.encode() not in stored


@pytest.mark.parametrize(
    ("purpose", "purpose_zh"),
    [("REGISTER", "注册"), ("SIGN_IN", "登录"), ("SMS_PURPOSE_QUERY_AUTH", "一键查卡授权")],
)
def test_the_code_sms_of_every_purpose_warns_never_to_give_the_code_away(purpose, purpose_zh):
    template = load_template_book().newest["SMS_CODE"]
    body = template.render({"code": "314159", "purpose": purpose})
    assert body.startswith("【云闪付】您的验证码为314159，") and f"用于{purpose_zh}" in body
    assert "请勿将验证码告知任何人" in body and "5分钟内有效" in body


def test_report_ready_holds_no_card_data_and_reminds_of_fraud():
    body = load_template_book().newest["REPORT_READY"].render({})
    assert re.findall(r"\d+", body) == ["7"]  # "kept 7 days": no card number, no digit else
    assert "报告保存7天" in body and "谨防电信网络诈骗" in body and "不出租、出借、出售银行卡" in body


def test_the_newest_template_version_is_sent_and_older_ones_stay_readable(tmp_path):
    for source in TEMPLATE_DIR.glob("*.txt"):
        (tmp_path / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "report_ready.v2.txt").write_text("【云闪付】报告已生成（第二版）。", encoding="utf-8")
    book = load_template_book(tmp_path)
    assert book.newest["REPORT_READY"].name == "report_ready.v2"
    assert book.named["report_ready.v1"].render({}).startswith("【云闪付】您的一键查卡报告已生成")
    (tmp_path / "consent_receipt.v1.txt").unlink()
    with pytest.raises(RuntimeError, match="CONSENT_RECEIPT"):
        load_template_book(tmp_path)
