"""The payment password (gateway/payment_passwords.py, gateway/users.py) through a real gateway
on SQLite and PostgreSQL: a keyed hash a dump alone cannot test guesses against, old plain
argon2 hashes upgraded at the next right password, hashes of a retired key, the escalating
lockout and its reset by SMS and face check, and the bounded executor that keeps a burst of
checks from starving the database."""

from __future__ import annotations

import asyncio
import base64
import secrets
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError
from sqlmodel import select

from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import Keyring, load_master_key
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.v1 import gateway_pb2
from gateway.config import GatewayConfig
from gateway.payment_passwords import PEPPER_KEY, PaymentPasswordHashes, key_id
from gateway.rewrap import rewrap
from gateway.users import UserRow
from tests.harness.gateway import ALICE, BOB, CAROL, PASSWORD, SIGN_IN, Stack, bearer, refusal_of, refused

DENIED = grpc.StatusCode.PERMISSION_DENIED
WRONG = "000000"
NEW_PASSWORD = "864209"
# Room for every attempt a test makes at one instant: the per-user budget is tested elsewhere.
ROOMY = GatewayConfig(report_user_burst=100)


def _row(stack: Stack, user_id: str) -> UserRow:
    db = Database(make_engine(stack.settings.database_url, stack.settings.data_dir, "gateway"))
    try:
        with db.session() as session:
            return session.exec(select(UserRow).where(UserRow.user_id == user_id)).one()
    finally:
        db.dispose()


def _store_hash(stack: Stack, user_id: str, password_hash: str) -> None:
    db = Database(make_engine(stack.settings.database_url, stack.settings.data_dir, "gateway"))
    try:
        with db.session() as session:
            row = session.get(UserRow, user_id)
            row.payment_password_hash = password_hash
            session.add(row)
    finally:
        db.dispose()


def _current_key_id(stack: Stack, master_key: bytes | None = None) -> str:
    master = master_key or load_master_key(stack.settings.master_key, stack.settings.data_dir)
    return key_id(Keyring(master).subkey(PEPPER_KEY))


def _report(stack: Stack, token: str, query_id: str, password: str):
    request = gateway_pb2.GetReportRequest(query_id=query_id, payment_password=password)
    return stack.gateway.GetReport(request, metadata=bearer(token))


async def _wrong(stack: Stack, token: str, query_id: str, times: int) -> list:
    return [
        await refused(_report(stack, token, query_id, WRONG), DENIED, "PAYMENT_PASSWORD_INVALID")
        for _ in range(times)
    ]


async def _locked(stack: Stack, token: str, query_id: str, password: str = WRONG):
    return await refused(_report(stack, token, query_id, password), DENIED, "PAYMENT_PASSWORD_LOCKED")


def _reset_request(challenge_id: str, code: str, **overrides) -> gateway_pb2.ResetPaymentPasswordRequest:
    values = dict(
        challenge_id=challenge_id, sms_code=code, face_token="sandbox:pass", new_payment_password=NEW_PASSWORD
    )
    values.update(overrides)
    return gateway_pb2.ResetPaymentPasswordRequest(**values)


# --- the stored hash -----------------------------------------------------------------------------


async def test_a_right_password_costs_one_transaction_and_no_thread_of_its_own(stack: Stack):
    """GetReport reads the user's row in the session's revocation check, and the keyed hash is
    checked on the event loop: one transaction, nothing on the payment password executor."""
    alice = await stack.register(ALICE)
    query = await stack.submit(ALICE, alice.session_token)
    assert stack.flows is not None
    executor = stack.flows._users._passwords.executor
    transactions = []

    def began(connection) -> None:
        transactions.append(connection)

    sa.event.listen(sa.Engine, "begin", began)
    try:
        assert (await _report(stack, alice.session_token, query.query_id, PASSWORD)).query_id == query.query_id
    finally:
        sa.event.remove(sa.Engine, "begin", began)
    assert len(transactions) == 1
    assert executor.taken == 0 and not executor._pool._threads



async def test_the_stored_hash_is_keyed_so_a_dump_alone_cannot_test_a_guess(stack: Stack):
    alice = await stack.register(ALICE)
    bob = await stack.register(BOB)
    stored = _row(stack, alice.user_id).payment_password_hash
    scheme, stored_key_id, salt, mac = stored.split("$")
    assert (scheme, stored_key_id) == ("hmac-sha256", _current_key_id(stack))
    assert PASSWORD not in stored
    # argon2 alone (what a dump of the old scheme was attacked with) cannot even read it.
    with pytest.raises(InvalidHashError):
        PasswordHasher().verify(stored, PASSWORD)
    # Without the key a search of all 10^6 passwords has nothing to compare: under any other
    # key the hash is not even recognised, and under the right one the right password matches.
    assert PaymentPasswordHashes(secrets.token_bytes(32)).verify(alice.user_id, stored, PASSWORD).unverifiable
    keyed = PaymentPasswordHashes(Keyring(load_master_key(None, stack.settings.data_dir)).subkey(PEPPER_KEY))
    assert keyed.verify(alice.user_id, stored, PASSWORD).right
    assert not keyed.verify(alice.user_id, stored, WRONG).right
    # Salted and bound to its row: the same password stores differently for Bob, and Alice's
    # hash copied onto Bob's row does not verify there.
    assert _row(stack, bob.user_id).payment_password_hash != stored
    assert not keyed.verify(bob.user_id, stored, PASSWORD).right
    for garbage in ("", "hmac-sha256$", f"hmac-sha256${stored_key_id}$!!$!!", "plain:135790"):
        assert not keyed.verify(alice.user_id, garbage, PASSWORD).right


async def test_an_old_argon2_hash_verifies_is_upgraded_and_verifies_again(start_stack):
    stack = await start_stack(config=ROOMY)
    alice = await stack.register(ALICE)
    token = alice.session_token
    query = await stack.submit(ALICE, token)
    # As the scheme before stored it: argon2-cffi's defaults, no key.
    old = PasswordHasher().hash(PASSWORD)
    _store_hash(stack, alice.user_id, old)

    # A wrong password on the old hash counts as wrong and leaves it as it is.
    [refusal] = await _wrong(stack, token, query.query_id, 1)
    assert refusal.metadata["attempts_left"] == "4"
    assert _row(stack, alice.user_id).payment_password_hash == old
    # The right one: the report, and the hash stored again under the keyed scheme.
    report = await _report(stack, token, query.query_id, PASSWORD)
    assert report.query_id == query.query_id
    upgraded = _row(stack, alice.user_id)
    assert upgraded.payment_password_hash.startswith(f"hmac-sha256${_current_key_id(stack)}$")
    assert upgraded.wrong_password_count == 0
    # It verifies again, now under the new scheme, and a wrong password is still wrong.
    assert (await _report(stack, token, query.query_id, PASSWORD)).query_id == query.query_id
    assert _row(stack, alice.user_id).payment_password_hash == upgraded.payment_password_hash
    [refusal] = await _wrong(stack, token, query.query_id, 1)
    assert refusal.metadata["attempts_left"] == "4"


def test_the_lockout_columns_come_to_rows_of_the_first_schema(tmp_path: Path, database_url):
    """A database at 0001 holding a user (as the gateway wrote before) migrates to head with
    no locks and no reset required."""
    engine = make_engine(database_url, tmp_path, "gateway")
    try:
        assert upgrade_to_head(engine, "gateway.migrations", "gateway", target="0001") == "0001"
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO gw_users (user_id, id_hash, phone_hash, identity_sealed, region,"
                    " payment_password_hash, bound_bank_code, wrong_password_count, created_at)"
                    " VALUES ('u-1', :i, :p, :s, 'CN-JL', :h, 'ICBC', 3, CURRENT_TIMESTAMP)"
                ),
                {"i": "i" * 64, "p": "p" * 64, "s": b"\x01", "h": PasswordHasher().hash(PASSWORD)},
            )
        assert upgrade_to_head(engine, "gateway.migrations", "gateway") == "0005"
        with engine.connect() as conn:
            row = conn.execute(sa.select(UserRow.__table__)).one()
        assert (row.wrong_password_count, row.payment_password_locks, row.payment_password_reset_required) == (
            3, 0, False
        )
        assert row.payment_password_hash.startswith("$argon2id$")
    finally:
        engine.dispose()


# --- rotation ------------------------------------------------------------------------------------


async def _sign_in(stack: Stack, phone: str) -> gateway_pb2.Session:
    challenge_id, code = await stack.challenge(SIGN_IN, phone)
    return await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=phone, challenge_id=challenge_id, sms_code=code)
    )


async def test_a_hash_of_a_retired_key_verifies_is_made_again_and_without_the_key_asks_for_a_reset(
    start_stack,
):
    a_raw, b_raw = secrets.token_bytes(32), secrets.token_bytes(32)
    a, b = base64.b64encode(a_raw).decode(), base64.b64encode(b_raw).decode()
    old = await start_stack(master_key=a, config=ROOMY)
    alice = await old.register(ALICE)
    carol = await old.register(CAROL)
    query = await old.submit(ALICE, alice.session_token)
    assert _row(old, alice.user_id).payment_password_hash.split("$")[1] == _current_key_id(old, a_raw)

    # Rotated: B current, A retired. Alice's hash under A verifies and is made again under B.
    rotated = await start_stack(master_key=b, retired_master_keys=a, config=ROOMY)
    await _wrong(rotated, alice.session_token, query.query_id, 1)  # still wrong when wrong
    assert (await _report(rotated, alice.session_token, query.query_id, PASSWORD)).query_id == query.query_id
    assert _row(rotated, alice.user_id).payment_password_hash.split("$")[1] == _current_key_id(rotated, b_raw)

    # The rewrap writes identities and lookups again under B; it cannot remake a password hash.
    carol_hash = _row(rotated, carol.user_id).payment_password_hash
    db = Database(make_engine(rotated.settings.database_url, rotated.settings.data_dir, "gateway"))
    try:
        assert rewrap(db, Keyring(b_raw, [a_raw])).rows == 2
    finally:
        db.dispose()
    assert _row(rotated, carol.user_id).payment_password_hash == carol_hash

    # A destroyed: Alice, who came back meanwhile, keeps her password. Carol's hash is under A
    # alone: it cannot be checked, so she is asked to reset (never counted as wrong).
    final = await start_stack(master_key=b, config=ROOMY)
    final.clock.advance(timedelta(minutes=5))
    alice_again = await _sign_in(final, ALICE.phone)
    assert (await _report(final, alice_again.session_token, query.query_id, PASSWORD)).query_id == query.query_id
    final.clock.advance(timedelta(minutes=5))
    carol_again = await _sign_in(final, CAROL.phone)
    assert carol_again.user_id == carol.user_id
    for password in (PASSWORD, WRONG, PASSWORD, WRONG, WRONG, WRONG):
        refusal = await _locked(final, carol_again.session_token, "q1", password)
        assert refusal.metadata == {"reset_required": "true", "cause": "key_retired"}
        assert refusal.retry_after is None
    assert _row(final, carol.user_id).wrong_password_count == 0
    final.clock.advance(timedelta(minutes=5))
    challenge_id, code = await final.query_auth(CAROL, carol_again.session_token)
    await final.gateway.ResetPaymentPassword(
        _reset_request(challenge_id, code), metadata=bearer(carol_again.session_token)
    )
    await refused(_report(final, carol_again.session_token, "q1", NEW_PASSWORD), grpc.StatusCode.NOT_FOUND,
                  "NOT_FOUND")  # past the password: the query is not Carol's


# --- the escalating lockout and its reset ---------------------------------------------------------


async def test_wrong_passwords_lock_for_30_minutes_then_4_hours_then_until_a_reset(start_stack):
    stack = await start_stack(config=ROOMY)
    alice = await stack.register(ALICE)
    token = alice.session_token
    query = await stack.submit(ALICE, token)
    qid = query.query_id

    async def run_of_wrong() -> object:
        refusals = await _wrong(stack, token, qid, 4)
        assert [r.metadata["attempts_left"] for r in refusals] == ["4", "3", "2", "1"]
        return await _locked(stack, token, qid)

    # First lock: 30 minutes.
    first = await run_of_wrong()
    assert first.retry_after == timedelta(minutes=30) and first.metadata["lock_stage"] == "1"
    assert first.metadata["locked_until"] == (stack.clock.now() + timedelta(minutes=30)).isoformat().replace(
        "+00:00", "Z"
    )
    stack.clock.advance(timedelta(minutes=30))
    # Second, without a right password between: 4 hours.
    second = await run_of_wrong()
    assert second.retry_after == timedelta(hours=4) and second.metadata["lock_stage"] == "2"
    stack.clock.advance(timedelta(hours=3, minutes=59))
    assert (await _locked(stack, token, qid, PASSWORD)).retry_after == timedelta(minutes=1)
    stack.clock.advance(timedelta(minutes=1))
    # A right password forgives the locks before it: the next run locks for 30 minutes again.
    await _wrong(stack, token, qid, 4)
    assert (await _report(stack, token, qid, PASSWORD)).query_id == qid
    assert (await run_of_wrong()).metadata["lock_stage"] == "1"
    stack.clock.advance(timedelta(minutes=30))
    assert (await run_of_wrong()).metadata["lock_stage"] == "2"
    stack.clock.advance(timedelta(hours=4))
    # Third: locked until a reset, however long one waits and whatever one types.
    third = await run_of_wrong()
    assert third.metadata == {"reset_required": "true", "lock_stage": "3"} and third.retry_after is None
    stack.clock.advance(timedelta(days=30))
    token = (await _sign_in(stack, ALICE.phone)).session_token  # a new session changes nothing
    calls = len(stack.reports.report_calls)
    for password in (PASSWORD, WRONG):
        assert (await _locked(stack, token, qid, password)).metadata["reset_required"] == "true"
    assert len(stack.reports.report_calls) == calls
    row = _row(stack, alice.user_id)
    assert (row.payment_password_locks, row.payment_password_reset_required) == (3, True)

    # The reset: every field checked at once, then the SMS code, then the face.
    refusal = await refused(
        stack.gateway.ResetPaymentPassword(
            _reset_request("nope", "12", face_token="", new_payment_password="12345a"), metadata=bearer(token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(refusal.violations) == {"challenge_id", "sms_code", "face_token", "new_payment_password"}
    await refused(
        stack.gateway.ResetPaymentPassword(_reset_request("nope", "123456")), grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )
    challenge_id, code = await stack.query_auth(ALICE, token)
    wrong_code = f"{(int(code) + 1) % 1_000_000:06d}"
    await refused(
        stack.gateway.ResetPaymentPassword(_reset_request(challenge_id, wrong_code), metadata=bearer(token)),
        DENIED,
        "VERIFICATION_FAILED",
    )
    refusal = await refused(
        stack.gateway.ResetPaymentPassword(
            _reset_request(challenge_id, code, face_token="sandbox:fail"), metadata=bearer(token)
        ),
        DENIED,
        "VERIFICATION_FAILED",
    )
    assert refusal.metadata == {"factor": "face", "cause": "not_passed"}
    assert (await _locked(stack, token, qid, PASSWORD)).metadata["reset_required"] == "true"
    stack.clock.advance(timedelta(minutes=1))
    challenge_id, code = await stack.query_auth(ALICE, token)
    await stack.gateway.ResetPaymentPassword(_reset_request(challenge_id, code), metadata=bearer(token))
    row = _row(stack, alice.user_id)
    assert (row.payment_password_locks, row.payment_password_reset_required, row.wrong_password_count) == (
        0, False, 0
    )
    assert row.payment_password_hash.startswith(f"hmac-sha256${_current_key_id(stack)}$")
    # The old password is wrong now (a fresh count), the new one opens the report.
    [refusal] = await _wrong(stack, token, qid, 1)
    assert refusal.metadata["attempts_left"] == "4"
    assert (await _report(stack, token, qid, NEW_PASSWORD)).query_id == qid
    # The code was used once.
    await refused(
        stack.gateway.ResetPaymentPassword(_reset_request(challenge_id, code), metadata=bearer(token)),
        DENIED,
        "VERIFICATION_FAILED",
    )


def test_lockout_and_executor_settings_are_read_and_checked():
    from cardcheck.runtime.settings import SettingsError

    config = GatewayConfig.from_env(
        {
            "CARDCHECK_PAYMENT_PASSWORD_SECOND_LOCK_MINUTES": "90",
            "CARDCHECK_PAYMENT_PASSWORD_WORKERS": "3",
            "CARDCHECK_PAYMENT_PASSWORD_QUEUE": "0",
        }
    )
    assert (config.payment_password_second_lock, config.payment_password_workers, config.payment_password_queue) == (
        timedelta(minutes=90), 3, 0
    )
    assert GatewayConfig.from_env({}).payment_password_second_lock == timedelta(hours=4)
    assert GatewayConfig().payment_password_workers >= 1
    for var, value in (
        ("CARDCHECK_PAYMENT_PASSWORD_WORKERS", "0"),
        ("CARDCHECK_PAYMENT_PASSWORD_QUEUE", "-1"),
        ("CARDCHECK_PAYMENT_PASSWORD_SECOND_LOCK_MINUTES", "soon"),
    ):
        with pytest.raises(SettingsError, match=var):
            GatewayConfig.from_env({var: value})


# --- the bounded executor ------------------------------------------------------------------------


async def test_a_burst_of_checks_is_bounded_refused_cleanly_and_leaves_the_database_answering(
    start_stack,
):
    """One thread and one place in the queue: of a burst of GetReports on a slow (old, costly)
    argon2 hash, two are checked and the rest refused at once with SERVICE_BUSY and a RetryInfo,
    none counted as wrong; meanwhile calls that only need the database answer at once (more
    checks than the default executor has threads would have queued them behind argon2)."""
    stack = await start_stack(
        config=GatewayConfig(payment_password_workers=1, payment_password_queue=1, report_user_burst=100)
    )
    alice = await stack.register(ALICE)
    token = alice.session_token
    query = await stack.submit(ALICE, token)
    slow = PasswordHasher(time_cost=10, memory_cost=64 * 1024, parallelism=1).hash(PASSWORD)
    _store_hash(stack, alice.user_id, slow)

    burst = [asyncio.ensure_future(_report(stack, token, query.query_id, PASSWORD)) for _ in range(12)]
    busy = []
    for done in asyncio.as_completed(burst):
        try:
            await done
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            busy.append(error)
        if len(busy) == 10:
            break
    # The ten refusals came back while the two admitted checks still run.
    assert sum(task.done() for task in burst) == 10
    listed = await stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(token))
    assert [q.query_id for q in listed.queries] == [query.query_id]
    assert not all(task.done() for task in burst)  # the database answered while the checks ran

    for error in busy:
        refusal = refusal_of(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVICE_BUSY")
        assert refusal.retry_after == timedelta(seconds=1)
    reports = await asyncio.gather(*burst, return_exceptions=True)
    admitted = [r for r in reports if not isinstance(r, Exception)]
    assert len(admitted) == 2 and all(r.query_id == query.query_id for r in admitted)
    # Nothing was counted wrong, the slots are free again and the hash was upgraded.
    row = _row(stack, alice.user_id)
    assert row.wrong_password_count == 0 and row.payment_password_hash.startswith("hmac-sha256$")
    assert (await _report(stack, token, query.query_id, PASSWORD)).query_id == query.query_id
