"""How report_service's units of work reach the database: reads and writes apart.

On PostgreSQL both are `Database.run` (one transaction in a worker thread). On the embedded
SQLite file, `make_engine` starts every transaction with BEGIN IMMEDIATE, reads included, so
concurrent units queue on SQLite's file lock, whose busy handler sleeps in growing steps (up to
100 ms) before it retries: under load that, not the work, is most of the latency. Here instead
writes run one after another on a single thread of their own (one process is SQLite's one
writer, so they never meet the lock), and reads run on their own connections in deferred
transactions, which in WAL mode see a consistent snapshot and never wait for a writer."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlmodel import Session

from cardcheck.runtime.database import Database

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
        # Deferred: a read snapshot, no write lock. Straight to the driver: a statement through
        # SQLAlchemy costs several times what it does there.
        connection.connection.dbapi_connection.execute("BEGIN")

    return engine


class Storage:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._sqlite = db.engine.dialect.name == "sqlite"
        self._reader = Database(_sqlite_reader(db.engine), serial=False) if self._sqlite else db
        self._writer = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="report_service-sqlite-writer")
            if self._sqlite
            else None
        )
        # The SQLite writer's one connection, kept from one unit to the next (used on its thread
        # only): checking it out of the pool and back in, with the pool's rollback on return,
        # cost about a third of a small unit.
        self._connection: Connection | None = None

    @property
    def engine(self) -> Engine:
        return self.db.engine

    async def write(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in one transaction that may write; committed if it returns."""
        if self._writer is None:
            return await self.db.run(work)
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._unit, work)

    def _unit(self, work: Callable[[Session], T]) -> T:
        connection = self._connection
        if connection is None or connection.closed or connection.invalidated:
            if connection is not None:
                connection.close()
            connection = self._connection = self.db.engine.connect()
        with Session(bind=connection, expire_on_commit=False) as session, session.begin():
            return work(session)

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def read(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in one transaction that only reads (refused on SQLite if it writes)."""
        return await self._reader.run(work)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.submit(self._close_connection)
            self._writer.shutdown(wait=True)
        if self._reader is not self.db:
            self._reader.dispose()
        self.db.dispose()
