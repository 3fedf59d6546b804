"""Every setting declared once: the settings models are what the services read, what `cardcheck
config` lists and what docs/configuration.md says."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bank_sim.process import clean_env, free_port
from cardcheck.cli.config import DECLARED_PER_SERVICE, DOCUMENT, SERVICE_MODELS, accepted, render, variables
from cardcheck.runtime.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted({m for models in SERVICE_MODELS.values() for m in models}, key=lambda m: m.__name__)


def cardcheck_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in clean_env(ROOT / "var").items() if k != "CARDCHECK_DATA_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "cardcheck.cli.main", "config", *args],
        cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60,
    )


def test_the_documentation_is_what_the_declarations_say():
    assert DOCUMENT.read_text() == render(list(SERVICE_MODELS), {}, markdown=True), (
        "docs/configuration.md drifted: cardcheck config --format markdown --no-environment > docs/configuration.md"
    )


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_declared_variable_is_read(model):
    """A junk value in each declared variable is refused naming it, or read (the model differs
    from its defaults): no declaration names a variable nobody reads."""
    default = model.from_env({})
    for variable in variables(model):
        name = variable.name.replace("<CODE>", "ICBC")
        try:
            read = model.from_env({name: "not-a-value"})
        except SettingsError as error:
            assert name in str(error) and "\n" not in str(error)
        else:
            assert read != default, f"{name} is declared but changes nothing"


def test_the_accepted_variables_are_the_declared_ones():
    exact, prefixes = accepted()
    assert {"CARDCHECK_GATEWAY_ADDR", "CARDCHECK_SMS_CAP_SMS_CODE", "CARDCHECK_BANK_RETRY_MAX_ATTEMPTS",
            "CARDCHECK_REPORT_RETENTION_DAYS", "CARDCHECK_BANK_SIM_PORT_PER_BANK"} <= exact
    assert "CARDCHECK_SHUTDOWN_GRACE" not in exact and set(prefixes) == {
        "CARDCHECK_BANK_ADDR_", "CARDCHECK_BANK_CONCURRENCY_", "CARDCHECK_BANK_TLS_DIR_"
    }
    declared = Counter(v.name for m in MODELS for v in variables(m) if v.prefix is None)
    # No name twice, but for a value each service holds of its own (say, its own API key).
    assert {name for name, times in declared.items() if times > 1} == DECLARED_PER_SERVICE
    assert exact == set(declared)


def test_config_lists_every_variable_with_current_values_and_no_secret():
    master, password, secret = "bWFzdGVyLWtleS1iYXNlNjQ=", "Pg-Pass-1f2e", "webhook-secret-0123456789"
    result = cardcheck_config(env={
        "CARDCHECK_MASTER_KEY": master,
        "CARDCHECK_DATABASE_URL": f"postgresql+psycopg://cardcheck:{password}@db.internal/cardcheck",
        "CARDCHECK_SMS_WEBHOOK_SECRET": secret,
        "CARDCHECK_SUBMIT_GLOBAL_RPS": "25",
        "CARDCHECK_BANK_ADDR_ICBC": "10.1.2.3:443",
    })
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for model in MODELS:
        for variable in variables(model):
            assert variable.name in out
    assert "CARDCHECK_SUBMIT_GLOBAL_RPS = 50  (set: 25)" in out
    assert "(set: postgresql+psycopg://cardcheck:***@db.internal/cardcheck)" in out
    assert "ICBC=10.1.2.3:443" in out
    assert master not in out and password not in out and secret not in out
    assert "CARDCHECK_MASTER_KEY = –  (set: ***)" in out


def test_config_narrows_to_one_service_and_prints_markdown():
    result = cardcheck_config("--service", "notifier", "--format", "markdown", env={"CARDCHECK_SMS_RETRY_MAX_S": "600"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "## notifier" in out and "## gateway" not in out and "CARDCHECK_SUBMIT_GLOBAL_RPS" not in out
    assert "| `CARDCHECK_SMS_RETRY_MAX_S` | 300 | 600 |" in out and "| `CARDCHECK_BIND_HOST` | 127.0.0.1 | |" in out
    assert cardcheck_config("--service", "nosuch").returncode == 2


def test_the_cli_and_the_models_agree_on_defaults():
    shown = {v.name: v.default for v in variables(Settings)}
    assert shown["CARDCHECK_PER_BANK_TIMEOUT_S"] == f"{Settings().per_bank_timeout_s:g}"
    assert shown["CARDCHECK_NOTIFIER_ADDR"] == Settings().addresses["notifier"]


@pytest.mark.parametrize(
    ("module", "env"),
    [
        ("report_service", {"CARDCHECK_REPORT_LEASE_S": "soon"}),
        ("bank_connector", {"CARDCHECK_BANK_BREAKER_WINDOW": "0"}),
        ("notifier", {"CARDCHECK_SMS_CAP_REPORT_READY": "lots"}),
    ],
)
def test_a_malformed_value_stops_the_service_with_one_line_naming_it(tmp_path, module, env):
    result = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=clean_env(tmp_path, **{f"CARDCHECK_{module.upper()}_ADDR": f"127.0.0.1:{free_port()}"}, **env),
    )
    (variable,) = env
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{module}: {variable}=")
