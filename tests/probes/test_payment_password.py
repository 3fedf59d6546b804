"""Probes of the payment password against `cardcheck up`: guessing it online locks it, longer
each time and in the end until a reset by SMS code and face check; and a copy of the gateway's
database file without the master key cannot test a single guess offline.

The locks are configured down to seconds (the gateway reads them from the environment) so that
the real processes can show the whole escalation; their lengths are tested with a controlled
clock in tests/test_gateway_payment_password.py."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError

from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.v1 import common_pb2, gateway_pb2
from gateway.payment_passwords import PEPPER_KEY, PaymentPasswordHashes
from tests.probes.conftest import PAYMENT_PASSWORD, journey_of, register, registrable_people

MESH_ENV = {
    "CARDCHECK_PAYMENT_PASSWORD_LOCK_MINUTES": "0.02",  # 1.2 s
    "CARDCHECK_PAYMENT_PASSWORD_SECOND_LOCK_MINUTES": "0.04",  # 2.4 s
    "CARDCHECK_REPORT_USER_BURST": "100",
}
WRONG = "000000"
NEW_PASSWORD = "975310"


async def _refusal(journey, password: str, query_id: str = "q-none") -> CardCheckError:
    with pytest.raises(CardCheckError) as caught:
        await journey.call(
            journey.gateway.GetReport, gateway_pb2.GetReportRequest(query_id=query_id, payment_password=password)
        )
    return caught.value


async def _run_of_wrong(journey) -> CardCheckError:
    for left in ("4", "3", "2", "1"):
        refusal = await _refusal(journey, WRONG)
        assert (refusal.reason, refusal.metadata.get("attempts_left")) == ("PAYMENT_PASSWORD_INVALID", left)
    refusal = await _refusal(journey, WRONG)
    assert refusal.reason == "PAYMENT_PASSWORD_LOCKED"
    return refusal


async def test_guessing_locks_longer_each_time_then_until_a_reset(probe_mesh):
    async with journey_of(probe_mesh, registrable_people()[0]) as journey:
        await register(journey)
        first = await _run_of_wrong(journey)
        assert first.metadata["lock_stage"] == "1" and "locked_until" in first.metadata
        assert first.retry_after is not None and first.retry_after.total_seconds() <= 1.2
        # While locked, even the right password is refused.
        assert (await _refusal(journey, PAYMENT_PASSWORD)).reason == "PAYMENT_PASSWORD_LOCKED"
        await asyncio.sleep(first.retry_after.total_seconds() + 0.2)

        second = await _run_of_wrong(journey)
        assert second.metadata["lock_stage"] == "2"
        assert second.retry_after is not None and 1.2 < second.retry_after.total_seconds() <= 2.4
        await asyncio.sleep(second.retry_after.total_seconds() + 0.2)

        third = await _run_of_wrong(journey)
        assert third.metadata == {"reset_required": "true", "lock_stage": "3"} and third.retry_after is None
        await asyncio.sleep(2.6)  # longer than any timed lock: still locked
        assert (await _refusal(journey, PAYMENT_PASSWORD)).metadata.get("reset_required") == "true"

        # The way out: a fresh QUERY_AUTH code from the phone's inbox, the face, a new password.
        challenge_id, code = await journey.sms_code(common_pb2.SMS_PURPOSE_QUERY_AUTH)
        await journey.call(
            journey.gateway.ResetPaymentPassword,
            gateway_pb2.ResetPaymentPasswordRequest(
                challenge_id=challenge_id, sms_code=code, face_token="sandbox:pass",
                new_payment_password=NEW_PASSWORD,
            ),
        )
        assert (await _refusal(journey, PAYMENT_PASSWORD)).metadata.get("attempts_left") == "4"
        # Past the password check: the query asked for is not there.
        assert (await _refusal(journey, NEW_PASSWORD)).reason == "NOT_FOUND"


async def test_a_dump_of_the_database_cannot_test_a_guess_without_the_key(probe_mesh):
    async with journey_of(probe_mesh, registrable_people()[1]) as journey:
        session = await register(journey)
        assert (await _refusal(journey, PAYMENT_PASSWORD)).reason == "NOT_FOUND"  # the password is right

    # The gateway's SQLite file, as a stolen copy would hold it (cardcheck/runtime/database.py).
    database = Path(probe_mesh.data_dir) / "gateway.db"
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        (stored,) = conn.execute(
            "SELECT payment_password_hash FROM gw_users WHERE user_id = ?", (session.user_id,)
        ).fetchone()
    raw = b"".join(p.read_bytes() for p in database.parent.glob("gateway.db*"))
    assert PAYMENT_PASSWORD.encode() not in raw and NEW_PASSWORD.encode() not in raw

    # argon2 alone, what a dump used to be searched with, cannot read it; nor can a guess of the
    # key (a key of zeros), so no password can be tested against it.
    assert stored.startswith("hmac-sha256$")
    with pytest.raises(InvalidHashError):
        PasswordHasher().verify(stored, PAYMENT_PASSWORD)
    assert PaymentPasswordHashes(bytes(32)).verify(session.user_id, stored, PAYMENT_PASSWORD).unverifiable
    # What it takes is the master key, which is not in the database (keys/master.key).
    keyed = PaymentPasswordHashes(Keyring(load_master_key(None, Path(probe_mesh.data_dir))).subkey(PEPPER_KEY))
    assert keyed.verify(session.user_id, stored, PAYMENT_PASSWORD).right
    assert not keyed.verify(session.user_id, stored, WRONG).right
