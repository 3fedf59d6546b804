"""Face verification before each query and each payment password reset. StartFaceCheck opens a
check bound to the user's name and ID number and hands its token to the app; the app runs the
liveness check; SubmitQuery (or ResetPaymentPassword) brings the token back and the provider
says whether it proves this user, now, and for the first time.

Two providers: the sandbox (the token `sandbox:pass` passes, anything else fails; only with
CARDCHECK_SANDBOX on) and Tencent Cloud FaceID (gateway/tencent_faceid.py). Without sandbox
mode and without a configured provider the gateway refuses to start."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.settings import Settings, SettingsError
from gateway.config import GatewayConfig

if TYPE_CHECKING:
    from gateway.face_tokens import SpentFaceTokens

SANDBOX_PASS = "sandbox:pass"
SANDBOX_PREFIX = "sandbox:"


@dataclass(frozen=True)
class FaceSubject:
    """Whom a check is for: the user, with the name and ID number opened from the account's seal
    for this call only (never shown: the repr names the user id alone)."""

    user_id: str
    name: str = field(repr=False)
    id_number: str = field(repr=False)


@dataclass(frozen=True)
class FaceCheck:
    """A check started: the token the app runs the liveness check with and brings back, the
    vendor's H5 page (WeChat H5 only; empty otherwise), and until when the check can be done."""

    biz_token: str = field(repr=False)
    url: str
    expires_at: datetime


class FaceRefusal(StrEnum):
    """Why a token did not prove the user (ErrorInfo metadata `cause` of VERIFICATION_FAILED)."""

    NOT_PASSED = "not_passed"  # the liveness or face comparison failed, or was not finished
    OTHER_PERSON = "other_person"  # the check was of someone else's name or ID number
    STALE = "stale"  # the check is older than the freshness window
    SPENT = "spent"  # the token's result was already used once
    UNKNOWN_TOKEN = "unknown_token"  # the provider knows no such token (or it expired there)


class FaceVerifier(Protocol):
    async def start(self, subject: FaceSubject) -> FaceCheck:
        """Opens a check for the subject (raises SERVICE_UNAVAILABLE when the provider is out of
        reach)."""
        ...

    async def verify(self, subject: FaceSubject, face_token: str) -> FaceRefusal | None:
        """None when the token proves that this user is the one in front of the camera (and
        spends it); else why not. Raises SERVICE_UNAVAILABLE when the provider is out of reach."""
        ...

    async def close(self) -> None: ...


class SandboxFaceVerifier:
    """The sandbox identity of docs/api.md: exactly `sandbox:pass` passes, anything else fails.
    StartFaceCheck answers that token, so a client's flow is the same as in production."""

    def __init__(self, clock: Clock | None = None, fresh_for: timedelta = timedelta(minutes=10)) -> None:
        self._clock = clock or SystemClock()
        self._fresh_for = fresh_for

    async def start(self, subject: FaceSubject) -> FaceCheck:
        return FaceCheck(SANDBOX_PASS, "", self._clock.now() + self._fresh_for)

    async def verify(self, subject: FaceSubject, face_token: str) -> FaceRefusal | None:
        if hmac.compare_digest(face_token.encode(), SANDBOX_PASS.encode()):
            return None
        return FaceRefusal.NOT_PASSED

    async def close(self) -> None:
        return None


def face_setup_problems(settings: Settings, config: GatewayConfig) -> list[str]:
    """What keeps the configured face provider from running, one line each (empty: nothing)."""
    provider = config.face_provider or ("sandbox" if settings.sandbox else None)
    if provider is None:
        return ["CARDCHECK_SANDBOX is off: set CARDCHECK_FACE_PROVIDER=tencent (and its CARDCHECK_TENCENT_* settings)"]
    if provider == "sandbox":
        if not settings.sandbox:
            return ["CARDCHECK_FACE_PROVIDER=sandbox needs CARDCHECK_SANDBOX on"]
        return []
    problems = [
        f"CARDCHECK_FACE_PROVIDER=tencent needs {variable}"
        for variable, value in (
            ("CARDCHECK_TENCENT_SECRET_ID", config.tencent_secret_id),
            ("CARDCHECK_TENCENT_SECRET_KEY", config.tencent_secret_key),
            ("CARDCHECK_TENCENT_FACEID_RULE_ID", config.tencent_faceid_rule_id),
        )
        if not (value or "").strip()
    ]
    for variable, value in (
        ("CARDCHECK_TENCENT_SECRET_ID", config.tencent_secret_id),
        ("CARDCHECK_TENCENT_SECRET_KEY", config.tencent_secret_key),
    ):
        if value and value.strip() != value:
            problems.append(f"{variable} must not begin or end with spaces")
    redirect = config.tencent_faceid_redirect_url
    if redirect and not redirect.startswith("https://"):
        problems.append("CARDCHECK_TENCENT_FACEID_REDIRECT_URL must be an https URL")
    return problems


def face_provider_name(settings: Settings, config: GatewayConfig) -> str:
    """The provider to run, or a one-line SettingsError naming what is missing."""
    problems = face_setup_problems(settings, config)
    if problems:
        more = f" (and {len(problems) - 1} more: see gateway.face.face_setup_problems)" if len(problems) > 1 else ""
        raise SettingsError(
            f"no usable face-verification provider, the gateway refuses to start: {problems[0]}{more}"
        )
    return config.face_provider or "sandbox"


def face_verifier_for(
    settings: Settings,
    config: GatewayConfig | None = None,
    *,
    spent: SpentFaceTokens | None = None,
    clock: Clock | None = None,
) -> FaceVerifier:
    """The configured provider, or a one-line SettingsError (`face_provider_name`). Tencent's
    needs `spent`, the store of used tokens in the gateway's database."""
    config = config or GatewayConfig.from_env()
    name = face_provider_name(settings, config)
    if name == "sandbox":
        return SandboxFaceVerifier(clock, config.face_fresh_for)
    if spent is None:
        raise ValueError("the tencent face provider needs the store of spent tokens")
    from gateway.tencent_faceid import TencentFaceOptions, TencentFaceVerifier  # it imports this module

    return TencentFaceVerifier(TencentFaceOptions.from_config(config), spent, clock or SystemClock())
