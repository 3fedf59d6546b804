"""Sessions: a signed, expiring bearer token given at Register and SignIn, revocable.

A token reads `v1.<session id>.<user id>.<expiry>.<signature>`: the signature is HMAC-SHA256,
under a key derived from the master key for this purpose alone, over everything before it. So
`verify` knows without any I/O whether a token is ours, whose it is and whether it has expired;
a forged or expired token never reaches the database. `ensure_live` then asks the sessions table
whether the session still exists and is not revoked (sign-out), which every authenticated RPC
does. The table holds only a SHA-256 of the session id (128 random bits), never the token, so
even a leak of the table together with the key cannot make a working token.

Tokens are signed under the current master key; after a rotation those signed under a retired
key keep verifying while it is configured (a token cannot be signed again: once the retired key
is gone, a session it signed ends and its user signs in again)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Column, ColumnElement, DateTime, Row, Select, Table, bindparam, insert
from sqlalchemy import select as sa_select
from sqlmodel import Field, Session, SQLModel, select

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database, table_of
from cardcheck.runtime.errors import CardCheckError, Reason
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.statements import Statement

MAX_TOKEN_LENGTH = 256
TOKEN_VERSION = "v1"


class SessionRow(SQLModel, table=True):
    __tablename__ = "gw_sessions"

    token_hash: str = Field(primary_key=True, max_length=64)  # SHA-256 of the session id
    user_id: str = Field(index=True, max_length=36)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    revoked: bool = False


_SESSIONS = table_of(SessionRow)
_INSERT = Statement(insert(_SESSIONS))
# What the revocation check reads, named apart from the columns of a row read with it.
_CHECKED = (
    _SESSIONS.c.user_id.label("session_user_id"),
    _SESSIONS.c.revoked.label("session_revoked"),
    _SESSIONS.c.expires_at.label("session_expires_at"),
)
_LIVE = Statement(sa_select(*_CHECKED).where(_SESSIONS.c.token_hash == bindparam("token_hash")))


def live_joined(table: Table, *columns: ColumnElement[Any]) -> Statement[Select[Any]]:
    """The revocation check and, in the same statement, the row of `table` (keyed by `user_id`)
    of the session's user, then `columns` (a scalar subquery, say; their bound parameters are
    given to `Sessions.live_row`). Where that user has no such row its columns are None."""
    return Statement(
        sa_select(*_CHECKED, table, *columns)
        .select_from(_SESSIONS.outerjoin(table, table.c.user_id == _SESSIONS.c.user_id))
        .where(_SESSIONS.c.token_hash == bindparam("token_hash"))
    )


@dataclass(frozen=True)
class IssuedSession:
    user_id: str
    token: str
    expires_at: datetime


@dataclass(frozen=True)
class SessionClaims:
    """What a verified token says: authentic and unexpired, not yet checked for revocation."""

    session_id: str
    user_id: str
    expires_at: datetime

    @property
    def budget_key(self) -> str:
        """The session's key in the per-session rate limits: a digest, as the table keeps it
        (the session id is part of the token and must not sit in Redis as it is)."""
        return _hash(self.session_id)[:32]


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _unauthenticated(why: str) -> CardCheckError:
    return CardCheckError(Reason.UNAUTHENTICATED, why)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SessionTokens:
    """Signs and verifies tokens; no storage. Signs under `key`; verifies a signature under it
    or one of the `retired` keys."""

    def __init__(self, key: bytes, retired: Sequence[bytes] = ()) -> None:
        self._key = key
        self._retired = tuple(retired)

    @classmethod
    def from_keyring(cls, keyring: Keyring) -> SessionTokens:
        return cls(keyring.subkey("session-token"), keyring.retired_subkeys("session-token"))

    @staticmethod
    def _signature(key: bytes, body: str) -> str:
        return _b64(hmac.digest(key, body.encode(), "sha256"))

    def _authentic(self, body: str, signature: str) -> bool:
        return any(
            hmac.compare_digest(signature.encode(), self._signature(key, body).encode())
            for key in (self._key, *self._retired)
        )

    def sign(self, session_id: str, user_id: str, expires_at: datetime) -> str:
        body = f"{TOKEN_VERSION}.{session_id}.{user_id}.{int(expires_at.timestamp())}"
        return f"{body}.{self._signature(self._key, body)}"

    def verify(self, token: str | None, now: datetime) -> SessionClaims:
        """The claims of an authentic, unexpired token; UNAUTHENTICATED otherwise."""
        if not token:
            raise _unauthenticated("no session token")
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise _unauthenticated("unknown session token")
        body, _, signature = token.rpartition(".")
        if not self._authentic(body, signature):
            raise _unauthenticated("unknown session token")
        version, session_id, user_id, expiry = (body.split(".") + ["", "", "", ""])[:4]
        if version != TOKEN_VERSION or not expiry.isdigit() or body.count(".") != 3:
            raise _unauthenticated("unknown session token")  # signed by us, so only a format change
        expires_at = datetime.fromtimestamp(int(expiry), UTC)
        if expires_at <= now:
            raise _unauthenticated("session expired")
        return SessionClaims(session_id, user_id, expires_at)


class Sessions:
    def __init__(
        self, db: Database, keyring: Keyring, clock: Clock, ttl: timedelta = timedelta(hours=24)
    ) -> None:
        self._db = db
        self._tokens = SessionTokens.from_keyring(keyring)
        self._clock = clock
        self._ttl = ttl

    async def open(self, user_id: str) -> IssuedSession:
        session_id = secrets.token_urlsafe(16)
        now = self._clock.now()
        # Whole seconds, as the token carries them.
        expires_at = datetime.fromtimestamp(int((now + self._ttl).timestamp()), UTC)
        row = {
            "token_hash": _hash(session_id), "user_id": user_id, "created_at": now, "expires_at": expires_at,
            "revoked": False,
        }
        await self._db.run_core(lambda connection: _INSERT.run(connection, row))
        return IssuedSession(user_id, self._tokens.sign(session_id, user_id, expires_at), expires_at)

    def verify(self, token: str | None) -> SessionClaims:
        """Signature and expiry only, no I/O: cheap enough to come before load shedding."""
        return self._tokens.verify(token, self._clock.now())

    async def ensure_live(self, claims: SessionClaims) -> str:
        """The session's user, if the session is still on record and not revoked."""
        # Every call with a session makes this read: the columns it needs, without an ORM object.
        key = _hash(claims.session_id)
        row = await self._db.run_core(lambda connection: _LIVE.run(connection, {"token_hash": key}).first())
        return self._live_user(row, claims, self._clock.now())

    async def live_row(
        self, claims: SessionClaims, statement: Statement[Select[Any]], parameters: Mapping[str, Any] | None = None
    ) -> tuple[str, Any]:
        """`ensure_live`, and the row a `live_joined` statement read with it: one statement where
        a call reads the user's row next. The row is looked at only once the session is found
        live (a revoked or unknown one raises as `ensure_live` does)."""
        found = {"token_hash": _hash(claims.session_id), **(parameters or {})}
        now = self._clock.now()
        row = await self._db.run_core(lambda connection: statement.run(connection, found).first())
        return self._live_user(row, claims, now), row

    @staticmethod
    def _live_user(row: Row[Any] | None, claims: SessionClaims, now: datetime) -> str:
        if row is None or not hmac.compare_digest(row.session_user_id.encode(), claims.user_id.encode()):
            raise _unauthenticated("unknown session")
        if row.session_revoked:
            raise _unauthenticated("session revoked")
        if as_utc(row.session_expires_at) <= now:
            raise _unauthenticated("session expired")
        return str(row.session_user_id)

    async def user_of(self, token: str | None) -> str:
        """The user a live session token belongs to; UNAUTHENTICATED otherwise."""
        return await self.ensure_live(self.verify(token))

    async def revoke(self, claims: SessionClaims, *, everywhere: bool = False) -> int:
        """Ends this session (or every live session of its user): how many were ended."""
        now = self._clock.now()

        def work(session: Session) -> int:
            if everywhere:
                rows = session.exec(
                    select(SessionRow).where(
                        SessionRow.user_id == claims.user_id,
                        SessionRow.revoked == False,  # noqa: E712
                    )
                ).all()
            else:
                row = session.get(SessionRow, _hash(claims.session_id))
                rows = [row] if row is not None and not row.revoked else []
            ended = 0
            for row in rows:
                if as_utc(row.expires_at) > now:
                    ended += 1
                row.revoked = True
                session.add(row)
            return ended

        return await self._db.run(work)

    async def purge_expired(self, older_than: timedelta = timedelta(days=1)) -> int:
        cutoff = self._clock.now() - older_than

        def work(session: Session) -> int:
            rows = session.exec(select(SessionRow).where(SessionRow.expires_at < cutoff)).all()
            for row in rows:
                session.delete(row)
            return len(rows)

        return await self._db.run(work)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header value."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
