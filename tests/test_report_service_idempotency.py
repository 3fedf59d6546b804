"""report_service keeps each query's idempotency key as its keyed hash: new rows hold the hash
under the current key, a rotation's retired key still finds its rows, and keys stored in clear
before (migration 0003 marks them) still deduplicate until `python -m report_service.rewrap`
hashes them. On SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from cardcheck.runtime.database import make_engine
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.migrations import current_revision, upgrade_to_head
from report_service.app import MIGRATIONS
from report_service.queries import IDEMPOTENCY_KEY
from report_service.rewrap import rewrap
from tests.harness.report_service import USER, Rig

SERVICE = "report_service"
KEY = "app-install-5e2c/submit/2026-03-02T08:00"


def _digest(master: bytes, value: str) -> str:
    return hmac.new(Keyring(master).subkey(IDEMPOTENCY_KEY), value.encode(), hashlib.sha256).hexdigest()


async def test_a_new_query_holds_only_the_hash_of_its_key(rig):
    first = await rig.create(key=KEY)
    again = await rig.create(key=KEY)
    assert again.query_id == first.query_id
    master = load_master_key(None, rig.tmp_path)
    assert rig.rows("SELECT query_id, idempotency_key, idempotency_key_in_clear FROM rs_queries") == [
        (first.query_id, _digest(master, KEY), False)
    ]
    dump = json.dumps(rig.rows("SELECT * FROM rs_queries"), default=str)
    assert "app-install-5e2c" not in dump


async def test_a_key_hashed_under_a_retired_master_key_still_finds_its_query(tmp_path, database_url):
    service = Rig(tmp_path, database_url)
    old, new = bytes(range(32)), bytes(range(1, 33))
    try:
        await service.start_banks()
        await service.start_notifier()

        def keyed(settings, current, retired=()):
            return settings.replace(
                master_key=base64.b64encode(current).decode(),
                retired_master_keys=",".join(base64.b64encode(k).decode() for k in retired) or None,
            )

        base = service.settings
        service.settings = lambda **addresses: keyed(base(**addresses), old)
        await service.start_report_service()
        first = await service.create(key=KEY)
        await service.stop_report_service()
        service.settings = lambda **addresses: keyed(base(**addresses), new, [old])
        await service.start_report_service()
        assert (await service.create(key=KEY)).query_id == first.query_id
        assert service.rows("SELECT idempotency_key FROM rs_queries") == [(_digest(old, KEY),)]
    finally:
        await service.close()


async def test_keys_stored_in_clear_before_still_deduplicate_until_rewrap_hashes_them(tmp_path, database_url):
    """A database at 0002 with a key in clear: 0003 marks it; the service finds the query by the
    key; the rewrap hashes it under the current key, after which the query is still found and
    no row holds the key."""
    engine = make_engine(database_url, tmp_path, SERVICE)
    now = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    try:
        upgrade_to_head(engine, MIGRATIONS, SERVICE, target="0002")
        with engine.begin() as conn:
            for query_id, key in (("a" * 32, KEY), ("b" * 32, None)):
                conn.execute(
                    sa.text(
                        "INSERT INTO rs_queries (query_id, user_id, status, bank_codes, agreement_version,"
                        " idempotency_key, submitted_at, ready_by, banks_total, banks_answered, subject_sealed,"
                        " trace_context) VALUES (:q, :u, 'FAILED', '[\"ICBC\"]', '2026-11', :k, :at, :by, 1, 0,"
                        " :empty, '{}')"
                    ),
                    {"q": query_id, "u": USER, "k": key, "at": now, "by": now + timedelta(hours=24), "empty": b""},
                )
        assert upgrade_to_head(engine, MIGRATIONS, SERVICE) == "0003" == current_revision(engine, SERVICE)
        with engine.connect() as conn:
            marked = conn.execute(
                sa.text("SELECT query_id, idempotency_key, idempotency_key_in_clear FROM rs_queries ORDER BY query_id")
            ).all()
        assert [tuple(r) for r in marked] == [("a" * 32, KEY, True), ("b" * 32, None, False)]
    finally:
        engine.dispose()

    service = Rig(tmp_path, database_url)
    try:
        await service.start_banks()
        await service.start_notifier()
        await service.start_report_service()
        assert (await service.create(key=KEY)).query_id == "a" * 32  # found by the key in clear
        master = load_master_key(None, tmp_path)
        engine = make_engine(database_url, tmp_path, SERVICE)
        try:
            changed, verdict = rewrap(engine, Keyring(master))
            assert changed == 1 and verdict is not None and verdict.ok
            assert rewrap(engine, Keyring(master))[0] == 0  # a second run changes nothing
        finally:
            engine.dispose()
        assert service.rows("SELECT query_id, idempotency_key, idempotency_key_in_clear FROM rs_queries ORDER BY query_id") == [
            ("a" * 32, _digest(master, KEY), False),
            ("b" * 32, None, False),
        ]
        assert (await service.create(key=KEY)).query_id == "a" * 32  # now found by its hash
        assert KEY not in json.dumps(service.rows("SELECT * FROM rs_queries"), default=str)
    finally:
        await service.close()
