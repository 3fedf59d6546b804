"""`cardcheck config`: every variable of every service, from the settings models that declare
them (cardcheck/runtime/declared.py): name, default, current value (secrets redacted), meaning.
docs/configuration.md is its `--format markdown --no-environment` output."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bank_connector.config import ConnectorConfig
from bank_sim.config import BankSimConfig
from cardcheck.runtime.declared import DeclaredSettings, Family, Internal, Number, Secret, marker
from cardcheck.runtime.settings import REDACTED, Settings, redact_url
from gateway.config import GatewayConfig
from notifier.config import NotifierConfig
from report_service.config import ReportServiceConfig

# What each service reads: the shared Settings, then its own model.
SERVICE_MODELS: dict[str, tuple[type[DeclaredSettings], ...]] = {
    "gateway": (Settings, GatewayConfig),
    "report_service": (Settings, ReportServiceConfig),
    "bank_connector": (Settings, ConnectorConfig),
    "notifier": (Settings, NotifierConfig),
    "bank_sim": (Settings, BankSimConfig),
}
# Declared by more than one service on purpose: each reads a value of its own (the gateway's Tencent
# Cloud key may call FaceID only, the notifier's only SMS), from its own Secret.
DECLARED_PER_SERVICE = frozenset({"CARDCHECK_TENCENT_SECRET_ID", "CARDCHECK_TENCENT_SECRET_KEY"})
DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
HEADER = """# Configuration

Every process reads `CARDCHECK_*` variables from its environment, besides the standard `OTEL_*`
ones. Each is declared once, in a settings model (`cardcheck/runtime/settings.py` for the shared
ones, `<service>/config.py` for a service's own), which gives its default, its meaning and its
checks: a malformed value stops the process at start with exit code 2 and a one-line message
naming the variable. An empty value counts as unset. `cardcheck config` lists them with the
values in the current environment (secrets redacted; `--service NAME` for one service).

This file is generated: `cardcheck config --format markdown --no-environment > docs/configuration.md`.
"""


@dataclass(frozen=True)
class Variable:
    name: str  # a family's open entries as a pattern: CARDCHECK_BANK_ADDR_<CODE>
    default: str
    meaning: str
    secret: bool = False
    prefix: str | None = None  # for a pattern, the text every such variable starts with


def _text(value: Any, number: Number | None = None) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta) and number is not None and number.unit is not None:
        value = value / number.unit
    if isinstance(value, float | int):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_text(v) for v in value)
    return str(value)


def variables(model: type[DeclaredSettings]) -> Iterator[Variable]:
    """The variables `model` reads, in declaration order."""
    for name, field in model.model_fields.items():
        if marker(field, Internal) is not None:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        shown = extra.get("shown_default", field.get_default(call_default_factory=True))
        family = marker(field, Family)
        secret = marker(field, Secret) is not None
        if family is None:
            yield Variable(model.variable(name), _text(shown, marker(field, Number)), field.description or "", secret)
        elif family.keys is None:
            head = family.template.partition("{}")[0]
            pattern = family.template.replace("{}", f"<{family.key_text}>")
            yield Variable(pattern, _text(shown) if shown else "–", field.description or "", secret, head)
        else:
            defaults, meanings = dict(family.defaults), dict(family.meanings)
            for key in family.keys:
                default = defaults.get(key, shown.get(key) if isinstance(shown, Mapping) else shown)
                yield Variable(
                    family.variable(key), _text(default) if default else "–",
                    meanings.get(key, field.description or ""), secret,
                )


def sections(services: Iterable[str]) -> list[tuple[str, list[Variable]]]:
    """The shared variables once, then each service's own."""
    out = [("shared (every service)", list(variables(Settings)))]
    for service in services:
        out += [(service, list(variables(m))) for m in SERVICE_MODELS[service] if m is not Settings]
    return out


def accepted() -> tuple[set[str], tuple[str, ...]]:
    """Every variable some service reads: exact names, and the prefixes of patterns."""
    found = [v for _, listed in sections(SERVICE_MODELS) for v in listed]
    return {v.name for v in found if v.prefix is None}, tuple(v.prefix for v in found if v.prefix)


def current(variable: Variable, env: Mapping[str, str]) -> str:
    """The variable's value in `env` ("" when unset), a secret redacted (a URL keeps all but its
    password)."""
    if variable.prefix is not None:
        set_ = sorted((k, v) for k, v in env.items() if k.startswith(variable.prefix) and v)
        return ", ".join(f"{k.removeprefix(variable.prefix)}={REDACTED if variable.secret else v}" for k, v in set_)
    value = env.get(variable.name) or ""
    if value and variable.secret:
        return redact_url(value) if "://" in value else REDACTED
    return value


def render(services: Sequence[str], env: Mapping[str, str], markdown: bool) -> str:
    lines = [HEADER] if markdown else []
    listing = sections(services)
    values = {v.name: current(v, env) for _, listed in listing for v in listed}
    for title, listed in listing:
        if markdown:  # a column of current values when the environment sets any
            lines += [f"## {title}", ""]
            if any(values.values()):
                lines += ["| variable | default | current | meaning |", "|---|---|---|---|"]
                lines += [f"| `{v.name}` | {v.default} | {values[v.name]} | {v.meaning} |" for v in listed]
            else:
                lines += ["| variable | default | meaning |", "|---|---|---|"]
                lines += [f"| `{v.name}` | {v.default} | {v.meaning} |" for v in listed]
            lines.append("")
        else:
            lines.append(f"[{title}]")
            for v in listed:
                shown = f"  (set: {values[v.name]})" if values[v.name] else ""
                lines += [f"{v.name} = {v.default}{shown}", f"    {v.meaning}"]
            lines.append("")
    return "\n".join(lines).rstrip("\n").replace("|  |", "| |") + "\n"


def add_parser(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="every CARDCHECK_* variable: default, current value, meaning")
    config.add_argument("--service", choices=sorted(SERVICE_MODELS), help="only the shared ones and this service's")
    config.add_argument("--format", choices=["text", "markdown"], default="text")
    config.add_argument("--no-environment", action="store_true", help="defaults only (how docs/configuration.md is made)")


def run(args: argparse.Namespace) -> int:
    services = [args.service] if args.service else list(SERVICE_MODELS)
    env = {} if args.no_environment else os.environ
    print(render(services, env, args.format == "markdown"), end="")
    return 0
