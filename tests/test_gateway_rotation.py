"""Master key rotation on the gateway (the contract of cardcheck/runtime/keys.py): accounts,
sessions and SMS challenges made under key A keep working on a gateway whose current key is B
with A retired; `python -m gateway.rewrap` writes the user rows again under B; then a gateway
on B alone still serves those accounts. On SQLite and PostgreSQL, over a real gRPC server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import secrets
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.exceptions import InvalidTag
from sqlmodel import select

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.v1 import gateway_pb2
from gateway import rewrap
from gateway.users import ID_NUMBER_KEY, IDENTITY_KEY, PHONE_KEY, Identity, UserRow, Users, open_identity
from tests.harness.gateway import ALICE, BOB, CAROL, REGISTER, SIGN_IN, Stack, bearer, refused

ROOT = Path(__file__).parent.parent


def _key() -> tuple[bytes, str]:
    raw = secrets.token_bytes(32)
    return raw, base64.b64encode(raw).decode()


def _users(database_url: str | None, data_dir: Path) -> list[UserRow]:
    db = Database(make_engine(database_url, data_dir, "gateway"))
    try:
        with db.session() as session:
            return list(session.exec(select(UserRow).order_by(UserRow.user_id)).all())
    finally:
        db.dispose()


def _under(keyring: Keyring, row: UserRow) -> bool:
    """Whether the row is wholly under the (one) key of `keyring`: its identity opens under it
    and its hashes are that key's digests of the identity."""
    assert keyring.retired == 0
    try:
        identity = open_identity(keyring.sealer(IDENTITY_KEY), row)
    except InvalidTag:
        return False
    return row.id_hash == keyring.hasher(ID_NUMBER_KEY).digest(identity.id_number.upper()) and (
        row.phone_hash == keyring.hasher(PHONE_KEY).digest(identity.phone)
    )


def _stored(row: UserRow) -> tuple:
    return (row.id_hash, row.phone_hash, row.identity_sealed, row.payment_password_hash, row.region)


def _run_rewrap(env_overrides: dict[str, str | None], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDCHECK_")}
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    return subprocess.run(
        [sys.executable, "-m", "gateway.rewrap", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


async def _sign_in(stack: Stack, phone: str) -> gateway_pb2.Session:
    challenge_id, code = await stack.challenge(SIGN_IN, phone)
    return await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=phone, challenge_id=challenge_id, sms_code=code)
    )


async def _queries_of(stack: Stack, token: str) -> list:
    answer = await stack.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(token))
    return list(answer.queries)


async def test_accounts_survive_a_rotation_the_rewrap_and_the_retired_key_s_removal(
    start_stack, database_url, tmp_path: Path
):
    a_raw, a = _key()
    b_raw, b = _key()
    only_a, only_b = Keyring(a_raw), Keyring(b_raw)

    # Under key A: two accounts, a session, and a sign-in code sent but not yet used.
    old = await start_stack(master_key=a)
    alice = await old.register(ALICE)
    carol = await old.register(CAROL)
    pending_id, pending_code = await old.challenge(SIGN_IN, ALICE.phone)
    assert all(_under(only_a, row) for row in _users(database_url, tmp_path))

    # Rotated: B current, A retired.
    new = await start_stack(master_key=b, retired_master_keys=a)
    # The code sent just before the rotation signs in just after it.
    signed_in = await new.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=pending_id, sms_code=pending_code)
    )
    assert signed_in.user_id == alice.user_id
    # The session from before the rotation still works, and its user's identity opens.
    assert await _queries_of(new, alice.session_token) == []
    query = await new.submit(ALICE, alice.session_token)
    subject = new.reports.created[-1].subject
    assert (subject.name, subject.id_number, subject.phone) == (ALICE.name, ALICE.id_number, ALICE.phone)
    assert [q.query_id for q in await _queries_of(new, signed_in.session_token)] == [query.query_id]
    # Sign-in by phone finds an account stored under A (a fresh code, under B).
    new.clock.advance(timedelta(minutes=2))
    assert (await _sign_in(new, CAROL.phone)).user_id == carol.user_id
    # Nobody registers twice: not the same person, nor the same ID (a lower-case X is the same
    # ID) or the same phone with other details.
    for person in (
        ALICE,
        dataclasses.replace(BOB, id_number=CAROL.id_number.lower()),
        dataclasses.replace(BOB, phone=ALICE.phone),
    ):
        new.clock.advance(timedelta(minutes=2))
        new.bank.enrol(person)
        challenge_id, code = await new.challenge(REGISTER, person.phone)
        await refused(
            new.gateway.Register(new.register_request(person, challenge_id, code)),
            grpc.StatusCode.ALREADY_EXISTS,
            "ALREADY_REGISTERED",
        )
    # What is written now is under B alone.
    new.clock.advance(timedelta(minutes=2))
    bob = await new.register(BOB)
    rows = {row.user_id: row for row in _users(database_url, tmp_path)}
    assert _under(only_b, rows[bob.user_id]) and not _under(only_a, rows[bob.user_id])
    assert _under(only_a, rows[alice.user_id]) and _under(only_a, rows[carol.user_id])

    # The rewrap, as an operator runs it: A's rows are written again under B; then nothing more.
    env = {
        "CARDCHECK_DATA_DIR": str(tmp_path),
        "CARDCHECK_DATABASE_URL": database_url,
        "CARDCHECK_MASTER_KEY": b,
        "CARDCHECK_RETIRED_MASTER_KEYS": a,
    }
    before = {row.user_id: row for row in _users(database_url, tmp_path)}
    first = await asyncio.to_thread(_run_rewrap, env)
    assert (first.returncode, first.stdout, first.stderr) == (
        0, "gateway: 2 rows rewrapped under the current key\n", ""
    )
    after = {row.user_id: row for row in _users(database_url, tmp_path)}
    assert all(_under(only_b, row) for row in after.values())
    assert _stored(after[bob.user_id]) == _stored(before[bob.user_id])  # already under B: untouched
    for user_id in (alice.user_id, carol.user_id):
        with pytest.raises(InvalidTag):
            open_identity(only_a.sealer(IDENTITY_KEY), after[user_id])
        assert open_identity(only_b.sealer(IDENTITY_KEY), after[user_id]) == open_identity(
            only_a.sealer(IDENTITY_KEY), before[user_id]
        )
    second = await asyncio.to_thread(_run_rewrap, env)
    assert (second.returncode, second.stdout) == (0, "gateway: 0 rows rewrapped under the current key\n")
    assert {row.user_id: _stored(row) for row in _users(database_url, tmp_path)} == {
        user_id: _stored(row) for user_id, row in after.items()
    }

    # A destroyed: B alone still serves every account.
    final = await start_stack(master_key=b)
    final.clock.advance(timedelta(minutes=30))
    again = await _sign_in(final, ALICE.phone)
    assert again.user_id == alice.user_id
    await final.submit(ALICE, again.session_token)
    subject = final.reports.created[-1].subject
    assert (subject.name, subject.id_number, subject.phone) == (ALICE.name, ALICE.id_number, ALICE.phone)
    assert (await _sign_in(final, CAROL.phone)).user_id == carol.user_id
    # A session signed under B goes on; one signed under A alone ends with A.
    assert len(await _queries_of(final, signed_in.session_token)) == 2
    await refused(
        final.gateway.ListQueries(gateway_pb2.ListQueriesRequest(), metadata=bearer(alice.session_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )
    final.clock.advance(timedelta(minutes=2))
    challenge_id, code = await final.challenge(REGISTER, CAROL.phone)
    await refused(
        final.gateway.Register(final.register_request(CAROL, challenge_id, code)),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_REGISTERED",
    )


async def test_rewrap_works_in_batches_and_leaves_current_rows_alone(database_url, tmp_path: Path):
    a_raw, _ = _key()
    b_raw, _ = _key()
    db = Database(make_engine(database_url, tmp_path, "gateway"))
    try:
        await asyncio.to_thread(upgrade_to_head, db.engine, "gateway.migrations", "gateway")
        clock = ManualClock()
        people = [
            Identity(f"用户{n}", f"11010119800101{n:03d}X".lower() if n % 2 else f"11010119800101{n:03d}1",
                     f"1380000{n:04d}")
            for n in range(7)
        ]
        under_a = Users(db, Keyring(a_raw), clock)
        rotated = Users(db, Keyring(b_raw, [a_raw]), clock)
        made_under_a = [(await under_a.create(identity, "CN-BJ", "135790", "ICBC")).user_id
                        for identity in people[:5]]
        for identity in people[5:]:
            await rotated.create(identity, "CN-BJ", "135790", "ICBC")
        # A row whose seal is under B but whose hashes are still A's is written again too.
        with db.session() as session:
            row = session.get(UserRow, made_under_a[0])
            row.identity_sealed = Keyring(b_raw).sealer(IDENTITY_KEY).seal(
                Keyring(a_raw).sealer(IDENTITY_KEY).open(row.identity_sealed, row.user_id.encode()),
                row.user_id.encode(),
            )
            session.add(row)
        with db.session() as session:
            current = {r.user_id: r for r in session.exec(select(UserRow)).all()}
        assert sum(_under(Keyring(b_raw), r) for r in current.values()) == 2

        batches: list[int] = []
        original = db.session

        def counting_session():
            batches.append(1)
            return original()

        db.session = counting_session  # type: ignore[method-assign]
        done = rewrap.rewrap(db, Keyring(b_raw, [a_raw]), batch_size=3)
        db.session = original  # type: ignore[method-assign]
        assert done == rewrap.Rewrapped(rows=5, unopened=0)
        assert len(batches) == 3  # 7 rows, 3 to a transaction

        with db.session() as session:
            rows = list(session.exec(select(UserRow)).all())
        assert all(_under(Keyring(b_raw), row) for row in rows)
        for row in rows:
            if row.user_id not in made_under_a:
                assert _stored(row) == _stored(current[row.user_id])
        # Looked up under B alone, every one of them is there, as the person it was.
        only_b = Users(db, Keyring(b_raw), clock)
        for identity in people:
            user = await only_b.find_by_phone(identity.phone)
            assert user is not None
            opened = await only_b.identity(user.user_id)
            assert (opened.name, opened.id_number, opened.phone) == (
                identity.name, identity.id_number.upper(), identity.phone
            )
        assert rewrap.rewrap(db, Keyring(b_raw, [a_raw]), batch_size=3) == rewrap.Rewrapped(0, 0)

        # Without A the rows A sealed cannot be opened: left alone, counted, and the command
        # says so with exit 1 rather than claiming success.
        c_raw, c = _key()
        await Users(db, Keyring(c_raw), clock).create(
            Identity("王五", "110101198001019999", "13900009999"), "CN-BJ", "135790", "ICBC"
        )
        assert rewrap.rewrap(db, Keyring(b_raw), batch_size=3) == rewrap.Rewrapped(0, 1)
    finally:
        db.dispose()
    env = {"CARDCHECK_DATA_DIR": str(tmp_path), "CARDCHECK_DATABASE_URL": database_url,
           "CARDCHECK_MASTER_KEY": base64.b64encode(b_raw).decode()}
    refused_ = await asyncio.to_thread(_run_rewrap, env)
    assert refused_.returncode == 1 and refused_.stdout == "gateway: 0 rows rewrapped under the current key\n"
    assert "1 rows open under none of the keys" in refused_.stderr
    done_ = await asyncio.to_thread(_run_rewrap, {**env, "CARDCHECK_RETIRED_MASTER_KEYS": c})
    assert (done_.returncode, done_.stdout) == (0, "gateway: 1 rows rewrapped under the current key\n")


def test_rewrap_makes_no_key_and_no_database(tmp_path: Path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _, key = _key()

    # No key at all: nothing is made.
    done = _run_rewrap({"CARDCHECK_DATA_DIR": str(data_dir)})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("gateway: no master key") and done.stderr.count("\n") == 1
    # A key but no database.
    done = _run_rewrap({"CARDCHECK_MASTER_KEY": key}, "--data-dir", str(data_dir))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("gateway: no gateway database") and done.stderr.count("\n") == 1
    assert list(data_dir.iterdir()) == []

    # A database the gateway never migrated is not migrated here.
    sqlite3.connect(data_dir / "gateway.db").close()
    done = _run_rewrap({"CARDCHECK_MASTER_KEY": key, "CARDCHECK_DATA_DIR": str(data_dir)})
    assert done.returncode == 2 and "no gateway tables" in done.stderr and done.stderr.count("\n") == 1
    with contextlib.closing(sqlite3.connect(data_dir / "gateway.db")) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    assert sorted(p.name for p in data_dir.iterdir()) == ["gateway.db"]
