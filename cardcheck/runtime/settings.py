"""The settings every service reads (docs/configuration.md lists every variable), declared once
as a settings model (cardcheck/runtime/declared.py); each service adds its own model in its
config.py."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from cardcheck.runtime.declared import (
    DeclaredSettings,
    Family,
    Number,
    Secret,
    SettingsError,
    problem_of,
    refuse,
)

__all__ = ["Settings", "SettingsError", "env_number", "redact_url"]

DEFAULT_PORTS = {
    "gateway": 50051,
    "report_service": 50052,
    "bank_connector": 50053,
    "notifier": 50054,
    "bank_sim": 50060,
}

ALL_REGIONS = (
    "CN-BJ", "CN-TJ", "CN-HE", "CN-SX", "CN-NM", "CN-LN", "CN-JL", "CN-HL", "CN-SH", "CN-JS", "CN-ZJ",
    "CN-AH", "CN-FJ", "CN-JX", "CN-SD", "CN-HA", "CN-HB", "CN-HN", "CN-GD", "CN-GX", "CN-HI", "CN-CQ",
    "CN-SC", "CN-GZ", "CN-YN", "CN-XZ", "CN-SN", "CN-GS", "CN-QH", "CN-NX", "CN-XJ",
)  # the 31 provincial regions of the mainland


EVENT_LOOPS = ("uvloop", "asyncio")
LOG_FORMATS = ("text", "json")
# Beyond gRPC's own default receive limit (4 MiB) no service has a reason to go: the variables
# that move a server's request bounds are for tuning within that, and for measuring.
MAX_RECEIVE_BYTES_CEILING = 4 * 1024 * 1024


def env_number(
    env: Mapping[str, str],
    var: str,
    default: float,
    *,
    integer: bool = False,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """A finite number from the environment (the default when unset or empty), within bounds,
    or a SettingsError naming the variable. For code that reads a variable outside the models;
    a new setting is a field of its service's model instead, so that it is listed and checked."""
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    try:
        number: float = Number(integer=integer, above=above, at_least=at_least, at_most=at_most).check(raw)
        return number
    except PydanticCustomError as error:
        raise SettingsError(f"{var}={raw!r} {problem_of(error)}") from None


REDACTED = "***"
_SECRET_QUERY_PARAMS = ("password", "pass", "passwd", "token", "secret")


@overload
def redact_url(url: str) -> str: ...


@overload
def redact_url(url: None) -> None: ...


def redact_url(url: str | None) -> str | None:
    """`url` with its password (in the userinfo or a password-like query parameter) replaced by
    ***, for a URL shown in a log line or a repr."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(name.lower() in _SECRET_QUERY_PARAMS for name, _ in pairs):
                query = urlencode(
                    [(name, REDACTED if name.lower() in _SECRET_QUERY_PARAMS else value) for name, value in pairs]
                )
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return REDACTED  # not a URL we can take apart: nothing of it is shown


# What Settings' repr (and so a log line of it) never shows: keys as set or not, URLs without
# their password.
_KEYS = ("master_key", "retired_master_keys")
_URLS = ("database_url", "redis_url")
SERVICES = tuple(DEFAULT_PORTS)


def _host_port(key: str, value: Any) -> str:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise refuse("is not host:port")
    return str(value)


ADDRESSES = Family("CARDCHECK_{}_ADDR", SERVICES)
BANK_ADDRESSES = Family("CARDCHECK_BANK_ADDR_{}", key_text="CODE")
MAX_CONCURRENT_RPCS = Family("CARDCHECK_{}_MAX_CONCURRENT_RPCS", SERVICES)
MAX_RECEIVE_BYTES = Family("CARDCHECK_{}_MAX_RECEIVE_BYTES", SERVICES)
METRICS_ADDRESSES = Family("CARDCHECK_{}_METRICS_ADDR", SERVICES)
METRICS_PORT_OFFSET = 1000  # /metrics listens at the gRPC port + 1000 unless told otherwise


class Settings(DeclaredSettings):
    """What every service reads: where the others are, storage, keys, mode and the server's
    bounds."""

    addresses: Annotated[dict[str, str], ADDRESSES] = Field(
        default_factory=lambda: {s: f"127.0.0.1:{p}" for s, p in DEFAULT_PORTS.items()},
        description="host:port where that service listens and the others reach it",
        json_schema_extra={"shown_default": {s: f"127.0.0.1:{p}" for s, p in DEFAULT_PORTS.items()}},
    )
    bind_host: str = Field("127.0.0.1", description="the interface the servers listen on (0.0.0.0 in a pod)")
    data_dir: Path = Field(Path("var"), description="SQLite files, generated keys and span files; made 0700 with its "
                          "files 0600, tightened with a warning when found looser")
    database_url: Annotated[str | None, Secret()] = Field(
        None, description="a SQLAlchemy URL (PostgreSQL at scale); unset: a SQLite file per service in the data dir"
    )
    redis_url: Annotated[str | None, Secret()] = Field(
        None, description="Redis for limits shared by every gateway replica; unset: each process counts alone"
    )
    master_key: Annotated[str | None, Secret()] = Field(
        None, description="base64 of 32 bytes; unset: generated into the data dir on the embedded default"
    )
    retired_master_keys: Annotated[str | None, Secret()] = Field(
        None, description="base64, comma-separated: keys a rotation retired, still opening what they sealed"
    )
    sandbox: bool = Field(True, description="sandbox identity (face token) and SMS inbox; off in production")
    enabled_regions: tuple[str, ...] = Field(
        ALL_REGIONS, description="comma-separated region codes (CN-BJ...) users may be in",
        json_schema_extra={"shown_default": "all 31 provincial regions"},
    )
    bank_addresses: Annotated[dict[str, str], BANK_ADDRESSES] = Field(
        default_factory=dict, description="host:port of one bank's endpoint, overriding the bank_sim address"
    )
    per_bank_timeout_s: Annotated[float, Number(above=0)] = Field(
        5.0, description="how long one bank may take to answer, in seconds"
    )
    shutdown_grace_s: Annotated[float, Number(at_least=0)] = Field(
        10.0, description="how long a stopping server lets calls in flight finish, in seconds"
    )
    metrics: bool = Field(True, description="Prometheus metrics on HTTP /metrics (docs/metrics.md); off: none served")
    metrics_addresses: Annotated[dict[str, str], METRICS_ADDRESSES] = Field(
        default_factory=dict,
        description="host:port where that service serves /metrics",
        json_schema_extra={"shown_default": "the bind host, at the service's gRPC port + 1000"},
    )
    log_level: str = Field("INFO", description="the logging level (DEBUG, INFO, WARNING...)")
    log_format: str = Field(
        "text", description="text (one readable line, for a console), or json (one object a line, with the "
        "call's trace_id and span_id; the image and the manifests set it)"
    )
    readiness_every_s: Annotated[float, Number(above=0, at_most=60)] = Field(
        2.0, description="how often a service checks its database (and the gateway its Redis) to answer "
        "readiness, in seconds"
    )
    event_loop: str = Field("uvloop", description="uvloop, or asyncio (the standard library's loop)")
    # Overrides of a server's request bounds (cardcheck.runtime.server.RequestBounds), by service,
    # only those set. Each service's app.py holds its defaults and says why.
    max_concurrent_rpcs: Annotated[dict[str, int], MAX_CONCURRENT_RPCS] = Field(
        default_factory=dict,
        description="calls and streams one process of that service handles at once (1 to 1000000)",
        json_schema_extra={"shown_default": "the service's own"},
    )
    max_receive_bytes: Annotated[dict[str, int], MAX_RECEIVE_BYTES] = Field(
        default_factory=dict,
        description="the largest request message that service takes, 1 KiB to 4 MiB",
        json_schema_extra={"shown_default": "the service's own"},
    )

    @field_validator("addresses", mode="before")
    @classmethod
    def _addresses(cls, value: Mapping[str, str]) -> dict[str, str]:
        return {s: f"127.0.0.1:{p}" for s, p in DEFAULT_PORTS.items()} | ADDRESSES.each(value, _host_port)

    @field_validator("metrics_addresses", mode="before")
    @classmethod
    def _metrics_addresses(cls, value: Mapping[str, str]) -> dict[str, str]:
        return METRICS_ADDRESSES.each(value, _host_port)

    @field_validator("sandbox", "metrics", mode="before")
    @classmethod
    def _sandbox(cls, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise refuse("is not a boolean")

    @field_validator("enabled_regions", mode="before")
    @classmethod
    def _regions(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [r.strip() for r in value.split(",") if r.strip()]
        regions = tuple(value) or ALL_REGIONS
        unknown = [r for r in regions if r not in ALL_REGIONS]
        if unknown:
            raise refuse(f"CARDCHECK_ENABLED_REGIONS names unknown regions: {', '.join(unknown)}")
        return regions

    @field_validator("event_loop")
    @classmethod
    def _event_loop(cls, value: str) -> str:
        if value not in EVENT_LOOPS:
            raise refuse(f"is not one of {', '.join(EVENT_LOOPS)}")
        return value

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in LOG_FORMATS:
            raise refuse(f"is not one of {', '.join(LOG_FORMATS)}")
        return value

    @field_validator("max_concurrent_rpcs", mode="before")
    @classmethod
    def _max_concurrent_rpcs(cls, value: Mapping[str, Any]) -> dict[str, int]:
        number = Number(integer=True, at_least=1, at_most=1_000_000)
        return MAX_CONCURRENT_RPCS.each(value, lambda _, v: number.check(v))

    @field_validator("max_receive_bytes", mode="before")
    @classmethod
    def _max_receive_bytes(cls, value: Mapping[str, Any]) -> dict[str, int]:
        number = Number(integer=True, at_least=1024, at_most=MAX_RECEIVE_BYTES_CEILING)
        return MAX_RECEIVE_BYTES.each(value, lambda _, v: number.check(v))

    def __repr__(self) -> str:
        shown = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in _KEYS:
                text = "None" if value is None else f"<{len([k for k in value.split(',') if k.strip()])} set>"
            elif name in _URLS:
                text = repr(redact_url(value))
            else:
                text = repr(value)
            shown.append(f"{name}={text}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    def port(self, service: str) -> int:
        return int(self.addresses[service].rpartition(":")[2])

    def bind_address(self, service: str) -> str:
        return f"{self.bind_host}:{self.port(service)}"

    def metrics_address(self, service: str) -> str | None:
        """Where `service` serves /metrics: None when metrics are off; its gRPC port + 1000
        unless moved; any free port when its gRPC port is (port 0, as tests bind)."""
        if not self.metrics:
            return None
        if service in self.metrics_addresses:
            return self.metrics_addresses[service]
        port = self.port(service)
        moved = port + METRICS_PORT_OFFSET
        return f"{self.bind_host}:{moved if port and moved <= 65535 else 0}"
