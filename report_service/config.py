"""report_service's own settings, beyond the shared ones (cardcheck.runtime.settings), read from
the environment (docs/configuration.md lists them).

"7 natural days": natural (calendar) days as opposed to working days, so weekends and holidays
count; a report generated at instant T is deleted at T + 7 × 24 h, to the microsecond, the same
in every time zone (China keeps no daylight saving time, so this is also the same wall-clock
time in Beijing 7 calendar days later)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from cardcheck.runtime.backoff import Backoff
from cardcheck.runtime.declared import DeclaredSettings, Family, Number

# The wait before pass n+1 over the banks that failed in pass n (cardcheck.runtime.backoff):
# never past the query's ready_by, when the report is made regardless.
DEFAULT_RETRY = Backoff(60.0, 3600.0)


RETRY = Family(
    "CARDCHECK_REPORT_RETRY_{}_S", ("first", "max"),
    defaults=(("first", 60), ("max", 3600)),
    meanings=(
        ("first", "the longest wait before asking failed banks again, in seconds; doubles each pass (each wait is drawn at random up to it)"),
        ("max", "the cap on that longest wait between two passes, in seconds (never below the first)"),
    ),
)


class ReportServiceConfig(DeclaredSettings):
    """Report retention, the workers' leases, passes and polling."""

    model_config = SettingsConfigDict(env_prefix="CARDCHECK_REPORT_")

    retention: Annotated[timedelta, Number(above=0, unit=timedelta(days=1))] = Field(
        timedelta(days=7), validation_alias="CARDCHECK_REPORT_RETENTION_DAYS",
        description="how long a report is kept after it is generated, in days of 24 h",
    )
    lease_s: Annotated[float, Number(above=0)] = Field(
        30.0, description="how long a worker's claim on a query holds without renewal, in seconds"
    )
    retry: Annotated[Backoff, RETRY] = Field(
        default_factory=lambda: Backoff(60.0, 3600.0), description="the retry passes"
    )
    poll_s: Annotated[float, Number(above=0)] = Field(
        2.0, description="how often a worker looks for work it was not woken for, in seconds"
    )
    sweep_s: Annotated[float, Number(above=0)] = Field(
        60.0, description="how often expired reports are deleted, in seconds"
    )
    max_running: Annotated[int, Number(integer=True, at_least=0)] = Field(
        64, description="how many queries one process works on at once (0: it accepts and serves, "
        "other replicas run the work)",
    )

    @field_validator("retry", mode="before")
    @classmethod
    def _retry(cls, value: Any) -> Backoff:
        if isinstance(value, Backoff):
            return value
        parts = RETRY.checked(value, {"first": Number(above=0), "max": Number(above=0)})
        return Backoff(parts["first"], max(parts["first"], parts["max"]))
