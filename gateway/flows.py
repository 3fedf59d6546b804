"""The gateway's flows in the domain's words: registration, sign-in, SMS challenges, consent and
queries. No gRPC here: the servicer translates protobuf to these calls, and the internal
services are reached through the adapters of gateway/downstream.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from sqlalchemy import Row

from cardcheck.banks import BANK_CODES, BANKS, BankInfo
from cardcheck.runtime.clock import Clock
from cardcheck.runtime.database import Database
from cardcheck.runtime.errors import CardCheckError, FieldViolation, Reason, invalid_argument
from cardcheck.runtime.keys import KeyedHash
from cardcheck.runtime.settings import Settings
from cardcheck.v1 import common_pb2, gateway_pb2
from gateway import validation
from gateway.agreement import CURRENT, Agreement
from gateway.challenges import Challenges, IssuedChallenge
from gateway.config import GatewayConfig
from gateway.downstream import BankDirectory, ReportDesk, SmsSender
from gateway.face import FaceCheck, FaceRefusal, FaceSubject, FaceVerifier
from gateway.limits import Limiters, RateLimiter
from gateway.sessions import IssuedSession, SessionClaims, Sessions
from gateway.submissions import SubmissionRow, Submissions  # noqa: F401 (the model's first home)
from gateway.tracing import Shedding
from gateway.users import LIVE_USER, Identity, Users, live_user
from gateway.watches import LocalWatchSlots, Watches

log = logging.getLogger(__name__)

GLOBAL_SUBMIT_KEY = "submit:global"
WATCH_DEADLINE_MARGIN_S = 1.0
SIGN_IN_SEND_DELAY_S = 0.01


@dataclass(frozen=True)
class BankListing:
    bank: BankInfo
    available: bool


@dataclass(frozen=True)
class Registration:
    name: str
    id_number: str
    phone: str
    challenge_id: str
    sms_code: str
    card_number: str
    payment_password: str
    region: str


@dataclass(frozen=True)
class QueryRequest:
    bank_codes: list[str]
    agreement_version: str
    consent_given: bool
    challenge_id: str
    sms_code: str
    face_token: str
    idempotency_key: str


@dataclass(frozen=True)
class PasswordReset:
    challenge_id: str
    sms_code: str
    face_token: str
    new_payment_password: str


def undeliverable(purpose: str) -> CardCheckError:
    """A code SMS the vendor refused for good. On REGISTER the caller typed the number and can
    correct it; on QUERY_AUTH it is the account's own phone, which the user cannot fix here."""
    if purpose == "REGISTER":
        return invalid_argument([FieldViolation("phone", "this number cannot receive SMS")])
    return CardCheckError(Reason.SERVICE_UNAVAILABLE, "the code could not be sent to the account's phone")


def _annotate(attributes: dict[str, str | int]) -> None:
    """Our own span attributes (`cardcheck.*`, never personal data) on the RPC's server span."""
    span = trace.get_current_span()
    for key, value in attributes.items():
        span.set_attribute(key, value)


def face_failed(refusal: FaceRefusal) -> CardCheckError:
    return CardCheckError(
        Reason.VERIFICATION_FAILED,
        f"face verification failed ({refusal})",
        metadata={"factor": "face", "cause": str(refusal)},
    )


async def _limited(limiter: RateLimiter, key: str, scope: str, message: str) -> None:
    wait = await limiter.acquire(key)
    if wait is not None:
        raise CardCheckError(
            Reason.RATE_LIMITED,
            message,
            metadata={"limit": scope, "retry_after_seconds": str(max(1, int(wait.total_seconds() + 0.999)))},
            retry_after=wait,
        )


class Gateway:
    def __init__(
        self,
        *,
        settings: Settings,
        config: GatewayConfig,
        clock: Clock,
        db: Database,
        users: Users,
        sessions: Sessions,
        challenges: Challenges,
        face: FaceVerifier,
        banks: BankDirectory,
        reports: ReportDesk,
        sms: SmsSender,
        limiters: Limiters,
        callers: KeyedHash,
        submissions: Submissions,
        shedding: Shedding | None = None,
        watches: Watches | None = None,
        agreement: Agreement = CURRENT,
    ) -> None:
        self._settings = settings
        self._config = config
        self._clock = clock
        self._db = db
        self._users = users
        self._sessions = sessions
        self._challenges = challenges
        self._face = face
        self._banks = banks
        self._reports = reports
        self._sms = sms
        self._limits = limiters
        self._callers = callers
        self._submissions = submissions
        self._live_user_and_earlier = live_user(submissions.earlier_column)
        self._shedding = shedding or Shedding()
        self._watches = watches or Watches(
            LocalWatchSlots(config.watch_streams_per_user, clock),
            sessions,
            clock,
            lifetime=config.watch_max_lifetime,
            session_check_s=config.watch_session_check_s,
            lease=config.watch_slot_lease,
        )
        self.agreement = agreement
        self._background: set[asyncio.Task[None]] = set()  # SIGN_IN codes being sent

    # --- banks and agreement ---------------------------------------------------------------

    async def list_banks(self) -> list[BankListing]:
        """The 24 banks; those bank_connector does not report available (or all, when it
        cannot be reached) are listed as unavailable."""
        known = await self._banks.availability()
        available = {b.code for b in known or () if b.available}
        return [BankListing(bank, bank.code in available) for bank in BANKS]

    # --- SMS challenges ----------------------------------------------------------------------

    def caller_key(self, caller: str) -> str:
        """The caller (an address, never stored or logged) as the limits and the escalation of
        anonymous codes know it: a keyed digest under the current key (a master key rotation
        gives every caller a fresh budget, once)."""
        return self._callers.digest(caller)[:32]

    async def request_sms_code(
        self, phone: str, purpose: str | None, token: str | None, caller: str = ""
    ) -> IssuedChallenge:
        """Limited per caller, then: QUERY_AUTH per session and per user (in that order, see
        `_admit`) and per phone and purpose; REGISTER and SIGN_IN per phone, per caller and
        phone, and per phone and day (gateway/challenges.py).

        REGISTER and SIGN_IN answer alike whether the phone has an account or not, in content
        and in time. REGISTER never looks: it sends a code either way (the account shows only at
        Register, to whoever holds the code). SIGN_IN must look, so it sends no code to a phone
        without an account; to keep the two answers equally fast, the code of a registered phone
        is sent in the background after the answer, and whatever happens to it (notifier down,
        number refused) the challenge and its budgets stand as for a phone without an account."""
        problems = validation.Violations()
        problems.sms_purpose(purpose)
        if purpose in ("REGISTER", "SIGN_IN"):
            problems.phone(phone)
        problems.raise_if_any()
        assert purpose is not None
        _annotate({"cardcheck.sms.purpose": purpose})
        caller_key = self.caller_key(caller)
        await _limited(self._limits.sms_caller, caller_key, "caller", "too many codes requested")

        if purpose == "QUERY_AUTH":
            claims = self._sessions.verify(token)
            await _limited(self._limits.sms_session, claims.budget_key, "session", "too many codes requested")
            user_id, joined = await self._sessions.live_row(claims, LIVE_USER)
            await _limited(self._limits.sms_user, user_id, "user", "too many codes requested")
            phone = self._users.identity_of(self._users.row_of(joined)).phone
            return await self._issue_and_send(phone, purpose, "")
        if purpose == "REGISTER":
            return await self._issue_and_send(phone, purpose, caller_key)
        registered = await self._users.find_by_phone(phone) is not None
        issued = await self._challenges.issue(self._users.phone_hash(phone), purpose, caller_key)
        if registered:
            self._in_background(self._send_sign_in_code(phone, issued))
        return issued

    async def _issue_and_send(self, phone: str, purpose: str, caller_key: str) -> IssuedChallenge:
        """Issues a code and waits for the notifier to take it; a code that cannot be sent is
        withdrawn and refused (SERVICE_UNAVAILABLE, or a number the SMS vendor refused for good:
        no code will ever arrive, so the caller hears it now)."""
        phone_hash = self._users.phone_hash(phone)
        issued = await self._challenges.issue(phone_hash, purpose, caller_key)
        try:
            reachable = await self._sms.send_code(phone, issued.code, purpose, issued.challenge_id)
        except CardCheckError:
            await self._challenges.withdraw(
                issued.challenge_id, phone_hash, purpose, issued.issued_at, caller_key
            )
            raise
        if not reachable:
            await self._challenges.withdraw(
                issued.challenge_id, phone_hash, purpose, issued.issued_at, caller_key
            )
            raise undeliverable(purpose)
        return issued

    async def _send_sign_in_code(self, phone: str, issued: IssuedChallenge) -> None:
        # Let the answer leave first: building and starting the send on the event loop while
        # the answer is written would slow the registered phone's answer a little.
        await asyncio.sleep(SIGN_IN_SEND_DELAY_S)
        try:
            if not await self._sms.send_code(phone, issued.code, "SIGN_IN", issued.challenge_id):
                log.warning("sign-in code of challenge %s refused by the SMS vendor", issued.challenge_id)
        except CardCheckError as error:
            log.warning("sign-in code of challenge %s not sent: %s", issued.challenge_id, error.reason)

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work, name="gateway-sms-send")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for the codes still being sent in the background (at stop)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)

    # --- accounts ----------------------------------------------------------------------------

    async def register(self, form: Registration, caller: str = "") -> IssuedSession:
        today = validation.today_in_china(self._clock.now())
        problems = validation.Violations()
        problems.name(form.name)
        problems.id_number(form.id_number, today)
        problems.phone(form.phone)
        problems.challenge(form.challenge_id, form.sms_code)
        problems.card_number(form.card_number)
        problems.payment_password(form.payment_password)
        problems.region(form.region)
        problems.raise_if_any()
        validation.check_region_enabled(form.region, self._settings.enabled_regions)

        id_number = validation.normalise_id_number(form.id_number)
        await self._challenges.verify(
            form.challenge_id,
            form.sms_code,
            self._users.phone_hashes(form.phone),
            "REGISTER",
            self.caller_key(caller),
        )
        await self._users.ensure_not_registered(id_number, form.phone)
        bank_code = await self._banks.verify_real_name(form.card_number, form.name, id_number, form.phone)
        if bank_code is None:
            raise CardCheckError(Reason.REAL_NAME_CHECK_FAILED, "the card's bank did not confirm the identity")
        user = await self._users.create(
            Identity(form.name, id_number, form.phone), form.region, form.payment_password, bank_code
        )
        log.info("registered user %s (bank %s, region %s)", user.user_id, bank_code, form.region)
        return await self._sessions.open(user.user_id)

    async def sign_in(self, phone: str, challenge_id: str, sms_code: str, caller: str = "") -> IssuedSession:
        problems = validation.Violations()
        problems.phone(phone)
        problems.challenge(challenge_id, sms_code)
        problems.raise_if_any()
        await self._challenges.verify(
            challenge_id, sms_code, self._users.phone_hashes(phone), "SIGN_IN", self.caller_key(caller)
        )
        user = await self._users.find_by_phone(phone)
        if user is None:
            raise CardCheckError(Reason.VERIFICATION_FAILED, "no account for this phone")
        log.info("user %s signed in", user.user_id)
        return await self._sessions.open(user.user_id)

    async def sign_out(self, token: str | None, everywhere: bool) -> int:
        """Revokes the calling session (or all of its user's): how many live ones ended."""
        claims = self._sessions.verify(token)
        user_id = await self._sessions.ensure_live(claims)
        ended = await self._sessions.revoke(claims, everywhere=everywhere)
        log.info("user %s signed out (%d session(s) ended)", user_id, ended)
        return ended

    # --- queries -----------------------------------------------------------------------------

    async def _admit(self, claims: SessionClaims, key: str | None) -> tuple[str, Row[Any]]:
        """Admission of a SubmitQuery. Before any database work, downstream call or hashing:
        the token's signature (no I/O), the session's own budget, the global limit (shedding);
        then the session's revocation check in the database; then the user's own budget.

        The session's budget comes first so that one token (even a stolen, revoked one) can
        neither drain the global budget nor reach the database for free: it costs only its own
        bucket. The user's budget comes after the revocation check so that a revoked token
        cannot spend it: signed out, a stolen token leaves the owner's new session its whole
        budget. (Every session is held to the user's rate anyway, and a user has only the
        sessions SMS codes opened, so the per-user budget still bounds one person.) GetReport
        and QUERY_AUTH codes are admitted in the same order, without the global limit.

        Returns the user and what was read with the revocation check, in the same statement,
        once the session is found live (looked at only once the query is admitted and its form
        checked): the user's row and, for a well-formed idempotency `key`, the query it created
        (`earlier_query_id`; the claims' user is the session's once it is found live)."""
        await _limited(
            self._limits.submit_session, claims.budget_key, "session", "too many queries submitted"
        )
        wait = await self._limits.submit_global.acquire(GLOBAL_SUBMIT_KEY)
        if wait is not None:
            self._shedding.shed()
            _annotate({"cardcheck.admission.shed": True})
            raise CardCheckError(Reason.SERVICE_BUSY, "too many queries submitted at once", retry_after=wait)
        if key is None:
            user_id, joined = await self._sessions.live_row(claims, LIVE_USER)
        else:
            parameters = self._submissions.parameters(claims.user_id, key)
            user_id, joined = await self._sessions.live_row(claims, self._live_user_and_earlier, parameters)
        await _limited(self._limits.submit_user, user_id, "user", "too many queries submitted")
        return user_id, joined

    async def _resolve_banks(self, requested: list[str]) -> list[str]:
        if requested:
            return requested
        known = await self._banks.recent_availability()
        available = {b.code for b in known or () if b.available}
        return [code for code in BANK_CODES if code in available] or list(BANK_CODES)

    # --- face checks -------------------------------------------------------------------------

    async def start_face_check(self, token: str | None) -> FaceCheck:
        """A face check bound to the user's name and ID number, for the next SubmitQuery or
        ResetPaymentPassword. Each one may cost a vendor call: counted with SubmitQuery's
        budgets, per session before the revocation check and per user after it (see `_admit`)."""
        claims = self._sessions.verify(token)
        message = "too many face checks started"
        await _limited(self._limits.submit_session, claims.budget_key, "session", message)
        user_id = await self._sessions.ensure_live(claims)
        await _limited(self._limits.submit_user, user_id, "user", message)
        identity = await self._users.identity(user_id)
        check = await self._face.start(FaceSubject(user_id, identity.name, identity.id_number))
        log.info("user %s started a face check", user_id)
        return check

    async def _verify_face(self, subject: FaceSubject, face_token: str) -> None:
        refusal = await self._face.verify(subject, face_token)
        if refusal is not None:
            log.info("face check of user %s refused: %s", subject.user_id, refusal)
            raise face_failed(refusal)

    async def submit_query(self, token: str | None, form: QueryRequest) -> common_pb2.Query:
        key = form.idempotency_key
        remembered = bool(key) and validation.valid_idempotency_key(key)
        user_id, joined = await self._admit(self._sessions.verify(token), key if remembered else None)

        problems = validation.Violations()
        problems.bank_codes(form.bank_codes)
        problems.agreement_version(form.agreement_version)
        problems.challenge(form.challenge_id, form.sms_code)
        problems.face_token(form.face_token)
        problems.idempotency_key(form.idempotency_key)
        problems.raise_if_any()
        requested = validation.known_banks(form.bank_codes)

        earlier = joined.earlier_query_id if remembered else None
        if earlier is not None:
            return await self._reports.get_query(user_id, earlier)

        if not form.consent_given or form.agreement_version != self.agreement.version:
            raise CardCheckError(
                Reason.CONSENT_REQUIRED,
                "consent to the current agreement is required",
                metadata={"agreement_version": self.agreement.version},
            )
        found = self._users.user_and_identity(self._users.row_of(joined))
        if found is None:
            raise CardCheckError(Reason.UNAUTHENTICATED, "the session's user no longer exists")
        user, identity = found
        validation.check_region_enabled(user.region, self._settings.enabled_regions)

        # The code was sent to the identity's phone; its challenge is bound to the phone's
        # digest under the key current then (a retired one if a rotation came in between).
        await self._challenges.verify(
            form.challenge_id, form.sms_code, self._users.phone_hashes(identity.phone), "QUERY_AUTH"
        )
        await self._verify_face(FaceSubject(user_id, identity.name, identity.id_number), form.face_token)

        bank_codes = await self._resolve_banks(requested)
        idempotency_key = form.idempotency_key or secrets.token_hex(16)
        _annotate({"cardcheck.query.bank_count": len(bank_codes)})
        query = await self._reports.create_query(
            user_id,
            identity,
            bank_codes,
            self.agreement.version,
            idempotency_key,
        )
        await self._submissions.remember_new(user_id, idempotency_key, query.query_id)
        log.info("user %s submitted query %s to %d banks", user_id, query.query_id, len(bank_codes))
        try:
            await self._sms.send_consent_receipt(
                identity.phone, query.query_id, self.agreement.version, len(bank_codes)
            )
        except CardCheckError as error:
            log.warning("consent receipt for query %s not sent: %s", query.query_id, error.reason)
        return query

    async def watch_query(self, token: str | None, query_id: str) -> AsyncIterator[gateway_pb2.QueryEvent]:
        """The query's events, on a slot of the user's (gateway/watches.py says how the cap,
        the lifetime and the session checks end a stream). The slot is taken before the
        session's database read, as SubmitQuery's budget is, and released however it ends."""
        claims = self._sessions.verify(token)
        problems = validation.Violations()
        problems.query_id(query_id)
        problems.raise_if_any()
        async with self._watches.opened(claims.user_id) as watch:
            user_id = await self._sessions.ensure_live(claims)
            # The upstream ends a little after the lifetime at the latest: the gateway ends the
            # stream itself at the lifetime, the deadline is there should it not.
            deadline_s = self._watches.remaining(watch).total_seconds() + WATCH_DEADLINE_MARGIN_S
            upstream = self._reports.watch(user_id, query_id, deadline_s)
            # Progress only (which banks answered, never their cards, which GetReport shows
            # behind the payment password): report_service's stream carries no card at all.
            async with contextlib.aclosing(self._watches.guarded(watch, claims, upstream)) as events:
                async for event in events:
                    yield event

    async def list_queries(self, token: str | None) -> list[common_pb2.Query]:
        user_id = await self._sessions.user_of(token)
        return await self._reports.list_queries(user_id)

    async def get_report(self, token: str | None, query_id: str, payment_password: str) -> common_pb2.Report:
        claims = self._sessions.verify(token)
        # Each attempt costs a payment password check: counted before anything else, per
        # session before the revocation check and per user after it (see `_admit`).
        await _limited(self._limits.report_session, claims.budget_key, "session", "too many report requests")
        # The user's row (its payment password hash, counts and locks) read with the revocation
        # check: one statement.
        user_id, joined = await self._sessions.live_row(claims, LIVE_USER)
        await _limited(self._limits.report_user, user_id, "user", "too many report requests")
        problems = validation.Violations()
        problems.query_id(query_id)
        problems.payment_password(payment_password)
        problems.raise_if_any()
        await self._users.check_payment_password(user_id, payment_password, self._users.row_of(joined))
        return await self._reports.get_report(user_id, query_id)

    # --- payment password --------------------------------------------------------------------

    async def reset_payment_password(self, token: str | None, form: PasswordReset) -> None:
        """A new payment password, lifting every lock on it: the same proof of the person as a
        query (a fresh QUERY_AUTH code sent to the account's phone and the face check)."""
        claims = self._sessions.verify(token)
        # Counted with the GetReport attempts (both test and set the same secret), per session
        # before the revocation check and per user after it (see `_admit`).
        message = "too many payment password requests"
        await _limited(self._limits.report_session, claims.budget_key, "session", message)
        user_id = await self._sessions.ensure_live(claims)
        await _limited(self._limits.report_user, user_id, "user", message)
        problems = validation.Violations()
        problems.challenge(form.challenge_id, form.sms_code)
        problems.face_token(form.face_token)
        problems.payment_password(form.new_payment_password, "new_payment_password")
        problems.raise_if_any()

        identity = await self._users.identity(user_id)
        await self._challenges.verify(
            form.challenge_id, form.sms_code, self._users.phone_hashes(identity.phone), "QUERY_AUTH"
        )
        await self._verify_face(FaceSubject(user_id, identity.name, identity.id_number), form.face_token)
        await self._users.reset_payment_password(user_id, form.new_payment_password)
        log.info("user %s reset the payment password", user_id)
