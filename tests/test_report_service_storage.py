"""report_service's storage: the SQLite reader engine and the writer hide statement parameters
as every engine does, so a failed statement's error (and the log line it ends up in) holds no
value."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from cardcheck.runtime.database import Database, make_engine
from report_service.storage import Storage

SECRET = "13912345678-secret"


def _failing(session) -> None:
    session.execute(sa.text("SELECT * FROM no_such_table WHERE phone = :phone"), {"phone": SECRET})


@pytest.mark.parametrize("unit", ["read", "write"])
async def test_a_failing_statement_shows_no_parameter_value(tmp_path, database_url, unit):
    storage = Storage(Database(make_engine(database_url, tmp_path, "report_service")))
    try:
        with pytest.raises(SQLAlchemyError) as raised:
            await getattr(storage, unit)(_failing)
        text = str(raised.value)
        assert "no_such_table" in text  # the statement is there, its values are not
        assert SECRET not in text and SECRET not in repr(raised.value)
        assert "parameters hidden" in text.lower() or "[parameters" not in text
    finally:
        storage.close()
