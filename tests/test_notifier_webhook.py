"""The webhook provider against a real local HTTP server standing in for an SMS vendor (some
requests fail, some are slower than the timeout), and the provider configuration, in process
and through `python -m notifier`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest

from cardcheck.runtime.clock import SystemClock
from cardcheck.runtime.settings import SettingsError
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from notifier.app import build_parts
from notifier.config import Cap, NotifierConfig
from notifier.providers import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from tests.harness.vendors import LoopbackVendor
from tests.harness.waiting import eventually
from tests.test_notifier import _code_request, _settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "vendor-shared-secret-0123456789"
TIMEOUT_S = 0.5


@dataclass(frozen=True)
class VendorRequest:
    key: str | None
    payload: dict
    raw: bytes
    signature_ok: bool
    answer: int


class Vendor(LoopbackVendor):
    """An SMS vendor on 127.0.0.1: checks each request's signature and timestamp, answers each
    phone's requests by its plan ("500", "503", "429", "400", "slow": accept after the client's
    timeout), then "ok", and accepts each idempotency key once (a repeat is a duplicate)."""

    def __init__(self, secret: str, plans: dict[str, list[str]], slow_s: float) -> None:
        self.secret = secret.encode()
        self.plans = plans
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.requests: list[VendorRequest] = []
        self.accepted: dict[str, dict] = {}
        self.duplicates: Counter[str] = Counter()
        self.url = self.serve_on_loopback() + "/sms/send"

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        raw = request.rfile.read(int(request.headers.get("Content-Length", "0")))
        stamp = request.headers.get(TIMESTAMP_HEADER, "")
        expected = "v1=" + hmac.new(self.secret, stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
        signed = hmac.compare_digest(request.headers.get(SIGNATURE_HEADER, ""), expected)
        fresh = stamp.isdigit() and abs(time.time() - int(stamp)) < 300
        payload = json.loads(raw)
        key = request.headers.get(IDEMPOTENCY_HEADER)
        with self.lock:
            seen = sum(1 for r in self.requests if r.key == key)
            plan = self.plans.get(payload["phone"], [])
            action = plan[seen] if seen < len(plan) else "ok"
            if not (signed and fresh):
                action = "401"
            answer = 200 if action in ("ok", "slow") else int(action)
            self.requests.append(VendorRequest(key, payload, raw, signed and fresh, answer))
        if action == "slow":
            time.sleep(self.slow_s)  # the notifier has given up on this request by now
        if answer == 200:
            with self.lock:
                if key in self.accepted:
                    self.duplicates[key] += 1
                else:
                    self.accepted[key] = payload
        try:
            request.send_response(answer)
            request.send_header("Content-Type", "application/json")
            request.end_headers()
            request.wfile.write(b'{"ok": %s}' % (b"true" if answer == 200 else b"false"))
        except OSError:
            pass  # the client left (timeout)

    def of(self, key: str) -> list[VendorRequest]:
        with self.lock:
            return [r for r in self.requests if r.key == key]




def _webhook_config(url: str, secret: str = SECRET) -> NotifierConfig:
    return NotifierConfig(
        provider="webhook",
        webhook_url=url,
        webhook_secret=secret,
        webhook_timeout_s=TIMEOUT_S,
        retry_base_s=0.05,
        retry_max_s=0.2,
        poll_interval_s=0.05,
    )


@pytest.fixture
async def webhook_notifier(tmp_path, database_url):
    started = []

    async def start(config: NotifierConfig):
        parts = await build_parts(
            _settings(tmp_path, database_url, sandbox=False), config=config, clock=SystemClock()
        )
        port = await parts.host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((parts, channel))
        return parts, notifier_pb2_grpc.NotifierStub(channel)

    yield start
    for parts, channel in started:
        await channel.close()
        await parts.host.stop(0)


PLANS = {
    "13800000001": ["500", "500"],  # two failures, then accepted
    "13800000002": ["slow"],  # accepted too late for the timeout: the retry is a duplicate
    "13800000003": [],  # accepted at once
    "13800000004": ["503", "slow"],
    "13800000005": ["429"],
    "13800000006": ["400"],  # refused for good: never retried
}


async def test_webhook_delivers_each_message_through_failures_and_slowness(webhook_notifier):
    with Vendor(SECRET, PLANS, slow_s=TIMEOUT_S * 2.5) as vendor:
        parts, stub = await webhook_notifier(_webhook_config(vendor.url))
        sent = dict(
            zip(
                PLANS,
                await asyncio.gather(
                    *(
                        stub.Send(_code_request(f"w-{phone}", f"{n}13579", phone=phone))
                        for n, phone in enumerate(PLANS)
                    )
                ),
                strict=True,
            )
        )

        async def settled():
            deliveries = {
                phone: await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id=s.message_id))
                for phone, s in sent.items()
            }
            if any(d.status == notifier_pb2.DELIVERY_STATUS_QUEUED for d in deliveries.values()):
                return None
            return deliveries

        deliveries = await eventually(settled)

        async def late_answers_landed():  # the slow requests finish at the vendor after the retries
            with vendor.lock:
                return sum(vendor.duplicates.values()) >= 2

        await eventually(late_answers_landed)
        assert await parts.worker.run_once() == 0

    expected = {  # phone: (status, requests the vendor saw, last error)
        "13800000001": (notifier_pb2.DELIVERY_STATUS_DELIVERED, 3, "HTTP_500"),
        "13800000002": (notifier_pb2.DELIVERY_STATUS_DELIVERED, 2, "TIMEOUT"),
        "13800000003": (notifier_pb2.DELIVERY_STATUS_DELIVERED, 1, ""),
        "13800000004": (notifier_pb2.DELIVERY_STATUS_DELIVERED, 3, "TIMEOUT"),
        "13800000005": (notifier_pb2.DELIVERY_STATUS_DELIVERED, 2, "HTTP_429"),
        "13800000006": (notifier_pb2.DELIVERY_STATUS_FAILED, 1, "HTTP_400"),
    }
    for phone, (status, requests, last_error) in expected.items():
        message_id = sent[phone].message_id
        seen = vendor.of(message_id)
        assert (deliveries[phone].status, len(seen), deliveries[phone].last_error) == (
            status,
            requests,
            last_error,
        ), phone
        assert deliveries[phone].attempts == requests
        # Every retry is the same request: same key, same signed body, so the vendor can dedupe.
        assert len({r.raw for r in seen}) == 1
        assert seen[0].payload["message_id"] == message_id and seen[0].payload["phone"] == phone
        assert seen[0].payload["kind"] == "SMS_CODE" and "请勿将验证码告知任何人" in seen[0].payload["text"]
    assert all(r.signature_ok for r in vendor.requests)
    # Each message was accepted by the vendor once, under its own key; the two requests that
    # came back too late were accepted then, and their retries were duplicates.
    delivered = {s.message_id for p, s in sent.items() if p != "13800000006"}
    assert set(vendor.accepted) == delivered
    assert vendor.duplicates == Counter(
        {sent["13800000002"].message_id: 1, sent["13800000004"].message_id: 1}
    )


async def test_a_wrong_secret_is_refused_by_the_vendor_and_retried(webhook_notifier):
    with Vendor(SECRET, {}, slow_s=0) as vendor:
        _, stub = await webhook_notifier(_webhook_config(vendor.url, secret="not-the-vendors-secret"))
        sent = await stub.Send(_code_request("wrong-secret"))
        assert sent.status == notifier_pb2.DELIVERY_STATUS_QUEUED

        async def retried():
            return len(vendor.of(sent.message_id)) >= 2

        await eventually(retried)
        delivery = await stub.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id=sent.message_id))
    assert delivery.last_error == "HTTP_401" and delivery.attempts >= 2
    assert not any(r.signature_ok for r in vendor.requests) and not vendor.accepted


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"CARDCHECK_SMS_PROVIDER": "pigeon"}, "CARDCHECK_SMS_PROVIDER='pigeon' is not one of"),
        ({"CARDCHECK_SMS_PROVIDER": "webhook"}, "needs CARDCHECK_SMS_WEBHOOK_URL"),
        (
            {"CARDCHECK_SMS_PROVIDER": "webhook", "CARDCHECK_SMS_WEBHOOK_URL": "ftp://sms.example.com/"},
            "is not an http(s) URL",
        ),
        (
            {"CARDCHECK_SMS_PROVIDER": "webhook", "CARDCHECK_SMS_WEBHOOK_URL": "http://sms.example.com/send"},
            "must be https",
        ),
        (
            {
                "CARDCHECK_SMS_PROVIDER": "webhook",
                "CARDCHECK_SMS_WEBHOOK_URL": "https://sms.example.com/send",
            },
            "needs CARDCHECK_SMS_WEBHOOK_SECRET",
        ),
        (
            {
                "CARDCHECK_SMS_PROVIDER": "webhook",
                "CARDCHECK_SMS_WEBHOOK_URL": "https://sms.example.com/send",
                "CARDCHECK_SMS_WEBHOOK_SECRET": "short",
            },
            "at least 16 characters",
        ),
        ({"CARDCHECK_SMS_WEBHOOK_TIMEOUT_S": "0"}, "CARDCHECK_SMS_WEBHOOK_TIMEOUT_S='0' must be above 0"),
        ({"CARDCHECK_SMS_WEBHOOK_TIMEOUT_S": "soon"}, "is not a number"),
        ({"CARDCHECK_SMS_CAP_SMS_CODE": "ten/h"}, "CARDCHECK_SMS_CAP_SMS_CODE='ten/h' is not like 10/h,20/d"),
        ({"CARDCHECK_SMS_RETRY_BASE_S": "10", "CARDCHECK_SMS_RETRY_MAX_S": "5"}, "must not be below"),
    ],
)
def test_bad_configuration_is_refused_by_name(env, complaint):
    with pytest.raises(SettingsError) as caught:
        NotifierConfig.from_env(env)
    assert complaint in str(caught.value)


def test_configuration_from_the_environment():
    config = NotifierConfig.from_env(
        {
            "CARDCHECK_SMS_PROVIDER": "Webhook",
            "CARDCHECK_SMS_WEBHOOK_URL": "https://sms.example.com/send",
            "CARDCHECK_SMS_WEBHOOK_SECRET": SECRET,
            "CARDCHECK_SMS_WEBHOOK_TIMEOUT_S": "2.5",
            "CARDCHECK_SMS_CAP_SMS_CODE": "5/h,12/d",
            "CARDCHECK_SMS_CAP_REPORT_READY": "off",
        }
    )
    assert (config.provider, config.webhook_timeout_s) == ("webhook", 2.5)
    assert config.caps["SMS_CODE"] == Cap(5, 12) and config.caps["REPORT_READY"] == Cap(None, None)
    assert SECRET not in repr(config)
    assert config.provider_name(sandbox=False) == "webhook"
    assert NotifierConfig.from_env({}).provider_name(sandbox=True) == "sandbox"
    with pytest.raises(SettingsError, match="CARDCHECK_SANDBOX is off"):
        NotifierConfig.from_env({}).provider_name(sandbox=False)
    with pytest.raises(SettingsError, match="needs CARDCHECK_SANDBOX on"):
        NotifierConfig.from_env({"CARDCHECK_SMS_PROVIDER": "sandbox"}).provider_name(sandbox=False)


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"CARDCHECK_SMS_PROVIDER": "webhook"}, "needs CARDCHECK_SMS_WEBHOOK_URL"),
        (
            {"CARDCHECK_SMS_PROVIDER": "tencent", "CARDCHECK_TENCENT_SMS_SDK_APP_ID": "1400000001"},
            "CARDCHECK_SMS_PROVIDER=tencent needs CARDCHECK_TENCENT_SECRET_ID, CARDCHECK_TENCENT_SECRET_KEY, "
            "CARDCHECK_TENCENT_SMS_SIGN_NAME",
        ),
    ],
)
def test_the_process_refuses_to_start_on_bad_configuration(tmp_path, env, complaint):
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARDCHECK_")},
        "CARDCHECK_DATA_DIR": str(tmp_path),
        "CARDCHECK_NOTIFIER_ADDR": "127.0.0.1:0",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-m", "notifier"], env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.startswith("notifier: ") and len(result.stderr.strip().splitlines()) == 1
    assert complaint in result.stderr and "Traceback" not in result.stderr
