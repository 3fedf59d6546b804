"""The notifier's own settings, declared beside the shared Settings and validated the same way: a
bad value stops the process before it serves (exit 2). docs/configuration.md lists them."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from cardcheck.runtime.declared import (
    DeclaredSettings,
    Family,
    Internal,
    Number,
    Secret,
    SettingsError,
    refuse,
)

PROVIDERS = ("sandbox", "console", "webhook", "tencent")
KINDS = ("SMS_CODE", "REPORT_READY", "CONSENT_RECEIPT")
MIN_SECRET_CHARS = 16


@dataclass(frozen=True)
class Cap:
    """At most `per_hour` messages of one kind to one phone in any hour, `per_day` in any day
    (None: no limit on that window)."""

    per_hour: int | None
    per_day: int | None

    def text(self) -> str:
        """As a variable sets it: `10/h,20/d`, or `off`."""
        parts = [f"{n}/{w}" for n, w in ((self.per_hour, "h"), (self.per_day, "d")) if n is not None]
        return ",".join(parts) or "off"

    def windows(self) -> list[tuple[timedelta, int, str]]:
        out = []
        if self.per_hour is not None:
            out.append((timedelta(hours=1), self.per_hour, "hour"))
        if self.per_day is not None:
            out.append((timedelta(days=1), self.per_day, "day"))
        return out


# A second line behind the gateway (one code per phone and purpose a minute) and report_service
# (one report a week): generous for people, a wall for a bug or an abuse that gets past them.
DEFAULT_CAPS: dict[str, Cap] = {
    "SMS_CODE": Cap(per_hour=10, per_day=20),
    "REPORT_READY": Cap(per_hour=10, per_day=30),
    "CONSENT_RECEIPT": Cap(per_hour=10, per_day=30),
}

# How long a message is worth delivering: a code is dead after 5 minutes, a report lives 7 days.
DEFAULT_RETRY_WINDOWS: dict[str, timedelta] = {
    "SMS_CODE": timedelta(minutes=5),
    "REPORT_READY": timedelta(days=7),
    "CONSENT_RECEIPT": timedelta(days=1),
}

_CAP_PART = re.compile(r"^(?P<count>\d+)/(?P<window>[hd])$")
_LOOPBACK_NAMES = {"localhost"}


def parse_cap(var: str, raw: str) -> Cap:
    """`10/h,20/d`, `5/h`, `20/d` or `off`."""
    text = raw.strip().lower()
    if text == "off":
        return Cap(None, None)
    counts: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        match = _CAP_PART.match(part)
        if match is None or match["window"] in counts or int(match["count"]) < 1:
            raise SettingsError(f"{var}={raw!r} is not like 10/h,20/d (or off)")
        counts[match["window"]] = int(match["count"])
    return Cap(per_hour=counts.get("h"), per_day=counts.get("d"))


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_webhook_url(url: str) -> None:
    var = "CARDCHECK_SMS_WEBHOOK_URL"
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise SettingsError(f"{var}={url!r} is not an http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        # Phone numbers and codes travel in the request: never in clear over a network.
        raise SettingsError(f"{var} must be https (plain http only to a loopback host for tests)")
    if parts.username or parts.password:
        raise SettingsError(
            f"{var} must not carry credentials: the secret goes in CARDCHECK_SMS_WEBHOOK_SECRET"
        )


CAPS = Family("CARDCHECK_SMS_CAP_{}", KINDS)
TENCENT_TEMPLATES = Family("CARDCHECK_TENCENT_SMS_TEMPLATE_{}", KINDS)
TENCENT_ENDPOINT = "sms.tencentcloudapi.com"
_DIGITS = re.compile(r"^\d{1,20}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$")


def tencent_endpoint(raw: str) -> tuple[str, str]:
    """(scheme, host[:port]) of CARDCHECK_TENCENT_SMS_ENDPOINT: a bare host is https; plain
    http only to a loopback host (a local fake of the API)."""
    var = "CARDCHECK_TENCENT_SMS_ENDPOINT"
    scheme, sep, rest = raw.strip().partition("://")
    if not sep:
        scheme, rest = "https", raw.strip()
    rest = rest.rstrip("/")
    if scheme not in ("https", "http") or not _HOST_PORT.match(rest):
        raise SettingsError(f"{var}={raw!r} is not a host[:port] or an http(s)://host[:port]")
    if scheme == "http" and not _is_loopback(urlsplit(f"http://{rest}").hostname or ""):
        raise SettingsError(f"{var} must be https (plain http only to a loopback host for tests)")
    return scheme, rest


class NotifierConfig(DeclaredSettings):
    """The SMS provider, delivery retries, per-phone caps and retention."""

    model_config = SettingsConfigDict(env_prefix="CARDCHECK_SMS_")

    provider: str | None = Field(
        None, description="sandbox (the inbox; needs CARDCHECK_SANDBOX on), console, webhook or tencent (Tencent Cloud SMS)",
        json_schema_extra={"shown_default": "sandbox in sandbox mode, else required"},
    )
    webhook_url: str | None = Field(
        None, description="the SMS vendor's endpoint (https; plain http only to a loopback host); required for webhook"
    )
    webhook_secret: Annotated[str | None, Secret()] = Field(
        None, repr=False,
        description=f"the HMAC-SHA256 key the requests are signed with (at least {MIN_SECRET_CHARS} characters); "
        "required for webhook",
    )
    webhook_timeout_s: Annotated[float, Number(above=0, at_most=60)] = Field(
        5.0, description="how long one request to the vendor may take, in seconds"
    )
    tencent_secret_id: Annotated[str | None, Secret()] = Field(
        None, repr=False, validation_alias="CARDCHECK_TENCENT_SECRET_ID",
        description="the Tencent Cloud API key's SecretId (a CAM sub-account's, allowed sms:SendSms only); required for tencent",
    )
    tencent_secret_key: Annotated[str | None, Secret()] = Field(
        None, repr=False, validation_alias="CARDCHECK_TENCENT_SECRET_KEY",
        description="that API key's SecretKey; required for tencent",
    )
    tencent_sms_endpoint: str = Field(
        TENCENT_ENDPOINT, validation_alias="CARDCHECK_TENCENT_SMS_ENDPOINT",
        description="Tencent Cloud SMS's API host (https; http://127.0.0.1:PORT only for a local fake)",
    )
    tencent_sms_region: str = Field(
        "ap-guangzhou", validation_alias="CARDCHECK_TENCENT_SMS_REGION",
        description="the region the SMS application is in (ap-guangzhou, ap-beijing or ap-nanjing)",
    )
    tencent_sms_sdk_app_id: str | None = Field(
        None, validation_alias="CARDCHECK_TENCENT_SMS_SDK_APP_ID",
        description="the SMS application's SdkAppId (digits, e.g. 1400006666); required for tencent",
    )
    tencent_sms_sign_name: str | None = Field(
        None, validation_alias="CARDCHECK_TENCENT_SMS_SIGN_NAME",
        description="the approved signature the texts are sent under (e.g. 云闪付); required for tencent",
    )
    tencent_sms_templates: Annotated[Mapping[str, str], TENCENT_TEMPLATES] = Field(
        default_factory=dict,
        description="the approved Tencent template ID of that kind of message (digits); its placeholders "
        "{1}, {2}... take the values notifier/templates.py VENDOR_PARAMS lists; required for tencent",
    )
    tencent_sms_timeout_s: Annotated[float, Number(above=0, at_most=60)] = Field(
        5.0, validation_alias="CARDCHECK_TENCENT_SMS_TIMEOUT_S",
        description="how long one SendSms request may take, in seconds",
    )
    retry_base_s: Annotated[float, Number(above=0, at_most=3600)] = Field(
        2.0, description="the first backoff between attempts, in seconds: a ceiling doubling per attempt, each wait drawn at random up to it"
    )
    retry_max_s: Annotated[float, Number(above=0, at_most=86400)] = Field(
        300.0, description="the longest backoff between attempts, in seconds"
    )
    retry_windows: Annotated[Mapping[str, timedelta], Internal()] = Field(
        default_factory=lambda: dict(DEFAULT_RETRY_WINDOWS)
    )
    caps: Annotated[Mapping[str, Cap], CAPS] = Field(
        default_factory=lambda: dict(DEFAULT_CAPS),
        description="the per-phone cap of that kind of message, e.g. 10/h,20/d (off: none)",
        json_schema_extra={"shown_default": {k: cap.text() for k, cap in DEFAULT_CAPS.items()}},
    )
    poll_interval_s: Annotated[float, Number(above=0, at_most=60)] = Field(
        1.0, description="how often the delivery worker looks for messages come due, in seconds (a message given back by a stopping replica wakes it at once)"
    )
    max_in_flight: Annotated[int, Internal()] = 16  # deliveries one replica runs at once
    retention: Annotated[timedelta, Number(above=0, at_most=3650, unit=timedelta(days=1))] = Field(
        timedelta(days=30), validation_alias="CARDCHECK_SMS_RETENTION_DAYS",
        description="days a message (sealed phone and text, delivery record) is kept; longer than every retry "
        "window, so an idempotency key is remembered while it can still be sent again",
    )
    purge_interval_s: Annotated[float, Internal()] = 600.0  # how often a replica deletes what is past retention

    @field_validator("provider", mode="before")
    @classmethod
    def _provider(cls, value: str | None) -> str | None:
        provider = (value or "").strip().lower() or None
        if provider is not None and provider not in PROVIDERS:
            raise refuse(f"CARDCHECK_SMS_PROVIDER={provider!r} is not one of {', '.join(PROVIDERS)}")
        return provider

    @field_validator("caps", mode="before")
    @classmethod
    def _caps(cls, value: Mapping[str, Any]) -> dict[str, Cap]:
        def cap(kind: str, raw: Any) -> Cap:
            if isinstance(raw, Cap):
                return raw
            try:
                return parse_cap(CAPS.variable(kind), str(raw))
            except SettingsError as error:
                raise refuse(str(error)) from None

        from_env = any(isinstance(raw, str) for raw in value.values())
        return {**(DEFAULT_CAPS if from_env else {}), **{k: cap(k, raw) for k, raw in value.items()}}

    @model_validator(mode="after")
    def _together(self) -> NotifierConfig:
        if self.provider == "webhook":
            if not self.webhook_url:
                raise refuse("CARDCHECK_SMS_PROVIDER=webhook needs CARDCHECK_SMS_WEBHOOK_URL")
            try:
                check_webhook_url(self.webhook_url)
            except SettingsError as error:
                raise refuse(str(error)) from None
            if not self.webhook_secret:
                raise refuse("CARDCHECK_SMS_PROVIDER=webhook needs CARDCHECK_SMS_WEBHOOK_SECRET")
            if len(self.webhook_secret) < MIN_SECRET_CHARS:
                raise refuse(f"CARDCHECK_SMS_WEBHOOK_SECRET must hold at least {MIN_SECRET_CHARS} characters")
        if self.provider == "tencent":
            missing = self.tencent_missing()
            if missing:
                raise refuse(f"CARDCHECK_SMS_PROVIDER=tencent needs {', '.join(missing)}")
        try:
            tencent_endpoint(self.tencent_sms_endpoint)
        except SettingsError as error:
            raise refuse(str(error)) from None
        if self.tencent_sms_sdk_app_id and not _DIGITS.match(self.tencent_sms_sdk_app_id):
            raise refuse("CARDCHECK_TENCENT_SMS_SDK_APP_ID must be digits")
        for kind, template_id in self.tencent_sms_templates.items():
            if kind not in KINDS or not _DIGITS.match(template_id):
                raise refuse(f"{TENCENT_TEMPLATES.variable(kind)}={template_id!r} must be digits")
        if self.retry_max_s < self.retry_base_s:
            raise refuse("CARDCHECK_SMS_RETRY_MAX_S must not be below CARDCHECK_SMS_RETRY_BASE_S")
        missing = [k for k in KINDS if k not in self.retry_windows or k not in self.caps]
        if missing:
            raise refuse(f"no retry window or cap for {', '.join(missing)}")
        if self.retention <= self.longest_kept:
            raise refuse(
                f"CARDCHECK_SMS_RETENTION_DAYS must be over {self.longest_kept.days} days: a message must "
                "outlive its retry window and the per-phone caps' day"
            )
        return self

    def tencent_missing(self) -> list[str]:
        """The variables the tencent provider needs that are unset."""
        needed = {
            "CARDCHECK_TENCENT_SECRET_ID": self.tencent_secret_id,
            "CARDCHECK_TENCENT_SECRET_KEY": self.tencent_secret_key,
            "CARDCHECK_TENCENT_SMS_SDK_APP_ID": self.tencent_sms_sdk_app_id,
            "CARDCHECK_TENCENT_SMS_SIGN_NAME": self.tencent_sms_sign_name,
            **{TENCENT_TEMPLATES.variable(k): self.tencent_sms_templates.get(k) for k in KINDS},
        }
        return [var for var, value in needed.items() if not value]

    def missing_for_production(self) -> list[str]:
        """What stands between this configuration and texts reaching phones outside sandbox
        mode, one line each (empty: nothing). A configuration that names no vendor is valid
        in sandbox mode; this says what production would still need."""
        if self.provider in (None, "sandbox", "console"):
            shown = self.provider or "unset"
            return [f"CARDCHECK_SMS_PROVIDER is {shown}: set it to tencent (or webhook) to reach phones"]
        if self.provider == "tencent":
            return [f"{var} is unset" for var in self.tencent_missing()]
        return []  # webhook: its URL and secret are checked when the configuration is read

    @property
    def delivery_timeout_s(self) -> float:
        """How long one request to the configured vendor may take."""
        return self.tencent_sms_timeout_s if self.provider == "tencent" else self.webhook_timeout_s

    @property
    def longest_kept(self) -> timedelta:
        """What retention must exceed: the longest retry window (a sender may retry its key
        until then) and the day the per-phone caps count over."""
        return max(*self.retry_windows.values(), timedelta(days=1))

    def provider_name(self, sandbox: bool) -> str:
        """The provider to run; the inbox keeps bodies in clear, so only in sandbox mode."""
        name = self.provider or ("sandbox" if sandbox else None)
        if name is None:
            raise SettingsError(
                "CARDCHECK_SANDBOX is off: set CARDCHECK_SMS_PROVIDER to tencent or webhook (or console)"
            )
        if name == "sandbox" and not sandbox:
            raise SettingsError("CARDCHECK_SMS_PROVIDER=sandbox needs CARDCHECK_SANDBOX on")
        return name

    @property
    def lease(self) -> timedelta:
        """How long a replica holds a message it is delivering: well past one request's timeout,
        so a slow attempt is never taken over while still running."""
        return timedelta(seconds=max(30.0, 3 * self.delivery_timeout_s))
