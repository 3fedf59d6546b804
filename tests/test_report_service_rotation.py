"""A master key rotation on report_service (the embedded default's `rotate_master_key`; the same
keyring reads CARDCHECK_RETIRED_MASTER_KEYS at scale): what was sealed and keyed under the old
key stays readable, new values are under the new key, `python -m report_service.rewrap` moves
the rest over, and then the old key can be destroyed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from cryptography.exceptions import InvalidTag

from cardcheck.runtime.keys import Keyring, load_keyring, load_master_key, rotate_master_key
from cardcheck.v1 import common_pb2
from report_service.audit import AuditChain
from tests.harness.report_service import status_is
from tests.harness.waiting import eventually

NOW = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def _rewrap(rig) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDCHECK_")}
    env["CARDCHECK_DATA_DIR"] = str(rig.tmp_path)
    if rig.database_url:
        env["CARDCHECK_DATABASE_URL"] = rig.database_url
    return subprocess.run(
        [sys.executable, "-m", "report_service.rewrap"], env=env, capture_output=True, text=True, timeout=120
    )


def _sealed(rig) -> dict[str, bytes]:
    values = {f"subject {q}": s for q, s in rig.rows("SELECT query_id, subject_sealed FROM rs_queries")}
    values |= {f"report {q}": k for q, k in rig.rows("SELECT query_id, wrapped_key FROM rs_reports")}
    values |= {
        f"cards {q}/{b}": c
        for q, b, c in rig.rows("SELECT query_id, bank_code, cards_sealed FROM rs_bank_outcomes")
        if c is not None
    }
    return values


async def _restart(rig) -> None:
    await rig.stop_report_service()
    await rig.start_report_service()


async def test_a_rotated_key_keeps_old_reports_readable_until_rewrap_moves_them_over(rig):
    old = await rig.create()
    await status_is(rig, old.query_id, common_pb2.QUERY_STATUS_READY)
    old_report = await rig.report(old.query_id)
    old_key = load_master_key(None, rig.tmp_path)

    retired_file = rotate_master_key(rig.tmp_path, NOW)
    await _restart(rig)
    assert (await rig.report(old.query_id)).SerializeToString() == old_report.SerializeToString()
    new = await rig.create(user="u-2", key="k-2")
    await status_is_for(rig, new.query_id, "u-2")
    store = rig.parts.store
    before = _sealed(rig)
    assert store.open_subject(old.query_id, before[f"subject {old.query_id}"]).id_number.endswith("1234")
    old_only = Keyring(old_key).sealer("subject")
    assert old_only.reseal(before[f"subject {old.query_id}"], old.query_id.encode()) is None  # under the old key
    with pytest.raises(InvalidTag):  # the new one is under the new key alone
        old_only.open(before[f"subject {new.query_id}"], new.query_id.encode())
    # The audit trail holds entries under both keys and verifies with the rotated keyring.
    keyring = load_keyring(None, None, rig.tmp_path)
    assert keyring.retired == 1
    assert AuditChain.from_keyring(keyring).verify_engine(rig.parts.db.engine).ok

    done = _rewrap(rig)
    assert done.returncode == 0, done.stdout + done.stderr
    changed = int(done.stdout.split(": ")[1].split()[0])
    after = _sealed(rig)
    moved = {name for name in before if before[name] != after[name]}
    assert changed == len(moved) and {f"subject {old.query_id}", f"report {old.query_id}"} <= moved
    assert not any(name.endswith(new.query_id) for name in moved)  # already under the new key
    again = _rewrap(rig)
    assert again.returncode == 0 and again.stdout.startswith("report_service: 0 rows rewrapped"), again.stdout

    retired_file.unlink()  # the old key destroyed
    shutil.rmtree(retired_file.parent)
    await _restart(rig)
    assert load_keyring(None, None, rig.tmp_path).retired == 0
    assert (await rig.report(old.query_id)).SerializeToString() == old_report.SerializeToString()
    assert (await rig.report(new.query_id, user="u-2")).summary
    assert AuditChain.from_keyring(load_keyring(None, None, rig.tmp_path)).verify_engine(rig.parts.db.engine).ok


async def status_is_for(rig, query_id: str, user: str) -> None:

    async def ready():
        return (await rig.get(query_id, user=user)).status == common_pb2.QUERY_STATUS_READY

    await eventually(ready)


def test_the_rewrap_command_needs_a_key_and_a_database_and_makes_neither(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDCHECK_")}
    env["CARDCHECK_DATA_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-m", "report_service.rewrap"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "no master key" in run.stderr
    load_master_key(None, tmp_path)
    run = subprocess.run([sys.executable, "-m", "report_service.rewrap"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "no report_service database" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]
