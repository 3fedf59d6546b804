"""Core statements run on the driver's own cursor: compiled once per dialect (and, for an INSERT
or UPDATE, per set of parameter names, as SQLAlchemy's cache keys them), their parameters and
results converted by the statement's own column types. SQLAlchemy's execution of a compiled,
cached statement costs 60-150 us of Python (cache key, execution context, parameter and result
processing, events); the driver's own execute 5-15 us, and a query's life runs about 40.

The long way, SQLAlchemy's execution of the same statement and parameters, is taken whenever
it gives more than the rows: a statement a trace records (its span is the SQLAlchemy
instrumentation's), an engine something else listens to (before_cursor_execute: the tests that
count statements), and what the short way does not do (an empty IN list, a column default
computed in Python). Driver errors are raised as SQLAlchemy's (IntegrityError, OperationalError),
parameters hidden; a connection lost is invalidated."""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from sqlalchemy import Connection, CursorResult, Engine
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.sql import Executable, Insert, Select, Update, visitors
from sqlalchemy.sql.elements import BindParameter

Parameters = Mapping[str, Any]
S = TypeVar("S", bound=Executable)

# What the tracing of an engine registered: how many before_cursor_execute listeners it has
# with the tracer's, and whether a statement run now would be spanned.
_TRACED: weakref.WeakKeyDictionary[Engine, tuple[int, Callable[[], bool]]] = weakref.WeakKeyDictionary()


def traced_by(engine: Engine, spanned: Callable[[], bool]) -> None:
    """The engine's before_cursor_execute listeners so far are a tracer's: they make a span only
    when `spanned()`, so a statement run when it is False may leave them out."""
    _TRACED[engine] = (len(engine.dispatch.before_cursor_execute), spanned)


class Rows:
    """A statement's rows (tuples, each field also by name) and its rowcount."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return self._rows

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise NoResultFound("no row was found") if not self._rows else MultipleResultsFound("more than one row")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]


class _Plan(NamedTuple):
    sql: str
    # Per bind, in the order the SQL takes them (qmark) or by name (pyformat): the parameter's
    # name, its value when none is given (REQUIRED: must be given), its type's processor.
    binds: tuple[tuple[str, str, Any, Callable[[Any], Any] | None], ...]
    positional: bool
    row: type | None  # the row type of a statement with rows; None for one with none
    results: tuple[Callable[[Any], Any] | None, ...]


_REQUIRED = object()


class _Item(NamedTuple):
    """A bind's default that stands for item `at` of its expanding list's value: the one
    given, else the bind's own (`in_([...])` of literal values)."""

    at: int
    own: Sequence[Any] | None


class Statement(Generic[S]):
    """A Core statement (SELECT, INSERT, UPDATE, DELETE, with RETURNING or not) to run often."""

    def __init__(self, statement: S) -> None:
        self.statement: S = statement
        self._keyed = isinstance(statement, (Insert, Update))
        expanding = {
            b.key: b.value for b in visitors.iterate(statement)  # type: ignore[arg-type]
            if isinstance(b, BindParameter) and b.expanding
        }
        self._expanding = tuple(sorted(expanding.items()))
        self._plans: dict[tuple[str, frozenset[str] | None, tuple[int, ...]], _Plan | None] = {}

    def run(self, connection: Connection, parameters: Parameters | Sequence[Parameters] | None = None) -> Rows:
        """Runs the statement in `connection`'s transaction: one set of parameters, or a list of
        them (executemany, no rows)."""
        many = isinstance(parameters, Sequence)
        first: Parameters
        if isinstance(parameters, Sequence):
            first = parameters[0] if parameters else {}
        else:
            first = parameters or {}
        plan = self._plan(connection.dialect, first) if self._short(connection.engine) else None
        if plan is None:
            return self._long(connection, parameters)
        bound = [_bound(plan, p) for p in parameters] if isinstance(parameters, Sequence) else _bound(plan, first)
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if many:
                cursor.executemany(plan.sql, bound)
                return Rows([], cursor.rowcount)
            cursor.execute(plan.sql, bound)
            if plan.row is None:
                return Rows([], cursor.rowcount)
            fetched = cursor.fetchall()
            return Rows([_row(plan, raw) for raw in fetched], cursor.rowcount)
        except connection.dialect.loaded_dbapi.Error as error:
            raise _failed(connection, plan.sql, bound, many, error, cursor) from error
        finally:
            cursor.close()

    def _long(self, connection: Connection, parameters: Parameters | Sequence[Parameters] | None) -> Rows:
        result: CursorResult[Any] = connection.execute(self.statement, parameters)
        rows = list(result) if result.returns_rows else []
        return Rows(rows, result.rowcount)

    @staticmethod
    def _short(engine: Engine) -> bool:
        listeners = engine.dispatch.before_cursor_execute
        if not listeners:
            return True
        traced = _TRACED.get(engine)
        # A listener more than the tracer's: something else hears the statements.
        if traced is None or len(listeners) != traced[0]:
            return False
        return not traced[1]()

    def _plan(self, dialect: Dialect, parameters: Parameters) -> _Plan | None:
        keys = frozenset(parameters) if self._keyed else None
        # An expanding IN list is compiled for its length (SQLAlchemy renders it per execution).
        lengths = tuple(len(parameters.get(name, own) or ()) for name, own in self._expanding)
        key = (dialect.name, keys, lengths)
        try:
            return self._plans[key]
        except KeyError:
            by_name = {name: length for (name, _), length in zip(self._expanding, lengths, strict=True)}
            plan = self._plans[key] = None if 0 in lengths else _compile(self.statement, dialect, keys, by_name)
            return plan


def _compile(statement: Any, dialect: Dialect, keys: frozenset[str] | None, lengths: dict[str, int]) -> _Plan | None:
    """The statement's plan for `dialect` (each expanding IN list of `lengths`' length), or None
    when only SQLAlchemy's execution does all it asks (literal binds, column defaults computed in
    Python, escaped names)."""
    compiled: Any = statement.compile(dialect=dialect, column_keys=sorted(keys) if keys is not None else None)
    if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
        return None
    if getattr(compiled, "escaped_bind_names", None) or getattr(compiled, "literal_execute_params", None):
        return None
    sql: str = compiled.string
    names: list[str] = list(compiled.positiontup) if compiled.positional else list(dict.fromkeys(compiled.bind_names.values()))
    binds: list[tuple[str, str, Any, Callable[[Any], Any] | None]] = []
    for name in names:
        bind: BindParameter[Any] = compiled.binds[name]
        if bind.callable is not None:
            return None
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if bind.expanding:
            # One placeholder per element, each element a parameter of its own (item i of the list).
            parts = [f"{name}_{i + 1}" for i in range(lengths[bind.key])]
            placeholders = ", ".join("?" if compiled.positional else f"%({part})s" for part in parts)
            sql = sql.replace(f"__[POSTCOMPILE_{name}]", placeholders)
            own = None if bind.required else bind.value
            binds.extend((part, bind.key, _Item(i, own), process) for i, part in enumerate(parts))
            continue
        value = _REQUIRED if bind.required else bind.value
        binds.append((name, bind.key, value, process))
    if "__[POSTCOMPILE_" in sql:
        return None
    columns = list(statement.exported_columns) if _returns_rows(statement) else []
    row: type | None = collections.namedtuple(
        "Row", list(statement.exported_columns.keys()), rename=True
    ) if columns else None
    results = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
    return _Plan(sql, tuple(binds), compiled.positional, row, results)


def _returns_rows(statement: Any) -> bool:
    if isinstance(statement, Select):
        return True
    return bool(getattr(statement, "_returning", ()))


def _bound(plan: _Plan, parameters: Parameters) -> Any:
    values = []
    for _name, key, default, process in plan.binds:
        if type(default) is _Item:
            items = parameters.get(key, default.own)
            if items is None:
                raise KeyError(f"no value for the statement's parameter {key!r}")
            value = items[default.at]
        else:
            value = parameters.get(key, default)
            if value is _REQUIRED:
                raise KeyError(f"no value for the statement's parameter {key!r}")
        values.append(value if process is None or value is None else process(value))
    if plan.positional:
        return values
    return {name: value for (name, _k, _d, _p), value in zip(plan.binds, values, strict=True)}


def _row(plan: _Plan, raw: Sequence[Any]) -> Any:
    return plan.row._make(  # type: ignore[union-attr]
        value if process is None or value is None else process(value)
        for process, value in zip(plan.results, raw, strict=True)
    )


def _failed(connection: Connection, sql: str, bound: Any, many: bool, error: Any, cursor: Any) -> Exception:
    """The driver's error as SQLAlchemy raises it (parameters hidden); a connection lost is
    invalidated, as SQLAlchemy's execution does, so that the pool replaces it."""
    dialect = connection.dialect
    disconnected = dialect.is_disconnect(error, connection.connection.dbapi_connection, cursor)
    if disconnected:
        connection.invalidate(error)
    failed: Exception = DBAPIError.instance(
        sql, bound, error, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect,
        connection_invalidated=disconnected, ismulti=many,
    )
    return failed
