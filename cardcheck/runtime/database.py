"""Storage through SQLModel: a SQLite file per service under CARDCHECK_DATA_DIR by default,
or the database CARDCHECK_DATABASE_URL names (PostgreSQL at scale). The same code runs on both.

Engines hide statement parameters, so a failed statement never puts a value in a log line. The
data directory is 0700 and each SQLite file (with its -wal and -shm) 0600."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Engine, Result, Table, event, inspect
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, SQLModel, create_engine

from cardcheck.runtime.files import private_directory, private_file, tighten_if_present
from cardcheck.runtime.statements import Rows

T = TypeVar("T")
U = TypeVar("U")  # what a unit of work is given: a Session or a Connection


def table_of(model: type[SQLModel]) -> Table:
    """The table a `table=True` model maps to (SQLModel sets `__table__` without declaring it)."""
    table = inspect(model).local_table
    assert isinstance(table, Table)
    return table


def rowcount(result: Result[Any] | Rows) -> int:
    """The rows an UPDATE or DELETE matched. SQLModel types every `session.execute` as a plain
    Result; for these statements it is a CursorResult."""
    if isinstance(result, Rows):
        return result.rowcount
    return cast(CursorResult[Any], result).rowcount


_AFTER_COMMIT = "cardcheck.after_commit"  # Connection.info: what a Core unit runs once committed


def after_commit(connection: Connection, callback: Callable[[], None]) -> None:
    """Runs `callback` (on the unit's thread) once the transaction of the Core unit
    (`Database.run_core`) that `connection` belongs to has committed; never if it rolls back."""
    callbacks = connection.info.get(_AFTER_COMMIT)
    if callbacks is None:
        raise RuntimeError("after_commit outside a unit of Database.run_core")
    callbacks.append(callback)


@contextmanager
def _committing(connection: Connection) -> Iterator[None]:
    """A Core unit's transaction on `connection`, its after_commit callbacks run once it committed."""
    callbacks: list[Callable[[], None]] = []
    with connection.begin():
        connection.info[_AFTER_COMMIT] = callbacks
        try:
            yield
        finally:
            del connection.info[_AFTER_COMMIT]
    for callback in callbacks:
        callback()


def _make_private(path: Path) -> None:
    """The file made 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
    database file's mode. Ones made looser earlier are tightened (cardcheck.runtime.files)."""
    private_directory(path.parent)
    private_file(path)
    for companion in ("-wal", "-shm", "-journal"):
        tighten_if_present(path.with_name(path.name + companion))


def _sqlite_engine(path: Path) -> Engine:
    engine = create_engine(
        f"sqlite:///{path}",
        hide_parameters=True,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=8,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # Take transactions into our own hands (pysqlite's implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # One writer at a time, decided when the transaction starts: a deferred transaction
        # that later upgrades to a write can fail at once with "database is locked".
        begin_sqlite(connection, "BEGIN IMMEDIATE")

    return engine


def begin_sqlite(connection: Connection, statement: str) -> None:
    """A SQLite transaction begun with `statement` (BEGIN, BEGIN IMMEDIATE) sent on the driver's
    own connection: through SQLAlchemy's execution (events, a cursor, a result) it cost as much
    as a small statement, on every transaction. A failure is raised as SQLAlchemy's would be
    (OperationalError for a lock that timed out)."""
    try:
        connection.connection.driver_connection.execute(statement)  # type: ignore[union-attr]
    except sqlite3.Error as error:
        raise DBAPIError.instance(statement, None, error, sqlite3.Error) from error


def make_engine(database_url: str | None, data_dir: Path, service: str, *, private: bool = True) -> Engine:
    """`private`: make the SQLite file (and its directory) private first; the offline commands,
    which change only what they are for, open the file as they find it."""
    if database_url:
        return create_engine(database_url, hide_parameters=True, pool_pre_ping=True, pool_size=10, max_overflow=10)
    path = data_dir / f"{service}.db"
    if private:
        _make_private(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return _sqlite_engine(path)


class Database:
    """An engine plus the one way services use it: a unit of work run off the event loop.

    On SQLite (one writer per file, and every transaction begun IMMEDIATE), units run one after
    another on a thread of their own: run side by side on several threads they only queue on
    the file lock, whose busy handler sleeps in growing steps (up to 100 ms) before it retries,
    and under load that sleeping, not the work, was most of a call's latency. `serial=False`
    keeps the thread pool (read-only connections, which never take the lock)."""

    def __init__(self, engine: Engine, *, serial: bool | None = None) -> None:
        self.engine = engine
        if serial is None:
            serial = engine.dialect.name == "sqlite"
        self._serial = _SerialWorker("sqlite-unit") if serial else None
        self._held: Connection | None = None  # the serial worker's connection

    def create_tables(self, models: Iterable[type[SQLModel]]) -> None:
        SQLModel.metadata.create_all(self.engine, tables=[table_of(m) for m in models])

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    def _run(self, work: Callable[[Session], T]) -> T:
        with self.session() as session:
            return work(session)

    def _run_core(self, work: Callable[[Connection], T]) -> T:
        with self.engine.connect() as connection, _committing(connection):
            return work(connection)

    async def run(self, work: Callable[[Session], T]) -> T:
        """Runs `work(session)` in one transaction in a worker thread; commits if it returns."""
        if self._serial is None:
            return await asyncio.to_thread(self._run, work)
        return await self._serial.run(self._run_held, work)

    async def run_core(self, work: Callable[[Connection], T]) -> T:
        """As `run`, on a Core connection: for work of Core statements alone, which then pays
        no ORM session to set up and tear down (much of a short transaction's CPU)."""
        if self._serial is None:
            return await asyncio.to_thread(self._run_core, work)
        return await self._serial.run(self._run_core_held, work)

    def _held_connection(self) -> Connection:
        """The serial worker's one connection, kept from one unit to the next: a checkout from
        the pool and its return (with the rollback the pool resets a connection with) on every
        unit cost a quarter of a small one."""
        connection = self._held
        if connection is None or connection.closed or connection.invalidated:
            if connection is not None:
                connection.close()
            connection = self._held = self.engine.connect()
        return connection

    def _run_held(self, work: Callable[[Session], T]) -> T:
        """`_run` on the held connection. The session begins the connection's transaction and
        commits it itself: its after_commit hooks (change notifications) must run once the
        commit is visible to other connections, not before."""
        with Session(bind=self._held_connection(), expire_on_commit=False) as session:
            with session.begin():
                return work(session)

    def _run_core_held(self, work: Callable[[Connection], T]) -> T:
        """`_run_core` on the held connection."""
        connection = self._held_connection()
        with _committing(connection):
            return work(connection)

    def dispose(self) -> None:
        if self._serial is not None:
            self._serial.shutdown()
        if self._held is not None:
            self._held.close()
            self._held = None
        self.engine.dispose()


class _SerialWorker:
    """One thread that runs calls one after another, each with its caller's context (as
    asyncio.to_thread would: the current span, say). What a ThreadPoolExecutor of one thread
    and run_in_executor did, with less work per call on the event loop: no concurrent Future, no
    lock, no chaining of two futures. A call whose caller was cancelled before it started is not
    run; one under way runs to its end (its transaction commits or rolls back whole). Calls
    still queued at interpreter exit are run first, as the executor's were."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]] | None]
        self._calls = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)

    async def run(self, function: Callable[[Callable[[U], T]], T], work: Callable[[U], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, future, functools.partial(contextvars.copy_context().run, function, work)))
        return await future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, function = call
            if future.cancelled():
                continue
            try:
                result = function()
            except BaseException as error:
                _settle(loop, future.set_exception, future, error)
            else:
                _settle(loop, future.set_result, future, result)

    def shutdown(self) -> None:
        """Runs the calls queued, then ends the thread."""
        atexit.unregister(self.shutdown)
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()


def _settle(loop: asyncio.AbstractEventLoop, settle: Callable[[Any], None], future: asyncio.Future[Any], value: Any) -> None:
    def settled() -> None:
        if not future.cancelled():
            settle(value)

    with contextlib.suppress(RuntimeError):  # the loop closed first: nobody waits for it
        loop.call_soon_threadsafe(settled)
