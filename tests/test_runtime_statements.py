"""Statements run on the driver's cursor give what SQLAlchemy's execution gives (rows by index
and by name, converted by the columns' types, rowcounts, errors as SQLAlchemy's with their
parameters hidden), on SQLite and PostgreSQL; and they take SQLAlchemy's way whenever a span
is to be made or something else listens to the engine's statements."""

from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from sqlalchemy import bindparam, event, func

from cardcheck.runtime import statements
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.statements import Statement
from cardcheck.runtime.telemetry import trace_engine

METADATA = sa.MetaData()
LETTERS = sa.Table(
    "letters", METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("to_whom", sa.String(40), nullable=False, unique=True),
    sa.Column("sent_at", sa.DateTime, nullable=False),
    sa.Column("urgent", sa.Boolean, nullable=False),
    sa.Column("note", sa.String(40)),
    sa.Column("kind", sa.String(10), nullable=False, default="PLAIN"),
)
AT = datetime(2026, 11, 30, 8, 15, 30, 123456)

INSERT = Statement(sa.insert(LETTERS))
INSERT_RETURNING = Statement(sa.insert(LETTERS).returning(LETTERS.c.id, LETTERS.c.sent_at))
BY_NAME = Statement(
    sa.select(LETTERS.c.id, LETTERS.c.sent_at, LETTERS.c.urgent, LETTERS.c.note.label("remark"))
    .where(LETTERS.c.to_whom == bindparam("who"))
)
URGENT_SINCE = Statement(
    sa.select(func.count(), func.max(LETTERS.c.sent_at)).where(
        LETTERS.c.urgent == True, LETTERS.c.sent_at >= bindparam("since"), LETTERS.c.kind.in_(["PLAIN", "SEALED"])  # noqa: E712
    )
)
RENOTE = Statement(sa.update(LETTERS).where(LETTERS.c.id == bindparam("of")).values(note=bindparam("new_note")))
FORGET = Statement(sa.delete(LETTERS).where(LETTERS.c.to_whom.in_(bindparam("whom", expanding=True))))


@pytest.fixture
def db(tmp_path, database_url):
    database = Database(make_engine(database_url, tmp_path, "letters"))
    METADATA.create_all(database.engine)
    try:
        yield database
    finally:
        METADATA.drop_all(database.engine)
        database.dispose()


def _driver_statements(db: Database) -> list[str]:
    """What reaches the driver: SQLite's own trace of the statements it runs."""
    seen: list[str] = []
    connection = db._held_connection().connection.driver_connection
    connection.set_trace_callback(seen.append)
    return seen


async def test_rows_rowcounts_and_types_are_sqlalchemys(db):
    def work(connection):
        INSERT.run(connection, [
            {"to_whom": "wang", "sent_at": AT, "urgent": True, "note": "first", "kind": "PLAIN"},
            {"to_whom": "li", "sent_at": AT.replace(hour=9), "urgent": False, "note": None, "kind": "PLAIN"},
        ])
        returned = INSERT_RETURNING.run(
            connection, {"to_whom": "zhao", "sent_at": AT.replace(hour=10), "urgent": True, "note": "x", "kind": "SEALED"}
        ).one()
        row = BY_NAME.run(connection, {"who": "wang"}).one()
        counted = URGENT_SINCE.run(connection, {"since": AT}).one()
        missing = BY_NAME.run(connection, {"who": "nobody"}).first()
        renoted = RENOTE.run(connection, {"of": row.id, "new_note": "second"}).rowcount
        unknown = RENOTE.run(connection, {"of": 10_000, "new_note": "none"}).rowcount
        after = BY_NAME.run(connection, {"who": "wang"}).one()
        return returned, row, counted, missing, renoted, unknown, after

    returned, row, counted, missing, renoted, unknown, after = await db.run_core(work)
    assert isinstance(returned.id, int) and returned.sent_at == AT.replace(hour=10)
    assert (row.sent_at, row.urgent, row.remark) == (AT, True, "first")
    assert isinstance(row.sent_at, datetime) and row.urgent is True
    assert row[1] == AT and tuple(row)[3] == "first"
    assert tuple(counted) == (2, AT.replace(hour=10))
    assert missing is None
    assert (renoted, unknown) == (1, 0)
    assert after.remark == "second"
    name = db.engine.dialect.name
    for statement in (INSERT, INSERT_RETURNING, BY_NAME, URGENT_SINCE, RENOTE):
        plans = [plan for key, plan in statement._plans.items() if key[0] == name]
        assert plans and all(plans), "run on the driver's cursor"


@pytest.mark.parametrize("database_url", [None])  # SQLite's trace shows what reaches the driver
async def test_the_driver_runs_each_statement_once_and_nothing_else(db):
    seen = _driver_statements(db)

    def work(connection):
        INSERT.run(connection, {"to_whom": "wang", "sent_at": AT, "urgent": True, "note": None, "kind": "PLAIN"})
        return BY_NAME.run(connection, {"who": "wang"}).one()

    row = await db.run_core(work)
    assert row.urgent is True
    assert [s.split()[0] for s in seen] == ["BEGIN", "INSERT", "SELECT", "COMMIT"]
    assert "wang" in seen[1], "SQLite's trace shows a statement with its values bound"


async def test_expanding_lists_of_any_length_and_defaults_sqlalchemy_computes(db):
    """kind not given (its default is SQLAlchemy's to compute: the long way), IN lists of three
    and of one (compiled for each length), and an empty one (SQLAlchemy's own rendering)."""

    def work(connection):
        for who in ("wang", "li", "zhao"):
            INSERT.run(connection, {"to_whom": who, "sent_at": AT, "urgent": True, "note": None})
        kinds = connection.execute(sa.select(LETTERS.c.kind)).scalars().all()
        none = FORGET.run(connection, {"whom": []}).rowcount
        two = FORGET.run(connection, {"whom": ["wang", "li", "nobody"]}).rowcount
        one = FORGET.run(connection, {"whom": ["zhao"]}).rowcount
        return kinds, none, two, one

    assert await db.run_core(work) == (["PLAIN"] * 3, 0, 2, 1)
    name = db.engine.dialect.name
    planned = {key[2]: plan is not None for key, plan in FORGET._plans.items() if key[0] == name}
    assert planned == {(0,): False, (3,): True, (1,): True}
    defaulted = [plan for key, plan in INSERT._plans.items() if key[0] == name and "kind" not in key[1]]
    assert defaulted == [None], "a default SQLAlchemy computes is left to SQLAlchemy"


async def test_a_driver_error_is_sqlalchemys_with_its_parameters_hidden(db):
    secret = "13912345678"

    def twice(connection):
        for _ in range(2):
            INSERT.run(connection, {"to_whom": "wang", "sent_at": AT, "urgent": True, "note": secret, "kind": "PLAIN"})

    with pytest.raises(sa.exc.IntegrityError) as raised:
        await db.run_core(twice)
    assert secret not in str(raised.value) and "parameters hidden" in str(raised.value)
    # The transaction rolled back whole, and the connection serves the next unit.
    assert await db.run_core(lambda c: BY_NAME.run(c, {"who": "wang"}).first()) is None


async def test_a_missing_parameter_is_refused_before_the_driver(db):
    with pytest.raises(KeyError, match="who"):
        await db.run_core(lambda c: BY_NAME.run(c, {}))


def _listening(db: Database) -> list[str]:
    heard: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda conn, cursor, statement, *rest: heard.append(statement))
    return heard


async def test_an_engine_listened_to_hears_every_statement(db):
    heard = _listening(db)
    await db.run_core(lambda c: BY_NAME.run(c, {"who": "wang"}))
    assert [s.split()[0] for s in heard] == ["SELECT"]


@pytest.mark.parametrize("sampled", [True, False])
async def test_a_statement_is_spanned_in_a_recorded_trace_and_only_there(tmp_path, sampled):
    db = Database(make_engine(None, tmp_path, "letters"))
    METADATA.create_all(db.engine)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_engine(db.engine, provider)
    try:
        seen = _driver_statements(db)
        with provider.get_tracer("test").start_as_current_span("call"):
            row = await db.run_core(lambda c: BY_NAME.run(c, {"who": "wang"}).first())
        assert row is None
        assert any(s.startswith("SELECT") for s in seen)
        spans = [s.name.split()[0] for s in exporter.get_finished_spans() if s.name != "call"]
        assert spans == (["SELECT"] if sampled else [])
    finally:
        db.dispose()
        statements._TRACED.pop(db.engine, None)
