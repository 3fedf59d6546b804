"""bank_sim's start-time options from the environment, declared beside the shared Settings; its
command line's options win over them (bank_sim/app.py). docs/configuration.md lists them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator

from cardcheck.banks import BANK_CODES
from cardcheck.runtime.declared import DeclaredSettings, Number, refuse

HOUR_MS = 3_600_000
HIGHEST_BASE_PORT = 65535 - len(BANK_CODES)  # bank i listens on BASE + i


class BankSimConfig(DeclaredSettings):
    """The banks' starting behaviour and per-bank ports."""

    latency_ms: Annotated[float | None, Number()] = Field(
        None, validation_alias="CARDCHECK_BANK_LATENCY_MS",
        description="a fixed latency on every bank's answers, in ms (from 0, under an hour); --bank-latency-ms wins",
    )
    profile: Path | None = Field(
        None, validation_alias="CARDCHECK_BANK_PROFILE",
        description='a bank behaviour profile, JSON: {"default": {...}, "banks": {"ICBC": {...}}}; --profile wins',
    )
    port_per_bank: Annotated[int | None, Number(integer=True)] = Field(
        None, validation_alias="CARDCHECK_BANK_SIM_PORT_PER_BANK",
        description="bank number i of docs/api.md's list (0-based) also listens alone on this port + i; "
        "--port-per-bank wins",
    )

    @field_validator("latency_ms")
    @classmethod
    def _latency(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value < HOUR_MS:
            raise refuse("must be between 0 and an hour")
        return value

    @field_validator("port_per_bank", mode="before")
    @classmethod
    def _port(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.isdigit() or value is not None and not 0 < int(value) <= HIGHEST_BASE_PORT:
            raise refuse(f"is not a port from 1 to {HIGHEST_BASE_PORT}")
        return value
