"""`cardcheck keys rotate` and `cardcheck keys rewrap` on the embedded default's data directory,
through the installed command (what each service's rewrap does to its rows is tested with that
service)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

from cardcheck.runtime.database import make_engine
from cardcheck.runtime.keys import load_master_key
from cardcheck.runtime.migrations import upgrade_to_head

CARDCHECK = Path(sys.executable).parent / "cardcheck"
STATEFUL = {"gateway": "gateway.migrations", "notifier": "notifier.migrations", "report_service": "report_service.migrations"}


def _cardcheck(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CARDCHECK_")}
    clean |= {"CARDCHECK_DATA_DIR": str(data_dir), **env}
    return subprocess.run([str(CARDCHECK), *args], env=clean, capture_output=True, text=True, timeout=120)


def _migrate(data_dir: Path, services=STATEFUL) -> None:
    for service in services:
        engine = make_engine(None, data_dir, service)
        try:
            upgrade_to_head(engine, STATEFUL[service], service)
        finally:
            engine.dispose()


def test_rotate_retires_the_key_and_rewrap_runs_every_service(tmp_path: Path) -> None:
    old = load_master_key(None, tmp_path)
    _migrate(tmp_path)
    rotated = _cardcheck(tmp_path, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    (retired,) = (tmp_path / "keys" / "retired").iterdir()
    assert base64.b64decode(retired.read_text()) == old
    assert load_master_key(None, tmp_path) != old

    done = _cardcheck(tmp_path, "keys", "rewrap")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["gateway", "notifier", "report_service"]
    assert "can be destroyed" in lines[-1]


def test_rewrap_stops_at_a_service_that_cannot_run(tmp_path: Path) -> None:
    load_master_key(None, tmp_path)
    _migrate(tmp_path, ["gateway"])  # no notifier database yet
    done = _cardcheck(tmp_path, "keys", "rewrap")
    assert done.returncode == 2
    assert "no notifier database" in done.stderr and "report_service:" not in done.stdout
    assert not (tmp_path / "notifier.db").exists()


def test_rotate_refuses_a_configured_key_and_a_missing_one(tmp_path: Path) -> None:
    configured = _cardcheck(tmp_path, "keys", "rotate", CARDCHECK_MASTER_KEY=base64.b64encode(bytes(32)).decode())
    assert configured.returncode == 2 and "CARDCHECK_RETIRED_MASTER_KEYS" in configured.stderr
    missing = _cardcheck(tmp_path, "keys", "rotate")
    assert missing.returncode == 2 and "no master key" in missing.stderr
    assert not (tmp_path / "keys").exists()
