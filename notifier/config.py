"""The notifier's own settings, read from the environment beside the shared Settings and
validated the same way: a bad value stops the process before it serves (exit 2).

| variable | meaning | default |
|---|---|---|
| `CARDCHECK_SMS_PROVIDER` | `sandbox` (the inbox; needs CARDCHECK_SANDBOX on), `console` or `webhook` | `sandbox` in sandbox mode, else required |
| `CARDCHECK_SMS_WEBHOOK_URL` | the SMS vendor's endpoint (https; plain http only to a loopback host) | required for `webhook` |
| `CARDCHECK_SMS_WEBHOOK_SECRET` | the HMAC-SHA256 key the requests are signed with (at least 16 characters) | required for `webhook` |
| `CARDCHECK_SMS_WEBHOOK_TIMEOUT_S` | how long one request to the vendor may take | 5 |
| `CARDCHECK_SMS_RETRY_BASE_S`, `CARDCHECK_SMS_RETRY_MAX_S` | the backoff between attempts: a ceiling of base doubling per attempt, capped; each wait drawn at random up to it (cardcheck.runtime.backoff) | 2, 300 |
| `CARDCHECK_SMS_POLL_INTERVAL_S` | how often the delivery worker looks for messages come due (a message given back by a stopping replica wakes it at once) | 1 |
| `CARDCHECK_SMS_RETENTION_DAYS` | how long a message (sealed phone and text, delivery record) is kept before it is deleted; longer than every retry window, so an idempotency key is remembered while it can still be sent again | 30 |
| `CARDCHECK_SMS_CAP_SMS_CODE`, `..._REPORT_READY`, `..._CONSENT_RECEIPT` | the per-phone cap of that kind, e.g. `10/h,20/d` (`off`: none) | see DEFAULT_CAPS |
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

from cardcheck.runtime.settings import SettingsError, env_number

PROVIDERS = ("sandbox", "console", "webhook")
KINDS = ("SMS_CODE", "REPORT_READY", "CONSENT_RECEIPT")
MIN_SECRET_CHARS = 16


@dataclass(frozen=True)
class Cap:
    """At most `per_hour` messages of one kind to one phone in any hour, `per_day` in any day
    (None: no limit on that window)."""

    per_hour: int | None
    per_day: int | None

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


@dataclass(frozen=True)
class NotifierConfig:
    provider: str | None = None  # None: sandbox in sandbox mode, else a start-up error
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_timeout_s: float = 5.0
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    retry_windows: Mapping[str, timedelta] = field(default_factory=lambda: dict(DEFAULT_RETRY_WINDOWS))
    caps: Mapping[str, Cap] = field(default_factory=lambda: dict(DEFAULT_CAPS))
    poll_interval_s: float = 1.0
    max_in_flight: int = 16  # deliveries one replica runs at once
    retention: timedelta = timedelta(days=30)
    purge_interval_s: float = 600.0  # how often a replica deletes what is past retention

    def __post_init__(self) -> None:
        if self.provider is not None and self.provider not in PROVIDERS:
            raise SettingsError(
                f"CARDCHECK_SMS_PROVIDER={self.provider!r} is not one of {', '.join(PROVIDERS)}"
            )
        if self.provider == "webhook":
            if not self.webhook_url:
                raise SettingsError("CARDCHECK_SMS_PROVIDER=webhook needs CARDCHECK_SMS_WEBHOOK_URL")
            check_webhook_url(self.webhook_url)
            if not self.webhook_secret:
                raise SettingsError("CARDCHECK_SMS_PROVIDER=webhook needs CARDCHECK_SMS_WEBHOOK_SECRET")
            if len(self.webhook_secret) < MIN_SECRET_CHARS:
                raise SettingsError(
                    f"CARDCHECK_SMS_WEBHOOK_SECRET must hold at least {MIN_SECRET_CHARS} characters"
                )
        if self.retry_max_s < self.retry_base_s:
            raise SettingsError("CARDCHECK_SMS_RETRY_MAX_S must not be below CARDCHECK_SMS_RETRY_BASE_S")
        missing = [k for k in KINDS if k not in self.retry_windows or k not in self.caps]
        if missing:
            raise SettingsError(f"no retry window or cap for {', '.join(missing)}")
        if self.retention <= self.longest_kept:
            raise SettingsError(
                f"CARDCHECK_SMS_RETENTION_DAYS must be over {self.longest_kept.days} days: a message must "
                "outlive its retry window and the per-phone caps' day"
            )

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
                "CARDCHECK_SANDBOX is off: set CARDCHECK_SMS_PROVIDER to webhook (or console)"
            )
        if name == "sandbox" and not sandbox:
            raise SettingsError("CARDCHECK_SMS_PROVIDER=sandbox needs CARDCHECK_SANDBOX on")
        return name

    @property
    def lease(self) -> timedelta:
        """How long a replica holds a message it is delivering: well past one request's timeout,
        so a slow attempt is never taken over while still running."""
        return timedelta(seconds=max(30.0, 3 * self.webhook_timeout_s))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NotifierConfig:
        env = os.environ if env is None else env
        provider = (env.get("CARDCHECK_SMS_PROVIDER") or "").strip().lower() or None
        caps = dict(DEFAULT_CAPS)
        for kind in KINDS:
            var = f"CARDCHECK_SMS_CAP_{kind}"
            if env.get(var):
                caps[kind] = parse_cap(var, env[var])
        return cls(
            provider=provider,
            webhook_url=env.get("CARDCHECK_SMS_WEBHOOK_URL") or None,
            webhook_secret=env.get("CARDCHECK_SMS_WEBHOOK_SECRET") or None,
            webhook_timeout_s=env_number(env, "CARDCHECK_SMS_WEBHOOK_TIMEOUT_S", 5.0, above=0, at_most=60),
            retry_base_s=env_number(env, "CARDCHECK_SMS_RETRY_BASE_S", 2.0, above=0, at_most=3600),
            retry_max_s=env_number(env, "CARDCHECK_SMS_RETRY_MAX_S", 300.0, above=0, at_most=86400),
            caps=caps,
            poll_interval_s=env_number(env, "CARDCHECK_SMS_POLL_INTERVAL_S", 1.0, above=0, at_most=60),
            retention=timedelta(days=env_number(env, "CARDCHECK_SMS_RETENTION_DAYS", 30, above=0, at_most=3650)),
        )
