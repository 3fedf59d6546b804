"""The gateway's own settings, declared beside the shared Settings and validated the same way:
a bad value stops the process before it serves. docs/configuration.md lists them."""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from cardcheck.runtime.declared import DeclaredSettings, Number, Secret, refuse
from gateway.limits import LimitRates, Rate
from gateway.payment_passwords import usable_cores

_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
_HEADER = re.compile(r"^[a-z0-9_.-]{1,64}\Z")
FACE_PROVIDERS = ("sandbox", "tencent")
TENCENT_FACEID_ENDPOINT = "faceid.tencentcloudapi.com"
DEFAULT_RESERVE = 3

Positive = Annotated[float, Number(above=0)]
Count = Annotated[int, Number(integer=True, above=0)]
Seconds = Annotated[timedelta, Number(above=0, unit=timedelta(seconds=1))]
Minutes = Annotated[timedelta, Number(above=0, unit=timedelta(minutes=1))]
Hours = Annotated[timedelta, Number(above=0, unit=timedelta(hours=1))]
Days = Annotated[timedelta, Number(above=0, unit=timedelta(days=1))]


class GatewayConfig(DeclaredSettings):
    """The gateway's knobs: rate limits, SMS budgets, payment password lockout, sessions,
    WatchQuery streams, Redis, the face-verification provider."""

    # Global admission on SubmitQuery: beyond this the gateway sheds load (SERVICE_BUSY).
    submit_global_rps: Positive = Field(50.0, description="SubmitQuery calls a second the gateway admits, over all users")
    submit_global_burst: Positive = Field(100.0, description="the burst of that global admission")
    # Each user's own SubmitQuery budget (RATE_LIMITED): a burst, refilled per minute.
    submit_user_per_minute: Positive = Field(6.0, description="each user's (and session's) SubmitQuery calls a minute")
    submit_user_burst: Positive = Field(10.0, description="the burst of each user's SubmitQuery budget")
    # RequestSmsCode (gateway/challenges.py says why this shape). Every purpose: each phone one
    # code per purpose each resend interval, each caller a budget. QUERY_AUTH besides only the
    # signed-in session's and user's budgets (each session the same rate), so anonymous callers
    # never spend what the owner needs. Anonymous REGISTER and SIGN_IN, over both purposes: each
    # caller per phone an escalating cooldown after each code (the last step repeats), starting
    # again after the reset without a code past the wait or when the caller verifies a code of
    # the phone; each phone a daily cap (China's calendar day), of which the reserve only for
    # callers that verified one of its codes within the trust window. Keep the daily cap below
    # the notifier's hourly SMS_CODE cap (CARDCHECK_SMS_CAP_SMS_CODE, 10/h): what is left there
    # is the owner's room for QUERY_AUTH codes.
    sms_phone_daily_cap: Count = Field(8, description="SMS codes a phone gets a day from anonymous callers")
    sms_phone_daily_reserve: Annotated[int, Number(integer=True, at_least=0)] = Field(
        DEFAULT_RESERVE, description="of the daily cap, codes only for callers that verified one of the phone's "
        "codes within the trust window; below the cap (a small cap alone takes a reserve that fits)",
    )
    sms_resend_after: Seconds = Field(
        timedelta(seconds=60), validation_alias="CARDCHECK_SMS_RESEND_S",
        description="seconds before a phone gets another code of the same purpose",
    )
    sms_escalation: tuple[timedelta, ...] = Field(
        (timedelta(seconds=60), timedelta(minutes=2), timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1)),
        validation_alias="CARDCHECK_SMS_ESCALATION_S",
        description="each caller's cooldowns per phone after each code, comma-separated seconds; the last repeats",
        json_schema_extra={"shown_default": "60,120,300,900,3600"},
    )
    sms_escalation_reset: Hours = Field(
        timedelta(hours=6), validation_alias="CARDCHECK_SMS_ESCALATION_RESET_HOURS",
        description="hours without a code past the wait after which a caller's escalation starts again",
    )
    sms_trust: Days = Field(
        timedelta(days=30), validation_alias="CARDCHECK_SMS_TRUST_DAYS",
        description="days a caller that verified a phone's code may use the phone's reserve",
    )
    sms_caller_per_hour: Positive = Field(60.0, description="SMS codes each caller may request an hour")
    sms_caller_burst: Positive = Field(20.0, description="the burst of each caller's SMS budget")
    sms_user_per_hour: Positive = Field(20.0, description="QUERY_AUTH codes each user (and session) may request an hour")
    sms_user_burst: Positive = Field(5.0, description="the burst of each user's SMS budget")
    # Each user's GetReport attempts (each costs a payment password check).
    report_user_per_minute: Positive = Field(10.0, description="GetReport attempts each user (and session) makes a minute")
    report_user_burst: Positive = Field(10.0, description="the burst of each user's GetReport budget")
    # Payment password (gateway/users.py): this many wrong in a row lock it for the lock; the next
    # such run, without a right password between, for the second lock; the one after that until a
    # reset by SMS code and face check (ResetPaymentPassword).
    payment_password_max_attempts: Count = Field(5, description="wrong payment passwords in a row that lock it")
    payment_password_lock: Minutes = Field(
        timedelta(minutes=30), validation_alias="CARDCHECK_PAYMENT_PASSWORD_LOCK_MINUTES",
        description="minutes the first lock lasts",
    )
    payment_password_second_lock: Minutes = Field(
        timedelta(hours=4), validation_alias="CARDCHECK_PAYMENT_PASSWORD_SECOND_LOCK_MINUTES",
        description="minutes the second lock lasts; the third holds until a reset",
    )
    # Payment password checks run on threads of their own (gateway/payment_passwords.py), with a
    # bounded queue; beyond that GetReport says SERVICE_BUSY.
    payment_password_workers: Count = Field(
        default_factory=usable_cores, description="threads checking payment passwords",
        json_schema_extra={"shown_default": "one per usable core"},
    )
    payment_password_queue: Annotated[int, Number(integer=True, at_least=0)] = Field(
        16, description="payment password checks waiting for a thread; beyond, SERVICE_BUSY"
    )
    session_ttl: Hours = Field(
        timedelta(hours=24), validation_alias="CARDCHECK_SESSION_TTL_HOURS", description="hours a session lasts"
    )
    # WatchQuery (gateway/watches.py). Streams are counted over every replica on Redis when it is
    # configured, else in this process.
    watch_streams_per_user: Count = Field(
        4, description="each user's concurrent WatchQuery streams; one more is refused RATE_LIMITED"
    )
    watch_max_lifetime: Seconds = Field(
        timedelta(minutes=10), validation_alias="CARDCHECK_WATCH_MAX_LIFETIME_S",
        description="seconds a stream lives; it then ends UNAVAILABLE, STREAM_EXPIRED, and the client opens it again",
    )
    watch_session_check_s: Positive = Field(
        2.0, description="seconds between an open stream's reads of its session (a sign-out ends it within this)"
    )
    # Renewed every third of it while its stream lives: a replica killed with streams open frees
    # their slots after it.
    watch_slot_lease: Seconds = Field(
        timedelta(seconds=30), validation_alias="CARDCHECK_WATCH_SLOT_LEASE_S",
        description="seconds a stream's slot on Redis is leased; at least 3 session checks long",
    )
    downstream_timeout_s: Positive = Field(10.0, description="deadline of one unary call to an internal service, in seconds")
    # Redis (CARDCHECK_REDIS_URL, shared Settings).
    redis_key_prefix: str = Field("cardcheck", description="the namespace of the gateway's keys on Redis")
    redis_timeout_s: Positive = Field(
        0.5, description="seconds one Redis call may take before the limits treat Redis as unreachable"
    )
    # The proxy appends its own address after whatever the client sent. Never trust it without a
    # proxy.
    caller_header: str | None = Field(
        None, description="who a caller is for the SMS limits: the last address of the last occurrence of this "
        "metadata key (e.g. x-forwarded-for, set by a proxy); unset: the peer address",
    )

    # Face verification (gateway/face.py, gateway/tencent_faceid.py). Only these variables are
    # read, never the SDK's own TENCENTCLOUD_SECRET_ID/KEY: credentials meant for another tool in
    # the same environment are not taken up unasked.
    face_provider: str | None = Field(
        None, description="sandbox (the token sandbox:pass; needs CARDCHECK_SANDBOX on) or tencent (Tencent Cloud FaceID)",
        json_schema_extra={"shown_default": "sandbox in sandbox mode, else required"},
    )
    face_fresh_for: Seconds = Field(
        timedelta(minutes=10), validation_alias="CARDCHECK_FACE_FRESH_S",
        description="seconds a passed liveness check stays usable in SubmitQuery or ResetPaymentPassword",
    )
    tencent_secret_id: Annotated[str | None, Secret()] = Field(
        None, repr=False, description="the gateway's own Tencent Cloud API key's SecretId (a CAM sub-account allowed FaceID only); required for tencent"
    )
    tencent_secret_key: Annotated[str | None, Secret()] = Field(
        None, repr=False, description="the SecretKey of the Tencent Cloud API key; required for tencent"
    )
    tencent_region: str | None = Field(None, description="the region the FaceID calls name (FaceID needs none)")
    tencent_faceid_rule_id: str | None = Field(
        None, description="the FaceID RuleId (the business flow made in the FaceID console); required for tencent"
    )
    tencent_faceid_endpoint: str = Field(
        TENCENT_FACEID_ENDPOINT,
        description="the FaceID API host (https), or http://host:port to a loopback host for tests",
    )
    tencent_faceid_redirect_url: str | None = Field(
        None, description="where the vendor's H5 page returns after the check (WeChat H5 only); unset: none sent"
    )
    tencent_faceid_timeout_s: Annotated[float, Number(above=0, at_most=60)] = Field(
        5.0, description="how long one FaceID call may take, in seconds; beyond, the RPC is UNAVAILABLE"
    )

    @field_validator("face_provider", mode="before")
    @classmethod
    def _face_provider(cls, value: str | None) -> str | None:
        provider = (value or "").strip().lower() or None
        if provider is not None and provider not in FACE_PROVIDERS:
            raise refuse(f"CARDCHECK_FACE_PROVIDER={provider!r} is not one of {', '.join(FACE_PROVIDERS)}")
        return provider

    @field_validator("tencent_faceid_endpoint")
    @classmethod
    def _faceid_endpoint(cls, value: str) -> str:
        if faceid_endpoint(value) is None:
            raise refuse("is not a host, https://host[:port], or http:// to a loopback host")
        return value

    @field_validator("sms_escalation", mode="before")
    @classmethod
    def _escalation(cls, value: Any) -> tuple[timedelta, ...]:
        """Comma-separated seconds, e.g. `60,120,300,900,3600`."""
        if not isinstance(value, str):
            return tuple(value)
        try:
            steps = [float(part) for part in value.strip().split(",")]
        except ValueError:
            steps = []
        if not steps or not all(math.isfinite(step) and step > 0 for step in steps):
            raise refuse("is not comma-separated seconds, each above 0")
        return tuple(timedelta(seconds=step) for step in steps)

    @field_validator("redis_key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise refuse("is not 1-64 of A-Z a-z 0-9 _ . : -")
        return value

    @field_validator("caller_header", mode="before")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        header = (value or "").strip().lower() or None
        if header is not None and not _HEADER.match(header):
            raise refuse("is not a metadata key")
        return header

    @model_validator(mode="after")
    def _together(self) -> GatewayConfig:
        if "sms_phone_daily_reserve" not in self.model_fields_set:
            self.__dict__["sms_phone_daily_reserve"] = min(DEFAULT_RESERVE, self.sms_phone_daily_cap - 1)
        if self.sms_phone_daily_reserve >= self.sms_phone_daily_cap:
            raise refuse(
                f"CARDCHECK_SMS_PHONE_DAILY_RESERVE={self.sms_phone_daily_reserve} must be below the daily cap "
                f"({self.sms_phone_daily_cap})"
            )
        lease_s = self.watch_slot_lease.total_seconds()
        if lease_s < 3 * self.watch_session_check_s:
            raise refuse(
                f"CARDCHECK_WATCH_SLOT_LEASE_S={lease_s:g} must be at least 3 times "
                f"CARDCHECK_WATCH_SESSION_CHECK_S={self.watch_session_check_s:g}"
            )
        return self

    def limit_rates(self) -> LimitRates:
        """Each per-user budget applies per session too, at the same rate (gateway/flows.py)."""
        submit_user = Rate.per_minute(self.submit_user_per_minute, self.submit_user_burst)
        sms_user = Rate.per_hour(self.sms_user_per_hour, self.sms_user_burst)
        report_user = Rate.per_minute(self.report_user_per_minute, self.report_user_burst)
        return LimitRates(
            submit_global=Rate(self.submit_global_rps, self.submit_global_burst),
            submit_user=submit_user,
            submit_session=submit_user,
            sms_user=sms_user,
            sms_session=sms_user,
            sms_caller=Rate.per_hour(self.sms_caller_per_hour, self.sms_caller_burst),
            report_user=report_user,
            report_session=report_user,
        )


def faceid_endpoint(value: str) -> tuple[str, str] | None:
    """(scheme, host[:port]) of a FaceID endpoint setting, or None when it is not one: a bare host
    is https; plain http only to a loopback host (the Name and ID number travel in the body)."""
    scheme, sep, rest = value.strip().partition("://")
    if not sep:
        scheme, rest = "https", value.strip()
    parts = urlsplit(f"{scheme}://{rest}")
    try:
        _ = parts.port  # a port that is not a number raises
    except ValueError:
        return None
    if scheme not in ("https", "http") or not parts.hostname or parts.path.strip("/") or parts.query:
        return None
    if parts.username or parts.password:
        return None
    if scheme == "http" and not _loopback(parts.hostname):
        return None
    return scheme, parts.netloc


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
