"""A fake of Tencent Cloud FaceID's API on 127.0.0.1, over real HTTP, speaking what the vendor's
SDK sends: a POST of JSON to `/`, the action in X-TC-Action, a TC3-HMAC-SHA256 Authorization
(checked against the fake's SecretKey: a wrong key is answered AuthFailure.SignatureFailure),
and answers `{"Response": {..., "RequestId"}}`.

DetectAuth issues a BizToken bound to the Name and IdCard sent; the test then says how the
user's liveness check went (`complete`), and GetDetectInfoEnhanced reports it. `fail_next`
makes the next call answer a vendor error, `delay_s` holds every answer that long."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.harness.vendors import LoopbackVendor

SECRET_ID = "AKIDfakefaceid0000000000000000000000"
SECRET_KEY = "fake-faceid-secret-key-0123456789ab"
RULE_ID = "1"


@dataclass
class Check:
    """One BizToken: whom DetectAuth bound it to, and how its liveness check went (None: not yet)."""

    name: str
    id_card: str
    err_code: int | None = None
    checked_at: datetime | None = None
    result_name: str | None = None
    result_id_card: str | None = None


@dataclass
class Call:
    action: str
    body: dict[str, Any]
    signed: bool


@dataclass
class FakeFaceId(LoopbackVendor):
    secret_id: str = SECRET_ID
    secret_key: str = SECRET_KEY
    delay_s: float = 0.0
    checks: dict[str, Check] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.released = threading.Event()  # cuts every delay short when the fake stops
        self.endpoint = self.serve_on_loopback()

    # --- what a test says -------------------------------------------------------------------

    def complete(
        self,
        biz_token: str,
        at: datetime,
        *,
        err_code: int = 0,
        name: str | None = None,
        id_card: str | None = None,
    ) -> None:
        """The user's liveness check of this token ran at `at`, with this outcome (0: passed),
        for the bound person unless `name`/`id_card` say someone else."""
        with self.lock:
            check = self.checks[biz_token]
            check.err_code, check.checked_at = err_code, at
            check.result_name, check.result_id_card = name or check.name, id_card or check.id_card

    def fail_next(self, code: str, message: str = "the fake says no") -> None:
        with self.lock:
            self.errors.append((code, message))

    def actions(self) -> list[str]:
        with self.lock:
            return [call.action for call in self.calls]

    # --- the wire ---------------------------------------------------------------------------

    def _signed(self, request: BaseHTTPRequestHandler, raw: bytes) -> bool:
        auth = request.headers.get("Authorization", "")
        try:
            algorithm, _, rest = auth.partition(" ")
            parts = dict(p.strip().split("=", 1) for p in rest.split(","))
            secret_id, date, service, _ = parts["Credential"].split("/")
            timestamp = request.headers["X-TC-Timestamp"]
        except (KeyError, ValueError):
            return False
        canonical = "\n".join([
            "POST", "/", "", f"content-type:{request.headers.get('Content-Type', '')}\nhost:{request.headers.get('Host', '')}\n",
            parts.get("SignedHeaders", ""), hashlib.sha256(raw).hexdigest(),
        ])
        to_sign = "\n".join([
            algorithm, timestamp, f"{date}/{service}/tc3_request", hashlib.sha256(canonical.encode()).hexdigest()
        ])

        def mac(key: bytes, text: str) -> bytes:
            return hmac.new(key, text.encode(), hashlib.sha256).digest()

        key = mac(mac(mac(("TC3" + self.secret_key).encode(), date), service), "tc3_request")
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        return (
            algorithm == "TC3-HMAC-SHA256"
            and secret_id == self.secret_id
            and hmac.compare_digest(parts.get("Signature", ""), expected)
        )

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        raw = request.rfile.read(int(request.headers.get("Content-Length", "0")))
        action = request.headers.get("X-TC-Action", "")
        body = json.loads(raw or b"{}")
        signed = self._signed(request, raw)
        with self.lock:
            self.calls.append(Call(action, body, signed))
            error = self.errors.pop(0) if self.errors else None
        if not signed:
            error = ("AuthFailure.SignatureFailure", "The provided credentials could not be validated.")
        if self.delay_s:
            self.released.wait(self.delay_s)
        answer = {"Error": {"Code": error[0], "Message": error[1]}} if error else self._answer(action, body)
        answer["RequestId"] = str(uuid.uuid4())
        data = json.dumps({"Response": answer}).encode()
        try:
            request.send_response(200)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout)

    def _answer(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("RuleId") != RULE_ID:
            return {"Error": {"Code": "InvalidParameterValue.RuleIdNotExist", "Message": "no such RuleId"}}
        if action == "DetectAuth":
            token = str(uuid.uuid4()).upper()
            with self.lock:
                self.checks[token] = Check(body.get("Name", ""), body.get("IdCard", ""))
            return {"BizToken": token, "Url": f"https://h5.faceid.example/{token}"}
        if action == "GetDetectInfoEnhanced":
            with self.lock:
                check = self.checks.get(body.get("BizToken", ""))
                if check is None:
                    return {"Error": {"Code": "InvalidParameterValue.BizTokenIllegal", "Message": "BizToken illegal"}}
                if check.err_code is None:
                    return {"Text": {"ErrCode": None, "ErrMsg": None, "LivenessDetail": []}}
                stamp = str(int(check.checked_at.timestamp() * 1000)) if check.checked_at else None
                return {
                    "Text": {
                        "ErrCode": check.err_code,
                        "ErrMsg": "成功" if check.err_code == 0 else "比对失败",
                        "IdCard": check.result_id_card,
                        "Name": check.result_name,
                        "LiveStatus": check.err_code,
                        "Comparestatus": check.err_code,
                        "LivenessDetail": [
                            {"ReqTime": stamp, "Errcode": check.err_code, "Idcard": check.result_id_card}
                        ],
                    },
                    "IdCardData": None, "BestFrame": None, "VideoData": None,
                }
        return {"Error": {"Code": "InvalidAction", "Message": f"no action {action}"}}

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        super().__exit__(*exc)
