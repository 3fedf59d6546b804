"""How each simulated bank behaves beyond its data: latency (fixed or lognormal), errors, hangs,
being down, malformed answers and a capacity of concurrent calls. Set at start (a fixed latency
for every bank, a profile file) and changed at runtime. No gRPC here."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from cardcheck.banks import BANK_CODES, BY_CODE

# Status codes a bank may be told to fail with (names of grpc.StatusCode, no OK).
ERROR_CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})
Z99 = 2.3263478740408408  # the standard normal's 99th percentile


class BehaviourError(ValueError):
    """A behaviour that cannot be: `field` names what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Behaviour:
    latency_ms: float = 0.0
    latency_p99_ms: float = 0.0  # above latency_ms: lognormal with median latency_ms and this p99
    error_rate: float = 0.0
    error_code: str = "UNAVAILABLE"
    hang_rate: float = 0.0
    down: bool = False
    malformed_rate: float = 0.0
    capacity: int = 0  # 0 = no limit

    def __post_init__(self) -> None:
        for name in ("latency_ms", "latency_p99_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise BehaviourError(name, "must be a finite number of milliseconds, not negative")
        for name in ("error_rate", "hang_rate", "malformed_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise BehaviourError(name, "must be between 0 and 1")
        if self.error_code not in ERROR_CODES:
            raise BehaviourError("error_code", "must name a gRPC status code other than OK")
        if self.capacity < 0:
            raise BehaviourError("capacity", "must not be negative")

    @property
    def lognormal(self) -> bool:
        return self.latency_p99_ms > self.latency_ms > 0

    def changed(self, changes: Mapping[str, object]) -> Behaviour:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise BehaviourError(unknown[0], "no such behaviour")
        typed: dict[str, Any] = {}
        for f in fields(self):
            if f.name in changes:
                typed[f.name] = _typed(f.name, changes[f.name], type(getattr(self, f.name)))
        return replace(self, **typed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _typed(name: str, value: object, kind: type) -> object:
    if kind is bool:
        if not isinstance(value, bool):
            raise BehaviourError(name, "must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BehaviourError(name, "must be a whole number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BehaviourError(name, "must be a number")
        return float(value)
    if not isinstance(value, str):
        raise BehaviourError(name, "must be a string")
    return value


def starting_behaviours(
    latency_ms: float | None = None, profile: Mapping[str, object] | None = None
) -> dict[str, Behaviour]:
    """Every bank's behaviour at start: a fixed latency for all (if given), then the profile's
    `default` section, then its per-bank sections (`banks`: {code: {...}})."""
    base = Behaviour(latency_ms=float(latency_ms)) if latency_ms is not None else Behaviour()
    profile = profile or {}
    unknown = sorted(set(profile) - {"default", "banks"})
    if unknown:
        raise BehaviourError(unknown[0], "a profile has only `default` and `banks`")
    default = profile.get("default", {})
    if not isinstance(default, dict):
        raise BehaviourError("default", "must be an object")
    base = base.changed(default)
    per_bank = profile.get("banks", {})
    if not isinstance(per_bank, dict):
        raise BehaviourError("banks", "must be an object of bank code to behaviour")
    behaviours = {code: base for code in BANK_CODES}
    for code, changes in per_bank.items():
        if code not in BY_CODE:
            raise BehaviourError(f"banks.{code}", "unknown bank code")
        if not isinstance(changes, dict):
            raise BehaviourError(f"banks.{code}", "must be an object")
        try:
            behaviours[code] = base.changed(changes)
        except BehaviourError as error:
            raise BehaviourError(f"banks.{code}.{error.field}", error.problem) from None
    return behaviours


def load_profile(path: str | Path) -> dict[str, object]:
    """A profile file (JSON). OSError when unreadable, BehaviourError when malformed."""
    try:
        profile = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BehaviourError("profile", f"not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(profile, dict):
        raise BehaviourError("profile", "must be a JSON object")
    return profile


class Refused(Exception):
    """The bank turns the call away before handling it; `code` is a grpc status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Plan:
    """What becomes of one admitted call."""

    delay_s: float
    hang: bool
    error_code: str | None
    malformed: bool

    async def wait(self) -> None:
        """The bank's latency; forever for a call that hangs (until the caller gives up)."""
        if self.hang:
            await asyncio.Event().wait()
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)


@dataclass
class BankCounters:
    calls: int = 0
    lookup_calls: int = 0  # of which LookupCards (an ID number and a name)
    verify_calls: int = 0  # of which VerifyCard (a full card number, name, ID number, phone)
    refused: int = 0
    failed: int = 0
    in_flight: int = 0


class BankFloor:
    """The banks' current behaviours and call counters; every call enters and leaves through
    it. Random draws come from one seeded generator, so a run can be repeated."""

    def __init__(self, behaviours: Mapping[str, Behaviour], *, seed: int = 0) -> None:
        self._start = {code: behaviours.get(code, Behaviour()) for code in BANK_CODES}
        self._current = dict(self._start)
        self._counters = {code: BankCounters() for code in BANK_CODES}
        self._rng = random.Random(seed)

    def behaviour(self, bank: str) -> Behaviour:
        return self._current[bank]

    def counters(self, bank: str) -> BankCounters:
        return self._counters[bank]

    def set(self, banks: Iterable[str], changes: Mapping[str, object], *, reset: bool = False) -> None:
        """Applies `changes` to every bank named (validated for all before any changes)."""
        banks = list(banks)
        updated = {code: (self._start[code] if reset else self._current[code]).changed(changes) for code in banks}
        self._current.update(updated)

    def enter(self, bank: str, rpc: str) -> Plan:
        """Admits one call of `rpc` (LookupCards or VerifyCard; or raises Refused) and draws
        what becomes of it. Every call is counted, in `calls` and in its RPC's own counter,
        refused ones too: what it carried reached the bank. Every admitted call must `leave`
        exactly once."""
        behaviour = self._current[bank]
        counters = self._counters[bank]
        if rpc == "VerifyCard":
            counters.verify_calls += 1
        elif rpc == "LookupCards":
            counters.lookup_calls += 1
        else:
            raise ValueError(f"no such IssuingBank RPC {rpc!r}")
        counters.calls += 1
        if behaviour.down:
            counters.failed += 1
            raise Refused("UNAVAILABLE", "bank is down")
        if behaviour.capacity and counters.in_flight >= behaviour.capacity:
            counters.refused += 1
            raise Refused("RESOURCE_EXHAUSTED", "bank is at capacity")
        counters.in_flight += 1
        rng = self._rng
        hang = behaviour.hang_rate > 0 and rng.random() < behaviour.hang_rate
        error = behaviour.error_rate > 0 and rng.random() < behaviour.error_rate
        if error:
            counters.failed += 1
        malformed = behaviour.malformed_rate > 0 and rng.random() < behaviour.malformed_rate
        return Plan(self._delay_s(behaviour), hang, behaviour.error_code if error else None, malformed)

    def leave(self, bank: str) -> None:
        self._counters[bank].in_flight -= 1

    def _delay_s(self, behaviour: Behaviour) -> float:
        if not behaviour.lognormal:
            return behaviour.latency_ms / 1000
        mu = math.log(behaviour.latency_ms)
        sigma = (math.log(behaviour.latency_p99_ms) - mu) / Z99
        return self._rng.lognormvariate(mu, sigma) / 1000
