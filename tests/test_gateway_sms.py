"""RequestSmsCode's budgets (gateway/challenges.py) against the real gateway and notifier, on SQLite
and PostgreSQL: one code per phone and purpose a minute; anonymous REGISTER and SIGN_IN codes on
an escalating cooldown per caller and phone and a daily cap per phone with a reserve for callers
that verified the phone; QUERY_AUTH held only to its owner's budgets, so that nobody can lock the
owner out; and the same answers, in content and in time, and the same budgets for registered
and unregistered phones. (A revoked token's budgets: tests/test_gateway_limits.py.)"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from cardcheck.v1 import gateway_pb2
from gateway.config import GatewayConfig
from notifier.providers import OutgoingSms, SandboxProvider
from tests.harness.gateway import ALICE, BOB, CAROL, QUERY_AUTH, REGISTER, SIGN_IN, Stack, bearer, refused

FORWARDED = "x-forwarded-for"
CHINA_MIDNIGHT = datetime(2026, 1, 5, 16, 0, tzinfo=UTC)  # 2026-01-06 00:00 in China
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def from_(address: str) -> tuple[tuple[str, str], ...]:
    """The metadata a proxy that sets x-forwarded-for passes on for a client at `address`."""
    return ((FORWARDED, address),)


async def ask(stack: Stack, phone: str, purpose: int, caller: str | None = None) -> gateway_pb2.SmsChallenge:
    return await stack.gateway.RequestSmsCode(
        gateway_pb2.RequestSmsCodeRequest(phone=phone, purpose=purpose),
        metadata=from_(caller) if caller else (),
    )


async def limited(call, limit: str) -> timedelta:
    """The call is refused RATE_LIMITED by `limit`: the wait it names."""
    refusal = await refused(call, EXHAUSTED, "RATE_LIMITED")
    assert refusal.metadata["limit"] == limit, refusal.metadata
    assert refusal.retry_after is not None
    return refusal.retry_after


async def register_from(stack: Stack, person, caller: str) -> gateway_pb2.Session:
    stack.bank.enrol(person)
    challenge_id, code = await stack.challenge(REGISTER, person.phone, metadata=from_(caller))
    return await stack.gateway.Register(
        stack.register_request(person, challenge_id, code), metadata=from_(caller)
    )


async def sign_in_from(stack: Stack, person, caller: str) -> gateway_pb2.Session:
    challenge_id, code = await stack.challenge(SIGN_IN, person.phone, metadata=from_(caller))
    return await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=person.phone, challenge_id=challenge_id, sms_code=code),
        metadata=from_(caller),
    )


# --- nobody locks the owner out ----------------------------------------------------------------


async def test_anonymous_codes_for_a_phone_never_lock_its_owner_out(start_stack):
    stack = await start_stack(config=GatewayConfig(caller_header=FORWARDED))
    stack.clock.set(CHINA_MIDNIGHT + timedelta(hours=9))
    owner = await register_from(stack, ALICE, "198.51.100.7")  # 1 anonymous code today
    stack.clock.advance(timedelta(minutes=1))

    # Strangers, each from its own address (no escalation holds them), alternate REGISTER and
    # SIGN_IN codes for the owner's phone until refused: 8 a day, 3 of them kept for callers
    # that verified the phone, so 5 - 1 = 4 more.
    granted = 0
    for i in range(20):
        purpose = (REGISTER, SIGN_IN)[i % 2]
        try:
            await ask(stack, ALICE.phone, purpose, f"203.0.113.{i + 1}")
        except grpc.aio.AioRpcError as error:
            refusal = await refused(_raise(error), EXHAUSTED, "RATE_LIMITED")
            assert refusal.metadata["limit"] == "phone_daily"
            assert refusal.retry_after == timedelta(hours=15) - timedelta(minutes=1 + granted)
            break
        granted += 1
        stack.clock.advance(timedelta(minutes=1))  # past the phone's one code a minute per purpose
    assert granted == 4

    # The owner, signed in, still gets a QUERY_AUTH code and submits a query.
    query = await stack.submit(ALICE, owner.session_token)
    assert query.query_id and len(stack.reports.created) == 1
    # And signs in again from the address it verified the phone from (the reserve)...
    stack.clock.advance(timedelta(minutes=1))
    again = await sign_in_from(stack, ALICE, "198.51.100.7")
    assert again.user_id == owner.user_id
    # ...while strangers, and the owner from a new address, wait for China's midnight.
    stack.clock.advance(timedelta(minutes=1))
    for caller in ("203.0.113.200", "192.0.2.44"):
        await limited(ask(stack, ALICE.phone, REGISTER, caller), "phone_daily")
    stack.clock.set(CHINA_MIDNIGHT + timedelta(days=1))
    await ask(stack, ALICE.phone, SIGN_IN, "192.0.2.44")


def _raise(error: grpc.aio.AioRpcError):
    async def again():
        raise error

    return again()


async def test_the_reserve_is_bounded_and_a_caller_s_proof_of_the_phone_expires(start_stack):
    stack = await start_stack(
        config=GatewayConfig(caller_header=FORWARDED, sms_phone_daily_cap=3, sms_phone_daily_reserve=1)
    )
    stack.clock.set(CHINA_MIDNIGHT + timedelta(hours=1))
    await register_from(stack, ALICE, "198.51.100.7")  # 1
    stack.clock.advance(timedelta(minutes=1))
    await ask(stack, ALICE.phone, SIGN_IN, "203.0.113.1")  # 2: the strangers' share is spent
    await limited(ask(stack, ALICE.phone, REGISTER, "203.0.113.2"), "phone_daily")
    stack.clock.advance(timedelta(minutes=1))
    await ask(stack, ALICE.phone, SIGN_IN, "198.51.100.7")  # 3: the reserve
    stack.clock.advance(timedelta(minutes=2))
    await limited(ask(stack, ALICE.phone, SIGN_IN, "198.51.100.7"), "phone_daily")  # the whole cap
    # 30 days on, the proof no longer counts: the verified address is a stranger again.
    stack.clock.set(CHINA_MIDNIGHT + timedelta(days=31, hours=1))
    await ask(stack, ALICE.phone, SIGN_IN, "203.0.113.1")
    await ask(stack, ALICE.phone, REGISTER, "203.0.113.2")
    stack.clock.advance(timedelta(minutes=1))
    await limited(ask(stack, ALICE.phone, SIGN_IN, "198.51.100.7"), "phone_daily")


async def test_concurrent_anonymous_requests_do_not_exceed_the_daily_cap(start_stack):
    stack = await start_stack(
        config=GatewayConfig(caller_header=FORWARDED, sms_resend_after=timedelta(0), sms_caller_burst=100)
    )
    stack.clock.set(CHINA_MIDNIGHT + timedelta(hours=1))

    async def one(i: int) -> str:
        try:
            await ask(stack, BOB.phone, (REGISTER, SIGN_IN)[i % 2], f"203.0.113.{i + 1}")
        except grpc.aio.AioRpcError as error:
            assert error.code() == EXHAUSTED
            return "refused"
        return "granted"

    answers = await asyncio.gather(*(one(i) for i in range(12)))
    assert 1 <= answers.count("granted") <= 5
    later = [await one(i) for i in range(20, 30)]
    assert answers.count("granted") + later.count("granted") == 5  # the strangers' share, exactly


# --- the escalating cooldown -----------------------------------------------------------------


async def test_each_caller_waits_longer_after_each_anonymous_code_for_a_phone(start_stack):
    stack = await start_stack(
        config=GatewayConfig(caller_header=FORWARDED, sms_phone_daily_cap=30, sms_phone_daily_reserve=0)
    )
    stack.clock.set(CHINA_MIDNIGHT)
    caller = "203.0.113.7"
    steps = [60, 120, 300, 900, 3600, 3600]
    for i, step in enumerate(steps):
        purpose, other = (REGISTER, SIGN_IN) if i % 2 == 0 else (SIGN_IN, REGISTER)
        challenge = await ask(stack, BOB.phone, purpose, caller)
        assert challenge.resend_after_seconds == step
        # Over both purposes: the other one waits too.
        stack.clock.advance(timedelta(seconds=step - 1))
        assert await limited(ask(stack, BOB.phone, other, caller), "phone_caller") == timedelta(seconds=1)
        stack.clock.advance(timedelta(seconds=1))
    # Another caller is not held back by this one's ladder; another phone neither.
    assert (await ask(stack, BOB.phone, SIGN_IN, "198.51.100.1")).resend_after_seconds == 60
    assert (await ask(stack, CAROL.phone, REGISTER, caller)).resend_after_seconds == 60
    # Six hours without a code past its wait, the ladder starts again.
    stack.clock.advance(timedelta(hours=1, minutes=59))
    assert (await ask(stack, BOB.phone, REGISTER, caller)).resend_after_seconds == 3600
    stack.clock.advance(timedelta(hours=1) + timedelta(hours=6))
    assert (await ask(stack, BOB.phone, SIGN_IN, caller)).resend_after_seconds == 60


async def test_a_verified_code_starts_the_verifier_s_ladder_again(start_stack):
    stack = await start_stack(config=GatewayConfig(caller_header=FORWARDED))
    caller = "198.51.100.7"
    await register_from(stack, ALICE, caller)
    stack.clock.advance(timedelta(minutes=1))
    assert (await ask(stack, ALICE.phone, SIGN_IN, caller)).resend_after_seconds == 60  # not 120
    stack.clock.advance(timedelta(minutes=1))
    challenge_id, code = await stack.challenge(SIGN_IN, ALICE.phone, metadata=from_(caller))
    stack.clock.advance(timedelta(seconds=30))
    # Unverified, the second code's wait (2 min) holds; a wrong code changes nothing.
    await refused(
        stack.gateway.SignIn(
            gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code="000000"),
            metadata=from_(caller),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "VERIFICATION_FAILED",
    )
    stack.clock.advance(timedelta(seconds=30))
    await limited(ask(stack, ALICE.phone, REGISTER, caller), "phone_caller")
    await stack.gateway.SignIn(
        gateway_pb2.SignInRequest(phone=ALICE.phone, challenge_id=challenge_id, sms_code=code),
        metadata=from_(caller),
    )
    assert (await ask(stack, ALICE.phone, REGISTER, caller)).resend_after_seconds == 60


async def test_one_code_per_phone_and_purpose_a_minute(start_stack):
    stack = await start_stack()  # every call from 127.0.0.1: one caller
    owner = await stack.register(ALICE)
    stack.clock.advance(timedelta(minutes=1))
    await ask(stack, ALICE.phone, SIGN_IN)
    stack.clock.advance(timedelta(seconds=20))
    assert await limited(ask(stack, ALICE.phone, SIGN_IN), "phone") == timedelta(seconds=40)
    # QUERY_AUTH for the same phone is not held back by the anonymous code, and has its own minute.
    await stack.query_auth(ALICE, owner.session_token)
    stack.clock.advance(timedelta(seconds=20))
    assert await limited(
        stack.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(purpose=QUERY_AUTH), metadata=bearer(owner.session_token)
        ),
        "phone",
    ) == timedelta(seconds=40)
    await ask(stack, BOB.phone, REGISTER)  # another phone
    stack.clock.advance(timedelta(seconds=20))
    await ask(stack, ALICE.phone, SIGN_IN)
    assert len([m for m in await stack.inbox(ALICE.phone) if m.kind == "SMS_CODE"]) >= 3


# --- registered or not: the same answers ----------------------------------------------------------


class HeldInbox(SandboxProvider):
    """The sandbox inbox, delivering only while `open` is set."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()

    async def deliver(self, sms: OutgoingSms) -> None:
        await self.open.wait()


def _fields(challenge: gateway_pb2.SmsChallenge) -> dict[str, object]:
    assert re.fullmatch(r"[0-9a-f]{32}", challenge.challenge_id)
    return {field.name: value for field, value in challenge.ListFields() if field.name != "challenge_id"}


async def test_sign_in_answers_alike_for_registered_and_unregistered_phones(start_stack):
    inbox = HeldInbox()
    stack = await start_stack(
        config=GatewayConfig(caller_header=FORWARDED, sms_phone_daily_cap=4, sms_phone_daily_reserve=0),
        sms_provider=inbox,
    )
    stack.clock.set(CHINA_MIDNIGHT + timedelta(hours=1))
    phones = (ALICE.phone, CAROL.phone)  # registered, unregistered
    # The same history for both phones: one REGISTER code each, one of them then registered.
    await register_from(stack, ALICE, "198.51.100.7")
    await ask(stack, CAROL.phone, REGISTER, "198.51.100.7")
    stack.clock.advance(timedelta(minutes=1))
    known = await stack.message_ids(ALICE.phone)

    # The answer does not wait for the code to be sent: with its delivery held (the notifier's
    # Send waits up to 6 s for it), the registered phone answers as fast as the unknown one.
    inbox.open.clear()
    caller = "203.0.113.9"
    registered = await asyncio.wait_for(ask(stack, ALICE.phone, SIGN_IN, caller), 3)
    unknown = await asyncio.wait_for(ask(stack, CAROL.phone, SIGN_IN, caller), 3)
    assert _fields(registered) == _fields(unknown) == {"expires_in_seconds": 300, "resend_after_seconds": 60}
    inbox.open.set()
    assert re.fullmatch(r"\d{6}", await stack.code_for(ALICE.phone, known=known))
    assert len(await stack.inbox(CAROL.phone)) == 1  # its REGISTER code only

    async def both(limit: str | None) -> list:
        answers = []
        for phone in phones:
            if limit is None:
                answers.append(_fields(await ask(stack, phone, SIGN_IN, caller)))
            else:
                answers.append(await limited(ask(stack, phone, SIGN_IN, caller), limit))
        assert answers[0] == answers[1], answers
        return answers

    # The same refusals with the same waits, step by step, up to the same daily cap.
    assert await both("phone") == [timedelta(minutes=1)] * 2
    stack.clock.advance(timedelta(minutes=1))
    assert (await both(None))[0]["resend_after_seconds"] == 120
    stack.clock.advance(timedelta(minutes=1))
    assert await both("phone_caller") == [timedelta(minutes=1)] * 2
    stack.clock.advance(timedelta(minutes=1))
    assert (await both(None))[0]["resend_after_seconds"] == 300
    stack.clock.advance(timedelta(minutes=5))
    await both("phone_daily")

    # A notifier that is down does not tell them apart either: both answer, and the registered
    # phone's challenge is not withdrawn (it would be free to ask again at once).
    stack.clock.set(CHINA_MIDNIGHT + timedelta(days=1, hours=1))
    await stack.notifier_host.stop(0)
    caller = "203.0.113.10"
    await both(None)
    stack.clock.advance(timedelta(seconds=30))
    assert await both("phone") == [timedelta(seconds=30)] * 2


async def test_register_for_a_registered_phone_answers_as_for_a_new_one(start_stack):
    stack = await start_stack(config=GatewayConfig(caller_header=FORWARDED))
    await register_from(stack, ALICE, "198.51.100.7")
    stack.clock.advance(timedelta(minutes=1))
    caller = "203.0.113.9"
    known = {phone: await stack.message_ids(phone) for phone in (ALICE.phone, BOB.phone)}
    taken = await ask(stack, ALICE.phone, REGISTER, caller)
    free = await ask(stack, BOB.phone, REGISTER, caller)
    assert _fields(taken) == _fields(free)
    # Both get their code; the account shows only at Register, to whoever holds the phone's code.
    code = await stack.code_for(ALICE.phone, known=known[ALICE.phone])
    await stack.code_for(BOB.phone, known=known[BOB.phone])
    stack.bank.enrol(BOB)
    await refused(
        stack.gateway.Register(stack.register_request(BOB, taken.challenge_id, code, phone=ALICE.phone)),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_REGISTERED",
    )
    waits = [await limited(ask(stack, phone, REGISTER, caller), "phone") for phone in (ALICE.phone, BOB.phone)]
    assert waits[0] == waits[1] == timedelta(seconds=60)



# --- settings ------------------------------------------------------------------------------


def test_the_sms_budgets_are_read_from_the_environment_and_checked():
    from cardcheck.runtime.settings import SettingsError

    default = GatewayConfig.from_env({})
    assert (default.sms_phone_daily_cap, default.sms_phone_daily_reserve) == (8, 3)
    assert [step.total_seconds() for step in default.sms_escalation] == [60, 120, 300, 900, 3600]
    assert default.sms_escalation_reset == timedelta(hours=6) and default.sms_trust == timedelta(days=30)
    config = GatewayConfig.from_env(
        {
            "CARDCHECK_SMS_ESCALATION_S": "0.2, 30,600",
            "CARDCHECK_SMS_ESCALATION_RESET_HOURS": "2",
            "CARDCHECK_SMS_PHONE_DAILY_CAP": "4",
            "CARDCHECK_SMS_PHONE_DAILY_RESERVE": "0",
            "CARDCHECK_SMS_TRUST_DAYS": "7",
        }
    )
    assert config.sms_escalation == (timedelta(seconds=0.2), timedelta(seconds=30), timedelta(minutes=10))
    assert (config.sms_phone_daily_cap, config.sms_phone_daily_reserve) == (4, 0)
    assert config.sms_escalation_reset == timedelta(hours=2) and config.sms_trust == timedelta(days=7)
    # A small cap alone takes a reserve that fits.
    assert GatewayConfig.from_env({"CARDCHECK_SMS_PHONE_DAILY_CAP": "2"}).sms_phone_daily_reserve == 1
    for env, named in (
        ({"CARDCHECK_SMS_ESCALATION_S": "60,,120"}, "CARDCHECK_SMS_ESCALATION_S"),
        ({"CARDCHECK_SMS_ESCALATION_S": "60,-1"}, "CARDCHECK_SMS_ESCALATION_S"),
        ({"CARDCHECK_SMS_ESCALATION_S": "nan"}, "CARDCHECK_SMS_ESCALATION_S"),
        ({"CARDCHECK_SMS_PHONE_DAILY_CAP": "3", "CARDCHECK_SMS_PHONE_DAILY_RESERVE": "3"}, "RESERVE"),
        ({"CARDCHECK_SMS_PHONE_DAILY_RESERVE": "-1"}, "RESERVE"),
        ({"CARDCHECK_SMS_TRUST_DAYS": "0"}, "CARDCHECK_SMS_TRUST_DAYS"),
    ):
        with pytest.raises(SettingsError, match=named):
            GatewayConfig.from_env(env)
