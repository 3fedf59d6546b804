"""Pass/fail criteria on a run's summary, as k6's thresholds: `journey.p99_ms<5000`.

The left side names a figure of summary.json: `STAGE.p50_ms` (p90_ms, p99_ms, max_ms) for a
stage, `errors` (all of them) or `errors.REASON` (0 when that reason never came),
`journeys.started`, `journeys.completed`, `rate.offered`, `rate.achieved`. The operator is one
of < <= > >= ==, the right side a number. A stage that recorded nothing fails every threshold
on it: a criterion that cannot be checked is not met."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

METRICS = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt,
}
_FORM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|==|<|>)\s*([-+0-9.eE]+)\s*$")


class ThresholdError(ValueError):
    pass


@dataclass(frozen=True)
class Threshold:
    text: str
    path: tuple[str, ...]
    op: str
    limit: float

    def value(self, summary: Mapping) -> float | None:
        head, *rest = self.path
        if head == "errors":
            errors = summary["errors"]
            return float(sum(errors.values()) if not rest else errors.get(rest[0], 0))
        if head in ("journeys", "rate"):
            return summary[head][rest[0]]
        return summary["stages"].get(head, {}).get(rest[0])

    def check(self, summary: Mapping) -> tuple[bool, float | None]:
        value = self.value(summary)
        return (value is not None and OPERATORS[self.op](value, self.limit)), value


def parse(text: str, stages: tuple[str, ...]) -> Threshold:
    """`stages`: the stage names summary.json has."""
    match = _FORM.match(text)
    if match is None:
        raise ThresholdError(f"threshold {text!r} is not NAME<NUMBER (e.g. journey.p99_ms<5000)")
    name, op, number = match.groups()
    try:
        limit = float(number)
    except ValueError:
        limit = math.nan
    if not math.isfinite(limit):
        raise ThresholdError(f"threshold {text!r}: {number!r} is not a number")
    path = tuple(name.split("."))
    head, rest = path[0], path[1:]
    if head == "errors" and len(rest) <= 1:
        pass
    elif head == "journeys" and rest in (("started",), ("completed",)):
        pass
    elif head == "rate" and rest in (("offered",), ("achieved",)):
        pass
    elif head in stages and len(rest) == 1 and rest[0] in METRICS:
        pass
    else:
        raise ThresholdError(
            f"threshold {text!r}: no figure {name!r} (STAGE.{'|'.join(METRICS)} with STAGE one of "
            f"{', '.join(stages)}; errors[.REASON]; journeys.started|completed; rate.offered|achieved)"
        )
    return Threshold(text.strip(), path, op, limit)
