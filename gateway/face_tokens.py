"""Face-verification tokens already used: a vendor's result is accepted once, on whichever gateway
replica it comes to, so a token once spent is a row in the gateway's database (durable, shared
by every replica, unlike this process's memory or a Redis that may be flushed).

The token is held only as a keyed hash (HMAC-SHA256 under the "face-token" subkey); lookups try
every key's digest, so a rotation does not make a spent token new again while the retired key is
configured. A row is deleted by the housekeeping once no result of its token could still be
fresh: the check happened before the spend, and a result is fresh for CARDCHECK_FACE_FRESH_S."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Column, Connection, DateTime, Index, bindparam, delete, insert
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col

from cardcheck.runtime.clock import Clock
from cardcheck.runtime.database import Database, rowcount, table_of
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.statements import Statement

FACE_TOKEN_KEY = "face-token"  # the keyring's subkey the tokens are hashed under
# Beyond the freshness window, for a clock that differs a little from the vendor's.
PURGE_MARGIN = timedelta(hours=1)


class SpentFaceTokenRow(SQLModel, table=True):
    __tablename__ = "gw_face_tokens"
    __table_args__ = (Index("ix_gw_face_tokens_spent_at", "spent_at"),)

    token_hash: str = Field(primary_key=True, max_length=64)  # HMAC of the token
    user_id: str = Field(max_length=36)
    spent_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


_SPENT = table_of(SpentFaceTokenRow)
_SPENT_BY_DIGEST = Statement(sa_select(_SPENT.c.token_hash).where(
    _SPENT.c.token_hash.in_(bindparam("digests", expanding=True))
))
_INSERT_SPENT = Statement(insert(_SPENT))


class SpentFaceTokens:
    def __init__(self, db: Database, keyring: Keyring, clock: Clock, fresh_for: timedelta) -> None:
        self._db = db
        self._hash = keyring.hasher(FACE_TOKEN_KEY)
        self._clock = clock
        self._kept_for = fresh_for + PURGE_MARGIN

    def __repr__(self) -> str:
        return "SpentFaceTokens()"

    async def is_spent(self, token: str) -> bool:
        digests = list(self._hash.digests(token))
        found = await self._db.run_core(lambda connection: _SPENT_BY_DIGEST.run(connection, {"digests": digests}).first())
        return found is not None

    async def spend(self, user_id: str, token: str) -> bool:
        """Marks the token used; False when it already was (by any replica, under any key)."""
        digests = list(self._hash.digests(token))

        def work(connection: Connection) -> bool:
            if _SPENT_BY_DIGEST.run(connection, {"digests": digests}).first() is not None:
                return False
            _INSERT_SPENT.run(connection, {"token_hash": digests[0], "user_id": user_id, "spent_at": self._clock.now()})
            return True

        try:
            return await self._db.run_core(work)
        except IntegrityError:  # two replicas spent it at once: the other one won
            return False

    async def purge_expired(self) -> int:
        """Deletes the tokens no result of which could still be fresh; how many."""
        cutoff: datetime = self._clock.now() - self._kept_for

        def work(session: Session) -> int:
            return rowcount(
                session.execute(delete(SpentFaceTokenRow).where(col(SpentFaceTokenRow.spent_at) < cutoff))
            )

        return await self._db.run(work)
