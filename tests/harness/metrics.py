"""Scrapes of a service's /metrics for the tests, and `promtool check metrics` on them."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cardcheck.runtime.settings import METRICS_PORT_OFFSET


def scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        return answer.read().decode()


def metrics_port(grpc_address: str) -> int:
    return int(grpc_address.rpartition(":")[2]) + METRICS_PORT_OFFSET


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Each sample name's (labels, value) pairs."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def family_names(text: str) -> set[str]:
    """The exposed names (a counter with its _total, as in the `# TYPE` lines)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for got, v in samples(text).get(name, []) if labels.items() <= got.items())


def prometheus_binary(name: str = "promtool") -> str:
    """promtool or prometheus (Debian's `prometheus` package has both). Missing, the test fails
    in CI and is skipped elsewhere."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (apt-get install prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return found


def promtool() -> str:
    return prometheus_binary("promtool")


def promtool_check(text: str) -> None:
    """`promtool check metrics` finds nothing to say (names, units, help)."""
    checked = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (
        checked.stdout + checked.stderr
    )
