"""The domain classes of a service on a real SQLite file of their own, migrated to the newest
schema, without any server: what tests of the rules themselves build."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.migrations import upgrade_to_head
from report_service import audit
from report_service.execution import ExecutionStore
from report_service.queries import IDEMPOTENCY_KEY, QueryStore
from report_service.reports import ReportVault
from report_service.storage import Storage

MASTER_KEY = bytes(range(32))


@contextmanager
def gateway_database(data_dir: Path) -> Iterator[Database]:
    """The gateway's SQLite file in `data_dir`, migrated."""
    db = Database(make_engine(None, data_dir, "gateway"))
    try:
        upgrade_to_head(db.engine, "gateway.migrations", "gateway")
        yield db
    finally:
        db.dispose()


@dataclass(frozen=True)
class ReportStores:
    queries: QueryStore
    execution: ExecutionStore
    storage: Storage
    clock: ManualClock


@contextmanager
def report_stores(
    data_dir: Path, clock: ManualClock, *, retention: timedelta = timedelta(days=7)
) -> Iterator[ReportStores]:
    """report_service's query and execution stores on its SQLite file in `data_dir`, migrated,
    keyed as report_service keys them (report_service/app.py)."""
    storage = Storage(Database(make_engine(None, data_dir, "report_service")))
    try:
        upgrade_to_head(storage.engine, "report_service.migrations", "report_service")
        keyring = Keyring(MASTER_KEY)
        queries = QueryStore(
            storage,
            keyring.sealer("subject"),
            ReportVault(keyring.sealer("report-kek")),
            clock,
            outcome_sealer=keyring.sealer("bank-outcome"),
            audit_chain=audit.AuditChain.from_keyring(keyring),
            idempotency_hash=keyring.hasher(IDEMPOTENCY_KEY),
            retention=retention,
        )
        execution = ExecutionStore(storage, queries, clock, lease=timedelta(seconds=30))
        yield ReportStores(queries, execution, storage, clock)
    finally:
        storage.close()
