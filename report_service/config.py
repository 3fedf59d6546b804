"""report_service's own settings, beyond the shared ones (cardcheck.runtime.settings), read from
the environment:

| variable | meaning | default |
|---|---|---|
| CARDCHECK_REPORT_RETENTION_DAYS | how long a report is kept after it is generated, in days of 24 h | 7 |
| CARDCHECK_REPORT_LEASE_S | how long a worker's claim on a query holds without renewal | 30 |
| CARDCHECK_REPORT_RETRY_FIRST_S | the longest wait before asking failed banks again; doubles each pass (each wait is drawn at random up to it) | 60 |
| CARDCHECK_REPORT_RETRY_MAX_S | the cap on that longest wait between two passes | 3600 |
| CARDCHECK_REPORT_POLL_S | how often a worker looks for work it was not woken for | 2 |
| CARDCHECK_REPORT_SWEEP_S | how often expired reports are deleted | 60 |
| CARDCHECK_REPORT_MAX_RUNNING | how many queries one process works on at once (0: it accepts and serves, other replicas run the work) | 64 |

"7 natural days": natural (calendar) days as opposed to working days, so weekends and holidays
count; a report generated at instant T is deleted at T + 7 × 24 h, to the microsecond, the same
in every time zone (China keeps no daylight saving time, so this is also the same wall-clock
time in Beijing 7 calendar days later)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from cardcheck.runtime.backoff import Backoff
from cardcheck.runtime.settings import env_number

# The wait before pass n+1 over the banks that failed in pass n (cardcheck.runtime.backoff):
# never past the query's ready_by, when the report is made regardless.
DEFAULT_RETRY = Backoff(60.0, 3600.0)


@dataclass(frozen=True)
class ReportServiceConfig:
    retention: timedelta = timedelta(days=7)
    lease_s: float = 30.0
    retry: Backoff = field(default_factory=lambda: Backoff(60.0, 3600.0))
    poll_s: float = 2.0
    sweep_s: float = 60.0
    max_running: int = 64

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ReportServiceConfig:
        env = os.environ if env is None else env

        def number(var: str, default: float) -> float:
            return env_number(env, var, default, above=0)

        max_running = int(env_number(env, "CARDCHECK_REPORT_MAX_RUNNING", 64, integer=True, at_least=0))
        first = number("CARDCHECK_REPORT_RETRY_FIRST_S", 60.0)
        return cls(
            retention=timedelta(days=number("CARDCHECK_REPORT_RETENTION_DAYS", 7.0)),
            lease_s=number("CARDCHECK_REPORT_LEASE_S", 30.0),
            retry=Backoff(first, max(first, number("CARDCHECK_REPORT_RETRY_MAX_S", 3600.0))),
            poll_s=number("CARDCHECK_REPORT_POLL_S", 2.0),
            sweep_s=number("CARDCHECK_REPORT_SWEEP_S", 60.0),
            max_running=max_running,
        )
