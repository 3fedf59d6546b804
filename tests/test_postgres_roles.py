"""deploy/postgres/roles.sql: on one PostgreSQL database, each service that keeps state logs in
as a role of its own, migrates its tables into a schema of its own, and can read none of the
others' (a gateway broken into holds neither the reports nor the SMS log)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from cardcheck.runtime.database import make_engine
from cardcheck.runtime.migrations import upgrade_to_head, version_table
from gateway.app import MIGRATIONS as GATEWAY
from notifier.app import MIGRATIONS as NOTIFIER
from report_service.app import MIGRATIONS as REPORT_SERVICE

MIGRATIONS = {"gateway": GATEWAY, "report_service": REPORT_SERVICE, "notifier": NOTIFIER}


def _role(url: str) -> str:
    return make_url(url).username


def test_each_service_migrates_into_its_own_schema_and_reads_no_other(pg_service_roles, tmp_path):
    engines = {service: make_engine(url, tmp_path, service) for service, url in pg_service_roles.items()}
    try:
        tables: dict[str, set[str]] = {}
        for service, engine in engines.items():
            upgrade_to_head(engine, MIGRATIONS[service], service)
            schema = _role(pg_service_roles[service])
            tables[service] = set(sa.inspect(engine).get_table_names(schema=schema))
            assert version_table(service) in tables[service], tables[service]
        for reader, engine in engines.items():
            for owner, owned in tables.items():
                table = next(t for t in sorted(owned) if not t.startswith("alembic_version"))
                statement = sa.text(f"SELECT count(*) FROM {_role(pg_service_roles[owner])}.{table}")
                with engine.connect() as conn:
                    if reader == owner:
                        assert conn.execute(statement).scalar() == 0
                    else:
                        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                            conn.execute(statement)
            with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                conn.execute(sa.text(f"CREATE TABLE public.{_role(pg_service_roles[reader])}_stray (i int)"))
    finally:
        for engine in engines.values():
            engine.dispose()
