"""The Tencent Cloud SMS provider through the official SDK against a local fake of the SendSms API
(tests/harness/tencent_sms.py): what each answer does to a message, that a retry is the same
message, that the secrets stay secret, and the provider's configuration."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from cardcheck.runtime.clock import SystemClock
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from notifier.app import build_parts
from notifier.config import NotifierConfig
from notifier.messages import MessageRow, message_sealing
from notifier.providers import make_provider
from notifier.tencent import retryable
from tests.harness.tencent_sms import FakeTencentSms
from tests.harness.waiting import eventually
from tests.test_notifier import _settings

SECRET_ID = "AKIDfake0123456789abcdefABCDEF"
SECRET_KEY = "fake-secret-key-9f8e7d6c5b4a"
APP_ID = "1400000001"
SIGN = "云闪付"
TEMPLATES = {"SMS_CODE": "100001", "REPORT_READY": "100002", "CONSENT_RECEIPT": "100003"}
TIMEOUT_S = 1.0  # room for a loaded machine: only the "slow" answer is meant to time out

DELIVERED = notifier_pb2.DELIVERY_STATUS_DELIVERED
FAILED = notifier_pb2.DELIVERY_STATUS_FAILED
QUEUED = notifier_pb2.DELIVERY_STATUS_QUEUED


def _env(**changes: str) -> dict[str, str]:
    env = {
        "CARDCHECK_SMS_PROVIDER": "tencent",
        "CARDCHECK_TENCENT_SECRET_ID": SECRET_ID,
        "CARDCHECK_TENCENT_SECRET_KEY": SECRET_KEY,
        "CARDCHECK_TENCENT_SMS_SDK_APP_ID": APP_ID,
        "CARDCHECK_TENCENT_SMS_SIGN_NAME": SIGN,
        **{f"CARDCHECK_TENCENT_SMS_TEMPLATE_{kind}": tid for kind, tid in TEMPLATES.items()},
    }
    env.update(changes)
    return {k: v for k, v in env.items() if v}


def _config(endpoint: str) -> NotifierConfig:
    return NotifierConfig.from_env(_env(CARDCHECK_TENCENT_SMS_ENDPOINT=endpoint)).replace(
        tencent_sms_timeout_s=TIMEOUT_S, retry_base_s=0.05, retry_max_s=0.2, poll_interval_s=0.05
    )


def _fake(plans: dict[str, list[str]]) -> FakeTencentSms:
    return FakeTencentSms(
        SECRET_ID,
        SECRET_KEY,
        sdk_app_id=APP_ID,
        sign_name=SIGN,
        templates={"100001": 3, "100002": 1, "100003": 1},
        plans=plans,
        slow_s=TIMEOUT_S * 2,
    )


PLANS = {  # phone: the fake's answers to its requests, in turn, then Ok
    "13800000001": [],
    "13800000002": ["LimitExceeded.PhoneNumberThirtySecondLimit", "InternalError.Timeout"],
    "13800000003": ["InvalidParameterValue.IncorrectPhoneNumber"],  # never retried
    "13800000004": ["slow"],  # accepted after the client gave up: the retry sends it again
    "13800000005": ["error:FailedOperation.TemplateIncorrectOrUnapproved"],  # the whole request
    "13800000006": ["http:502"],
}


def _code(key: str, phone: str, code: str) -> notifier_pb2.SendRequest:
    return notifier_pb2.SendRequest(
        idempotency_key=key, phone=phone, kind=notifier_pb2.MESSAGE_KIND_SMS_CODE,
        params={"code": code, "purpose": "REGISTER"},
    )


async def test_tencent_delivers_retries_and_refuses_as_its_codes_say(tmp_path, database_url, caplog):
    caplog.set_level(logging.DEBUG)
    codes = {phone: f"{n + 1}24680" for n, phone in enumerate(PLANS)}
    with _fake(PLANS) as fake:
        parts = await build_parts(
            _settings(tmp_path, database_url, sandbox=False), config=_config(fake.endpoint), clock=SystemClock()
        )
        port = await parts.host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = notifier_pb2_grpc.NotifierStub(channel)
        try:
            sent = dict(
                zip(
                    PLANS,
                    await asyncio.gather(*(stub.Send(_code(f"t-{p}", p, codes[p])) for p in PLANS)),
                    strict=True,
                )
            )
            consent = await stub.Send(
                notifier_pb2.SendRequest(
                    idempotency_key="t-consent", phone="13800000007",
                    kind=notifier_pb2.MESSAGE_KIND_CONSENT_RECEIPT, params={"agreement_version": "2026-11"},
                )
            )

            async def settled():
                deliveries = {
                    phone: await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id=s.message_id))
                    for phone, s in sent.items()
                }
                if any(d.status == QUEUED for d in deliveries.values()):
                    return None
                return deliveries

            deliveries = await eventually(settled)

            async def late_acceptance_landed():
                return fake.accepted[sent["13800000004"].message_id] == 2

            await eventually(late_acceptance_landed)
            # Settled: nothing is due, and no message accepted once is sent again.
            seen = len(fake.requests)
            assert await parts.worker.run_once() == 0
            assert len(fake.requests) == seen
            consented = await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id=consent.message_id))
        finally:
            await channel.close()
            await parts.host.stop(0)

    expected = {  # phone: (status, requests the fake saw, last error)
        "13800000001": (DELIVERED, 1, ""),
        "13800000002": (DELIVERED, 3, "InternalError.Timeout"),
        "13800000003": (FAILED, 1, "InvalidParameterValue.IncorrectPhoneNumber"[:40]),  # last_error holds 40
        "13800000004": (DELIVERED, 2, "TIMEOUT"),
        "13800000005": (FAILED, 1, "FailedOperation.TemplateIncorrectOrUnapproved"[:40]),
        "13800000006": (DELIVERED, 2, "ServerNetworkError"),
    }
    for phone, (status, requests, last_error) in expected.items():
        message_id = sent[phone].message_id
        seen_by_fake = fake.of(message_id)  # SessionContext is the message_id, on every attempt
        assert (deliveries[phone].status, len(seen_by_fake), deliveries[phone].last_error) == (
            status, requests, last_error,
        ), phone
        assert deliveries[phone].attempts == requests
        # Every attempt is the same request: the same phone, template and parameters.
        assert all(r.payload == seen_by_fake[0].payload for r in seen_by_fake)
        assert seen_by_fake[0].payload == {
            "PhoneNumberSet": [f"+86{phone}"],
            "SmsSdkAppId": APP_ID,
            "SignName": SIGN,
            "TemplateId": TEMPLATES["SMS_CODE"],
            "TemplateParamSet": [codes[phone], "注册", "5"],
            "SessionContext": message_id,
        }
    # The request that timed out was sent after all: the second text carries the same
    # SessionContext, so the two are one message in Tencent's receipts.
    assert fake.accepted[sent["13800000004"].message_id] == 2
    assert consented.status == DELIVERED
    [consent_request] = fake.of(consent.message_id)
    assert (consent_request.payload["TemplateId"], consent_request.payload["TemplateParamSet"]) == (
        TEMPLATES["CONSENT_RECEIPT"], ["2026-11"],
    )
    assert all(
        r.signature_ok and (r.action, r.version, r.region) == ("SendSms", "2021-01-11", "ap-guangzhou")
        for r in fake.requests
    )
    assert all(r.authorization.startswith(f"TC3-HMAC-SHA256 Credential={SECRET_ID}/") for r in fake.requests)
    # Nothing logged holds a secret, a phone or a code, whatever the level.
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert sent["13800000002"].message_id in logged and "138****0002" in logged
    for secret in (SECRET_ID, SECRET_KEY, "13800000002", "+8613800000004", *codes.values()):
        assert secret not in logged


async def test_the_provider_and_its_configuration_show_no_secret():
    config = NotifierConfig.from_env(_env())
    provider = make_provider(config, _settings_outside_sandbox(), SystemClock())
    try:
        for shown in (repr(config), str(config), repr(provider), str(provider)):
            assert SECRET_ID not in shown and SECRET_KEY not in shown
        assert provider.name == "tencent" and "sms.tencentcloudapi.com" in repr(provider)
    finally:
        await provider.close()


def _settings_outside_sandbox() -> Settings:
    return Settings.from_env({"CARDCHECK_SANDBOX": "false"})


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        (
            _env(CARDCHECK_TENCENT_SECRET_ID="", CARDCHECK_TENCENT_SECRET_KEY=""),
            "CARDCHECK_SMS_PROVIDER=tencent needs CARDCHECK_TENCENT_SECRET_ID, CARDCHECK_TENCENT_SECRET_KEY",
        ),
        (
            _env(CARDCHECK_TENCENT_SMS_TEMPLATE_REPORT_READY=""),
            "CARDCHECK_SMS_PROVIDER=tencent needs CARDCHECK_TENCENT_SMS_TEMPLATE_REPORT_READY",
        ),
        (_env(CARDCHECK_TENCENT_SMS_TEMPLATE_SMS_CODE="SMS_12"), "CARDCHECK_TENCENT_SMS_TEMPLATE_SMS_CODE='SMS_12' must be digits"),
        (_env(CARDCHECK_TENCENT_SMS_SDK_APP_ID="app"), "CARDCHECK_TENCENT_SMS_SDK_APP_ID must be digits"),
        (_env(CARDCHECK_TENCENT_SMS_ENDPOINT="http://sms.example.com"), "CARDCHECK_TENCENT_SMS_ENDPOINT must be https"),
        (_env(CARDCHECK_TENCENT_SMS_TIMEOUT_S="0"), "CARDCHECK_TENCENT_SMS_TIMEOUT_S='0' must be above 0"),
    ],
)
def test_bad_tencent_configuration_is_refused_by_name(env, complaint):
    with pytest.raises(SettingsError) as caught:
        NotifierConfig.from_env(env)
    message = str(caught.value)
    assert complaint in message and "\n" not in message
    assert SECRET_KEY not in message and SECRET_ID not in message


def test_what_production_still_needs_is_listed():
    assert NotifierConfig.from_env({}).missing_for_production() == [
        "CARDCHECK_SMS_PROVIDER is unset: set it to tencent (or webhook) to reach phones"
    ]
    assert NotifierConfig.from_env(_env()).missing_for_production() == []
    config = NotifierConfig.from_env(_env()).model_copy(update={"tencent_secret_key": None, "tencent_sms_templates": {}})
    assert config.missing_for_production() == [
        "CARDCHECK_TENCENT_SECRET_KEY is unset",
        *(f"CARDCHECK_TENCENT_SMS_TEMPLATE_{kind} is unset" for kind in TEMPLATES),
    ]


@pytest.mark.parametrize(
    ("code", "retry"),
    [
        ("LimitExceeded.PhoneNumberDailyLimit", True),
        ("LimitExceeded.PhoneNumberThirtySecondLimit", True),
        ("LimitExceeded.PhoneNumberCountLimit", False),
        ("InternalError.Timeout", True),
        ("RequestTimeout", True),
        ("AuthFailure.SignatureExpire", True),
        ("FailedOperation.InsufficientBalanceInSmsPackage", True),
        ("FailedOperation.TemplateIncorrectOrUnapproved", False),
        ("FailedOperation.SignatureIncorrectOrUnapproved", False),
        ("FailedOperation.PhoneNumberInBlacklist", False),
        ("InvalidParameterValue.IncorrectPhoneNumber", False),
        ("UnauthorizedOperation.SmsSdkAppIdVerifyFail", False),
        ("UnauthorizedOperation.ServiceSuspendDueToArrears", True),
        ("MissingParameter.EmptyPhoneNumberSet", False),
        ("SomethingNew.NotInTheTable", True),  # unknown: retried, within the retry window
    ],
)
def test_each_tencent_code_is_retried_or_not(code, retry):
    assert retryable(code) is retry


def test_a_message_sealed_before_vendor_values_were_kept_still_opens():
    keyring = Keyring(bytes(range(32)))
    sealing = message_sealing(keyring)
    row = MessageRow(
        message_id="m-old", idempotency_key="k", phone_hash="h", kind="SMS_CODE", template="sms_code.v1",
        status="QUEUED", created_at=SystemClock().now(), phone_sealed=sealing.seal_phone("m-old", "13800000001"),
    )
    # As Send sealed a text before: the text alone.
    row.body_sealed = keyring.sealer("notifier-body").seal("【云闪付】旧的短信".encode(), b"m-old")
    old = sealing.outgoing(row)
    assert old is not None and (old.body, old.params) == ("【云闪付】旧的短信", ())
    row.body_sealed = sealing.seal_body("m-old", "【云闪付】新的短信", ("123456", "注册", "5"))
    new = sealing.outgoing(row)
    assert new is not None and (new.body, new.params) == ("【云闪付】新的短信", ("123456", "注册", "5"))
    assert "123456" not in repr(new) and "13800000001" not in repr(new)
