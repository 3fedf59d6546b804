"""deploy/observability: the alert rules pass promtool and its unit tests (one for every alert),
the PrometheusRule holds the same groups, and the dashboard asks only for documented metrics.
tests/test_e2e.py runs a real Prometheus on them against a real mesh."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.harness.metrics import promtool

ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "deploy" / "observability"
RULES = OBSERVABILITY / "rules.yml"
RULE_TESTS = OBSERVABILITY / "rules.test.yml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\b(?:grpc|cardcheck)_[a-z_]+\b|\bcardcheck:[a-z_:0-9]+\b")


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def alerts() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every dashboard target."""
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] if p["type"] != "row" for t in p["targets"]]


def test_the_rules_pass_promtool_and_their_unit_tests() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool, "test", "rules", RULE_TESTS.name], cwd=OBSERVABILITY, capture_output=True, text=True, timeout=120
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_that_makes_it_fire() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    names = [rule["alert"] for rule in alerts()]
    assert len(names) >= 9 and sorted(fired) == sorted(names)
    for rule in alerts():
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_prometheus_rule_holds_the_same_groups() -> None:
    resource = yaml.safe_load((OBSERVABILITY / "prometheus-rule.yaml").read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1" and resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == rule_groups()


def test_the_dashboard_has_the_panels_and_asks_for_documented_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    rows = {p["title"] for p in board["panels"] if p["type"] == "row"}
    assert {"The journey", "Banks", "Shedding and limits", "The outbox", "Saturation"} <= rows
    documented = set(re.findall(r"^\| `([a-z_:]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M))
    recorded = {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}
    queried = [(title, expr) for title, expr in dashboard_queries()]
    queried += [(rule["alert"], rule["expr"]) for rule in alerts()]
    for title, expr in queried:
        for name in METRIC_NAME.findall(re.sub(r"\{[^}]*\}|\bby \([^)]*\)", "", expr)):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in documented or base in documented or name in recorded, (title, name)


