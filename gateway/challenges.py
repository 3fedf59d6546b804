"""SMS challenges: a 6-digit code from a CSPRNG bound to a phone (by its keyed hash) and a
purpose, valid five minutes, used once, dead after five wrong tries. A phone gets a new code for
the same purpose at most once a minute, and at most `daily_cap` codes a day (China's calendar
day) over all purposes; both are counted in the database, in the transaction that issues the
code, so concurrent requests and several gateway replicas cannot exceed them. Only a keyed hash
of the code is stored. (Limits per caller and per user sit in front of this: gateway/flows.py.)

Across a master key rotation a challenge issued just before it still verifies: its code hash and
the phone hash it is bound to are compared with every key's digest. The resend and daily counts
are kept per phone hash under the current key, so they start afresh at a rotation."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import Column, DateTime
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database
from cardcheck.runtime.errors import CardCheckError
from cardcheck.runtime.keys import Keyring

CODE_TTL = timedelta(minutes=5)
RESEND_AFTER = timedelta(seconds=60)
MAX_WRONG_TRIES = 5
DAILY_CAP = 10
CHINA_TZ = timezone(timedelta(hours=8))


class ChallengeRow(SQLModel, table=True):
    __tablename__ = "gw_sms_challenges"

    challenge_id: str = Field(primary_key=True, max_length=32)
    phone_hash: str = Field(index=True, max_length=64)
    purpose: str = Field(max_length=16)
    code_hash: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    wrong_tries: int = 0
    used: bool = False
    dead: bool = False


class SmsThrottleRow(SQLModel, table=True):
    """When a phone last got a code for a purpose: the one-a-minute rule, safe under races."""

    __tablename__ = "gw_sms_throttle"

    phone_hash: str = Field(primary_key=True, max_length=64)
    purpose: str = Field(primary_key=True, max_length=16)
    last_sent_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class SmsDailyRow(SQLModel, table=True):
    """How many codes a phone got on one day (China's calendar), over all purposes."""

    __tablename__ = "gw_sms_daily"

    phone_hash: str = Field(primary_key=True, max_length=64)
    day: str = Field(max_length=10)  # YYYY-MM-DD
    sent: int = 0


def _china_day(instant: datetime) -> date:
    return instant.astimezone(CHINA_TZ).date()


def _next_china_midnight(instant: datetime) -> datetime:
    return datetime.combine(_china_day(instant) + timedelta(days=1), time(0), CHINA_TZ)


def _rate_limited(message: str, wait: timedelta, limit: str) -> CardCheckError:
    return CardCheckError(
        "RATE_LIMITED",
        message,
        metadata={"limit": limit, "retry_after_seconds": str(max(1, int(wait.total_seconds() + 0.999)))},
        retry_after=wait,
    )


@dataclass(frozen=True)
class IssuedChallenge:
    challenge_id: str
    code: str
    issued_at: datetime
    expires_in: timedelta
    resend_after: timedelta


def _verification_failed(why: str) -> CardCheckError:
    return CardCheckError("VERIFICATION_FAILED", f"sms code rejected: {why}")


class Challenges:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        clock: Clock,
        *,
        daily_cap: int = DAILY_CAP,
        resend_after: timedelta = RESEND_AFTER,
    ) -> None:
        self._resend_after = resend_after
        self._db = db
        self._code_hash = keyring.hasher("sms-code")
        self._clock = clock
        self._daily_cap = daily_cap

    def _hash(self, challenge_id: str, code: str) -> str:
        return self._code_hash.digest(f"{challenge_id}:{code}")

    async def issue(self, phone_hash: str, purpose: str) -> IssuedChallenge:
        """A new challenge, or RATE_LIMITED (with the wait) within a minute of the last one for
        this purpose or past the phone's daily cap. `phone_hash` is the current key's digest:
        the throttle and daily rows a retired key's digest named are not looked at, so both
        counts restart at a master key rotation (at most one extra minute's wait and one more
        day's cap of codes, once; housekeeping deletes the old rows)."""
        now = self._clock.now()
        today = _china_day(now).isoformat()
        challenge_id = secrets.token_hex(16)
        code = f"{secrets.randbelow(1_000_000):06d}"
        row = ChallengeRow(
            challenge_id=challenge_id,
            phone_hash=phone_hash,
            purpose=purpose,
            code_hash=self._hash(challenge_id, code),
            created_at=now,
            expires_at=now + CODE_TTL,
        )

        def work(session: Session) -> CardCheckError | None:
            throttle = session.exec(
                select(SmsThrottleRow)
                .where(SmsThrottleRow.phone_hash == phone_hash, SmsThrottleRow.purpose == purpose)
                .with_for_update()
            ).first()
            if throttle is not None:
                wait = as_utc(throttle.last_sent_at) + self._resend_after - now
                if wait > timedelta(0):
                    return _rate_limited(
                        "a code was sent to this phone less than a minute ago", wait, "phone"
                    )
            daily = session.exec(
                select(SmsDailyRow).where(SmsDailyRow.phone_hash == phone_hash).with_for_update()
            ).first()
            if daily is None:
                daily = SmsDailyRow(phone_hash=phone_hash, day=today, sent=0)
            elif daily.day != today:
                daily.day, daily.sent = today, 0
            if daily.sent >= self._daily_cap:
                return _rate_limited(
                    "this phone has had its codes for today", _next_china_midnight(now) - now, "phone_daily"
                )
            daily.sent += 1
            session.add(daily)
            if throttle is None:
                session.add(SmsThrottleRow(phone_hash=phone_hash, purpose=purpose, last_sent_at=now))
            else:
                throttle.last_sent_at = now
                session.add(throttle)
            session.add(row)
            session.flush()
            return None

        try:
            refusal = await self._db.run(work)
        except IntegrityError:
            # A concurrent request for the same phone inserted its first row first.
            refusal = _rate_limited("a code is being sent to this phone", self._resend_after, "phone")
        if refusal is not None:
            raise refusal
        return IssuedChallenge(challenge_id, code, now, CODE_TTL, self._resend_after)

    async def withdraw(self, challenge_id: str, phone_hash: str, purpose: str, issued_at: datetime) -> None:
        """The code could not be sent: the challenge dies, the phone may ask again at once, and
        the code does not count towards its daily cap."""
        day = _china_day(issued_at).isoformat()

        def work(session: Session) -> None:
            row = session.get(ChallengeRow, challenge_id)
            if row is not None:
                row.dead = True
                session.add(row)
            throttle = session.get(SmsThrottleRow, (phone_hash, purpose))
            if throttle is not None and as_utc(throttle.last_sent_at) == issued_at:
                session.delete(throttle)
            daily = session.get(SmsDailyRow, phone_hash)
            if daily is not None and daily.day == day and daily.sent > 0:
                daily.sent -= 1
                session.add(daily)

        await self._db.run(work)

    async def verify(
        self, challenge_id: str, code: str, phone_hashes: Sequence[str], purpose: str
    ) -> None:
        """Consumes the challenge when the code is right; VERIFICATION_FAILED otherwise.
        `phone_hashes`: the phone's digests under the current and the retired keys (a challenge
        issued before a rotation is bound to a retired key's digest)."""
        now = self._clock.now()
        offered = f"{challenge_id}:{code}"

        def work(session: Session) -> str | None:
            row = session.exec(
                select(ChallengeRow).where(ChallengeRow.challenge_id == challenge_id).with_for_update()
            ).first()
            if (
                row is None
                or row.purpose != purpose
                or not any(hmac.compare_digest(row.phone_hash, candidate) for candidate in phone_hashes)
            ):
                return "unknown challenge"
            if row.used:
                return "already used"
            if row.dead:
                return "too many wrong tries"
            if as_utc(row.expires_at) <= now:
                return "expired"
            if not self._code_hash.matches(offered, row.code_hash):
                row.wrong_tries += 1
                if row.wrong_tries >= MAX_WRONG_TRIES:
                    row.dead = True
                session.add(row)
                return "wrong code"
            row.used = True
            session.add(row)
            return None

        why = await self._db.run(work)
        if why is not None:
            raise _verification_failed(why)

    async def purge_expired(self, older_than: timedelta = timedelta(days=1)) -> int:
        """Deletes challenges and resend marks long past use (housekeeping)."""
        cutoff = self._clock.now() - older_than

        def work(session: Session) -> int:
            rows = session.exec(select(ChallengeRow).where(ChallengeRow.expires_at < cutoff)).all()
            for row in rows:
                session.delete(row)
            for mark in session.exec(
                select(SmsThrottleRow).where(SmsThrottleRow.last_sent_at < cutoff)
            ).all():
                session.delete(mark)
            for count in session.exec(
                select(SmsDailyRow).where(SmsDailyRow.day < _china_day(cutoff).isoformat())
            ).all():
                session.delete(count)
            return len(rows)

        return await self._db.run(work)
