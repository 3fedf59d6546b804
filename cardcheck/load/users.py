"""The people journeys run as. One journey per user: a user may run one query per 7 days (the
cooldown after a report), so a run of N query journeys needs N users.

From a bank dataset (the one bank_sim serves): everyone holding a card its bank would confirm
(not closed, a reserved phone), one card each, one person per phone. From a users file: JSON
Lines of `name`, `id_number`, `phone`, `card_number`, `region`, and optionally
`payment_password` and `session_token`.

Provisioning registers people before the timed run (or signs them in, for people the mesh
already knows), at a bounded concurrency, and sets aside anyone whose cooldown is running (a
query within the last 7 days), so a second run on the same mesh takes the people the first did
not use. Journeys that register take people as they are, unprovisioned."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from cardcheck import dataset
from cardcheck.client import CardCheckClient, CardCheckError
from cardcheck.load.inbox import Inbox, NoMessage

COOLDOWN = timedelta(days=7)
GIVE_UP_AFTER = 50
USER_FIELDS = ("name", "id_number", "phone", "card_number", "region")


class UsersError(ValueError):
    pass


@dataclass
class User:
    name: str
    id_number: str
    phone: str
    card_number: str
    region: str
    payment_password: str
    session_token: str | None = None


def people_of(records: Iterable[dataset.CardRecord], payment_password: str) -> list[User]:
    """Everyone the real-name check would confirm, in dataset order, one card each."""
    people: list[User] = []
    ids: set[str] = set()
    phones: set[str] = set()
    for record in records:
        key = record.id_number.upper()
        region = dataset.region_of(key)
        phone = record.reserved_phone
        if key in ids or phone is None or phone in phones or region is None:
            continue
        if record.status == "CLOSED" or not record.cnp_enabled:
            continue
        ids.add(key)
        phones.add(phone)
        people.append(User(record.holder_name, key, phone, record.pan, region, payment_password))
    return people


def read_users_file(path: Path, payment_password: str) -> list[User]:
    users = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UsersError(f"{path}: {error.strerror or error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise UsersError(f"{path} line {number}: not JSON") from None
        if not isinstance(obj, dict):
            raise UsersError(f"{path} line {number}: not a JSON object")
        missing = [f for f in USER_FIELDS if not isinstance(obj.get(f), str) or not obj[f]]
        if missing:
            raise UsersError(f"{path} line {number}: no {missing[0]}")
        users.append(
            User(
                obj["name"], obj["id_number"], obj["phone"], obj["card_number"], obj["region"],
                payment_password=str(obj.get("payment_password") or payment_password),
                session_token=obj.get("session_token") or None,
            )
        )
    if not users:
        raise UsersError(f"{path}: no users")
    return users


def failure_reason(error: BaseException) -> str:
    """The name an error is counted under: the refusal's reason, grpc's status without one
    (GRPC_UNAVAILABLE, ...), or the tool's own."""
    if isinstance(error, CardCheckError):
        return error.reason
    if isinstance(error, grpc.aio.AioRpcError):
        return f"GRPC_{error.code().name}"
    if isinstance(error, NoMessage):
        return "SMS_NOT_RECEIVED"
    if isinstance(error, TimeoutError):
        return "TIMEOUT"
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, str) else type(error).__name__


async def sign_in(client: CardCheckClient, inbox: Inbox, user: User) -> str:
    challenge = await client.request_sms_code("SIGN_IN", phone=user.phone)
    code = await inbox.next_code(user.phone)
    session = await client.sign_in(phone=user.phone, challenge_id=challenge.challenge_id, sms_code=code)
    return session.session_token


async def register(client: CardCheckClient, inbox: Inbox, user: User) -> str:
    challenge = await client.request_sms_code("REGISTER", phone=user.phone)
    code = await inbox.next_code(user.phone)
    session = await client.register(
        name=user.name, id_number=user.id_number, phone=user.phone, challenge_id=challenge.challenge_id,
        sms_code=code, card_number=user.card_number, payment_password=user.payment_password, region=user.region,
    )
    return session.session_token


@dataclass
class Provisioned:
    users: list[User]
    skipped: Counter[str]  # why the others were set aside
    retry_after: dict[str, timedelta]  # the longest RetryInfo of each reason
    seconds: float
    registered: int
    tried: int  # how many of `people`, from the start, were taken


async def provision(
    people: Sequence[User],
    wanted: int,
    client: Callable[[], CardCheckClient],
    inbox: Inbox,
    *,
    concurrency: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> Provisioned:
    """Up to `wanted` users with a live session and no cooldown running, from `people` in order."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    queue = deque(people)
    ready: list[User] = []
    skipped: Counter[str] = Counter()
    retry_after: dict[str, timedelta] = {}
    registered = 0
    now = datetime.now(UTC)

    async def one(user: User) -> None:
        nonlocal registered
        session = client()
        await inbox.remember(user.phone)
        token = user.session_token
        if token is None:
            try:
                token = await register(session, inbox, user)
                registered += 1
            except CardCheckError as error:
                if error.reason != "ALREADY_REGISTERED":
                    raise
                token = await sign_in(session, inbox, user)
        try:
            queries = await session.list_queries(session_token=token)
        except CardCheckError as error:
            if error.reason != "UNAUTHENTICATED" or user.session_token is None:
                raise
            token = await sign_in(session, inbox, user)  # the file's session has ended
            queries = await session.list_queries(session_token=token)
        if any(q.submitted_at.ToDatetime(UTC) > now - COOLDOWN for q in queries):
            skipped["COOLDOWN_ACTIVE"] += 1
            return
        user.session_token = token
        ready.append(user)

    failures = 0  # in a row: past GIVE_UP_AFTER the mesh refuses everyone (a limit), stop asking
    under_way = 0

    async def worker() -> None:
        nonlocal failures, under_way
        while queue and len(ready) < wanted and failures < GIVE_UP_AFTER:
            if len(ready) + under_way >= wanted:  # enough under way, unless some fail: wait and see
                await asyncio.sleep(0.02)
                continue
            user = queue.popleft()
            under_way += 1
            try:
                await one(user)
                failures = 0
            except Exception as error:  # noqa: BLE001 - a refused person is set aside, counted
                failures += 1
                reason = failure_reason(error)
                skipped[reason] += 1
                retry = getattr(error, "retry_after", None)
                if retry is not None:
                    retry_after[reason] = max(retry, retry_after.get(reason, retry))
            finally:
                under_way -= 1
            if on_progress is not None:
                on_progress(len(ready), wanted)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, wanted)))))
    return Provisioned(ready, skipped, retry_after, loop.time() - began, registered, len(people) - len(queue))
