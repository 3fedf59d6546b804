"""The gateway's own settings, read from the environment beside the shared Settings and
validated the same way: a bad value stops the process before it serves."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from cardcheck.runtime.settings import SettingsError, env_number
from gateway.limits import LimitRates, Rate
from gateway.payment_passwords import usable_cores

_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
_HEADER = re.compile(r"^[a-z0-9_.-]{1,64}\Z")


@dataclass(frozen=True)
class GatewayConfig:
    # Global admission on SubmitQuery: beyond this the gateway sheds load (SERVICE_BUSY).
    submit_global_rps: float = 50.0
    submit_global_burst: float = 100.0
    # Each user's own SubmitQuery budget (RATE_LIMITED): a burst, refilled per minute.
    submit_user_per_minute: float = 6.0
    submit_user_burst: float = 10.0
    # RequestSmsCode (gateway/challenges.py says why this shape). Every purpose: each phone one
    # code per purpose each CARDCHECK_SMS_RESEND_S (60), each caller a budget
    # (CARDCHECK_SMS_CALLER_PER_HOUR, _BURST). QUERY_AUTH besides only the signed-in session's
    # and user's budgets (CARDCHECK_SMS_USER_PER_HOUR, _BURST; each session the same rate), so
    # anonymous callers never spend what the owner needs. Anonymous REGISTER and SIGN_IN, over
    # both purposes: each caller per phone an escalating cooldown after each code
    # (CARDCHECK_SMS_ESCALATION_S, comma-separated seconds, the last one repeats), starting
    # again after CARDCHECK_SMS_ESCALATION_RESET_HOURS without a code past the wait or when the
    # caller verifies a code of the phone; each phone CARDCHECK_SMS_PHONE_DAILY_CAP codes a day
    # (China's calendar day), of which CARDCHECK_SMS_PHONE_DAILY_RESERVE only for callers that
    # verified one of its codes within CARDCHECK_SMS_TRUST_DAYS. Keep the daily cap below the
    # notifier's hourly SMS_CODE cap (CARDCHECK_SMS_CAP_SMS_CODE, 10/h): what is left there is
    # the owner's room for QUERY_AUTH codes.
    sms_phone_daily_cap: int = 8
    sms_phone_daily_reserve: int = 3
    sms_resend_after: timedelta = timedelta(seconds=60)
    sms_escalation: tuple[timedelta, ...] = (
        timedelta(seconds=60),
        timedelta(minutes=2),
        timedelta(minutes=5),
        timedelta(minutes=15),
        timedelta(hours=1),
    )
    sms_escalation_reset: timedelta = timedelta(hours=6)
    sms_trust: timedelta = timedelta(days=30)
    sms_caller_per_hour: float = 60.0
    sms_caller_burst: float = 20.0
    sms_user_per_hour: float = 20.0
    sms_user_burst: float = 5.0
    # Each user's GetReport attempts (each costs a payment password check).
    report_user_per_minute: float = 10.0
    report_user_burst: float = 10.0
    # Payment password (gateway/users.py): this many wrong in a row
    # (CARDCHECK_PAYMENT_PASSWORD_MAX_ATTEMPTS) lock it for payment_password_lock
    # (CARDCHECK_PAYMENT_PASSWORD_LOCK_MINUTES); the next such run, without a right password
    # between, for payment_password_second_lock (CARDCHECK_PAYMENT_PASSWORD_SECOND_LOCK_MINUTES);
    # the one after that until a reset by SMS code and face check (ResetPaymentPassword).
    payment_password_max_attempts: int = 5
    payment_password_lock: timedelta = timedelta(minutes=30)
    payment_password_second_lock: timedelta = timedelta(hours=4)
    # Payment password checks run on threads of their own (gateway/payment_passwords.py):
    # CARDCHECK_PAYMENT_PASSWORD_WORKERS of them (default one per usable core), with at most
    # CARDCHECK_PAYMENT_PASSWORD_QUEUE more waiting; beyond that GetReport says SERVICE_BUSY.
    payment_password_workers: int = field(default_factory=usable_cores)
    payment_password_queue: int = 16
    session_ttl: timedelta = timedelta(hours=24)
    # WatchQuery (gateway/watches.py). Each user's concurrent streams
    # (CARDCHECK_WATCH_STREAMS_PER_USER; one more is refused RATE_LIMITED, limit watch_streams),
    # counted over every replica on Redis when it is configured, else in this process.
    watch_streams_per_user: int = 4
    # A stream's maximum lifetime (CARDCHECK_WATCH_MAX_LIFETIME_S): it then ends UNAVAILABLE,
    # STREAM_EXPIRED, and the client opens it again.
    watch_max_lifetime: timedelta = timedelta(minutes=10)
    # How often an open stream reads its session again (CARDCHECK_WATCH_SESSION_CHECK_S): a
    # sign-out ends it UNAUTHENTICATED within about this. One primary-key read each.
    watch_session_check_s: float = 2.0
    # The lease of a slot on Redis (CARDCHECK_WATCH_SLOT_LEASE_S), renewed every third of it
    # while its stream lives: a replica killed with streams open frees their slots after it.
    # At least 3 session checks long.
    watch_slot_lease: timedelta = timedelta(seconds=30)
    # Deadline of one unary call to an internal service.
    downstream_timeout_s: float = 10.0
    # Redis (CARDCHECK_REDIS_URL, shared Settings): the namespace of our keys and how long one
    # call may take before the limits treat Redis as unreachable.
    redis_key_prefix: str = "cardcheck"
    redis_timeout_s: float = 0.5
    # Who a caller is for the SMS limits: the peer address, or (behind a proxy that sets it) the
    # last address of the last occurrence of this metadata key, e.g. x-forwarded-for (the proxy
    # appends its own after whatever the client sent). Never trust it without a proxy.
    caller_header: str | None = None

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        env = os.environ if env is None else env

        def number(var: str, default: float) -> float:
            return env_number(env, var, default, above=0)

        prefix = env.get("CARDCHECK_REDIS_KEY_PREFIX") or cls.redis_key_prefix
        if not _PREFIX.match(prefix):
            raise SettingsError(f"CARDCHECK_REDIS_KEY_PREFIX={prefix!r}: 1-64 of A-Z a-z 0-9 _ . : -")
        header = (env.get("CARDCHECK_CALLER_HEADER") or "").strip().lower() or None
        if header is not None and not _HEADER.match(header):
            raise SettingsError(f"CARDCHECK_CALLER_HEADER={header!r} is not a metadata key")
        daily_cap = int(
            env_number(env, "CARDCHECK_SMS_PHONE_DAILY_CAP", cls.sms_phone_daily_cap, integer=True, above=0)
        )
        daily_reserve = int(
            env_number(
                env, "CARDCHECK_SMS_PHONE_DAILY_RESERVE", min(cls.sms_phone_daily_reserve, daily_cap - 1),
                integer=True, at_least=0,
            )
        )
        if daily_reserve >= daily_cap:
            raise SettingsError(
                f"CARDCHECK_SMS_PHONE_DAILY_RESERVE={daily_reserve} must be below the daily cap ({daily_cap})"
            )
        watch_session_check_s = number("CARDCHECK_WATCH_SESSION_CHECK_S", cls.watch_session_check_s)
        watch_slot_lease_s = number("CARDCHECK_WATCH_SLOT_LEASE_S", 30.0)
        if watch_slot_lease_s < 3 * watch_session_check_s:
            raise SettingsError(
                f"CARDCHECK_WATCH_SLOT_LEASE_S={watch_slot_lease_s:g} must be at least 3 times "
                f"CARDCHECK_WATCH_SESSION_CHECK_S={watch_session_check_s:g}"
            )
        return cls(
            submit_global_rps=number("CARDCHECK_SUBMIT_GLOBAL_RPS", cls.submit_global_rps),
            submit_global_burst=number("CARDCHECK_SUBMIT_GLOBAL_BURST", cls.submit_global_burst),
            submit_user_per_minute=number("CARDCHECK_SUBMIT_USER_PER_MINUTE", cls.submit_user_per_minute),
            submit_user_burst=number("CARDCHECK_SUBMIT_USER_BURST", cls.submit_user_burst),
            sms_phone_daily_cap=daily_cap,
            sms_phone_daily_reserve=daily_reserve,
            sms_resend_after=timedelta(seconds=number("CARDCHECK_SMS_RESEND_S", 60.0)),
            sms_escalation=_escalation(env),
            sms_escalation_reset=timedelta(hours=number("CARDCHECK_SMS_ESCALATION_RESET_HOURS", 6.0)),
            sms_trust=timedelta(days=number("CARDCHECK_SMS_TRUST_DAYS", 30.0)),
            sms_caller_per_hour=number("CARDCHECK_SMS_CALLER_PER_HOUR", cls.sms_caller_per_hour),
            sms_caller_burst=number("CARDCHECK_SMS_CALLER_BURST", cls.sms_caller_burst),
            sms_user_per_hour=number("CARDCHECK_SMS_USER_PER_HOUR", cls.sms_user_per_hour),
            sms_user_burst=number("CARDCHECK_SMS_USER_BURST", cls.sms_user_burst),
            report_user_per_minute=number("CARDCHECK_REPORT_USER_PER_MINUTE", cls.report_user_per_minute),
            report_user_burst=number("CARDCHECK_REPORT_USER_BURST", cls.report_user_burst),
            payment_password_max_attempts=int(
                env_number(
                    env,
                    "CARDCHECK_PAYMENT_PASSWORD_MAX_ATTEMPTS",
                    cls.payment_password_max_attempts,
                    integer=True,
                    above=0,
                )
            ),
            payment_password_lock=timedelta(minutes=number("CARDCHECK_PAYMENT_PASSWORD_LOCK_MINUTES", 30.0)),
            payment_password_second_lock=timedelta(
                minutes=number("CARDCHECK_PAYMENT_PASSWORD_SECOND_LOCK_MINUTES", 240.0)
            ),
            payment_password_workers=int(
                env_number(env, "CARDCHECK_PAYMENT_PASSWORD_WORKERS", usable_cores(), integer=True, above=0)
            ),
            payment_password_queue=int(
                env_number(env, "CARDCHECK_PAYMENT_PASSWORD_QUEUE", cls.payment_password_queue, integer=True, at_least=0)
            ),
            session_ttl=timedelta(hours=number("CARDCHECK_SESSION_TTL_HOURS", 24.0)),
            watch_streams_per_user=int(
                env_number(
                    env, "CARDCHECK_WATCH_STREAMS_PER_USER", cls.watch_streams_per_user, integer=True, above=0
                )
            ),
            watch_max_lifetime=timedelta(seconds=number("CARDCHECK_WATCH_MAX_LIFETIME_S", 600.0)),
            watch_session_check_s=watch_session_check_s,
            watch_slot_lease=timedelta(seconds=watch_slot_lease_s),
            downstream_timeout_s=number("CARDCHECK_DOWNSTREAM_TIMEOUT_S", cls.downstream_timeout_s),
            redis_key_prefix=prefix,
            redis_timeout_s=number("CARDCHECK_REDIS_TIMEOUT_S", cls.redis_timeout_s),
            caller_header=header,
        )


def _escalation(env: Mapping[str, str]) -> tuple[timedelta, ...]:
    """CARDCHECK_SMS_ESCALATION_S: the cooldown steps in seconds, e.g. `60,120,300,900,3600`."""
    raw = (env.get("CARDCHECK_SMS_ESCALATION_S") or "").strip()
    if not raw:
        return GatewayConfig.sms_escalation
    try:
        steps = [float(part) for part in raw.split(",")]
    except ValueError:
        steps = []
    if not steps or not all(math.isfinite(step) and step > 0 for step in steps):
        raise SettingsError(f"CARDCHECK_SMS_ESCALATION_S={raw!r}: comma-separated seconds, each above 0")
    return tuple(timedelta(seconds=step) for step in steps)
