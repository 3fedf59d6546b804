"""The gateway's flows in the domain's words: registration, sign-in, SMS challenges, consent and
queries. No gRPC here: the servicer translates protobuf to these calls, and the internal
services are reached through the adapters of gateway/downstream.py."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import trace

from cardcheck.banks import BANK_CODES, BANKS, BankInfo
from cardcheck.runtime.clock import Clock
from cardcheck.runtime.database import Database
from cardcheck.runtime.errors import CardCheckError, FieldViolation, invalid_argument
from cardcheck.runtime.keys import KeyedHash
from cardcheck.runtime.settings import Settings
from cardcheck.v1 import common_pb2, gateway_pb2, report_service_pb2
from gateway import validation
from gateway.agreement import CURRENT, Agreement
from gateway.challenges import Challenges, IssuedChallenge
from gateway.config import GatewayConfig
from gateway.downstream import BankDirectory, ReportDesk, SmsSender
from gateway.face import FaceVerifier
from gateway.limits import Limiters, RateLimiter
from gateway.sessions import IssuedSession, SessionClaims, Sessions
from gateway.submissions import SubmissionRow, Submissions  # noqa: F401 (the model's first home)
from gateway.tracing import Shedding
from gateway.users import Identity, Users

log = logging.getLogger(__name__)

GLOBAL_SUBMIT_KEY = "submit:global"


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


def undeliverable(purpose: str) -> CardCheckError:
    """A code SMS the vendor refused for good. On REGISTER the caller typed the number and can
    correct it; on QUERY_AUTH it is the account's own phone, which the user cannot fix here."""
    if purpose == "REGISTER":
        return invalid_argument([FieldViolation("phone", "this number cannot receive SMS")])
    return CardCheckError("SERVICE_UNAVAILABLE", "the code could not be sent to the account's phone")


def _annotate(attributes: dict[str, str | int]) -> None:
    """Our own span attributes (`cardcheck.*`, never personal data) on the RPC's server span."""
    span = trace.get_current_span()
    for key, value in attributes.items():
        span.set_attribute(key, value)


async def _limited(limiter: RateLimiter, key: str, scope: str, message: str) -> None:
    wait = await limiter.acquire(key)
    if wait is not None:
        raise CardCheckError(
            "RATE_LIMITED",
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
        self._shedding = shedding or Shedding()
        self.agreement = agreement

    # --- banks and agreement ---------------------------------------------------------------

    async def list_banks(self) -> list[BankListing]:
        """The 24 banks; those bank_connector does not report available (or all, when it
        cannot be reached) are listed as unavailable."""
        known = await self._banks.availability()
        available = {b.code for b in known or () if b.available}
        return [BankListing(bank, bank.code in available) for bank in BANKS]

    # --- SMS challenges ----------------------------------------------------------------------

    async def request_sms_code(
        self, phone: str, purpose: str | None, token: str | None, caller: str = ""
    ) -> IssuedChallenge:
        """Limited per caller, per signed-in user (QUERY_AUTH) and per phone (challenges.py)."""
        problems = validation.Violations()
        problems.sms_purpose(purpose)
        if purpose in ("REGISTER", "SIGN_IN"):
            problems.phone(phone)
        problems.raise_if_any()
        assert purpose is not None
        _annotate({"cardcheck.sms.purpose": purpose})
        # The caller (an address, never stored or logged) is only a key in the limiter (under
        # the current key: a master key rotation gives every caller a fresh budget, once).
        await _limited(
            self._limits.sms_caller, self._callers.digest(caller)[:32], "caller", "too many codes requested"
        )

        send = True
        if purpose == "QUERY_AUTH":
            claims = self._sessions.verify(token)
            await _limited(self._limits.sms_user, claims.user_id, "user", "too many codes requested")
            user_id = await self._sessions.ensure_live(claims)
            phone = (await self._users.identity(user_id)).phone
        elif purpose == "SIGN_IN" and await self._users.find_by_phone(phone) is None:
            # Answer exactly as for a registered phone (no account enumeration), send nothing.
            send = False
        phone_hash = self._users.phone_hash(phone)
        issued = await self._challenges.issue(phone_hash, purpose)
        if send:
            try:
                reachable = await self._sms.send_code(phone, issued.code, purpose, issued.challenge_id)
            except CardCheckError:
                await self._challenges.withdraw(issued.challenge_id, phone_hash, purpose, issued.issued_at)
                raise
            if not reachable and purpose != "SIGN_IN":
                # The SMS vendor refused the number for good: no code will ever arrive, so the
                # caller hears it now. (SIGN_IN answers as if sent, whatever happens: otherwise
                # the answer would tell a registered phone from an unregistered one.)
                await self._challenges.withdraw(issued.challenge_id, phone_hash, purpose, issued.issued_at)
                raise undeliverable(purpose)
        return issued

    # --- accounts ----------------------------------------------------------------------------

    async def register(self, form: Registration) -> IssuedSession:
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
            form.challenge_id, form.sms_code, self._users.phone_hashes(form.phone), "REGISTER"
        )
        await self._users.ensure_not_registered(id_number, form.phone)
        bank_code = await self._banks.verify_real_name(form.card_number, form.name, id_number, form.phone)
        if bank_code is None:
            raise CardCheckError("REAL_NAME_CHECK_FAILED", "the card's bank did not confirm the identity")
        user = await self._users.create(
            Identity(form.name, id_number, form.phone), form.region, form.payment_password, bank_code
        )
        log.info("registered user %s (bank %s, region %s)", user.user_id, bank_code, form.region)
        return await self._sessions.open(user.user_id)

    async def sign_in(self, phone: str, challenge_id: str, sms_code: str) -> IssuedSession:
        problems = validation.Violations()
        problems.phone(phone)
        problems.challenge(challenge_id, sms_code)
        problems.raise_if_any()
        await self._challenges.verify(challenge_id, sms_code, self._users.phone_hashes(phone), "SIGN_IN")
        user = await self._users.find_by_phone(phone)
        if user is None:
            raise CardCheckError("VERIFICATION_FAILED", "no account for this phone")
        log.info("user %s signed in", user.user_id)
        return await self._sessions.open(user.user_id)

    async def authenticate(self, token: str | None) -> str:
        return await self._sessions.user_of(token)

    async def sign_out(self, token: str | None, everywhere: bool) -> int:
        """Revokes the calling session (or all of its user's): how many live ones ended."""
        claims = self._sessions.verify(token)
        user_id = await self._sessions.ensure_live(claims)
        ended = await self._sessions.revoke(claims, everywhere=everywhere)
        log.info("user %s signed out (%d session(s) ended)", user_id, ended)
        return ended

    # --- queries -----------------------------------------------------------------------------

    async def _admit(self, claims: SessionClaims) -> str:
        """Admission of a SubmitQuery, before any database work, downstream call or hashing:
        the token's signature (no I/O), the user's own budget, the global limit (shedding);
        only then the session's revocation check in the database. The user's budget comes first
        so that one user (even with a stolen, revoked token) cannot drain the global one."""
        await _limited(self._limits.submit_user, claims.user_id, "user", "too many queries submitted")
        wait = await self._limits.submit_global.acquire(GLOBAL_SUBMIT_KEY)
        if wait is not None:
            self._shedding.shed()
            _annotate({"cardcheck.admission.shed": True})
            raise CardCheckError("SERVICE_BUSY", "too many queries submitted at once", retry_after=wait)
        return await self._sessions.ensure_live(claims)

    async def _resolve_banks(self, requested: list[str]) -> list[str]:
        if requested:
            return requested
        known = await self._banks.availability()
        available = {b.code for b in known or () if b.available}
        return [code for code in BANK_CODES if code in available] or list(BANK_CODES)

    async def submit_query(self, token: str | None, form: QueryRequest) -> common_pb2.Query:
        user_id = await self._admit(self._sessions.verify(token))

        problems = validation.Violations()
        problems.bank_codes(form.bank_codes)
        problems.agreement_version(form.agreement_version)
        problems.challenge(form.challenge_id, form.sms_code)
        problems.face_token(form.face_token)
        problems.idempotency_key(form.idempotency_key)
        problems.raise_if_any()
        requested = validation.known_banks(form.bank_codes)

        if form.idempotency_key:
            earlier = await self._submissions.earlier(user_id, form.idempotency_key)
            if earlier is not None:
                return await self._reports.get_query(user_id, earlier)

        if not form.consent_given or form.agreement_version != self.agreement.version:
            raise CardCheckError(
                "CONSENT_REQUIRED",
                "consent to the current agreement is required",
                metadata={"agreement_version": self.agreement.version},
            )
        user = await self._users.get(user_id)
        if user is None:
            raise CardCheckError("UNAUTHENTICATED", "the session's user no longer exists")
        validation.check_region_enabled(user.region, self._settings.enabled_regions)

        identity = await self._users.identity(user_id)
        # The code was sent to the identity's phone; its challenge is bound to the phone's
        # digest under the key current then (a retired one if a rotation came in between).
        await self._challenges.verify(
            form.challenge_id, form.sms_code, self._users.phone_hashes(identity.phone), "QUERY_AUTH"
        )
        if not await self._face.verify(user_id, form.face_token):
            raise CardCheckError(
                "VERIFICATION_FAILED", "face verification failed", metadata={"factor": "face"}
            )

        bank_codes = await self._resolve_banks(requested)
        idempotency_key = form.idempotency_key or secrets.token_hex(16)
        _annotate({"cardcheck.query.bank_count": len(bank_codes)})
        query = await self._reports.create_query(
            user_id,
            report_service_pb2.Subject(
                name=identity.name, id_number=identity.id_number, phone=identity.phone
            ),
            bank_codes,
            self.agreement.version,
            idempotency_key,
        )
        await self._submissions.remember(user_id, idempotency_key, query.query_id)
        log.info("user %s submitted query %s to %d banks", user_id, query.query_id, len(bank_codes))
        try:
            await self._sms.send_consent_receipt(
                identity.phone, query.query_id, self.agreement.version, len(bank_codes)
            )
        except CardCheckError as error:
            log.warning("consent receipt for query %s not sent: %s", query.query_id, error.reason)
        return query

    async def watch_query(self, token: str | None, query_id: str) -> AsyncIterator[gateway_pb2.QueryEvent]:
        user_id = await self._sessions.user_of(token)
        problems = validation.Violations()
        problems.query_id(query_id)
        problems.raise_if_any()
        async for event in self._reports.watch(user_id, query_id):
            # Progress only: which banks answered, never their cards, which GetReport shows
            # behind the payment password.
            if event.HasField("outcome"):
                event.outcome.ClearField("cards")
            for outcome in event.outcomes:
                outcome.ClearField("cards")
            yield event

    async def list_queries(self, token: str | None) -> list[common_pb2.Query]:
        user_id = await self._sessions.user_of(token)
        return await self._reports.list_queries(user_id)

    async def get_report(self, token: str | None, query_id: str, payment_password: str) -> common_pb2.Report:
        claims = self._sessions.verify(token)
        # Each attempt may cost an argon2 verification: counted before anything else.
        await _limited(self._limits.report_user, claims.user_id, "user", "too many report requests")
        user_id = await self._sessions.ensure_live(claims)
        problems = validation.Violations()
        problems.query_id(query_id)
        problems.payment_password(payment_password)
        problems.raise_if_any()
        await self._users.check_payment_password(user_id, payment_password)
        return await self._reports.get_report(user_id, query_id)
