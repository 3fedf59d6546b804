"""The refusals of the public API, as a caller sees them: the reasons (`Reason`, a StrEnum whose
values are ErrorInfo's `reason` on the wire) and their status codes (docs/api.md's table), the
typed exception, and the way back from a status to it (`from_rpc_error`).

It needs grpc and the status protos only, so the client distribution (clients/python) ships it;
the servers build their statuses from it in `cardcheck.runtime.errors`.

Every refusal is bounded, whatever the request it answers: at most MAX_VIOLATIONS field
violations (ErrorInfo metadata `violations_omitted` then says how many more there were), and
each field, description, metadata value and the message cut to a fixed length. A request with
thousands of bad values gets a refusal of a few KB, and its trailers fit any client's limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "cardcheck.v1"

MAX_VIOLATIONS = 10  # a form has fewer fields; more only repeat the same mistake
MAX_FIELD_CHARS = 64  # e.g. `bank_codes[95]`, `subject.id_number`
MAX_DESCRIPTION_CHARS = 200
MAX_MESSAGE_CHARS = 300
MAX_METADATA_VALUE_CHARS = 256
OMITTED_KEY = "violations_omitted"  # ErrorInfo metadata: violations beyond MAX_VIOLATIONS


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Reason(StrEnum):
    """Why a call was refused: ErrorInfo's `reason`, the same string on the wire, in JSON and in
    storage (`error.reason == Reason.COOLDOWN_ACTIVE`, or == "COOLDOWN_ACTIVE")."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    NOT_FOUND = "NOT_FOUND"
    UNKNOWN_BANK = "UNKNOWN_BANK"
    CONSENT_REQUIRED = "CONSENT_REQUIRED"
    VERIFICATION_FAILED = "VERIFICATION_FAILED"
    REAL_NAME_CHECK_FAILED = "REAL_NAME_CHECK_FAILED"
    ALREADY_REGISTERED = "ALREADY_REGISTERED"
    REGION_NOT_SUPPORTED = "REGION_NOT_SUPPORTED"
    QUERY_IN_PROGRESS = "QUERY_IN_PROGRESS"
    COOLDOWN_ACTIVE = "COOLDOWN_ACTIVE"
    REPORT_NOT_READY = "REPORT_NOT_READY"
    REPORT_EXPIRED = "REPORT_EXPIRED"
    PAYMENT_PASSWORD_INVALID = "PAYMENT_PASSWORD_INVALID"
    PAYMENT_PASSWORD_LOCKED = "PAYMENT_PASSWORD_LOCKED"
    SERVICE_BUSY = "SERVICE_BUSY"
    RATE_LIMITED = "RATE_LIMITED"
    STREAM_EXPIRED = "STREAM_EXPIRED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    CALLER_NOT_ALLOWED = "CALLER_NOT_ALLOWED"


@dataclass(frozen=True)
class ReasonSpec:
    """What a reason means to the caller: its status code and the zh-CN message shown."""

    code: grpc.StatusCode
    message_zh: str


REASONS: dict[Reason, ReasonSpec] = {
    Reason.INVALID_ARGUMENT: ReasonSpec(grpc.StatusCode.INVALID_ARGUMENT, "请求参数有误，请检查后重试"),
    Reason.UNAUTHENTICATED: ReasonSpec(grpc.StatusCode.UNAUTHENTICATED, "请先登录"),
    Reason.NOT_FOUND: ReasonSpec(grpc.StatusCode.NOT_FOUND, "未找到相关记录"),
    Reason.UNKNOWN_BANK: ReasonSpec(grpc.StatusCode.INVALID_ARGUMENT, "不支持所选银行"),
    Reason.CONSENT_REQUIRED: ReasonSpec(grpc.StatusCode.FAILED_PRECONDITION, "请阅读并同意最新版授权协议"),
    Reason.VERIFICATION_FAILED: ReasonSpec(grpc.StatusCode.PERMISSION_DENIED, "身份验证未通过"),
    Reason.REAL_NAME_CHECK_FAILED: ReasonSpec(
        grpc.StatusCode.FAILED_PRECONDITION, "银行卡实名信息核验未通过，请核对姓名、证件号、手机号与卡号"
    ),
    Reason.ALREADY_REGISTERED: ReasonSpec(grpc.StatusCode.ALREADY_EXISTS, "该证件号或手机号已注册"),
    Reason.REGION_NOT_SUPPORTED: ReasonSpec(grpc.StatusCode.FAILED_PRECONDITION, "您所在地区暂未开通一键查卡服务"),
    Reason.QUERY_IN_PROGRESS: ReasonSpec(grpc.StatusCode.ALREADY_EXISTS, "您有正在进行中的查询，请等待结果"),
    Reason.COOLDOWN_ACTIVE: ReasonSpec(grpc.StatusCode.FAILED_PRECONDITION, "距上次查询报告生成未满7天，请稍后再查"),
    Reason.REPORT_NOT_READY: ReasonSpec(grpc.StatusCode.FAILED_PRECONDITION, "查询报告尚未生成，请耐心等待"),
    Reason.REPORT_EXPIRED: ReasonSpec(grpc.StatusCode.FAILED_PRECONDITION, "查询报告已超过7天保存期限，已删除"),
    Reason.PAYMENT_PASSWORD_INVALID: ReasonSpec(grpc.StatusCode.PERMISSION_DENIED, "支付密码错误"),
    Reason.PAYMENT_PASSWORD_LOCKED: ReasonSpec(grpc.StatusCode.PERMISSION_DENIED, "支付密码错误次数过多，已锁定"),
    Reason.SERVICE_BUSY: ReasonSpec(grpc.StatusCode.RESOURCE_EXHAUSTED, "申请人数过多，服务繁忙，请稍后再试"),
    Reason.RATE_LIMITED: ReasonSpec(grpc.StatusCode.RESOURCE_EXHAUSTED, "操作过于频繁，请稍后再试"),
    # WatchQuery: the stream reached its maximum lifetime; open it again (RetryInfo says when).
    Reason.STREAM_EXPIRED: ReasonSpec(grpc.StatusCode.UNAVAILABLE, "查询进度推送已达最长时长，请重新打开"),
    # Not in the public table: a dependency of the service is down.
    Reason.SERVICE_UNAVAILABLE: ReasonSpec(grpc.StatusCode.UNAVAILABLE, "服务暂时不可用，请稍后再试"),
    # Not in the public table: an internal service's caller whose certificate names no identity
    # allowed to make that call (cardcheck/runtime/access.py). ErrorInfo metadata `caller`, `method`.
    Reason.CALLER_NOT_ALLOWED: ReasonSpec(grpc.StatusCode.PERMISSION_DENIED, "无权调用该服务"),
}


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class CardCheckError(Exception):
    """A refusal the caller should understand: one of REASONS, with optional details. The reason
    may be given as its string too; it is kept as the Reason."""

    reason: Reason
    message: str | None = None  # English, for engineers; the zh-CN message comes from REASONS
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: Sequence[FieldViolation] = ()
    retry_after: timedelta | None = None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason}")
        self.reason = Reason(self.reason)
        # The bounds of every refusal (module docstring), applied once, here.
        omitted = len(self.violations) - MAX_VIOLATIONS
        self.violations = [
            FieldViolation(_cut(v.field, MAX_FIELD_CHARS), _cut(v.description, MAX_DESCRIPTION_CHARS))
            for v in self.violations[:MAX_VIOLATIONS]
        ]
        self.metadata = {key: _cut(value, MAX_METADATA_VALUE_CHARS) for key, value in self.metadata.items()}
        if omitted > 0:
            self.metadata[OMITTED_KEY] = str(omitted)
        if self.message is not None:
            self.message = _cut(self.message, MAX_MESSAGE_CHARS)
        super().__init__(self.reason, self.message)

    @property
    def code(self) -> grpc.StatusCode:
        return REASONS[self.reason].code

    @property
    def message_zh(self) -> str:
        return REASONS[self.reason].message_zh

    def __str__(self) -> str:
        return f"{self.reason}: {self.message or self.message_zh}"


def from_rpc_error(error: grpc.RpcError) -> CardCheckError | None:
    """The typed refusal behind an RpcError, or None when it carries no ErrorInfo of ours."""
    # An AioRpcError has the methods from_call reads (trailing_metadata, code, details) without
    # being a grpc.Call; a sync call's RpcError is one.
    status = rpc_status.from_call(cast(grpc.Call, error))
    if status is None:
        return None
    info = None
    localized = None
    violations: list[FieldViolation] = []
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
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta()
    if info is None or info.domain != DOMAIN or info.reason not in REASONS:
        return None
    del localized  # the zh-CN text is derived from the reason again
    return CardCheckError(
        Reason(info.reason), status.message, dict(info.metadata), violations, retry_after
    )


__all__ = [
    "DOMAIN",
    "MAX_VIOLATIONS",
    "REASONS",
    "CardCheckError",
    "FieldViolation",
    "Reason",
    "ReasonSpec",
    "from_rpc_error",
]
