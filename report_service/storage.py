"""How report_service's units of work reach the database: reads and writes apart.

On PostgreSQL both are `Database.run` (one transaction in a worker thread). On the embedded
SQLite file, `make_engine` starts every transaction with BEGIN IMMEDIATE, reads included, so
concurrent units queue on SQLite's file lock, whose busy handler sleeps in growing steps (up to
100 ms) before it retries: under load that, not the work, is most of the latency. Here instead
writes run one after another on a single thread of their own (one process is SQLite's one
writer, so they never meet the lock), and reads run on their own connections in deferred
transactions, which in WAL mode see a consistent snapshot and never wait for a writer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlmodel import Session

from cardcheck.runtime.database import Database, begin_sqlite

T = TypeVar("T")


def _sqlite_reader(writer: Engine) -> Engine:
    # Parameters hidden as make_engine hides them: a failed read puts no value in a log line.
    engine = create_engine(
        writer.url,
        hide_parameters=True,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=8,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # transactions are ours: BEGIN below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        begin_sqlite(connection, "BEGIN")  # deferred: a read snapshot, no write lock

    return engine


class Storage:
    def __init__(self, db: Database) -> None:
        self.db = db  # on SQLite, Database runs its units one after another on one thread
        self._sqlite = db.engine.dialect.name == "sqlite"
        self._reader = Database(_sqlite_reader(db.engine), serial=False) if self._sqlite else db

    @property
    def engine(self) -> Engine:
        return self.db.engine

    async def write(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in one transaction that may write; committed if it returns."""
        return await self.db.run(work)

    async def read(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in one transaction that only reads (refused on SQLite if it writes)."""
        return await self._reader.run(work)

    # Units of Core statements alone (changes announced on their connection are delivered once
    # they commit): no ORM session to set up and tear down, much of a short transaction's CPU.

    async def write_core(self, work: Callable[[Connection], T]) -> T:
        """As `write`, `work(connection)`."""
        return await self.db.run_core(work)

    async def read_core(self, work: Callable[[Connection], T]) -> T:
        """As `read`, `work(connection)`."""
        return await self._reader.run_core(work)

    def close(self) -> None:
        if self._reader is not self.db:
            self._reader.dispose()
        self.db.dispose()
