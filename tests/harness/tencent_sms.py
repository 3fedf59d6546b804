"""A local Tencent Cloud SMS: SendSms (API 2021-01-11) as its HTTPS API answers it, on a real
HTTP server on 127.0.0.1, for the SDK to reach through HttpProfile(endpoint=..., protocol="http").

Each request's TC3-HMAC-SHA256 signature is checked against the known SecretKey, and its
timestamp against the clock (Tencent refuses a request signed more than 5 minutes ago: a replay
is refused as AuthFailure.SignatureExpire). A phone's requests are answered by its plan, one step
each, then "Ok": "Ok", a code for that phone's SendStatus (e.g. "LimitExceeded.PhoneNumberDailyLimit"),
"error:<code>" for the whole request refused, "http:<status>", or "slow" (accepted, but only after
`slow_s`: later than the client waits). Every request is recorded, and each SessionContext's
acceptances counted: a retry of one message carries the same one."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler

from tests.harness.vendors import LoopbackVendor

SERVICE = "sms"
VERSION = "2021-01-11"
SIGNATURE_LIFETIME_S = 300


@dataclass(frozen=True)
class SendSms:
    """One request as the fake read it."""

    action: str
    version: str
    region: str
    authorization: str
    signature_ok: bool
    payload: dict
    answer: str  # the step of the plan it was answered with ("Ok", a code, "slow"...)

    @property
    def session_context(self) -> str:
        return str(self.payload.get("SessionContext", ""))

    @property
    def phones(self) -> list[str]:
        return list(self.payload.get("PhoneNumberSet", []))


def tc3_signature(secret_key: str, timestamp: str, host: str, content_type: str, body: bytes) -> str:
    """TC3-HMAC-SHA256 of a POST to / with no query, as Tencent's documentation defines it."""
    date = datetime.fromtimestamp(int(timestamp), UTC).strftime("%Y-%m-%d")
    canonical = "\n".join(
        [
            "POST",
            "/",
            "",
            f"content-type:{content_type}\nhost:{host}\n",
            "content-type;host",
            hashlib.sha256(body).hexdigest(),
        ]
    )
    to_sign = "\n".join(
        ["TC3-HMAC-SHA256", timestamp, f"{date}/{SERVICE}/tc3_request", hashlib.sha256(canonical.encode()).hexdigest()]
    )

    def mac(key: bytes, text: str) -> bytes:
        return hmac.new(key, text.encode(), hashlib.sha256).digest()

    key = mac(mac(mac(("TC3" + secret_key).encode(), date), SERVICE), "tc3_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class FakeTencentSms(LoopbackVendor):
    def __init__(
        self,
        secret_id: str,
        secret_key: str,
        *,
        sdk_app_id: str,
        sign_name: str,
        templates: Mapping[str, int],
        plans: Mapping[str, Sequence[str]] | None = None,
        slow_s: float = 1.0,
    ) -> None:
        """`templates`: template ID -> how many parameters it takes (another ID, or another
        count, is refused as Tencent does)."""
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.sdk_app_id = sdk_app_id
        self.sign_name = sign_name
        self.templates = dict(templates)
        self.plans = {phone: list(steps) for phone, steps in (plans or {}).items()}
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.requests: list[SendSms] = []
        self.accepted: Counter[str] = Counter()  # SessionContext -> times a text was sent
        self.endpoint = self.serve_on_loopback()

    # --- what a test reads ----------------------------------------------------------------

    def of(self, session_context: str) -> list[SendSms]:
        with self.lock:
            return [r for r in self.requests if r.session_context == session_context]

    # --- the API ---------------------------------------------------------------------------

    def _signed(self, request: BaseHTTPRequestHandler, raw: bytes) -> tuple[bool, str | None]:
        """(signature valid, the error code when the request is refused for it)."""
        auth = request.headers.get("Authorization", "")
        stamp = request.headers.get("X-TC-Timestamp", "")
        if not auth.startswith("TC3-HMAC-SHA256 ") or not stamp.isdigit():
            return False, "AuthFailure.SignatureFailure"
        fields = dict(part.strip().split("=", 1) for part in auth.removeprefix("TC3-HMAC-SHA256 ").split(","))
        credential = fields.get("Credential", "").split("/")
        date = datetime.fromtimestamp(int(stamp), UTC).strftime("%Y-%m-%d")
        if credential[0] != self.secret_id:
            return False, "AuthFailure.SecretIdNotFound"
        if credential[1:] != [date, SERVICE, "tc3_request"] or fields.get("SignedHeaders") != "content-type;host":
            return False, "AuthFailure.SignatureFailure"
        expected = tc3_signature(
            self.secret_key, stamp, request.headers.get("Host", ""), request.headers.get("Content-Type", ""), raw
        )
        if not hmac.compare_digest(fields.get("Signature", ""), expected):
            return False, "AuthFailure.SignatureFailure"
        if abs(time.time() - int(stamp)) > SIGNATURE_LIFETIME_S:
            return True, "AuthFailure.SignatureExpire"
        return True, None

    def _checked(self, payload: dict) -> str | None:
        """The whole request's error, as Tencent checks the application, signature and template."""
        if str(payload.get("SmsSdkAppId")) != self.sdk_app_id:
            return "InvalidParameterValue.SdkAppIdNotExist"
        if payload.get("SignName") != self.sign_name:
            return "FailedOperation.SignatureIncorrectOrUnapproved"
        template = str(payload.get("TemplateId", ""))
        if template not in self.templates:
            return "FailedOperation.TemplateIncorrectOrUnapproved"
        if len(payload.get("TemplateParamSet") or []) != self.templates[template]:
            return "FailedOperation.TemplateParamSetNotMatchApprovedTemplate"
        return None

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        raw = request.rfile.read(int(request.headers.get("Content-Length", "0")))
        action = request.headers.get("X-TC-Action", "")
        signature_ok, auth_error = self._signed(request, raw)
        payload = json.loads(raw or b"{}")
        phones = payload.get("PhoneNumberSet") or [""]
        with self.lock:
            seen = sum(1 for r in self.requests if r.session_context == payload.get("SessionContext"))
            plan = self.plans.get(str(phones[0]).removeprefix("+86"), [])  # plans name mainland numbers
            step = plan[seen] if seen < len(plan) else "Ok"
            error = auth_error or ("InvalidAction" if action != "SendSms" else None) or self._checked(payload)
            if error is not None:
                step = f"error:{error}"
            self.requests.append(
                SendSms(
                    action,
                    request.headers.get("X-TC-Version", ""),
                    request.headers.get("X-TC-Region", ""),
                    request.headers.get("Authorization", ""),
                    signature_ok,
                    payload,
                    step,
                )
            )
        if step == "slow":
            time.sleep(self.slow_s)  # the client has given up waiting by now
            step = "Ok"
        if step.startswith("http:"):
            self._answer(request, int(step.removeprefix("http:")), {"message": "unavailable"})
            return
        request_id = str(uuid.uuid4())
        if step.startswith("error:"):
            code = step.removeprefix("error:")
            body: dict = {"Error": {"Code": code, "Message": code}, "RequestId": request_id}
        else:
            if step == "Ok":
                with self.lock:
                    self.accepted[str(payload.get("SessionContext", ""))] += 1
            body = {
                "SendStatusSet": [
                    {
                        "SerialNo": uuid.uuid4().hex if step == "Ok" else "",
                        "PhoneNumber": phone,
                        "Fee": 1 if step == "Ok" else 0,
                        "SessionContext": payload.get("SessionContext", ""),
                        "Code": step,
                        "Message": "send success" if step == "Ok" else step,
                        "IsoCode": "CN",
                    }
                    for phone in phones
                ],
                "RequestId": request_id,
            }
        self._answer(request, 200, {"Response": body})

    @staticmethod
    def _answer(request: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except OSError:
            pass  # the client left (its timeout)


