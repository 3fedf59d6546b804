"""Settings for a service a test builds in process: the defaults of an empty environment."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cardcheck.runtime.settings import Settings


def settings_for(
    data_dir: Path, database_url: str | None = None, *, addresses: Mapping[str, str] | None = None, **changes
) -> Settings:
    """The defaults with nothing from this process's environment, on `data_dir` and the
    database (None: SQLite there), `addresses` over the default ones, then `changes`."""
    base = Settings.from_env({})
    return base.replace(
        data_dir=data_dir, database_url=database_url, addresses={**base.addresses, **(addresses or {})}, **changes
    )
