"""bank_connector's own settings, from the environment (beside the shared Settings):

| variable | meaning | default |
|---|---|---|
| CARDCHECK_BANK_RETRY_MAX_ATTEMPTS | attempts per bank call, first included (1 = no retry) | 3 |
| CARDCHECK_BANK_RETRY_BACKOFF_MS | first backoff ceiling (full jitter, doubling) | 25 |
| CARDCHECK_BANK_RETRY_MAX_BACKOFF_MS | largest backoff ceiling | 1000 |
| CARDCHECK_BANK_RETRY_BUDGET_RATIO | retries allowed per first attempt, over the window | 0.1 |
| CARDCHECK_BANK_RETRY_BUDGET_FLOOR | retries always allowed per window | 10 |
| CARDCHECK_BANK_RETRY_BUDGET_WINDOW_S | the retry budget's sliding window | 10 |
| CARDCHECK_BANK_BREAKER_CONSECUTIVE_FAILURES | failures in a row that open a bank's breaker | 5 |
| CARDCHECK_BANK_BREAKER_FAILURE_RATE | share of recent calls failed that opens it | 0.5 |
| CARDCHECK_BANK_BREAKER_WINDOW | recent calls the failure rate is taken over | 20 |
| CARDCHECK_BANK_BREAKER_MIN_CALLS | recent calls needed before the rate counts | 10 |
| CARDCHECK_BANK_BREAKER_OPEN_S | how long an open breaker fails fast before probing | 5 |
| CARDCHECK_BANK_CONCURRENCY | calls in flight per bank (bulkhead) | 64 |
| CARDCHECK_BANK_CONCURRENCY_<CODE> | the same for one bank, e.g. its known capacity | – |
| CARDCHECK_BANK_CONNECTOR_MAX_ACTIVE | requests (fan-outs, real-name checks) handled at once | 16 |
| CARDCHECK_BANK_CONNECTOR_MAX_QUEUED | requests waiting for a turn; beyond, RESOURCE_EXHAUSTED | 2000 |
| CARDCHECK_BANK_CONNECTOR_MAX_CONCURRENT_RPCS | calls the server takes at once, health included (cardcheck/runtime/settings.py); beyond, grpc refuses RESOURCE_EXHAUSTED | MAX_ACTIVE + MAX_QUEUED + 64 |

Sizing admission: in-flight bank calls are about MAX_ACTIVE x banks per request; past what the
banks' endpoints serve at once they only queue there (and a grpc.aio server past ~1000 waiting
calls starts cancelling them). On this 2-core box with every bank in one bank_sim, 16 fan-outs
(384 calls) give the peak; Little's law sizes it elsewhere: target fan-outs/s x fan-out seconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from bank_connector.resilience import BreakerPolicy, RetryPolicy
from cardcheck.banks import BY_CODE
from cardcheck.runtime.settings import SettingsError, env_number

PREFIX = "CARDCHECK_BANK_"


@dataclass(frozen=True)
class ConnectorConfig:
    retry: RetryPolicy = RetryPolicy()
    budget_ratio: float = 0.1
    budget_floor: int = 10
    budget_window: timedelta = timedelta(seconds=10)
    breaker: BreakerPolicy = BreakerPolicy()
    concurrency: int = 64
    bank_concurrency: dict[str, int] = field(default_factory=dict)
    max_active: int = 16
    max_queued: int = 2000

    def concurrency_of(self, bank_code: str) -> int:
        return self.bank_concurrency.get(bank_code, self.concurrency)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConnectorConfig:
        env = os.environ if env is None else env
        retry = RetryPolicy(
            max_attempts=int(env_number(env, "CARDCHECK_BANK_RETRY_MAX_ATTEMPTS", 3, at_least=1, at_most=10, integer=True)),
            base_backoff_s=env_number(env, "CARDCHECK_BANK_RETRY_BACKOFF_MS", 25, at_least=0) / 1000,
            max_backoff_s=env_number(env, "CARDCHECK_BANK_RETRY_MAX_BACKOFF_MS", 1000, at_least=0) / 1000,
        )
        breaker = BreakerPolicy(
            consecutive_failures=int(env_number(env, "CARDCHECK_BANK_BREAKER_CONSECUTIVE_FAILURES", 5, at_least=1, integer=True)),
            failure_rate=env_number(env, "CARDCHECK_BANK_BREAKER_FAILURE_RATE", 0.5, at_least=0.01, at_most=1),
            window=int(env_number(env, "CARDCHECK_BANK_BREAKER_WINDOW", 20, at_least=1, integer=True)),
            min_calls=int(env_number(env, "CARDCHECK_BANK_BREAKER_MIN_CALLS", 10, at_least=1, integer=True)),
            open_for=timedelta(seconds=env_number(env, "CARDCHECK_BANK_BREAKER_OPEN_S", 5, at_least=0)),
        )
        per_bank = {}
        for var, raw in env.items():
            if var.startswith("CARDCHECK_BANK_CONCURRENCY_") and raw:
                code = var.removeprefix("CARDCHECK_BANK_CONCURRENCY_")
                if code not in BY_CODE:
                    raise SettingsError(f"{var} names no known bank")
                per_bank[code] = int(env_number(env, var, 0, at_least=1, integer=True))
        return cls(
            retry=retry,
            budget_ratio=env_number(env, "CARDCHECK_BANK_RETRY_BUDGET_RATIO", 0.1, at_least=0),
            budget_floor=int(env_number(env, "CARDCHECK_BANK_RETRY_BUDGET_FLOOR", 10, at_least=0, integer=True)),
            budget_window=timedelta(seconds=env_number(env, "CARDCHECK_BANK_RETRY_BUDGET_WINDOW_S", 10, at_least=0.1)),
            breaker=breaker,
            concurrency=int(env_number(env, "CARDCHECK_BANK_CONCURRENCY", 64, at_least=1, integer=True)),
            bank_concurrency=per_bank,
            max_active=int(env_number(env, "CARDCHECK_BANK_CONNECTOR_MAX_ACTIVE", 16, at_least=1, integer=True)),
            max_queued=int(env_number(env, "CARDCHECK_BANK_CONNECTOR_MAX_QUEUED", 2000, at_least=0, integer=True)),
        )
