"""Which stages a journey runs. A journey kind is an ordered subset of STAGES, written
`register,query,watch,report`; a mix is one or more kinds with weights (`query,watch,report:3`),
and each arrival draws its kind by weight.

- `register` (RequestSmsCode REGISTER, Register) runs as a person not yet registered;
  `sign_in` (RequestSmsCode SIGN_IN, SignIn) as a provisioned user, signed in anew; a kind
  with neither starts with the provisioned user's session.
- `query` is RequestSmsCode QUERY_AUTH and SubmitQuery; `watch` follows the query to READY
  on WatchQuery; `report` reads it with GetReport (after `watch`: a report exists once READY).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

STAGES = ("register", "sign_in", "query", "watch", "report")
DEFAULT_KIND = "query,watch,report"


class MixError(ValueError):
    pass


@dataclass(frozen=True)
class JourneyKind:
    stages: tuple[str, ...]
    weight: float = 1.0

    @property
    def name(self) -> str:
        return ",".join(self.stages)

    @property
    def registers(self) -> bool:
        return "register" in self.stages

    def runs(self, stage: str) -> bool:
        return stage in self.stages


def parse_kind(text: str) -> JourneyKind:
    spec, colon, weight_text = text.strip().partition(":")
    weight = 1.0
    if colon:
        try:
            weight = float(weight_text)
        except ValueError:
            weight = float("nan")
        if not weight > 0 or weight == float("inf"):
            raise MixError(f"{text!r}: the weight after ':' must be a number above 0")
    stages = tuple(part.strip() for part in spec.split(",") if part.strip())
    if not stages:
        raise MixError(f"{text!r}: no stages (choose from {', '.join(STAGES)})")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise MixError(f"{text!r}: unknown stage {unknown[0]!r} (choose from {', '.join(STAGES)})")
    if len(set(stages)) != len(stages):
        raise MixError(f"{text!r}: a stage appears twice")
    if list(stages) != sorted(stages, key=STAGES.index):
        raise MixError(f"{text!r}: stages run in the order {','.join(STAGES)}")
    if "register" in stages and "sign_in" in stages:
        raise MixError(f"{text!r}: register already opens a session; drop sign_in")
    if ("watch" in stages or "report" in stages) and "query" not in stages:
        raise MixError(f"{text!r}: watch and report follow a query; add query")
    if "report" in stages and "watch" not in stages:
        raise MixError(f"{text!r}: report reads a READY query; add watch before it")
    return JourneyKind(stages, weight)


def parse_mix(texts: Sequence[str]) -> list[JourneyKind]:
    kinds = [parse_kind(text) for text in texts] or [parse_kind(DEFAULT_KIND)]
    names = [k.name for k in kinds]
    if len(set(names)) != len(names):
        raise MixError("a journey kind appears twice in --mix; give it one weight")
    return kinds


def choose(kinds: Sequence[JourneyKind], rng: random.Random) -> JourneyKind:
    if len(kinds) == 1:
        return kinds[0]
    return rng.choices(kinds, weights=[k.weight for k in kinds])[0]
