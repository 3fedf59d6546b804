"""Schema by Alembic migrations, run by the service itself at start; no alembic.ini, no env.py.

Every service keeps its own chain of hand-written, reviewed revisions and its own version table
(`alembic_version_<service>`), because on PostgreSQL all services share one database. The whole
upgrade is one transaction; on PostgreSQL it first takes an advisory lock named after the service
(`pg_advisory_xact_lock`), so replicas that start together queue up: the first migrates, the
others find the schema at head and do nothing. On SQLite the engine of
`cardcheck.runtime.database.make_engine` starts every transaction with BEGIN IMMEDIATE, which
serializes upgraders the same way (SQLite runs DDL inside a transaction too).

Converting a service from `create_tables` (report_service is the worked example):

1. Add the package `<service>/migrations/` (an empty `__init__.py`) with a folder `versions/`
   holding one module per revision, named `NNNN_what_it_does.py`::

       '''What this revision does, and why.'''
       import sqlalchemy as sa
       from alembic import op

       revision = "0001"
       down_revision = None      # the previous revision's id from the second one on

       def upgrade() -> None:
           op.create_table("xx_things", sa.Column("id", sa.String(32), primary_key=True), ...)

   Write the operations by hand (`alembic revision --autogenerate` is only a draft), with
   constraint and index names spelled out, and keep the models in `<service>/models.py` as they
   describe the result: `schema_drift` below finds any difference, so assert in a test that it
   is empty on SQLite and on PostgreSQL. Revisions are never edited once released: a change is a
   new revision. Downgrades are not supported (restore from backup instead).
2. A database made earlier by `create_all` has the tables but no version table: let the first
   revision skip creating what exists (`sa.inspect(op.get_bind()).has_table(name)`), which adopts
   such a database, and from then on it upgrades like any other.
3. In `build()`, replace `db.create_tables([...])` by::

       await asyncio.to_thread(upgrade_to_head, db.engine, "<service>.migrations", "<service>")

   so `python -m <service>` (and thus `cardcheck up`) migrates the database before serving.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, text
from sqlalchemy.exc import OperationalError

log = logging.getLogger(__name__)

SQLITE_LOCKED_ATTEMPTS = 20


def version_table(service: str) -> str:
    return f"alembic_version_{service}"


def advisory_lock_key(service: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock, one per service."""
    digest = hashlib.sha256(f"cardcheck.migrations:{service}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _script_directory(migrations: str | Path) -> tuple[Config, ScriptDirectory]:
    """`migrations`: a package name ("report_service.migrations") or a directory; either way
    the directory holding `versions/`."""
    if isinstance(migrations, Path) or "/" in str(migrations):
        directory = Path(migrations)
    else:
        try:
            spec = importlib.util.find_spec(str(migrations))
        except ModuleNotFoundError:
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"no migrations package {migrations!r}")
        directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / "versions").is_dir():
        raise ValueError(f"{directory} has no versions/ folder")
    config = Config()
    config.set_main_option("script_location", str(directory))
    config.set_main_option("path_separator", "os")
    return config, ScriptDirectory.from_config(config)


def upgrade_to_head(
    engine: Engine, migrations: str | Path, service: str, *, target: str = "head"
) -> str | None:
    """Brings the service's schema to `target` (its newest revision by default) in one
    transaction, serialized against other processes doing the same. Idempotent: at head it
    changes nothing. Returns the revision the database is at afterwards. Blocking: call it
    with asyncio.to_thread from async code."""
    config, script = _script_directory(migrations)
    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:  # its per-start chatter; our own line says what changed
        alembic_log.setLevel(logging.WARNING)
    attempts = SQLITE_LOCKED_ATTEMPTS if engine.dialect.name == "sqlite" else 1
    for attempt in range(1, attempts + 1):
        try:
            before, after = _upgrade(engine, config, script, service, target)
            break
        except OperationalError as error:
            # A brand-new SQLite file switching to WAL while another process migrates it can be
            # refused at once ("database is locked") instead of waiting: try again.
            if attempt == attempts or "locked" not in str(error.orig):
                raise
            time.sleep(0.05 * attempt)
    if before != after:
        log.info("%s: schema migrated from %s to %s", service, before or "nothing", after)
    return after


def _upgrade(
    engine: Engine, config: Config, script: ScriptDirectory, service: str, target: str
) -> tuple[str | None, str | None]:
    with engine.connect() as connection:
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_lock_key(service)}
                )

            def upgrade(revision: str, _context: MigrationContext) -> list[RevisionStep]:
                return script._upgrade_revs(target, revision)

            with EnvironmentContext(config, script, fn=upgrade, destination_rev=target) as environment:
                environment.configure(connection=connection, version_table=version_table(service))
                before = environment.get_context().get_current_revision()
                environment.run_migrations()
                return before, environment.get_context().get_current_revision()


def current_revision(engine: Engine, service: str) -> str | None:
    """The revision the service's schema is at (None: never migrated)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": version_table(service)})
        return context.get_current_revision()


def head_revision(migrations: str | Path) -> str | None:
    return _script_directory(migrations)[1].get_current_head()


def schema_drift(engine: Engine, metadata: MetaData, tables: Iterable[str]) -> list[Any]:
    """How the migrated schema differs from `metadata` for the named tables (empty when the
    models and the migrations agree). Meant for a test that runs after upgrade_to_head."""
    names = set(tables)

    def include(obj: Any, name: str | None, kind: str, _reflected: bool, _compare_to: Any) -> bool:
        return (
            name in names
            if kind == "table"
            else getattr(obj, "table", None) is None or obj.table.name in names
        )

    include_object: Callable[..., bool] = include
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_object": include_object, "compare_type": True}
        )
        drift: list[Any] = compare_metadata(context, metadata)
        return drift
