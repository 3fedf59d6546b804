"""Shared fixtures: storage on SQLite and on PostgreSQL, and a Redis that must be there in CI."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

# Helper modules whose asserts should explain themselves like a test's do.
pytest.register_assert_rewrite("tests.deploy_image", "tests.deploy_manifests", "tests.e2e_mesh")

PG_ADMIN_DSN = os.environ.get("CARDCHECK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CARDCHECK_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _unavailable(what: str, error: Exception) -> None:
    # In CI a missing server is a failure, never a silent skip.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but unreachable: {error}")
    pytest.skip(f"{what} unreachable: {error}")


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A SQLAlchemy URL on a fresh PostgreSQL schema of its own, dropped afterwards."""
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as error:
        _unavailable("PostgreSQL", error)
    base = PG_ADMIN_DSN.replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}?options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


STATEFUL_SERVICES = ("gateway", "report_service", "notifier")


@pytest.fixture
def pg_service_roles() -> Iterator[dict[str, str]]:
    """deploy/postgres/roles.sql, run with psql as documented but under role names of its own
    (cardcheck_ → t<hex>_): each stateful service's SQLAlchemy URL, logged in as its role.
    Roles and schemas are dropped afterwards."""
    import shutil
    import subprocess
    from pathlib import Path

    import psycopg
    from sqlalchemy.engine import make_url

    psql = shutil.which("psql")
    if psql is None:
        _unavailable("psql", FileNotFoundError("psql"))
    prefix = f"t{secrets.token_hex(4)}_"
    script = (Path(__file__).parent.parent / "deploy" / "postgres" / "roles.sql").read_text()
    roles = {service: f"{prefix}{service}" for service in STATEFUL_SERVICES}
    done = subprocess.run(
        [psql, PG_ADMIN_DSN, "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
        input=script.replace("cardcheck_", prefix), capture_output=True, text=True, timeout=60,
    )
    if done.returncode != 0 and "could not connect" in done.stderr:
        _unavailable("PostgreSQL", RuntimeError(done.stderr))
    try:
        assert done.returncode == 0, done.stderr
        admin = make_url(PG_ADMIN_DSN).set(drivername="postgresql+psycopg")
        yield {
            service: admin.set(username=role, password=None).render_as_string(hide_password=False)
            for service, role in roles.items()
        }
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            for role in roles.values():
                conn.execute(f"DROP SCHEMA IF EXISTS {role} CASCADE")
                conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str | None:
    """None means the embedded default (a SQLite file under the data dir)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        _unavailable("Redis", error)
    finally:
        client.close()
    return REDIS_URL
