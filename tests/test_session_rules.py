"""Sessions on Sessions and SessionTokens themselves, on a real SQLite file and the ManualClock,
without any server: a token lives 24 hours (whole seconds, as it carries them), is ours only
with its signature intact, ends at sign-out, and is purged a day after it expired."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.keys import Keyring
from gateway.sessions import Sessions, SessionTokens, bearer_token
from tests.harness.stores import MASTER_KEY, gateway_database

SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sessions(tmp_path, clock):
    with gateway_database(tmp_path) as db:
        yield Sessions(db, Keyring(MASTER_KEY), clock)


def _unauthenticated(call, why: str) -> None:
    with pytest.raises(CardCheckError) as caught:
        call()
    assert (caught.value.reason, caught.value.message) == ("UNAUTHENTICATED", why)


async def _refused(awaitable, why: str) -> None:
    with pytest.raises(CardCheckError) as caught:
        await awaitable
    assert (caught.value.reason, caught.value.message) == ("UNAUTHENTICATED", why)


async def test_a_session_lives_24_hours_to_the_whole_second(sessions: Sessions, clock: ManualClock):
    opened_at = clock.now()
    clock.advance(timedelta(milliseconds=900))
    issued = await sessions.open("u-1")
    assert issued.expires_at == opened_at + DAY  # the fraction of a second is dropped
    clock.set(issued.expires_at - SECOND)
    assert await sessions.user_of(issued.token) == "u-1"
    clock.set(issued.expires_at)
    _unauthenticated(lambda: sessions.verify(issued.token), "session expired")


async def test_a_token_is_ours_only_as_it_was_signed(sessions: Sessions, clock: ManualClock):
    issued = await sessions.open("u-1")
    version, session_id, user_id, expiry, signature = issued.token.split(".")
    forged = [
        f"{version}.{session_id}.u-2.{expiry}.{signature}",  # another user
        f"{version}.{session_id}.{user_id}.{int(expiry) + 86400}.{signature}",  # a longer life
        issued.token[:-2] + ("AA" if not issued.token.endswith("AA") else "BB"),
        "v1." + "x" * 300,
        "",
    ]
    for token in forged[:-2]:
        _unauthenticated(lambda token=token: sessions.verify(token), "unknown session token")
    _unauthenticated(lambda: sessions.verify(forged[-2]), "unknown session token")
    _unauthenticated(lambda: sessions.verify(forged[-1]), "no session token")
    # Signed by us but not on record (as after a purge): known only to the database.
    stray = SessionTokens.from_keyring(Keyring(MASTER_KEY)).sign("not-opened", "u-1", issued.expires_at)
    assert sessions.verify(stray).user_id == "u-1"
    await _refused(sessions.user_of(stray), "unknown session")


def test_a_token_signed_under_a_retired_key_verifies_while_that_key_is_configured(clock: ManualClock):
    old, new = bytes(range(1, 33)), MASTER_KEY
    token = SessionTokens(old).sign("s-1", "u-1", clock.now() + DAY)
    assert SessionTokens(new, [old]).verify(token, clock.now()).session_id == "s-1"
    _unauthenticated(lambda: SessionTokens(new).verify(token, clock.now()), "unknown session token")


async def test_sign_out_ends_this_session_or_every_live_one_of_its_user(sessions: Sessions, clock: ManualClock):
    old = await sessions.open("u-1")
    clock.advance(DAY)  # `old` has expired by now
    here, there = await sessions.open("u-1"), await sessions.open("u-1")
    elsewhere = await sessions.open("u-2")
    assert await sessions.revoke(sessions.verify(here.token)) == 1
    await _refused(sessions.user_of(here.token), "session revoked")
    assert await sessions.revoke(sessions.verify(here.token)) == 0  # once
    assert await sessions.user_of(there.token) == "u-1"
    ended = await sessions.revoke(sessions.verify(there.token), everywhere=True)
    assert ended == 1  # `there`; `here` was ended before and `old` had expired
    await _refused(sessions.user_of(there.token), "session revoked")
    assert await sessions.user_of(elsewhere.token) == "u-2"
    assert old.expires_at <= clock.now()


async def test_sessions_are_purged_a_day_after_they_expired(sessions: Sessions, clock: ManualClock):
    issued = await sessions.open("u-1")
    clock.set(issued.expires_at + DAY)
    assert await sessions.purge_expired() == 0
    clock.advance(timedelta(microseconds=1))
    assert await sessions.purge_expired() == 1


@pytest.mark.parametrize(
    "header, token",
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer ", None), ("", None), (None, None)],
)
def test_the_bearer_token_of_an_authorization_header(header, token):
    assert bearer_token(header) == token
