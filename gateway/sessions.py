"""Sessions: an opaque bearer token given once at Register/SignIn. Only its SHA-256 is stored
(the token has 256 bits of entropy, so a plain hash suffices), with its user, expiry and a
revoked flag."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Column, DateTime
from sqlmodel import Field, Session, SQLModel, select

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import Database
from cardcheck.runtime.errors import CardCheckError

MAX_TOKEN_LENGTH = 256


class SessionRow(SQLModel, table=True):
    __tablename__ = "gw_sessions"

    token_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(index=True, max_length=36)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    revoked: bool = False


@dataclass(frozen=True)
class IssuedSession:
    user_id: str
    token: str
    expires_at: datetime


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _unauthenticated(why: str) -> CardCheckError:
    return CardCheckError("UNAUTHENTICATED", why)


class Sessions:
    def __init__(self, db: Database, clock: Clock, ttl: timedelta = timedelta(hours=24)) -> None:
        self._db = db
        self._clock = clock
        self._ttl = ttl

    async def open(self, user_id: str) -> IssuedSession:
        token = secrets.token_urlsafe(32)
        now = self._clock.now()
        row = SessionRow(token_hash=_hash(token), user_id=user_id, created_at=now, expires_at=now + self._ttl)
        await self._db.run(lambda session: session.add(row))
        return IssuedSession(user_id, token, row.expires_at)

    async def user_of(self, token: str | None) -> str:
        """The user a live session token belongs to; UNAUTHENTICATED otherwise."""
        if not token:
            raise _unauthenticated("no session token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthenticated("unknown session token")
        row = await self._db.run(lambda session: session.get(SessionRow, _hash(token)))
        if row is None:
            raise _unauthenticated("unknown session token")
        if row.revoked:
            raise _unauthenticated("session revoked")
        if as_utc(row.expires_at) <= self._clock.now():
            raise _unauthenticated("session expired")
        return row.user_id

    async def revoke(self, token: str) -> None:
        def work(session: Session) -> None:
            row = session.get(SessionRow, _hash(token))
            if row is not None:
                row.revoked = True
                session.add(row)

        await self._db.run(work)

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
