"""Change notification in-process: waiters wake once a change's transaction has committed,
and never for one rolled back."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from cardcheck.runtime.changes import ChangeHub
from cardcheck.runtime.database import Database, make_engine

NOTES = sa.Table("change_notes", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))


@pytest.fixture
def db(tmp_path, database_url):
    database = Database(make_engine(database_url, tmp_path, "changes"))
    NOTES.create(database.engine)
    try:
        yield database
    finally:
        NOTES.drop(database.engine)
        database.dispose()


def _count(db: Database) -> int:
    with db.engine.connect() as other:
        return other.execute(sa.select(sa.func.count()).select_from(NOTES)).scalar_one()


async def test_a_committed_change_wakes_its_waiter_with_the_row_visible(db):
    channel = ChangeHub(db.engine).channel("notes")  # not listening: delivered in-process
    waiting, other = channel.current("a"), channel.current("b")

    def write(session) -> None:
        session.execute(sa.insert(NOTES))
        channel.announce(session, "a")

    await db.run(write)
    await asyncio.wait_for(waiting.wait(), 2)
    assert _count(db) == 1
    assert not other.is_set()


async def test_a_rolled_back_change_wakes_nobody_and_is_not_delivered_later(db):
    channel = ChangeHub(db.engine).channel("notes")
    waiting = channel.current("a")

    def fail(session) -> None:
        channel.announce(session, "a")
        raise ValueError("no")

    with pytest.raises(ValueError):
        await db.run(fail)
    await db.run(lambda session: session.execute(sa.insert(NOTES)))  # commits, announces nothing
    await asyncio.sleep(0.05)
    assert not waiting.is_set()
