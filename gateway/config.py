"""The gateway's own settings, read from the environment beside the shared Settings and
validated the same way: a bad value stops the process before it serves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from cardcheck.runtime.settings import SettingsError


def _positive(env: Mapping[str, str], var: str, default: float, *, integer: bool = False) -> float:
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise SettingsError(f"{var}={raw!r} is not {kind}") from None
    if value <= 0:
        raise SettingsError(f"{var}={raw!r} must be positive")
    return value


@dataclass(frozen=True)
class GatewayConfig:
    # Global admission on SubmitQuery: beyond this the gateway sheds load (SERVICE_BUSY).
    submit_global_rps: float = 50.0
    submit_global_burst: float = 100.0
    # Each user's own SubmitQuery budget (RATE_LIMITED): a burst, refilled per minute.
    submit_user_per_minute: float = 6.0
    submit_user_burst: float = 10.0
    # Payment password: this many wrong in a row lock it for payment_password_lock.
    payment_password_max_attempts: int = 5
    payment_password_lock: timedelta = timedelta(minutes=30)
    session_ttl: timedelta = timedelta(hours=24)
    # Deadline of one unary call to an internal service.
    downstream_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        env = os.environ if env is None else env
        return cls(
            submit_global_rps=_positive(env, "CARDCHECK_SUBMIT_GLOBAL_RPS", cls.submit_global_rps),
            submit_global_burst=_positive(env, "CARDCHECK_SUBMIT_GLOBAL_BURST", cls.submit_global_burst),
            submit_user_per_minute=_positive(
                env, "CARDCHECK_SUBMIT_USER_PER_MINUTE", cls.submit_user_per_minute
            ),
            submit_user_burst=_positive(env, "CARDCHECK_SUBMIT_USER_BURST", cls.submit_user_burst),
            payment_password_max_attempts=int(
                _positive(
                    env,
                    "CARDCHECK_PAYMENT_PASSWORD_MAX_ATTEMPTS",
                    cls.payment_password_max_attempts,
                    integer=True,
                )
            ),
            payment_password_lock=timedelta(
                minutes=_positive(env, "CARDCHECK_PAYMENT_PASSWORD_LOCK_MINUTES", 30.0)
            ),
            session_ttl=timedelta(hours=_positive(env, "CARDCHECK_SESSION_TTL_HOURS", 24.0)),
            downstream_timeout_s=_positive(env, "CARDCHECK_DOWNSTREAM_TIMEOUT_S", cls.downstream_timeout_s),
        )
