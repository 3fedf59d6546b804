"""Shared fixtures: storage on SQLite and on PostgreSQL, and a Redis that must be there in CI."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

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
