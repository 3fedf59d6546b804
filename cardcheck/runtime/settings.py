"""One validated settings object, read from the environment (the variables of the README's Configuration)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
# Beyond gRPC's own default receive limit (4 MiB) no service has a reason to go: the variables
# that move a server's request bounds are for tuning within that, and for measuring.
MAX_RECEIVE_BYTES_CEILING = 4 * 1024 * 1024


class SettingsError(ValueError):
    """A configuration value is missing or malformed: the process refuses to start."""


def _address(env: Mapping[str, str], service: str) -> str:
    var = f"CARDCHECK_{service.upper()}_ADDR"
    value = env.get(var, f"127.0.0.1:{DEFAULT_PORTS[service]}")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{var}={value!r} is not host:port")
    return value


def _bool(env: Mapping[str, str], var: str, default: bool) -> bool:
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{var}={raw!r} is not a boolean")


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
    or a SettingsError naming the variable: every service reads its numbers this way."""
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise SettingsError(f"{var}={raw!r} is not {'a whole number' if integer else 'a number'}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{var}={raw!r} is not a finite number")
    bounds = []
    if above is not None and not value > above:
        bounds.append(f"above {above:g}")
    if at_least is not None and not value >= at_least:
        bounds.append(f"at least {at_least:g}")
    if at_most is not None and not value <= at_most:
        bounds.append(f"at most {at_most:g}")
    if bounds:
        kind = "a whole number " if integer else ""
        raise SettingsError(f"{var}={raw!r} must be {kind}{' and '.join(bounds)}")
    return value


REDACTED = "***"
_SECRET_QUERY_PARAMS = ("password", "pass", "passwd", "token", "secret")


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


def _per_service(env: Mapping[str, str], suffix: str, *, at_least: int, at_most: int) -> dict[str, int]:
    """CARDCHECK_<SERVICE>_<suffix> of every service that has it set: a whole number in bounds."""
    values = {}
    for service in DEFAULT_PORTS:
        var = f"CARDCHECK_{service.upper()}_{suffix}"
        if env.get(var):
            values[service] = int(env_number(env, var, 0, integer=True, at_least=at_least, at_most=at_most))
    return values


@dataclass(frozen=True)
class Settings:
    addresses: dict[str, str]
    bind_host: str = "127.0.0.1"
    data_dir: Path = Path("var")
    database_url: str | None = None
    redis_url: str | None = None
    master_key: str | None = None  # base64 of 32 bytes; generated into data_dir when unset
    retired_master_keys: str | None = None  # base64, comma-separated: still open what they sealed
    sandbox: bool = True  # sandbox identity (face token) and SMS inbox
    enabled_regions: tuple[str, ...] = ALL_REGIONS
    bank_addresses: dict[str, str] = field(default_factory=dict)  # per-bank overrides
    per_bank_timeout_s: float = 5.0
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    event_loop: str = "uvloop"  # or "asyncio", the standard library's loop
    # Overrides of a server's request bounds (cardcheck.runtime.server.RequestBounds), by service,
    # only those set: CARDCHECK_<SERVICE>_MAX_CONCURRENT_RPCS (calls and streams one process
    # handles at once) and CARDCHECK_<SERVICE>_MAX_RECEIVE_BYTES (the largest request message,
    # 1 KiB to 4 MiB). Each service's app.py holds its defaults and says why.
    max_concurrent_rpcs: dict[str, int] = field(default_factory=dict)
    max_receive_bytes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        addresses = {service: _address(env, service) for service in DEFAULT_PORTS}
        regions_raw = env.get("CARDCHECK_ENABLED_REGIONS", "")
        regions = tuple(r.strip() for r in regions_raw.split(",") if r.strip()) or ALL_REGIONS
        unknown = [r for r in regions if r not in ALL_REGIONS]
        if unknown:
            raise SettingsError(f"CARDCHECK_ENABLED_REGIONS names unknown regions: {', '.join(unknown)}")
        bank_addresses = {
            var.removeprefix("CARDCHECK_BANK_ADDR_"): value
            for var, value in env.items()
            if var.startswith("CARDCHECK_BANK_ADDR_") and value
        }
        event_loop = env.get("CARDCHECK_EVENT_LOOP", "") or "uvloop"
        if event_loop not in EVENT_LOOPS:
            raise SettingsError(f"CARDCHECK_EVENT_LOOP={event_loop!r} is not one of {', '.join(EVENT_LOOPS)}")
        return cls(
            addresses=addresses,
            bind_host=env.get("CARDCHECK_BIND_HOST", "127.0.0.1") or "127.0.0.1",
            data_dir=Path(env.get("CARDCHECK_DATA_DIR", "var") or "var"),
            database_url=env.get("CARDCHECK_DATABASE_URL") or None,
            redis_url=env.get("CARDCHECK_REDIS_URL") or None,
            master_key=env.get("CARDCHECK_MASTER_KEY") or None,
            retired_master_keys=env.get("CARDCHECK_RETIRED_MASTER_KEYS") or None,
            sandbox=_bool(env, "CARDCHECK_SANDBOX", True),
            enabled_regions=regions,
            bank_addresses=bank_addresses,
            per_bank_timeout_s=env_number(env, "CARDCHECK_PER_BANK_TIMEOUT_S", 5.0, above=0),
            shutdown_grace_s=env_number(env, "CARDCHECK_SHUTDOWN_GRACE_S", 10.0, at_least=0),
            log_level=env.get("CARDCHECK_LOG_LEVEL", "INFO") or "INFO",
            event_loop=event_loop,
            max_concurrent_rpcs=_per_service(env, "MAX_CONCURRENT_RPCS", at_least=1, at_most=1_000_000),
            max_receive_bytes=_per_service(env, "MAX_RECEIVE_BYTES", at_least=1024, at_most=MAX_RECEIVE_BYTES_CEILING),
        )

    def __repr__(self) -> str:
        shown = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name in _KEYS:
                text = "None" if value is None else f"<{len([k for k in value.split(',') if k.strip()])} set>"
            elif spec.name in _URLS:
                text = repr(redact_url(value))
            else:
                text = repr(value)
            shown.append(f"{spec.name}={text}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    def port(self, service: str) -> int:
        return int(self.addresses[service].rpartition(":")[2])

    def bind_address(self, service: str) -> str:
        return f"{self.bind_host}:{self.port(service)}"
