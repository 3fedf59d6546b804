"""What `cardcheck up` leaves on disk, as real processes write it: a data directory only its
user can enter, keys, SQLite files and span files only it can read; and, once a report is
deleted by the retention sweep, an audit trail that holds none of what the report said and
still verifies."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time

from cardcheck.cli.demo import walk
from tests.probes.conftest import journey_of, registrable_people

RETENTION_S = 8
MESH_ENV = {
    # Reports deleted seconds after they are generated, swept every second.
    "CARDCHECK_REPORT_RETENTION_DAYS": str(RETENTION_S / 86400),
    "CARDCHECK_REPORT_SWEEP_S": "1",
}
HARNESS_FILES = {"up.log"}  # written by the test harness, not by the mesh


def _rows(path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


async def test_a_deleted_reports_counts_are_not_in_the_audit_trail_and_the_data_dir_is_private(probe_mesh):
    person = registrable_people()[11]
    async with journey_of(probe_mesh, person) as journey:
        report = await walk(journey)
    assert any(s.debit_count or s.credit_count for s in report.summary)  # the report had counts

    db = probe_mesh.data_dir / "report_service.db"
    deadline = time.monotonic() + RETENTION_S + 30
    while _rows(db, "SELECT count(*) FROM rs_reports") != [(0,)]:
        assert time.monotonic() < deadline, "the retention sweep did not delete the report"
        await asyncio.sleep(0.5)
    events = _rows(db, "SELECT event, details FROM rs_audit ORDER BY seq")
    assert [e for e, _ in events][-1] == "report.deleted"
    for event, details in events:
        parsed = json.loads(details)
        assert not {"cards", "banks_answered", "unavailable"} & set(parsed), (event, parsed)
        assert [k for k, v in parsed.items() if isinstance(v, int)] in ([], ["pass"]), (event, parsed)
    verified = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cardcheck.cli.main", "audit", "verify"],
        env=probe_mesh.env, capture_output=True, text=True, timeout=60,
    )
    assert verified.returncode == 0 and "audit trail OK" in verified.stdout, verified.stdout + verified.stderr
    assert "still hold" not in verified.stdout

    looser = []
    for root, dirs, files in os.walk(probe_mesh.data_dir):
        for name in dirs:
            path = os.path.join(root, name)
            if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                looser.append((path, oct(stat.S_IMODE(os.stat(path).st_mode))))
        for name in files:
            path = os.path.join(root, name)
            if name not in HARNESS_FILES and stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                looser.append((path, oct(stat.S_IMODE(os.stat(path).st_mode))))
    assert stat.S_IMODE(probe_mesh.data_dir.stat().st_mode) == 0o700
    for expected in ("keys/master.key", "report_service.db", "gateway.db", "notifier.db", "spans"):
        assert (probe_mesh.data_dir / expected).exists(), expected
    assert looser == []
