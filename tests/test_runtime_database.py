"""Database: units of work in one transaction each, off the event loop; on SQLite one after
another on one thread and one connection kept between them. And the change notification on
top of it: waiters wake once a change's transaction has committed, never for one rolled back."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from cardcheck.runtime.changes import ChangeHub
from cardcheck.runtime.database import Database, after_commit, make_engine

NOTES = sa.Table("notes", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), sa.Column("text", sa.String))


@pytest.fixture
def db(tmp_path, database_url):
    database = Database(make_engine(database_url, tmp_path, "notes"))
    NOTES.create(database.engine)
    try:
        yield database
    finally:
        NOTES.drop(database.engine)
        database.dispose()


def _count(db: Database) -> int:
    """Rows seen from a connection of its own, as a reader or another replica would (a plain
    driver read: on SQLite it neither takes nor waits for the write lock)."""
    other = db.engine.raw_connection()
    try:
        cursor = other.cursor()
        cursor.execute("SELECT count(*) FROM notes")
        (count,) = cursor.fetchone()
        cursor.close()
        other.rollback()
        return count
    finally:
        other.close()


async def test_after_commit_hooks_run_once_the_commit_is_visible(db):
    # Change notifications wake waiters from after_commit: a waiter that reads then must see
    # what woke it, or it sleeps until its safety poll.
    seen_at_commit: list[int] = []

    def write(session) -> None:
        event.listen(session, "after_commit", lambda _s: seen_at_commit.append(_count(db)), once=True)
        session.execute(sa.insert(NOTES), {"text": "one"})

    for expected in (1, 2):  # the second on the connection the first left behind
        await db.run(write)
        assert seen_at_commit[-1] == expected


async def test_a_core_units_after_commit_callbacks_run_once_the_commit_is_visible(db):
    seen_at_commit: list[int] = []

    def write(connection) -> None:
        after_commit(connection, lambda: seen_at_commit.append(_count(db)))
        connection.execute(sa.insert(NOTES), {"text": "one"})

    def fail(connection) -> None:
        after_commit(connection, lambda: seen_at_commit.append(-1))
        raise ValueError("no")

    for expected in (1, 2):  # the second on the connection the first left behind (SQLite)
        await db.run_core(write)
        assert seen_at_commit == list(range(1, expected + 1))
    with pytest.raises(ValueError):
        await db.run_core(fail)
    await db.run_core(lambda connection: None)
    assert seen_at_commit == [1, 2]  # rolled back: never run, nor left for the next unit
    with pytest.raises(RuntimeError, match="outside a unit"):
        with db.engine.connect() as connection:
            after_commit(connection, lambda: None)


async def test_a_unit_that_raises_leaves_nothing_and_the_next_one_runs(db):
    def half_then_fail(session) -> None:
        session.execute(sa.insert(NOTES), {"text": "half"})
        raise ValueError("no")

    with pytest.raises(ValueError):
        await db.run(half_then_fail)
    with pytest.raises(ValueError):
        await db.run_core(lambda connection: half_then_fail(connection))
    assert _count(db) == 0
    await db.run_core(lambda connection: connection.execute(sa.insert(NOTES), {"text": "whole"}))
    assert await db.run(lambda session: session.execute(sa.select(NOTES.c.text)).scalars().all()) == ["whole"]


async def test_a_unit_cancelled_before_it_starts_is_not_run(tmp_path):
    db = Database(make_engine(None, tmp_path, "notes"))  # SQLite: one unit at a time
    NOTES.create(db.engine)
    started = asyncio.Event()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocking(session) -> None:
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)

    try:
        first = asyncio.create_task(db.run(blocking))
        await started.wait()
        queued = asyncio.create_task(db.run(lambda session: session.execute(sa.insert(NOTES), {"text": "late"})))
        await asyncio.sleep(0.05)
        queued.cancel()
        release.set()
        await first
        await db.run(lambda session: None)  # everything queued before it has been through
        assert queued.cancelled()
        assert _count(db) == 0
    finally:
        db.dispose()


# A change is announced in an ORM session's transaction or on a Core unit's connection.
UNITS = pytest.mark.parametrize("unit", ["session", "core"])


def _run(db: Database, unit: str):
    return db.run if unit == "session" else db.run_core


@UNITS
async def test_a_committed_change_wakes_its_waiter_with_the_row_visible(db, unit):
    channel = ChangeHub(db.engine).channel("notes")  # not listening: delivered in-process
    waiting, other = channel.current("a"), channel.current("b")
    seen_when_woken: list[int] = []

    def write(session) -> None:
        session.execute(sa.insert(NOTES))
        channel.announce(session, "a")

    async def wake() -> None:
        await waiting.wait()
        seen_when_woken.append(_count(db))

    woken = asyncio.create_task(wake())
    await _run(db, unit)(write)
    await asyncio.wait_for(woken, 2)
    assert seen_when_woken == [1]
    assert not other.is_set()


@UNITS
async def test_a_rolled_back_change_wakes_nobody_and_is_not_delivered_later(db, unit):
    channel = ChangeHub(db.engine).channel("notes")
    waiting = channel.current("a")

    def fail(session) -> None:
        channel.announce(session, "a")
        raise ValueError("no")

    with pytest.raises(ValueError):
        await _run(db, unit)(fail)
    await _run(db, unit)(lambda session: session.execute(sa.insert(NOTES)))  # commits, announces nothing
    await asyncio.sleep(0.05)
    assert not waiting.is_set()
