"""The notifier across a master key rotation: messages stored under key A keep working once B is
current and A retired (the inbox finds them, a retried Send is the same message, a queued one is
delivered, the per-phone cap counts them), `python -m notifier.rewrap` moves them under B, and
then B alone does everything. Real grpc.aio servers, SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.database import make_engine
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.keys import Keyring
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from notifier.app import NotifierParts, build_parts
from notifier.config import Cap, NotifierConfig
from notifier.providers import DeliveryError, OutgoingSms, SmsProvider
from notifier.rewrap import rewrap
from tests.test_notifier import PHONE, _code_request, _settings

REPO = Path(__file__).resolve().parent.parent
QUEUED = notifier_pb2.DELIVERY_STATUS_QUEUED
DELIVERED = notifier_pb2.DELIVERY_STATUS_DELIVERED
OTHER_PHONE = "13900000000"


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


class Switchboard(SmsProvider):
    """Delivers every message but the ones in `blocked` (by message_id), and notes what it sent."""

    name = "switchboard"

    def __init__(self, *, inbox: bool) -> None:
        self.keeps_inbox = inbox
        self.blocked: set[str] = set()
        self.block_all = False
        self.sent: dict[str, OutgoingSms] = {}

    async def deliver(self, sms: OutgoingSms) -> None:
        if self.block_all or sms.message_id in self.blocked:
            raise DeliveryError("HTTP_503")
        self.sent[sms.message_id] = sms


@dataclasses.dataclass
class Node:
    parts: NotifierParts
    stub: notifier_pb2_grpc.NotifierStub
    channel: grpc.aio.Channel

    async def status(self, message_id: str) -> int:
        reply = await self.stub.GetDelivery(notifier_pb2.GetDeliveryRequest(message_id=message_id))
        return reply.status

    async def inbox(self, phone: str = PHONE) -> list[notifier_pb2.Message]:
        return list((await self.stub.ListMessages(notifier_pb2.ListMessagesRequest(phone=phone))).messages)

    async def close(self) -> None:
        await self.channel.close()
        await self.parts.host.stop(0)


@pytest.fixture
async def start(tmp_path, database_url):
    running: list[Node] = []

    async def start(master: str, retired: str | None, provider: Switchboard, clock: ManualClock, **kwargs) -> Node:
        settings = _settings(tmp_path, database_url, sandbox=provider.keeps_inbox).replace(
            master_key=master,
            retired_master_keys=retired,
        )
        config = kwargs.pop("config", None) or NotifierConfig(retry_base_s=10, retry_max_s=80)
        parts = await build_parts(
            settings, provider=provider, clock=clock, config=config, start_worker=False, **kwargs
        )
        port = await parts.host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        node = Node(parts, notifier_pb2_grpc.NotifierStub(channel), channel)
        running.append(node)
        return node

    yield start
    for node in reversed(running):
        await node.close()


def _consent_request(key: str, version: str, phone: str = PHONE) -> notifier_pb2.SendRequest:
    return notifier_pb2.SendRequest(
        idempotency_key=key,
        phone=phone,
        kind=notifier_pb2.MESSAGE_KIND_CONSENT_RECEIPT,
        params={"agreement_version": version},
    )


async def _refused(call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return from_rpc_error(caught.value).reason


def _rows(tmp_path: Path, database_url: str | None) -> dict[str, sa.Row]:
    engine = make_engine(database_url, tmp_path, "notifier")
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM nt_messages")).all()
    finally:
        engine.dispose()
    return {row.idempotency_key: row for row in rows}


def _under(key: str, row: sa.Row, phone: str) -> bool:
    """Whether the row's phone is sealed and hashed under `key` (that key alone)."""
    alone = Keyring(base64.b64decode(key))
    try:
        opened = alone.sealer("notifier-phone").open(row.phone_sealed, row.message_id.encode()).decode()
    except InvalidTag:
        return False
    return opened == phone and row.phone_hash == alone.hasher("phone").digest(phone)


def _run_rewrap(tmp_path: Path, database_url: str | None, master: str, retired: str | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDCHECK_")}
    env.update(CARDCHECK_DATA_DIR=str(tmp_path), CARDCHECK_MASTER_KEY=master)
    if retired:
        env["CARDCHECK_RETIRED_MASTER_KEYS"] = retired
    if database_url:
        env["CARDCHECK_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "notifier.rewrap"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


async def test_the_sandbox_inbox_retries_and_queued_messages_survive_a_rotation(start, tmp_path, database_url):
    key_a, key_b = _key(), _key()
    clock = ManualClock()
    provider = Switchboard(inbox=True)

    # Under A: one code delivered, two receipts whose first attempt fails (left QUEUED).
    node = await start(key_a, None, provider, clock)
    provider.block_all = True
    queued = [(await node.stub.Send(_consent_request(f"q{n}", f"2026-0{n}", OTHER_PHONE))) for n in (1, 2)]
    assert [q.status for q in queued] == [QUEUED, QUEUED]
    provider.block_all = False
    code = await node.stub.Send(_code_request("a1", "135790"))
    assert code.status == DELIVERED
    await node.close()

    # B current, A retired: everything stored under A still works.
    node = await start(key_b, key_a, provider, clock)
    [found] = await node.inbox()
    assert found.message_id == code.message_id and found.phone == PHONE and "135790" in found.body
    assert (await node.stub.Send(_code_request("a1", "135790"))).message_id == code.message_id
    # ... and a retry with other text is still told apart from the same message.
    assert await _refused(node.stub.Send(_code_request("a1", "999999"))) == "INVALID_ARGUMENT"
    provider.blocked = {queued[1].message_id}
    clock.advance(timedelta(minutes=2))
    assert await node.parts.worker.run_once() == 2
    assert await node.status(queued[0].message_id) == DELIVERED
    assert await node.status(queued[1].message_id) == QUEUED
    sent = provider.sent[queued[0].message_id]
    assert sent.phone == OTHER_PHONE and "2026-01" in sent.body
    newer = await node.stub.Send(_code_request("b1", "246802"))
    assert [m.message_id for m in await node.inbox()] == [newer.message_id, code.message_id]
    await node.close()

    rows = _rows(tmp_path, database_url)
    assert _under(key_b, rows["b1"], PHONE) and not _under(key_a, rows["b1"], PHONE)  # new: B only
    assert all(_under(key_a, rows[k], p) for k, p in [("a1", PHONE), ("q1", OTHER_PHONE), ("q2", OTHER_PHONE)])

    done = _run_rewrap(tmp_path, database_url, key_b, key_a)
    assert (done.returncode, done.stdout, done.stderr) == (0, "notifier: 3 rows rewrapped under the current key\n", "")
    again = _run_rewrap(tmp_path, database_url, key_b, key_a)
    assert (again.returncode, again.stdout) == (0, "notifier: 0 rows rewrapped under the current key\n")
    rows = _rows(tmp_path, database_url)
    assert all(_under(key_b, rows[k], p) for k, p in [("a1", PHONE), ("q1", OTHER_PHONE), ("q2", OTHER_PHONE)])
    assert PHONE not in done.stdout + again.stdout

    # A destroyed: B alone.
    node = await start(key_b, None, provider, clock)
    inbox = await node.inbox()
    assert [m.message_id for m in inbox] == [newer.message_id, code.message_id]
    assert inbox[1].phone == PHONE and "135790" in inbox[1].body
    assert (await node.stub.Send(_code_request("a1", "135790"))).message_id == code.message_id
    assert await _refused(node.stub.Send(_code_request("a1", "999999"))) == "INVALID_ARGUMENT"
    provider.blocked = set()
    clock.advance(timedelta(minutes=2))
    assert await node.parts.worker.run_once() == 1
    assert await node.status(queued[1].message_id) == DELIVERED
    sent = provider.sent[queued[1].message_id]
    assert sent.phone == OTHER_PHONE and "2026-02" in sent.body


async def test_sealed_text_and_the_cap_outside_sandbox_survive_a_rotation(start, tmp_path, database_url):
    key_a, key_b = _key(), _key()
    clock = ManualClock()
    provider = Switchboard(inbox=False)
    config = NotifierConfig(
        retry_base_s=10, retry_max_s=80, caps={**NotifierConfig().caps, "CONSENT_RECEIPT": Cap(per_hour=2, per_day=None)}
    )

    # Under A: one receipt delivered (its text gone, its digest kept), one QUEUED with its text sealed.
    node = await start(key_a, None, provider, clock, config=config)
    delivered = await node.stub.Send(_consent_request("d1", "2026-01"))
    assert delivered.status == DELIVERED
    provider.block_all = True
    queued = await node.stub.Send(_consent_request("q1", "2026-02"))
    assert queued.status == QUEUED
    await node.close()
    rows = _rows(tmp_path, database_url)
    assert rows["d1"].body_sealed is None and rows["d1"].body_digest is not None
    assert rows["q1"].body_sealed is not None and rows["q1"].body is None

    # B current, A retired: the cap counts A's messages, a retry is the same message.
    node = await start(key_b, key_a, provider, clock, config=config)
    assert await _refused(node.stub.Send(_consent_request("n1", "2026-03"))) == "RATE_LIMITED"
    assert (await node.stub.Send(_consent_request("d1", "2026-01"))).message_id == delivered.message_id
    assert await _refused(node.stub.Send(_consent_request("d1", "2099-01"))) == "INVALID_ARGUMENT"
    await node.close()

    engine = make_engine(database_url, tmp_path, "notifier")
    try:
        assert rewrap(engine, Keyring(base64.b64decode(key_b), [base64.b64decode(key_a)]), batch=1).changed == 2
        assert rewrap(engine, Keyring(base64.b64decode(key_b), [base64.b64decode(key_a)])).changed == 0
    finally:
        engine.dispose()
    rows = _rows(tmp_path, database_url)
    assert _under(key_b, rows["q1"], PHONE) and _under(key_b, rows["d1"], PHONE)
    body_b = Keyring(base64.b64decode(key_b)).sealer("notifier-body")
    assert "2026-02" in body_b.open(rows["q1"].body_sealed, rows["q1"].message_id.encode()).decode()
    assert rows["d1"].body_digest is None  # no text left to digest again under B

    # A destroyed: B alone delivers the queued text, knows the retry, still counts the cap.
    node = await start(key_b, None, provider, clock, config=config)
    assert (await node.stub.Send(_consent_request("d1", "2026-01"))).message_id == delivered.message_id
    assert await _refused(node.stub.Send(_consent_request("n1", "2026-03"))) == "RATE_LIMITED"
    provider.block_all = False
    clock.advance(timedelta(minutes=2))
    assert await node.parts.worker.run_once() == 1
    assert await node.status(queued.message_id) == DELIVERED
    sent = provider.sent[queued.message_id]
    assert sent.phone == PHONE and "2026-02" in sent.body


async def test_rewrap_without_a_key_or_a_database_creates_neither(tmp_path, database_url):
    no_key = _run_rewrap(tmp_path, database_url, "", None)
    assert no_key.returncode == 2 and no_key.stdout == ""
    assert len(no_key.stderr.strip().splitlines()) == 1 and "master key" in no_key.stderr
    assert not (tmp_path / "keys").exists()

    no_db = _run_rewrap(tmp_path, database_url, _key(), None)
    assert no_db.returncode == 2 and no_db.stdout == ""
    assert len(no_db.stderr.strip().splitlines()) == 1 and "notifier" in no_db.stderr
    assert list(tmp_path.iterdir()) == []  # no key file, no SQLite file
    if database_url is not None:
        engine = sa.create_engine(database_url)
        try:
            assert not sa.inspect(engine).has_table("nt_messages")  # never migrates
        finally:
            engine.dispose()
