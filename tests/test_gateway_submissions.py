"""The gateway's submissions (which query a user's idempotency key created): the key held only
as a keyed hash, found under every key of a rotation, and purged by the housekeeping once the
query can no longer have a report (24 h to be ready + 7 days kept), on the controllable clock."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from datetime import timedelta

from sqlalchemy import text

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.migrations import upgrade_to_head
from gateway.app import _housekeeping
from gateway.challenges import Challenges
from gateway.face_tokens import SpentFaceTokens
from gateway.sessions import Sessions
from gateway.submissions import IDEMPOTENCY_KEY, KEPT_FOR, Submissions
from tests.harness.gateway import ALICE, BOB, Stack
from tests.harness.waiting import eventually

IDEMPOTENCY = "device-7f3a-retry-2026-03-02T08:00"


def _gateway_db(of: Stack) -> Database:
    return Database(make_engine(of.settings.database_url, of.settings.data_dir, "gateway"))


def _submissions(db: Database) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT user_id, key_hash, query_id FROM gw_submissions"))]


async def test_an_idempotency_key_is_stored_only_as_its_keyed_hash(stack: Stack, caplog):
    caplog.set_level("DEBUG")
    session = await stack.register(ALICE)
    query = await stack.submit(ALICE, session.session_token, idempotency_key=IDEMPOTENCY)
    stack.clock.advance(timedelta(minutes=2))  # a fresh code may be sent
    again = await stack.submit(ALICE, session.session_token, idempotency_key=IDEMPOTENCY)
    assert again.query_id == query.query_id and len(stack.reports.created) == 1

    db = _gateway_db(stack)
    try:
        key = Keyring(load_master_key(None, stack.settings.data_dir)).subkey(IDEMPOTENCY_KEY)
        digest = hmac.new(key, IDEMPOTENCY.encode(), hashlib.sha256).hexdigest()
        assert _submissions(db) == [(session.user_id, digest, query.query_id)]
        with db.engine.connect() as conn:
            dump = repr(conn.execute(text("SELECT * FROM gw_submissions")).all())
        assert IDEMPOTENCY not in dump and "device-7f3a" not in dump
    finally:
        db.dispose()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "device-7f3a" not in logged and ALICE.phone not in logged


async def test_a_submission_is_found_under_a_retired_key_and_new_ones_go_under_the_current(tmp_path, database_url):
    old, new = bytes(range(32)), bytes(range(1, 33))
    db = Database(make_engine(database_url, tmp_path, "gateway"))
    upgrade_to_head(db.engine, "gateway.migrations", "gateway")
    clock = ManualClock()
    try:
        await Submissions(db, Keyring(old), clock).remember("u-1", IDEMPOTENCY, "q-1")
        rotated = Submissions(db, Keyring(new, [old]), clock)
        assert await rotated.earlier("u-1", IDEMPOTENCY) == "q-1"
        assert await rotated.earlier("u-2", IDEMPOTENCY) is None  # per user
        await rotated.remember("u-1", IDEMPOTENCY, "q-other")  # known under the old key: kept as it is
        await rotated.remember("u-1", "another", "q-2")
        current = Keyring(new).hasher(IDEMPOTENCY_KEY)
        assert sorted(_submissions(db)) == sorted(
            [
                ("u-1", Keyring(old).hasher(IDEMPOTENCY_KEY).digest(IDEMPOTENCY), "q-1"),
                ("u-1", current.digest("another"), "q-2"),
            ]
        )
        # Once the retired key is gone, its rows no longer match (they die with their query).
        assert await Submissions(db, Keyring(new), clock).earlier("u-1", IDEMPOTENCY) is None
    finally:
        db.dispose()


async def test_a_new_submission_is_one_insert_under_the_current_key_and_a_race_keeps_the_first(
    tmp_path, database_url
):
    old, new = bytes(range(32)), bytes(range(1, 33))
    db = Database(make_engine(database_url, tmp_path, "gateway"))
    upgrade_to_head(db.engine, "gateway.migrations", "gateway")
    clock = ManualClock()
    try:
        rotated = Submissions(db, Keyring(new, [old]), clock)
        await rotated.remember_new("u-1", IDEMPOTENCY, "q-1")
        await rotated.remember_new("u-1", IDEMPOTENCY, "q-2")  # the same key raced in twice
        assert _submissions(db) == [("u-1", Keyring(new).hasher(IDEMPOTENCY_KEY).digest(IDEMPOTENCY), "q-1")]
        assert await rotated.earlier("u-1", IDEMPOTENCY) == "q-1"
    finally:
        db.dispose()


async def test_housekeeping_purges_submissions_once_their_report_cannot_live_and_stale_face_tokens(stack: Stack):
    alice = await stack.register(ALICE)
    first = await stack.submit(ALICE, alice.session_token, idempotency_key="first")
    stack.clock.advance(timedelta(days=1))
    bob = await stack.register(BOB)
    later = await stack.submit(BOB, bob.session_token, idempotency_key="later")
    db = _gateway_db(stack)
    keyring = Keyring(load_master_key(None, stack.settings.data_dir))
    submissions = Submissions(db, keyring, stack.clock)
    face_tokens = SpentFaceTokens(db, keyring, stack.clock, timedelta(minutes=10))
    assert await face_tokens.spend("someone", "biz-token-old")
    try:
        assert KEPT_FOR == timedelta(hours=24) + timedelta(days=7)
        stack.clock.advance(KEPT_FOR - timedelta(days=1))  # the first is exactly KEPT_FOR old
        assert await submissions.purge_expired() == 0
        stack.clock.advance(timedelta(microseconds=1))

        # A face token whose result could still be fresh (10 minutes, and an hour's margin) stays.
        assert await face_tokens.spend("someone", "biz-token-new")
        # The gateway's housekeeping does it (one round; it then sleeps for an hour).
        housekeeping = asyncio.create_task(
            _housekeeping(Challenges(db, keyring, stack.clock), Sessions(db, keyring, stack.clock), submissions,
                          face_tokens)
        )
        try:
            async def purged() -> bool:
                return [q for _, _, q in _submissions(db)] == [later.query_id] and not await face_tokens.is_spent(
                    "biz-token-old"
                )

            await eventually(purged, within=4, every=0.02, what="the housekeeping round")
            assert await face_tokens.is_spent("biz-token-new")
        finally:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
        # A retry of the purged key is a new submission to report_service (which deduplicates).
        assert await submissions.earlier(alice.user_id, "first") is None
        assert first.query_id != later.query_id
        stack.clock.advance(timedelta(days=1))
        assert await submissions.purge_expired() == 1 and _submissions(db) == []
    finally:
        db.dispose()
