"""The payment password's lockout on Users itself, on a real SQLite file and the ManualClock,
without any server: 5 wrong in a row lock it for 30 minutes, the next 5 without a right one
between for 4 hours, the next until a reset; a right password forgives the locks before it. And
the bounded executor the checks run on."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.keys import Keyring
from gateway.payment_passwords import BoundedExecutor, PaymentPasswords
from gateway.users import Identity, Users
from tests.harness.stores import MASTER_KEY, gateway_database

PASSWORD, WRONG, NEW = "135790", "000000", "246802"
SECOND = timedelta(seconds=1)
ALICE = Identity("张三", "220102199003071234", "13912345678")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def db(tmp_path):
    with gateway_database(tmp_path) as db:
        yield db


def _users(db, clock: ManualClock, key: bytes = MASTER_KEY) -> Users:
    keyring = Keyring(key)
    return Users(db, keyring, clock, passwords=PaymentPasswords(keyring, workers=1))


@pytest.fixture
async def users(db, clock):
    made = _users(db, clock)
    yield made
    made.close()


@pytest.fixture
async def user_id(users: Users) -> str:
    return (await users.create(ALICE, "CN-22", PASSWORD, "ICBC")).user_id


async def _refused(users: Users, user_id: str, password: str, reason: str) -> CardCheckError:
    with pytest.raises(CardCheckError) as caught:
        await users.check_payment_password(user_id, password)
    assert caught.value.reason == reason
    return caught.value


async def _run_of_wrong(users: Users, user_id: str) -> CardCheckError:
    """Five wrong in a row: the four counted and the lock the fifth brings."""
    left = [(await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_INVALID")).metadata for _ in range(4)]
    assert left == [{"attempts_left": n} for n in ("4", "3", "2", "1")]
    return await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_LOCKED")


def _z(instant) -> str:
    return instant.isoformat().replace("+00:00", "Z")


async def test_locks_last_30_minutes_then_4_hours_then_until_a_reset(users: Users, user_id: str, clock):
    first = await _run_of_wrong(users, user_id)
    until = clock.now() + timedelta(minutes=30)
    assert first.retry_after == timedelta(minutes=30)
    assert first.metadata == {"locked_until": _z(until), "lock_stage": "1"}
    clock.set(until - SECOND)
    # Locked: even the right password is refused, and nothing typed meanwhile is counted.
    assert (await _refused(users, user_id, PASSWORD, "PAYMENT_PASSWORD_LOCKED")).retry_after == SECOND
    assert (await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_LOCKED")).metadata["locked_until"] == _z(until)
    clock.set(until)
    second = await _run_of_wrong(users, user_id)  # an expired lock starts a fresh count of five
    assert second.retry_after == timedelta(hours=4) and second.metadata["lock_stage"] == "2"
    clock.advance(timedelta(hours=4) - SECOND)
    assert (await _refused(users, user_id, PASSWORD, "PAYMENT_PASSWORD_LOCKED")).retry_after == SECOND
    clock.advance(SECOND)
    third = await _run_of_wrong(users, user_id)
    assert third.metadata == {"reset_required": "true", "lock_stage": "3"} and third.retry_after is None
    clock.advance(timedelta(days=365))
    for password in (PASSWORD, WRONG):
        assert (await _refused(users, user_id, password, "PAYMENT_PASSWORD_LOCKED")).metadata["reset_required"]
    # The reset lifts every count and lock; the old password is a wrong one now.
    await users.reset_payment_password(user_id, NEW)
    assert (await _refused(users, user_id, PASSWORD, "PAYMENT_PASSWORD_INVALID")).metadata == {"attempts_left": "4"}
    await users.check_payment_password(user_id, NEW)
    assert (await _run_of_wrong(users, user_id)).metadata["lock_stage"] == "1"


async def test_a_right_password_forgives_the_wrong_ones_and_the_locks_before_it(users: Users, user_id: str, clock):
    for _ in range(4):
        await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_INVALID")
    await users.check_payment_password(user_id, PASSWORD)
    assert (await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_INVALID")).metadata == {"attempts_left": "4"}
    await users.check_payment_password(user_id, PASSWORD)

    await _run_of_wrong(users, user_id)
    clock.advance(timedelta(minutes=30))
    await users.check_payment_password(user_id, PASSWORD)
    again = await _run_of_wrong(users, user_id)
    assert again.metadata["lock_stage"] == "1" and again.retry_after == timedelta(minutes=30)


async def test_the_attempts_and_locks_are_settings(db, clock):
    keyring = Keyring(MASTER_KEY)
    users = Users(
        db, keyring, clock, passwords=PaymentPasswords(keyring, workers=1),
        max_password_attempts=2, password_locks=[timedelta(minutes=1)],
    )
    try:
        user_id = (await users.create(ALICE, "CN-22", PASSWORD, "ICBC")).user_id
        assert (await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_INVALID")).metadata == {"attempts_left": "1"}
        assert (await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_LOCKED")).retry_after == timedelta(minutes=1)
        clock.advance(timedelta(minutes=1))
        await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_INVALID")
        locked = await _refused(users, user_id, WRONG, "PAYMENT_PASSWORD_LOCKED")
        assert locked.metadata == {"reset_required": "true", "lock_stage": "2"}
    finally:
        users.close()


async def test_a_hash_no_configured_key_can_check_asks_for_a_reset_and_counts_nothing(db, clock):
    before = _users(db, clock, bytes(range(1, 33)))
    try:
        user_id = (await before.create(ALICE, "CN-22", PASSWORD, "ICBC")).user_id
    finally:
        before.close()
    after = _users(db, clock)  # that master key is gone
    try:
        for _ in range(6):
            refusal = await _refused(after, user_id, PASSWORD, "PAYMENT_PASSWORD_LOCKED")
            assert refusal.metadata == {"reset_required": "true", "cause": "key_retired"}
        await after.reset_payment_password(user_id, NEW)
        await after.check_payment_password(user_id, NEW)
    finally:
        after.close()


async def test_checks_beyond_the_workers_and_the_queue_are_refused_at_once():
    executor = BoundedExecutor(workers=1, queue=1)
    release = threading.Event()
    try:
        running = [asyncio.ensure_future(executor.run(release.wait, 5)) for _ in range(2)]
        await asyncio.sleep(0)
        assert executor.taken == 2
        with pytest.raises(CardCheckError) as caught:
            await executor.run(lambda: None)
        assert (caught.value.reason, caught.value.retry_after) == ("SERVICE_BUSY", timedelta(seconds=1))
        release.set()
        assert await asyncio.gather(*running) == [True, True]
        await asyncio.sleep(0)
        assert executor.taken == 0
        assert await executor.run(lambda: 42) == 42
    finally:
        release.set()
        executor.shutdown()
