"""Shared fixtures: storage on SQLite and on PostgreSQL, and a Redis that must be there in CI;
the markers each test gets from what it uses (`pytest -m "not e2e"` is the quick loop)."""

from __future__ import annotations

import contextlib
import inspect
import os
import secrets
import types
from collections.abc import Iterator

import pytest

# Helper modules whose asserts should explain themselves like a test's do.
pytest.register_assert_rewrite("tests.deploy_image", "tests.deploy_manifests", "tests.harness")

# Fixtures of the harness, for every test module.
from tests.harness.gateway import fakes, stack, start_stack  # noqa: E402, F401
from tests.harness.report_service import rig  # noqa: E402, F401

PG_ADMIN_DSN = os.environ.get("CARDCHECK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CARDCHECK_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _unavailable(what: str, error: Exception) -> None:
    # In CI a missing server is a failure, never a silent skip.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but unreachable: {error}")
    pytest.skip(f"{what} unreachable: {error}")


@contextlib.contextmanager
def pg_schema(prefix: str = "t") -> Iterator[str]:
    """A SQLAlchemy URL on a fresh PostgreSQL schema of its own, dropped afterwards."""
    import psycopg

    schema = f"{prefix}_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as error:
        _unavailable("PostgreSQL", error)
    base = PG_ADMIN_DSN.replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A SQLAlchemy URL on a fresh PostgreSQL schema of its own, dropped afterwards."""
    with pg_schema() as url:
        yield url


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


@pytest.fixture
async def redis_prefix(redis_url: str):
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    import redis.asyncio

    prefix = f"cardcheck-test-{secrets.token_hex(6)}"
    yield prefix
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# --- markers -----------------------------------------------------------------------------------

POSTGRES_FIXTURES = {"pg_schema_url", "pg_service_roles"}
# Names a code object uses when it starts a process: subprocess.run/Popen/check_*, asyncio's.
PROCESS_CALLS = {"Popen", "check_call", "check_output", "create_subprocess_exec", "create_subprocess_shell"}
# Helpers that run a quick tool, not a process of ours, so their tests stay in the quick loop:
# `kubectl kustomize` renders the manifests in about a second, once per session.
QUICK_TOOLS = {("tests.deploy_manifests", "render")}


def _code_objects(obj) -> Iterator[types.CodeType]:
    if inspect.isclass(obj):
        for cls in obj.__mro__[:-1]:  # its bases' methods too, object's aside
            for member in vars(cls).values():
                yield from _code_objects(getattr(member, "__func__", member))
        return
    code = getattr(inspect.unwrap(obj), "__code__", None)
    pending = [code] if code is not None else []
    while pending:
        code = pending.pop()
        yield code
        pending.extend(const for const in code.co_consts if isinstance(const, types.CodeType))


def _starts_processes(obj, seen: set[int]) -> bool:
    """Whether the function or class, or a helper of the tests it calls (followed through the
    names its code uses), starts a process. tests/conftest.py's own fixtures do not count: psql
    for the roles is a quick command, not a service."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    module = inspect.getmodule(obj)
    if module is None or not module.__name__.startswith("tests.") or module.__name__ == __name__:
        return False
    if (module.__name__, getattr(obj, "__qualname__", None)) in QUICK_TOOLS:
        return False
    for code in _code_objects(obj):
        names = set(code.co_names)
        if names & PROCESS_CALLS or {"subprocess", "run"} <= names:
            return True
        for name in names & vars(module).keys():
            helper = vars(module)[name]
            if (inspect.isfunction(helper) or inspect.isclass(helper)) and _starts_processes(helper, seen):
                return True
    return False


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        used = set(item.fixturenames)
        params = getattr(getattr(item, "callspec", None), "params", {})
        # A fixture on PostgreSQL, or a parametrised one (database_url, a module's mesh) on it.
        if used & POSTGRES_FIXTURES or "postgres" in params.values():
            item.add_marker(pytest.mark.postgres)
        if "redis_url" in used:
            item.add_marker(pytest.mark.redis)
        seen: set[int] = set()
        fixtures = [defs[-1].func for name, defs in item._fixtureinfo.name2fixturedefs.items() if defs]
        if any(_starts_processes(obj, seen) for obj in [item.function, *fixtures]):
            item.add_marker(pytest.mark.e2e)
