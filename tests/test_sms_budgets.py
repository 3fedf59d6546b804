"""The SMS code budgets on Challenges itself, on a real SQLite file and the ManualClock, without
any server: one code per phone and purpose a minute, the escalating cooldown per caller and
phone (60 s, 2 min, 5 min, 15 min, then 1 h; afresh after 6 quiet hours or a verified code), the
daily cap per phone with its reserve for callers that proved they receive the phone's codes, and
a code's five minutes and five tries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.keys import Keyring
from gateway.challenges import Challenges, IssuedChallenge
from tests.harness.stores import MASTER_KEY, gateway_database

SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
LADDER = [timedelta(seconds=60), timedelta(minutes=2), timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1)]
PHONE = "a" * 64  # the phone's keyed digest, as the gateway passes it
OTHER_PHONE = "b" * 64


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 1, 5, 9, 0, tzinfo=UTC))  # 17:00 in China


@pytest.fixture
def db(tmp_path):
    with gateway_database(tmp_path) as db:
        yield db


@pytest.fixture
def challenges(db, clock) -> Challenges:
    return Challenges(db, Keyring(MASTER_KEY), clock)


async def _refused(challenges: Challenges, purpose: str, caller: str, phone: str = PHONE) -> CardCheckError:
    with pytest.raises(CardCheckError) as caught:
        await challenges.issue(phone, purpose, caller)
    assert caught.value.reason == "RATE_LIMITED"
    return caught.value


def _limit(refusal: CardCheckError) -> tuple[str, timedelta | None]:
    return refusal.metadata["limit"], refusal.retry_after


async def test_one_code_per_phone_and_purpose_a_minute(challenges: Challenges, clock: ManualClock):
    issued = await challenges.issue(PHONE, "QUERY_AUTH")
    assert (issued.resend_after, issued.expires_in) == (MINUTE, timedelta(minutes=5))
    assert len(issued.code) == 6 and issued.code.isdigit()
    clock.advance(MINUTE - SECOND)
    refusal = await _refused(challenges, "QUERY_AUTH", "")
    assert _limit(refusal) == ("phone", SECOND) and refusal.metadata["retry_after_seconds"] == "1"
    await challenges.issue(OTHER_PHONE, "QUERY_AUTH")  # per phone
    clock.advance(SECOND)
    await challenges.issue(PHONE, "QUERY_AUTH")


async def test_each_anonymous_code_makes_its_caller_wait_longer_for_the_phone(db, clock: ManualClock):
    challenges = Challenges(db, Keyring(MASTER_KEY), clock, daily_cap=10)  # room for seven codes
    for step in [*LADDER, timedelta(hours=1), timedelta(hours=1)]:
        issued = await challenges.issue(PHONE, "SIGN_IN", "caller-a")
        assert issued.resend_after == step
        # The ladder spans both purposes: REGISTER, never asked for, is held by it alone.
        clock.advance(step - SECOND)
        assert _limit(await _refused(challenges, "REGISTER", "caller-a")) == ("phone_caller", SECOND)
        clock.advance(SECOND)


async def test_another_caller_is_not_held_by_the_first_one_s_ladder(challenges: Challenges, clock: ManualClock):
    for step in LADDER[:3]:
        await challenges.issue(PHONE, "SIGN_IN", "attacker")
        clock.advance(step)
    issued = await challenges.issue(PHONE, "SIGN_IN", "owner")
    assert issued.resend_after == LADDER[0]


async def test_the_ladder_starts_again_after_six_quiet_hours_past_its_wait(
    challenges: Challenges, clock: ManualClock
):
    for phone in (PHONE, OTHER_PHONE):
        await challenges.issue(phone, "SIGN_IN", "caller-a")
    clock.advance(LADDER[0])
    for phone in (PHONE, OTHER_PHONE):
        await challenges.issue(phone, "SIGN_IN", "caller-a")  # waits 2 min after this one
    # Six hours after the end of the 2-minute wait, and a second before.
    clock.advance(LADDER[1] + timedelta(hours=6) - SECOND)
    assert (await challenges.issue(PHONE, "SIGN_IN", "caller-a")).resend_after == LADDER[2]
    clock.advance(SECOND)
    assert (await challenges.issue(OTHER_PHONE, "SIGN_IN", "caller-a")).resend_after == LADDER[0]


async def test_a_verified_code_starts_the_verifier_s_ladder_again(challenges: Challenges, clock: ManualClock):
    for step in LADDER[:2]:
        await challenges.issue(PHONE, "SIGN_IN", "owner")
        clock.advance(step)
    issued = await challenges.issue(PHONE, "SIGN_IN", "owner")
    assert issued.resend_after == LADDER[2]
    await challenges.verify(issued.challenge_id, issued.code, [PHONE], "SIGN_IN", "owner")
    assert (await challenges.issue(PHONE, "REGISTER", "owner")).resend_after == LADDER[0]


async def _spend(challenges: Challenges, clock: ManualClock, count: int, prefix: str, phone: str = PHONE) -> None:
    """`count` anonymous codes for `phone`, each from a caller of its own, a minute apart."""
    for n in range(count):
        await challenges.issue(phone, "SIGN_IN", f"{prefix}-{n}")
        clock.advance(MINUTE)


async def test_strangers_share_5_codes_a_day_and_the_phone_s_own_caller_the_last_3(
    challenges: Challenges, clock: ManualClock
):
    # The owner proved earlier that it receives this phone's codes.
    issued = await challenges.issue(PHONE, "SIGN_IN", "owner")
    await challenges.verify(issued.challenge_id, issued.code, [PHONE], "SIGN_IN", "owner")
    clock.advance(MINUTE)
    await _spend(challenges, clock, 4, "stranger")  # 5 of the day's 8 spent
    refusal = await _refused(challenges, "SIGN_IN", "stranger-late")
    midnight_in_china = datetime(2026, 1, 5, 16, 0, tzinfo=UTC)
    assert _limit(refusal) == ("phone_daily", midnight_in_china - clock.now())
    for _ in range(3):  # the reserve
        await challenges.issue(PHONE, "SIGN_IN", "owner")
        clock.advance(LADDER[-1])  # past any wait of the owner's ladder
    assert _limit(await _refused(challenges, "SIGN_IN", "owner"))[0] == "phone_daily"
    # The signed-in owner's QUERY_AUTH codes never count against any of it.
    await challenges.issue(PHONE, "QUERY_AUTH")


async def test_the_daily_cap_starts_again_at_midnight_in_china(challenges: Challenges, clock: ManualClock):
    await _spend(challenges, clock, 5, "stranger")
    clock.set(datetime(2026, 1, 5, 16, 0, tzinfo=UTC) - SECOND)
    assert _limit(await _refused(challenges, "SIGN_IN", "late")) == ("phone_daily", SECOND)
    clock.advance(SECOND)
    await challenges.issue(PHONE, "SIGN_IN", "late")


async def test_a_caller_s_proof_of_the_phone_counts_for_30_days(challenges: Challenges, clock: ManualClock):
    for phone in (PHONE, OTHER_PHONE):
        issued = await challenges.issue(phone, "SIGN_IN", "owner")
        await challenges.verify(issued.challenge_id, issued.code, [phone], "SIGN_IN", "owner")
    trust_ends = clock.now() + timedelta(days=30)
    # Strangers spend both phones' shares of one day; then the owner asks, just before and at the end.
    clock.set(trust_ends - timedelta(minutes=12))
    await _spend(challenges, clock, 5, "stranger", PHONE)
    await _spend(challenges, clock, 5, "stranger", OTHER_PHONE)
    clock.set(trust_ends - SECOND)
    await challenges.issue(PHONE, "SIGN_IN", "owner")
    clock.set(trust_ends)
    refusal = await _refused(challenges, "SIGN_IN", "owner", OTHER_PHONE)
    assert refusal.metadata["limit"] == "phone_daily"


async def test_a_code_that_could_not_be_sent_counts_for_nothing(challenges: Challenges, clock: ManualClock):
    await _spend(challenges, clock, 4, "stranger")
    issued = await challenges.issue(PHONE, "SIGN_IN", "caller-a")
    await challenges.withdraw(issued.challenge_id, PHONE, "SIGN_IN", issued.issued_at, "caller-a")
    # Neither the minute, nor the caller's ladder, nor the phone's day was spent.
    again = await challenges.issue(PHONE, "SIGN_IN", "caller-a")
    assert again.resend_after == LADDER[0]
    with pytest.raises(CardCheckError) as caught:
        await challenges.verify(issued.challenge_id, issued.code, [PHONE], "SIGN_IN", "caller-a")
    assert caught.value.message == "sms code rejected: too many wrong tries"  # the withdrawn code is dead
    clock.advance(MINUTE)
    assert _limit(await _refused(challenges, "SIGN_IN", "stranger-5"))[0] == "phone_daily"


async def _verify_fails(challenges: Challenges, issued: IssuedChallenge, code: str, why: str) -> None:
    with pytest.raises(CardCheckError) as caught:
        await challenges.verify(issued.challenge_id, code, [PHONE], "QUERY_AUTH")
    assert (caught.value.reason, caught.value.message) == ("VERIFICATION_FAILED", f"sms code rejected: {why}")


async def test_a_code_lives_five_minutes_and_is_used_once(challenges: Challenges, clock: ManualClock):
    late = await challenges.issue(PHONE, "QUERY_AUTH")
    clock.advance(timedelta(minutes=5))
    await _verify_fails(challenges, late, late.code, "expired")
    on_time = await challenges.issue(PHONE, "QUERY_AUTH")
    clock.advance(timedelta(minutes=5) - SECOND)
    with pytest.raises(CardCheckError):  # bound to its purpose
        await challenges.verify(on_time.challenge_id, on_time.code, [PHONE], "SIGN_IN")
    await challenges.verify(on_time.challenge_id, on_time.code, [PHONE], "QUERY_AUTH")
    await _verify_fails(challenges, on_time, on_time.code, "already used")


def _wrong(issued: IssuedChallenge) -> str:
    return f"{(int(issued.code) + 1) % 1_000_000:06d}"


async def test_the_fifth_wrong_try_kills_the_code(challenges: Challenges):
    issued = await challenges.issue(PHONE, "QUERY_AUTH")
    for _ in range(4):
        await _verify_fails(challenges, issued, _wrong(issued), "wrong code")
    await challenges.verify(issued.challenge_id, issued.code, [PHONE], "QUERY_AUTH")  # the 4th left it alive

    dying = await challenges.issue(OTHER_PHONE, "QUERY_AUTH")
    for _ in range(5):
        with pytest.raises(CardCheckError):
            await challenges.verify(dying.challenge_id, _wrong(dying), [OTHER_PHONE], "QUERY_AUTH")
    with pytest.raises(CardCheckError) as caught:
        await challenges.verify(dying.challenge_id, dying.code, [OTHER_PHONE], "QUERY_AUTH")
    assert caught.value.message == "sms code rejected: too many wrong tries"
