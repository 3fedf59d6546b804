"""bank_connector's own settings, declared beside the shared Settings (docs/configuration.md
lists them). The retry and breaker policies' defaults are bank_connector/resilience.py's.

Sizing admission: in-flight bank calls are about MAX_ACTIVE x banks per request; past what the
banks' endpoints serve at once they only queue there (and a grpc.aio server past ~1000 waiting
calls starts cancelling them). On this 2-core box with every bank in one bank_sim, 16 fan-outs
(384 calls) give the peak; Little's law sizes it elsewhere: target fan-outs/s x fan-out seconds.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from bank_connector.resilience import BreakerPolicy, RetryPolicy
from cardcheck.banks import BY_CODE
from cardcheck.runtime.declared import DeclaredSettings, Family, Number, refuse

PREFIX = "CARDCHECK_BANK_"

RETRY = Family(
    "CARDCHECK_BANK_RETRY_{}", ("max_attempts", "backoff_ms", "max_backoff_ms"),
    defaults=(
        ("max_attempts", RetryPolicy.max_attempts),
        ("backoff_ms", RetryPolicy.base_backoff_s * 1000),
        ("max_backoff_ms", RetryPolicy.max_backoff_s * 1000),
    ),
    meanings=(
        ("max_attempts", "attempts per bank call, first included (1 = no retry; at most 10)"),
        ("backoff_ms", "first backoff ceiling in ms (full jitter, doubling)"),
        ("max_backoff_ms", "largest backoff ceiling in ms"),
    ),
)
_RETRY_NUMBERS = {
    "max_attempts": Number(integer=True, at_least=1, at_most=10),
    "backoff_ms": Number(at_least=0),
    "max_backoff_ms": Number(at_least=0),
}
BREAKER = Family(
    "CARDCHECK_BANK_BREAKER_{}", ("consecutive_failures", "failure_rate", "window", "min_calls", "open_s"),
    defaults=(
        ("consecutive_failures", BreakerPolicy.consecutive_failures),
        ("failure_rate", BreakerPolicy.failure_rate),
        ("window", BreakerPolicy.window),
        ("min_calls", BreakerPolicy.min_calls),
        ("open_s", BreakerPolicy.open_for.total_seconds()),
    ),
    meanings=(
        ("consecutive_failures", "failures in a row that open a bank's breaker"),
        ("failure_rate", "share of recent calls failed that opens it (0.01 to 1)"),
        ("window", "recent calls the failure rate is taken over"),
        ("min_calls", "recent calls needed before the rate counts"),
        ("open_s", "seconds an open breaker fails fast before probing"),
    ),
)
_BREAKER_NUMBERS = {
    "consecutive_failures": Number(integer=True, at_least=1),
    "failure_rate": Number(at_least=0.01, at_most=1),
    "window": Number(integer=True, at_least=1),
    "min_calls": Number(integer=True, at_least=1),
    "open_s": Number(at_least=0),
}
BANK_CONCURRENCY = Family("CARDCHECK_BANK_CONCURRENCY_{}", key_text="CODE")


class ConnectorConfig(DeclaredSettings):
    """Retries, the retry budget, breakers, bulkheads and admission."""

    model_config = SettingsConfigDict(env_prefix=PREFIX)

    retry: Annotated[RetryPolicy, RETRY] = Field(default_factory=RetryPolicy, description="the retry policy")
    budget_ratio: Annotated[float, Number(at_least=0)] = Field(
        0.1, validation_alias="CARDCHECK_BANK_RETRY_BUDGET_RATIO",
        description="retries allowed per first attempt, over the window",
    )
    budget_floor: Annotated[int, Number(integer=True, at_least=0)] = Field(
        10, validation_alias="CARDCHECK_BANK_RETRY_BUDGET_FLOOR", description="retries always allowed per window"
    )
    budget_window: Annotated[timedelta, Number(at_least=0.1, unit=timedelta(seconds=1))] = Field(
        timedelta(seconds=10), validation_alias="CARDCHECK_BANK_RETRY_BUDGET_WINDOW_S",
        description="the retry budget's sliding window, in seconds",
    )
    breaker: Annotated[BreakerPolicy, BREAKER] = Field(default_factory=BreakerPolicy, description="the breaker")
    concurrency: Annotated[int, Number(integer=True, at_least=1)] = Field(
        64, description="calls in flight per bank (bulkhead)"
    )
    bank_concurrency: Annotated[dict[str, int], BANK_CONCURRENCY] = Field(
        default_factory=dict, description="calls in flight to that one bank, e.g. its known capacity",
        json_schema_extra={"shown_default": "CARDCHECK_BANK_CONCURRENCY"},
    )
    max_active: Annotated[int, Number(integer=True, at_least=1)] = Field(
        16, validation_alias="CARDCHECK_BANK_CONNECTOR_MAX_ACTIVE",
        description="requests (fan-outs, real-name checks) handled at once",
    )
    max_queued: Annotated[int, Number(integer=True, at_least=0)] = Field(
        2000, validation_alias="CARDCHECK_BANK_CONNECTOR_MAX_QUEUED",
        description="requests waiting for a turn; beyond, RESOURCE_EXHAUSTED (the server itself takes "
        "CARDCHECK_BANK_CONNECTOR_MAX_CONCURRENT_RPCS calls at once, by default MAX_ACTIVE + MAX_QUEUED + 64)",
    )

    @field_validator("retry", mode="before")
    @classmethod
    def _retry(cls, value: Any) -> RetryPolicy:
        if isinstance(value, RetryPolicy):
            return value
        parts = RETRY.checked(value, _RETRY_NUMBERS)
        return RetryPolicy(parts["max_attempts"], parts["backoff_ms"] / 1000, parts["max_backoff_ms"] / 1000)

    @field_validator("breaker", mode="before")
    @classmethod
    def _breaker(cls, value: Any) -> BreakerPolicy:
        if isinstance(value, BreakerPolicy):
            return value
        parts = BREAKER.checked(value, _BREAKER_NUMBERS)
        return BreakerPolicy(
            parts["consecutive_failures"], parts["failure_rate"], parts["window"], parts["min_calls"],
            timedelta(seconds=parts["open_s"]),
        )

    @field_validator("bank_concurrency", mode="before")
    @classmethod
    def _bank_concurrency(cls, value: Any) -> dict[str, int]:
        number = Number(integer=True, at_least=1)

        def check(code: str, raw: Any) -> int:
            if code not in BY_CODE:
                raise refuse("names no known bank")
            return number.check(raw)

        return BANK_CONCURRENCY.each(value, check)

    def concurrency_of(self, bank_code: str) -> int:
        return self.bank_concurrency.get(bank_code, self.concurrency)
