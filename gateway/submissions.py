"""Which query a user's idempotency key created, so that a retried SubmitQuery returns the same
Query without asking for the SMS code and the face again.

The key is the client's and may say something about it (a device id, a timestamp): it is held
only as a keyed hash (HMAC-SHA256 under the "idempotency-key" subkey). Lookups try every key's
digest, so a retry still finds its submission after a master key rotation while the retired key
is configured; new rows are written under the current key. A digest cannot be computed again
under a new key without the client's key, so `gateway.rewrap` leaves these rows: they are kept
only as long as the query's report can live anyway.

A row is deleted by the housekeeping once the query it names can no longer have a report: ready
within 24 h of submission, a report is kept 7 days (KEPT_FOR)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Column, Connection, DateTime, Index, Select, bindparam, delete, insert
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col

from cardcheck.runtime.clock import Clock
from cardcheck.runtime.database import Database, rowcount, table_of
from cardcheck.runtime.keys import Keyring
from cardcheck.runtime.statements import Statement

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = "idempotency-key"  # the keyring's subkey the keys are hashed under
KEPT_FOR = timedelta(hours=24) + timedelta(days=7)  # ready within 24 h, a report kept 7 days


class SubmissionRow(SQLModel, table=True):
    __tablename__ = "gw_submissions"
    __table_args__ = (Index("ix_gw_submissions_created_at", "created_at"),)

    user_id: str = Field(primary_key=True, max_length=36)
    key_hash: str = Field(primary_key=True, max_length=64)  # HMAC of the idempotency key
    query_id: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


_SUBMISSIONS = table_of(SubmissionRow)
_INSERT = Statement(insert(_SUBMISSIONS))


def _query_of_key(digests: int) -> Select[tuple[str]]:
    """The query of a user's key, by any of its `digests` (one a key of the keyring): a bound
    parameter each, not an expanding IN, whose SQL is made again on every execution."""
    return (
        sa_select(_SUBMISSIONS.c.query_id)
        .where(
            _SUBMISSIONS.c.user_id == bindparam("submission_user"),
            _SUBMISSIONS.c.key_hash.in_([bindparam(f"key_digest_{n}") for n in range(digests)]),
        )
        .limit(1)
    )


class Submissions:
    def __init__(self, db: Database, keyring: Keyring, clock: Clock) -> None:
        self._db = db
        self._hash = keyring.hasher(IDEMPOTENCY_KEY)
        self._clock = clock
        self._query_of_key = _query_of_key(1 + keyring.retired)
        # The query of a key as a column of another statement (SubmitQuery's first read:
        # gateway/sessions.py, live_joined), with `parameters` bound.
        self.earlier_column = self._query_of_key.scalar_subquery().label("earlier_query_id")

    def parameters(self, user_id: str, idempotency_key: str) -> dict[str, str]:
        """The bound parameters of the lookup of `earlier_column`."""
        digests = self._hash.digests(idempotency_key)
        return {"submission_user": user_id, **{f"key_digest_{n}": digest for n, digest in enumerate(digests)}}

    async def earlier(self, user_id: str, idempotency_key: str) -> str | None:
        """The query this user's key created, if it is remembered."""
        return await self._db.run_core(lambda connection: self.earlier_in(connection, user_id, idempotency_key))

    def earlier_in(self, connection: Connection, user_id: str, idempotency_key: str) -> str | None:
        """`earlier`, read within the caller's transaction."""
        found = self.parameters(user_id, idempotency_key)
        return cast("str | None", connection.execute(self._query_of_key, found).scalar())

    async def remember(self, user_id: str, idempotency_key: str, query_id: str) -> None:
        """Remembers the key's query unless the key is known already (under any key)."""
        found = self.parameters(user_id, idempotency_key)

        def work(connection: Connection) -> None:
            if connection.execute(self._query_of_key, found).first() is None:
                self._insert(connection, user_id, found["key_digest_0"], query_id)

        await self._remembering(work, query_id)

    async def remember_new(self, user_id: str, idempotency_key: str, query_id: str) -> None:
        """`remember` for a key this call found unknown (`earlier_column`, `earlier_in`): the
        insert alone. Between the two only a concurrent call with the same key can have
        remembered it, and under the current key, the one a new row takes: that insert conflicts."""
        digest = self._hash.digest(idempotency_key)
        await self._remembering(lambda connection: self._insert(connection, user_id, digest, query_id), query_id)

    def _insert(self, connection: Connection, user_id: str, digest: str, query_id: str) -> None:
        _INSERT.run(
            connection, {"user_id": user_id, "key_hash": digest, "query_id": query_id, "created_at": self._clock.now()}
        )

    async def _remembering(self, work: Callable[[Connection], None], query_id: str) -> None:
        try:
            await self._db.run_core(work)
        except IntegrityError:  # the same key raced in twice: report_service already deduplicated
            log.info("submission of query %s already remembered", query_id)

    async def purge_expired(self, older_than: timedelta = KEPT_FOR) -> int:
        """Deletes the submissions whose query can no longer have a report; how many."""
        cutoff = self._clock.now() - older_than

        def work(session: Session) -> int:
            return rowcount(session.execute(delete(SubmissionRow).where(col(SubmissionRow.created_at) < cutoff)))

        return await self._db.run(work)
