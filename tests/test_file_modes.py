"""The data directory is 0700 and everything sensitive in it 0600: keys (current and retired),
each service's SQLite file with its -wal and -shm, span files. Made so whatever the umask, and
tightened (and logged) when found looser at start. Real files, real SQLite."""

from __future__ import annotations

import contextlib
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from cardcheck.runtime.database import make_engine
from cardcheck.runtime.keys import load_keyring, rotate_master_key
from cardcheck.runtime.telemetry import make_tracer_provider


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def _umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _use_sqlite(data_dir: Path, service: str) -> None:
    """Opens the service's SQLite file and writes to it, so SQLite makes its -wal and -shm."""
    engine = make_engine(None, data_dir, service)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t (x TEXT)"))
            conn.execute(sa.text("INSERT INTO t VALUES ('a')"))
        for companion in ("-wal", "-shm"):  # still open: WAL mode keeps them while connected
            assert (data_dir / f"{service}.db{companion}").exists()
            assert _mode(data_dir / f"{service}.db{companion}") == 0o600, companion
    finally:
        engine.dispose()


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_a_fresh_data_directory_is_private_whatever_the_umask(tmp_path, umask):
    data_dir = tmp_path / "var"
    with _umask(umask):
        keyring = load_keyring(None, None, data_dir)
        _use_sqlite(data_dir, "report_service")
        provider = make_tracer_provider("gateway", data_dir, env={})
        with provider.get_tracer("t").start_as_current_span("s"):
            pass
        provider.shutdown()
        retired = rotate_master_key(data_dir, datetime(2026, 3, 2, tzinfo=UTC))
    assert keyring.retired == 0
    assert _mode(data_dir) == 0o700
    assert _mode(data_dir / "keys") == 0o700 and _mode(data_dir / "keys" / "retired") == 0o700
    assert _mode(data_dir / "keys" / "master.key") == 0o600 and _mode(retired) == 0o600
    assert _mode(data_dir / "report_service.db") == 0o600
    assert _mode(data_dir / "spans") == 0o700
    spans = data_dir / "spans" / "gateway.jsonl"
    assert spans.read_text() and _mode(spans) == 0o600
    assert not list((data_dir / "keys").glob("*.tmp"))  # the candidate key file went


def test_a_data_directory_found_looser_is_tightened_and_logged(tmp_path, caplog):
    data_dir = tmp_path / "var"
    with _umask(0o022):
        load_keyring(None, None, data_dir)
        rotate_master_key(data_dir, datetime(2026, 3, 2, tzinfo=UTC))
        _use_sqlite(data_dir, "notifier")
    loose = {
        data_dir: 0o755,
        data_dir / "keys": 0o755,
        data_dir / "keys" / "retired": 0o775,
        data_dir / "keys" / "master.key": 0o644,
        **{path: 0o644 for path in (data_dir / "keys" / "retired").glob("*.key")},
        data_dir / "notifier.db": 0o644,
    }
    (data_dir / "notifier.db-wal").touch()
    loose[data_dir / "notifier.db-wal"] = 0o666
    for path, mode in loose.items():
        path.chmod(mode)
    caplog.set_level("WARNING", logger="cardcheck.runtime.files")

    load_keyring(None, None, data_dir)  # what every service does at start
    make_engine(None, data_dir, "notifier").dispose()

    for path in loose:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path
    logged = [r.getMessage() for r in caplog.records]
    for path, mode in loose.items():
        assert any(m.startswith(f"{path} was mode {mode:o}") for m in logged), path


def test_only_the_data_directory_itself_is_made_private(tmp_path):
    from cardcheck.runtime.files import private_directory

    with _umask(0o022):
        made = private_directory(tmp_path / "a" / "var")
    assert _mode(made) == 0o700
    assert _mode(tmp_path / "a") == 0o755  # the operator's directories above are left alone
