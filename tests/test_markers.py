"""tests/conftest.py marks each test by what it uses, so that `pytest -m "not e2e"` leaves out
every test that starts a process (however deep in its helpers) and keeps the in-process ones."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
KINDS = {"e2e", "postgres", "redis", "probe"}


def markers(*modules: str) -> dict[str, set[str]]:
    """Each test of the modules (`module.py::test[param]`) and the markers it is collected with."""

    class Collected:
        found: dict[str, set[str]] = {}

        def pytest_collection_finish(self, session) -> None:
            for item in session.items:
                name = f"{Path(item.fspath).name}::{item.name}"
                self.found[name] = {mark.name for mark in item.iter_markers()} & KINDS

    collected = Collected()
    paths = [str(TESTS / module) for module in modules]
    assert pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *paths], plugins=[collected]) == 0
    return collected.found


def test_each_test_is_marked_by_the_processes_and_servers_it_uses() -> None:
    found = markers(
        "test_client.py", "test_notifier_outage.py", "test_report_service_durability.py", "test_cli_keys.py",
        "test_gateway_limits.py", "test_deploy.py", "test_e2e.py", "test_report_service_migrations.py",
    )
    # In-process servers only.
    assert found["test_client.py::test_refusals_become_card_check_errors"] == set()
    assert found["test_deploy.py::test_manifests_hold[base-network]"] == set()  # kubectl renders, quickly
    # A process started by a class the fixture uses, by its base class, by a module helper.
    restarts = "test_notifier_outage.py::test_report_ready_sms_arrives_once_after_the_notifier_process_restarts"
    assert found[f"{restarts}[sqlite]"] == {"e2e"}
    assert found[f"{restarts}[postgres]"] == {"e2e", "postgres"}
    kill = "test_report_service_durability.py::test_kill_9_bank_connector_mid_query_then_start_it_again"
    assert found[f"{kill}[sqlite]"] == {"e2e"}
    assert found["test_cli_keys.py::test_rotate_refuses_a_configured_key_and_a_missing_one"] == {"e2e"}
    # A process of the shared harness (tests/harness/processes.py) the test makes itself.
    migrates = "test_report_service_migrations.py::test_the_service_migrates_its_database_when_it_starts"
    assert found[migrates] == {"e2e"}
    # A module's fixture parametrised onto PostgreSQL.
    assert found["test_e2e.py::test_the_journey_ends_in_the_report_the_banks_hold[postgres]"] == {"e2e", "postgres"}
    assert found["test_e2e.py::test_the_journey_ends_in_the_report_the_banks_hold[sqlite]"] == {"e2e"}
    assert found["test_deploy.py::test_the_image_command_starts_and_stops_each_service[postgres]"] == {
        "e2e", "postgres"
    }
    # The servers a test's fixtures reach.
    redis = [name for name, kinds in found.items() if name.startswith("test_gateway_limits.py") and "redis" in kinds]
    assert "test_gateway_limits.py::test_two_gateway_processes_hold_one_global_limit" in redis
    assert len(redis) >= 5
    assert all("e2e" not in kinds for name, kinds in found.items() if name.startswith("test_client.py"))
