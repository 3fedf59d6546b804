"""The settings every service reads (docs/configuration.md lists every variable), declared once
as a settings model (cardcheck/runtime/declared.py); each service adds its own model in its
config.py."""

from __future__ import annotations

import os
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
from cardcheck.runtime.tls import TlsFiles

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
HEALTH_ADDRESSES = Family("CARDCHECK_{}_HEALTH_ADDR", SERVICES)
HEALTH_PORT_OFFSET = 2000  # with TLS on: plaintext grpc.health.v1 alone, for the kubelet's probes
BANK_TLS_DIRS = Family("CARDCHECK_BANK_TLS_DIR_{}", key_text="CODE")
INTERNAL_SERVICES = ("report_service", "bank_connector", "notifier", "bank_sim")


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

    # TLS (docs/security.md): the files each service reads, reloaded when they change.
    tls: bool = Field(False, json_schema_extra={"shown_default": "off"}, description="on: every server serves TLS, internal ones require a client "
                      "certificate of the mesh's CA (mTLS), and every channel presents its service's certificate")
    tls_dir: Path | None = Field(
        None, description="the directory with `ca.pem`, `<service>.pem` and `<service>.key`, as `cardcheck "
        "certs` writes them", json_schema_extra={"shown_default": "the data dir's tls/"},
    )
    tls_ca_file: Path | None = Field(None, description="the mesh's CA (PEM), instead of the TLS dir's ca.pem; "
                                     "cert-manager's secret mounts it as ca.crt")
    tls_cert_file: Path | None = Field(None, description="this service's certificate chain (PEM), instead of "
                                       "`<service>.pem`; cert-manager: tls.crt")
    tls_key_file: Path | None = Field(None, description="this service's private key (PEM), instead of "
                                      "`<service>.key`; cert-manager: tls.key")
    gateway_public_cert_file: Path | None = Field(
        None, description="the certificate the gateway's public port presents (server authentication only)",
        json_schema_extra={"shown_default": "the gateway's own"},
    )
    gateway_public_key_file: Path | None = Field(
        None, description="its private key", json_schema_extra={"shown_default": "the gateway's own"},
    )
    bank_tls_dir: Path | None = Field(
        None, description="with TLS on, what bank channels use for banks reached at their own address "
        "(`CARDCHECK_BANK_ADDR_<CODE>`): ca.pem (the bank's CA), bank_connector.pem and bank_connector.key "
        "(the client certificate the bank requires)", json_schema_extra={"shown_default": "the TLS dir's banks/"},
    )
    bank_tls_dirs: Annotated[dict[str, Path], BANK_TLS_DIRS] = Field(
        default_factory=dict, description="that bank's own directory of the same three files"
    )
    health_addresses: Annotated[dict[str, str], HEALTH_ADDRESSES] = Field(
        default_factory=dict,
        description="with TLS on, host:port where that service also serves grpc.health.v1 alone, in "
        "plaintext, for the kubelet's gRPC probes (which speak no TLS)",
        json_schema_extra={"shown_default": "the bind host, at the service's gRPC port + 2000"},
    )

    @field_validator("addresses", mode="before")
    @classmethod
    def _addresses(cls, value: Mapping[str, str]) -> dict[str, str]:
        return {s: f"127.0.0.1:{p}" for s, p in DEFAULT_PORTS.items()} | ADDRESSES.each(value, _host_port)

    @field_validator("metrics_addresses", mode="before")
    @classmethod
    def _metrics_addresses(cls, value: Mapping[str, str]) -> dict[str, str]:
        return METRICS_ADDRESSES.each(value, _host_port)

    @field_validator("health_addresses", mode="before")
    @classmethod
    def _health_addresses(cls, value: Mapping[str, str]) -> dict[str, str]:
        return HEALTH_ADDRESSES.each(value, _host_port)

    @field_validator("bank_tls_dirs", mode="before")
    @classmethod
    def _bank_tls_dirs(cls, value: Mapping[str, Any]) -> dict[str, Any]:
        from cardcheck.banks import BANK_CODES

        def known(code: str, path: Any) -> Any:
            if code not in BANK_CODES:
                raise refuse("names no bank of docs/api.md's list")
            return path

        return BANK_TLS_DIRS.each(value, known)

    @field_validator("sandbox", "metrics", "tls", mode="before")
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

    def health_address(self, service: str) -> str:
        """Where `service` serves plaintext health with TLS on: its gRPC port + 2000 unless moved."""
        if service in self.health_addresses:
            return self.health_addresses[service]
        port = self.port(service)
        moved = port + HEALTH_PORT_OFFSET
        return f"{self.bind_host}:{moved if port and moved <= 65535 else 0}"

    def tls_files(self, service: str) -> TlsFiles:
        """`service`'s CA, certificate and key: the TLS dir's, each file overridable."""
        directory = self.tls_dir or self.data_dir / "tls"
        return TlsFiles(
            self.tls_ca_file or directory / "ca.pem",
            self.tls_cert_file or directory / f"{service}.pem",
            self.tls_key_file or directory / f"{service}.key",
        )

    def gateway_public_files(self) -> TlsFiles:
        own = self.tls_files("gateway")
        return TlsFiles(own.ca, self.gateway_public_cert_file or own.certificate,
                        self.gateway_public_key_file or own.key)

    def banks_tls_dir(self, bank_code: str | None = None) -> Path:
        """The directory of a bank's TLS material (its own, else the shared one)."""
        own = self.bank_tls_dirs.get(bank_code) if bank_code else None
        return own or self.bank_tls_dir or (self.tls_dir or self.data_dir / "tls") / "banks"

    def bank_tls_files(self, bank_code: str, identity: str = "bank_connector") -> TlsFiles:
        """The bank's CA and `identity`'s certificate and key: bank_connector's client ones, or
        bank_sim's server ones for the simulated bank."""
        directory = self.banks_tls_dir(bank_code)
        return TlsFiles(directory / "ca.pem", directory / f"{identity}.pem", directory / f"{identity}.key")

    def tls_missing(self, service: str) -> list[str]:
        """What `service` lacks to run on TLS, one line each (empty: nothing): TLS off, or a file
        that is not there or cannot be read."""
        if not self.tls:
            return [f"{self.variable('tls')} is off: the mesh runs in plaintext"]
        wanted = [self.tls_files(service)]
        if service == "gateway":
            wanted.append(self.gateway_public_files())
        if service == "bank_connector":
            wanted += [self.bank_tls_files(code) for code in sorted(self.bank_addresses)]
        problems: list[str] = []
        for files in wanted:
            for path in files.paths():
                line = f"no readable TLS file {path}"
                if not os.access(path, os.R_OK) and line not in problems:
                    problems.append(line)
        return problems

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
