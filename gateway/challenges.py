"""SMS challenges: a 6-digit code from a CSPRNG bound to a phone (by its keyed hash) and a
purpose, valid five minutes, used once, dead after five wrong tries. Only a keyed hash of the
code is stored. (Limits per caller, per session and per user sit in front of this:
gateway/flows.py.)

Every budget below is counted in the database, in the transaction that issues the code, so
concurrent requests and several gateway replicas cannot exceed it. There are two kinds of code:

- QUERY_AUTH is asked for by the signed-in owner of the phone. It is held only to the resend
  rule (one code per phone and purpose each `resend_after`, default a minute) and, in front of
  this module, to the session's and the user's own budgets. Nothing an anonymous caller does
  to the phone counts against it, so nobody can stop the owner from querying.
- REGISTER and SIGN_IN are asked for anonymously, by anyone who knows (or guesses) a number.
  Besides the resend rule per purpose they have budgets of their own, over both purposes:

  * An ESCALATING cooldown per phone AND caller (the caller's keyed digest, as the per-caller
    limit uses it): after a caller's 1st, 2nd, 3rd, 4th and every later code for a phone it
    waits `escalation` (default 60 s, 2 min, 5 min, 15 min, then 1 h each time) before its
    next one. The ladder starts again once the caller has asked for no code for that phone for
    `escalation_reset` (default 6 h) past its wait, or when it verifies one of the phone's codes.
  * A daily cap per phone (China's calendar day): `daily_cap` anonymous codes over all callers
    (default 8), of which a caller that has not verified one of this phone's REGISTER or
    SIGN_IN codes within `trust_for` (default 30 days) may use only `daily_cap -
    daily_reserve` (default 5). This is what bounds SMS bombing of one phone from many
    addresses.

Why this shape, and what an attacker who knows the phone can still do. SIGN_IN is anonymous by
nature, so some per-phone budget must exist (otherwise many addresses could bomb the phone), and
whoever spends it delays the owner's sign-in. The design keeps that delay small:

- The ladder is per caller, so an attacker climbing it delays only its own next code; the
  owner's first code from another address is not held by it. (A per-phone ladder would let one
  attacker poll the phone's single slot every hour and win it, forever.)
- The per-caller budget (gateway/flows.py) stays strict, so one address cannot spend much of
  anything; spending a phone's daily share takes many addresses.
- When strangers have spent the phone's daily share, a caller that has proved it receives this
  phone's codes (the owner's usual address) still has the reserve, so the owner signs in from
  where they signed in before. An owner on a new address behind such an attack waits until
  China's midnight: that is the price of the bombing bound, and it never touches QUERY_AUTH.
  (An attacker behind the same public address as the owner, e.g. a carrier's NAT, shares its
  reserve: at worst `daily_cap` anonymous codes a day reach the phone.)
- A successful verification restarts the verifier's ladder, so an owner who signs in often is
  not slowed down by its own earlier codes.

Keep `daily_cap` below the notifier's hourly SMS_CODE cap per phone (default 10/h, 20/d): the
notifier counts every purpose, and the room left there is what the owner's QUERY_AUTH codes
use. The answers, refusals and budgets are the same for a registered and an unregistered phone:
the ladder and the caps never look at the account, and verification can only succeed for a
code that reached the phone.

Across a master key rotation a challenge issued just before it still verifies: its code hash and
the phone hash it is bound to are compared with every key's digest. The resend, ladder and daily
rows are kept per phone hash (and caller digest) under the current key, so they start afresh at
a rotation (a caller's proof of receiving the phone's codes too)."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import Column, Connection, DateTime, Insert, Update, bindparam, insert, not_, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database, table_of
from cardcheck.runtime.errors import CardCheckError, Reason
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.statements import Statement

CODE_TTL = timedelta(minutes=5)
RESEND_AFTER = timedelta(seconds=60)
MAX_WRONG_TRIES = 5
ANONYMOUS_PURPOSES = ("REGISTER", "SIGN_IN")
ESCALATION = (
    timedelta(seconds=60),
    timedelta(minutes=2),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
)
ESCALATION_RESET = timedelta(hours=6)
DAILY_CAP = 8
DAILY_RESERVE = 3
TRUST_FOR = timedelta(days=30)
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
    """How many anonymous codes (REGISTER, SIGN_IN) a phone got on one day (China's calendar)."""

    __tablename__ = "gw_sms_daily"

    phone_hash: str = Field(primary_key=True, max_length=64)
    day: str = Field(max_length=10)  # YYYY-MM-DD
    sent: int = 0


class SmsEscalationRow(SQLModel, table=True):
    """One caller's anonymous codes for one phone: where it stands on the escalating cooldown,
    and when it last proved it receives the phone's codes. `caller_hash` is the keyed digest
    the per-caller limit uses, never an address."""

    __tablename__ = "gw_sms_escalation"

    phone_hash: str = Field(primary_key=True, max_length=64)
    caller_hash: str = Field(primary_key=True, max_length=64)
    streak: int = 0  # codes since the ladder last started again
    last_sent_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    next_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    verified_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


def _china_day(instant: datetime) -> date:
    return instant.astimezone(CHINA_TZ).date()


def _next_china_midnight(instant: datetime) -> datetime:
    return datetime.combine(_china_day(instant) + timedelta(days=1), time(0), CHINA_TZ)


def _rate_limited(message: str, wait: timedelta, limit: str) -> CardCheckError:
    return CardCheckError(
        Reason.RATE_LIMITED,
        message,
        metadata={"limit": limit, "retry_after_seconds": str(max(1, int(wait.total_seconds() + 0.999)))},
        retry_after=wait,
    )


_CHALLENGES = table_of(ChallengeRow)
_THROTTLE = table_of(SmsThrottleRow)
# Core statements, built once, on the path of every code: issued, then verified.
_LAST_SENT = (
    sa_select(_THROTTLE.c.last_sent_at)
    .where(_THROTTLE.c.phone_hash == bindparam("phone_hash"), _THROTTLE.c.purpose == bindparam("purpose"))
    .with_for_update()
)
_SENT_AGAIN = (  # an UPDATE's parameters may not be named as its columns
    update(_THROTTLE)
    .where(_THROTTLE.c.phone_hash == bindparam("hash_of_phone"), _THROTTLE.c.purpose == bindparam("for_purpose"))
    .values(last_sent_at=bindparam("now"))
)
_CHALLENGE = Statement(
    sa_select(
        _CHALLENGES.c.purpose, _CHALLENGES.c.phone_hash, _CHALLENGES.c.code_hash, _CHALLENGES.c.expires_at,
        _CHALLENGES.c.wrong_tries, _CHALLENGES.c.used, _CHALLENGES.c.dead,
    )
    .where(_CHALLENGES.c.challenge_id == bindparam("challenge_id"))
    .with_for_update()
)
_INSERT_THROTTLE = insert(_THROTTLE)


def _mark_sent(dialect: str) -> Statement[Insert]:
    """The phone's resend mark for a purpose, made or moved to now unless it is after
    `resend_from` (an upsert of the dialect: no row written nor returned then)."""
    statement = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(_THROTTLE).values(
        phone_hash=bindparam("mark_phone"), purpose=bindparam("mark_purpose"), last_sent_at=bindparam("mark_now")
    )
    return Statement(statement.on_conflict_do_update(
        index_elements=[_THROTTLE.c.phone_hash, _THROTTLE.c.purpose],
        set_={"last_sent_at": statement.excluded.last_sent_at},
        where=_THROTTLE.c.last_sent_at <= bindparam("resend_from"),
    ).returning(_THROTTLE.c.purpose))  # psycopg's rowcount of an upsert is -1
_INSERT_CHALLENGE = Statement(insert(_CHALLENGES))
# An UPDATE's SET clause names the columns its parameters give (all but the bound key).
_CHANGE_CHALLENGE = Statement(update(_CHALLENGES).where(_CHALLENGES.c.challenge_id == bindparam("of_challenge")))


def _consume(digests: int) -> Statement[Update]:
    """Marks the challenge used if it is live, of the purpose, bound to one of the phone's
    `digests` and its code's digest is one of the offered code's (a bound parameter each:
    one statement whose SQL is made once); RETURNING a row only then."""
    return Statement(
        update(_CHALLENGES)
        .where(
            _CHALLENGES.c.challenge_id == bindparam("of_challenge"),
            _CHALLENGES.c.purpose == bindparam("for_purpose"),
            _CHALLENGES.c.phone_hash.in_([bindparam(f"phone_digest_{n}") for n in range(digests)]),
            _CHALLENGES.c.code_hash.in_([bindparam(f"code_digest_{n}") for n in range(digests)]),
            not_(_CHALLENGES.c.used),
            not_(_CHALLENGES.c.dead),
            _CHALLENGES.c.expires_at > bindparam("at"),
        )
        .values(used=True)
        .returning(_CHALLENGES.c.challenge_id)
    )


def _digests(name: str, digests: Sequence[str], count: int) -> dict[str, str]:
    """`count` parameters of `_consume`: the digests given, the last repeated (more than
    `count` are not looked at here; the row-by-row check that follows a miss looks at all)."""
    return {f"{name}_{n}": digests[min(n, len(digests) - 1)] for n in range(count)}


@dataclass(frozen=True)
class IssuedChallenge:
    challenge_id: str
    code: str
    issued_at: datetime
    expires_in: timedelta
    resend_after: timedelta  # how long until this caller may have the next code for this purpose


def _verification_failed(why: str) -> CardCheckError:
    return CardCheckError(Reason.VERIFICATION_FAILED, f"sms code rejected: {why}")


class Challenges:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        clock: Clock,
        *,
        daily_cap: int = DAILY_CAP,
        daily_reserve: int = DAILY_RESERVE,
        resend_after: timedelta = RESEND_AFTER,
        escalation: Sequence[timedelta] = ESCALATION,
        escalation_reset: timedelta = ESCALATION_RESET,
        trust_for: timedelta = TRUST_FOR,
    ) -> None:
        if not escalation or not 0 <= daily_reserve < daily_cap:
            raise ValueError("an escalation of at least one step and 0 <= daily_reserve < daily_cap")
        self._resend_after = resend_after
        self._db = db
        self._code_hash = keyring.hasher("sms-code")
        self._clock = clock
        self._daily_cap = daily_cap
        self._daily_reserve = daily_reserve
        self._escalation = tuple(escalation)
        self._escalation_reset = escalation_reset
        self._trust_for = trust_for
        self._mark_sent = _mark_sent(db.engine.dialect.name)
        self._digest_count = 1 + keyring.retired
        self._consume = _consume(self._digest_count)

    def _hash(self, challenge_id: str, code: str) -> str:
        return self._code_hash.digest(f"{challenge_id}:{code}")

    def _step(self, streak: int) -> timedelta:
        """The wait after a caller's `streak`-th code (1-based) for a phone."""
        return self._escalation[min(streak, len(self._escalation)) - 1]

    async def issue(self, phone_hash: str, purpose: str, caller_hash: str = "") -> IssuedChallenge:
        """A new challenge, or RATE_LIMITED (with the wait and the `limit` that refused): within
        `resend_after` of the phone's last code for this purpose ("phone"); for REGISTER and
        SIGN_IN also before this caller's escalating cooldown for the phone has passed
        ("phone_caller") or past the phone's daily cap ("phone_daily"). `phone_hash` is the
        current key's digest: the rows a retired key's digest named are not looked at, so the
        counts restart at a master key rotation (once; housekeeping deletes the old rows)."""
        now = self._clock.now()
        today = _china_day(now).isoformat()
        anonymous = purpose in ANONYMOUS_PURPOSES
        challenge_id = secrets.token_hex(16)
        code = f"{secrets.randbelow(1_000_000):06d}"
        row = {
            "challenge_id": challenge_id,
            "phone_hash": phone_hash,
            "purpose": purpose,
            "code_hash": self._hash(challenge_id, code),
            "created_at": now,
            "expires_at": now + CODE_TTL,
            "wrong_tries": 0,
            "used": False,
            "dead": False,
        }
        mark = {"phone_hash": phone_hash, "purpose": purpose}

        def refused(last_sent_at: datetime) -> CardCheckError:
            wait = as_utc(last_sent_at) + self._resend_after - now
            return _rate_limited("a code was sent to this phone less than a minute ago", wait, "phone")

        def work(session: Session) -> CardCheckError | timedelta:
            # Locked in one order everywhere (throttle, escalation, daily): no deadlock.
            last_sent_at = session.execute(_LAST_SENT, mark).scalar()
            if last_sent_at is not None and as_utc(last_sent_at) + self._resend_after > now:
                return refused(last_sent_at)
            refusal_or_wait = self._spend_anonymous(session, phone_hash, caller_hash, now, today)
            if isinstance(refusal_or_wait, CardCheckError):
                return refusal_or_wait
            if last_sent_at is None:
                session.execute(_INSERT_THROTTLE, {**mark, "last_sent_at": now})
            else:
                session.execute(_SENT_AGAIN, {"hash_of_phone": phone_hash, "for_purpose": purpose, "now": now})
            _INSERT_CHALLENGE.run(session.connection(), row)
            session.flush()  # what _spend_anonymous changed, inside the IntegrityError guard
            return max(self._resend_after, refusal_or_wait)

        def owners(connection: Connection) -> CardCheckError | timedelta:
            # The resend rule alone: the phone's mark written unless it is recent, in one
            # statement (the row locked as the read of `work` locks it).
            marked = {"mark_phone": phone_hash, "mark_purpose": purpose, "mark_now": now,
                      "resend_from": now - self._resend_after}
            if self._mark_sent.run(connection, marked).first() is None:
                return refused(connection.execute(_LAST_SENT, mark).scalar_one())
            _INSERT_CHALLENGE.run(connection, row)
            return self._resend_after

        try:
            # Only the anonymous codes' escalation and daily count are ORM objects: the others
            # are Core statements alone, on a connection without a session to set up.
            outcome = await (self._db.run(work) if anonymous else self._db.run_core(owners))
        except IntegrityError:
            # A concurrent request for the same phone inserted its first row first.
            outcome = _rate_limited("a code is being sent to this phone", self._resend_after, "phone")
        if isinstance(outcome, CardCheckError):
            raise outcome
        return IssuedChallenge(challenge_id, code, now, CODE_TTL, outcome)

    def _spend_anonymous(
        self, session: Session, phone_hash: str, caller_hash: str, now: datetime, today: str
    ) -> CardCheckError | timedelta:
        """The escalating cooldown and the daily cap of an anonymous code: the refusal, or the
        wait before this caller's next code for the phone (the rows updated)."""
        ladder = session.exec(
            select(SmsEscalationRow)
            .where(SmsEscalationRow.phone_hash == phone_hash, SmsEscalationRow.caller_hash == caller_hash)
            .with_for_update()
        ).first()
        if ladder is not None and ladder.next_at is not None and as_utc(ladder.next_at) > now:
            return _rate_limited(
                "this phone had codes requested from here a moment ago", as_utc(ladder.next_at) - now,
                "phone_caller",
            )
        daily = session.exec(
            select(SmsDailyRow).where(SmsDailyRow.phone_hash == phone_hash).with_for_update()
        ).first()
        if daily is None:
            daily = SmsDailyRow(phone_hash=phone_hash, day=today, sent=0)
        elif daily.day != today:
            daily.day, daily.sent = today, 0
        trusted = (
            ladder is not None
            and ladder.verified_at is not None
            and as_utc(ladder.verified_at) > now - self._trust_for
        )
        allowance = self._daily_cap if trusted else self._daily_cap - self._daily_reserve
        if daily.sent >= allowance:
            return _rate_limited(
                "this phone has had its codes for today", _next_china_midnight(now) - now, "phone_daily"
            )
        daily.sent += 1
        session.add(daily)
        if ladder is None:
            ladder = SmsEscalationRow(phone_hash=phone_hash, caller_hash=caller_hash)
        quiet = ladder.next_at is None or as_utc(ladder.next_at) + self._escalation_reset <= now
        ladder.streak = 1 if quiet else ladder.streak + 1
        ladder.last_sent_at = now
        ladder.next_at = now + self._step(ladder.streak)
        session.add(ladder)
        return as_utc(ladder.next_at) - now

    async def withdraw(
        self, challenge_id: str, phone_hash: str, purpose: str, issued_at: datetime, caller_hash: str = ""
    ) -> None:
        """The code could not be sent: the challenge dies, the phone may ask again at once, and
        the code counts towards neither the caller's escalation nor the phone's daily cap."""
        day = _china_day(issued_at).isoformat()

        def work(session: Session) -> None:
            row = session.get(ChallengeRow, challenge_id)
            if row is not None:
                row.dead = True
                session.add(row)
            # Written (so locked) one after the other, in the order `issue` locks them: no deadlock.
            throttle = session.get(SmsThrottleRow, (phone_hash, purpose))
            if throttle is not None and as_utc(throttle.last_sent_at) == issued_at:
                session.delete(throttle)
                session.flush()
            if purpose not in ANONYMOUS_PURPOSES:
                return
            ladder = session.get(SmsEscalationRow, (phone_hash, caller_hash))
            if ladder is not None and ladder.last_sent_at is not None and as_utc(ladder.last_sent_at) == issued_at:
                # The wait before this code had passed when it was issued: none is owed now.
                ladder.streak = max(ladder.streak - 1, 0)
                ladder.next_at = issued_at
                session.add(ladder)
                session.flush()
            daily = session.get(SmsDailyRow, phone_hash)
            if daily is not None and daily.day == day and daily.sent > 0:
                daily.sent -= 1
                session.add(daily)

        await self._db.run(work)

    async def verify(
        self, challenge_id: str, code: str, phone_hashes: Sequence[str], purpose: str, caller_hash: str = ""
    ) -> None:
        """Consumes the challenge when the code is right; VERIFICATION_FAILED otherwise.
        `phone_hashes`: the phone's digests under the current and the retired keys (a challenge
        issued before a rotation is bound to a retired key's digest). A right REGISTER or
        SIGN_IN code restarts the verifying caller's escalation for the phone and lets it use
        the phone's daily reserve for `trust_for`."""
        now = self._clock.now()
        offered = f"{challenge_id}:{code}"
        # The right code of a live challenge is consumed by one statement; anything else is
        # looked at row by row to say why (and count a wrong code).
        right = {"of_challenge": challenge_id, "for_purpose": purpose, "at": now}
        right.update(_digests("phone_digest", phone_hashes, self._digest_count))
        right.update(_digests("code_digest", self._code_hash.digests(offered), self._digest_count))

        def work(connection: Connection) -> str | None:
            if self._consume.run(connection, right).first() is not None:
                return None
            row = _CHALLENGE.run(connection, {"challenge_id": challenge_id}).first()
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
                wrong_tries = row.wrong_tries + 1  # the row is locked: no lost update
                _CHANGE_CHALLENGE.run(
                    connection,
                    {"of_challenge": challenge_id, "wrong_tries": wrong_tries, "dead": wrong_tries >= MAX_WRONG_TRIES},
                )
                return "wrong code"
            _CHANGE_CHALLENGE.run(connection, {"of_challenge": challenge_id, "used": True})
            return None

        why = await self._db.run_core(work)
        if why is not None:
            raise _verification_failed(why)
        if purpose in ANONYMOUS_PURPOSES:
            await self._vouch(phone_hashes[0], caller_hash, now)

    async def _vouch(self, phone_hash: str, caller_hash: str, now: datetime) -> None:
        """The caller proved it receives the phone's codes: its ladder starts again, trusted."""

        def work(session: Session) -> None:
            ladder = session.exec(
                select(SmsEscalationRow)
                .where(SmsEscalationRow.phone_hash == phone_hash, SmsEscalationRow.caller_hash == caller_hash)
                .with_for_update()
            ).first()
            if ladder is None:
                ladder = SmsEscalationRow(phone_hash=phone_hash, caller_hash=caller_hash)
            ladder.streak, ladder.next_at, ladder.verified_at = 0, None, now
            session.add(ladder)
            session.flush()

        try:
            await self._db.run(work)
        except IntegrityError:  # a concurrent code request created the row: update it
            await self._db.run(work)

    async def purge_expired(self, older_than: timedelta = timedelta(days=1)) -> int:
        """Deletes challenges, resend marks, daily counts and escalations long past use
        (housekeeping); an escalation is kept while its caller's proof of the phone counts."""
        now = self._clock.now()
        cutoff = now - older_than
        settled = now - max(older_than, self._escalation_reset)  # its ladder would start again
        untrusted = now - self._trust_for

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
            for ladder in session.exec(
                select(SmsEscalationRow).where(
                    or_(col(SmsEscalationRow.next_at).is_(None), col(SmsEscalationRow.next_at) < settled),
                    or_(
                        col(SmsEscalationRow.verified_at).is_(None),
                        col(SmsEscalationRow.verified_at) < untrusted,
                    ),
                )
            ).all():
                session.delete(ladder)
            return len(rows)

        return await self._db.run(work)
