"""A service's tables read and changed with plain SQL, behind its back, as an operator would."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa


def _url(database_url: str | None, data_dir: Path, service: str) -> str:
    # None is the embedded default: the service's SQLite file in its data directory.
    return database_url or f"sqlite:///{data_dir / f'{service}.db'}"


def rows(database_url: str | None, data_dir: Path, service: str, sql: str, **params) -> list[tuple]:
    engine = sa.create_engine(_url(database_url, data_dir, service))
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def execute(database_url: str | None, data_dir: Path, service: str, sql: str, **params) -> int:
    """Runs `sql` in a transaction of its own: the number of rows it changed."""
    engine = sa.create_engine(_url(database_url, data_dir, service))
    try:
        with engine.begin() as conn:
            return conn.execute(sa.text(sql), params).rowcount
    finally:
        engine.dispose()
