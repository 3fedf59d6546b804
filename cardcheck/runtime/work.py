"""Durable work under leases: the claiming, renewing, fencing and releasing every worker needs,
over the rows of whatever table holds its work. The table keeps its own columns: a key, the
lease's owner and expiry, a counter of claims (the fencing token) and, optionally, when the
work is due. The domain decides what the work is; this module only who holds it.

Claiming: on PostgreSQL `SELECT ... FOR UPDATE SKIP LOCKED` over due rows whose lease is free
or expired, then the lease set in the same transaction, so two replicas never claim the same
row; on SQLite every write transaction is exclusive (BEGIN IMMEDIATE,
cardcheck.runtime.database), which makes the same select-then-update safe for its one writer.

Fencing: each claim counts up the row's token, and a `Lease` carries the token it was given.
A write made under a lease first locks the row and checks owner and token (`hold`): a worker
whose lease expired and was claimed again (by another worker, or by itself later) is refused
with LeaseLost, even if it is still working. Renewing and putting back are fenced the same way.

A worker that stops renewing (killed, cut off) loses its leases when they expire and the next
claim takes the work over. Changes others wait for are announced on the queue's channel
(cardcheck.runtime.changes) in the transaction that makes them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import Column, ColumnElement, Table, and_, bindparam, or_, select, tuple_, update
from sqlmodel import Session

from cardcheck.runtime.changes import Channel
from cardcheck.runtime.clock import Clock
from cardcheck.runtime.database import rowcount

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[Any, ...]


class Run(Protocol):
    """Runs `work(session)` in a transaction of its own (`Database.run`)."""

    def __call__(self, work: Callable[[Session], T], /) -> Awaitable[T]: ...


def worker_name() -> str:
    """Who holds a lease: host, process and a random part (a restarted process is a new one)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class LeaseLost(Exception):
    """The lease is no longer this worker's: it expired and was claimed again, or the work is
    done. What the worker was about to write is refused."""


@dataclass(frozen=True)
class Lease:
    key: Key
    owner: str
    token: int  # the row's claim count when this lease was given


@dataclass(frozen=True)
class LeaseColumns:
    """Where a table keeps its work's lease."""

    table: Table
    key: tuple[Column[Any], ...]
    owner: Column[Any]
    expires: Column[Any]
    token: Column[Any]  # counts claims (passes, attempts): the fencing token
    due: Column[Any] | None = None


class WorkQueue:
    """The leases of one table. Methods taking a session join the caller's transaction, so the
    domain's own reads and writes commit with the lease; the others run their own."""

    def __init__(
        self,
        columns: LeaseColumns,
        run: Run,
        clock: Clock,
        *,
        lease: timedelta,
        changes: Channel | None = None,
    ) -> None:
        self.columns = columns
        self._run = run
        self._clock = clock
        self.lease = lease
        self.changes = changes
        # Built once: the fence runs in every transaction of the work it guards.
        c = columns
        self._held_row = (
            select(c.owner, c.token)
            .where(and_(*(column == bindparam(f"key_{i}") for i, column in enumerate(c.key))))
            .with_for_update()
        )

    def _key(self) -> ColumnElement[Any]:
        key = self.columns.key
        return tuple_(*key) if len(key) > 1 else key[0]

    def _keyed(self, keys: Sequence[Key]) -> ColumnElement[bool]:
        return self._key().in_([k if len(k) > 1 else k[0] for k in keys])

    def _free(self, now: datetime) -> ColumnElement[bool]:
        expires = self.columns.expires
        return or_(expires.is_(None), expires <= now)

    # --- in the caller's transaction -----------------------------------------------------------

    def claim(
        self,
        session: Session,
        owner: str,
        limit: int,
        *,
        where: Iterable[ColumnElement[bool]] = (),
        order_by: Sequence[ColumnElement[Any]] = (),
    ) -> list[Lease]:
        """Leases up to `limit` rows that are due (when the table says), free or expired, and
        match `where`; oldest due first unless `order_by` says otherwise."""
        if limit <= 0:
            return []
        c = self.columns
        now = self._clock.now()
        conditions = [self._free(now), *where]
        if c.due is not None:
            conditions.append(c.due <= now)
        order = list(order_by) or ([c.due] if c.due is not None else list(c.key))
        rows = session.execute(
            select(*c.key, c.token)
            .where(*conditions)
            .order_by(*order)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return []
        keys = [tuple(row[: len(c.key)]) for row in rows]
        session.execute(
            update(c.table)
            .where(self._keyed(keys))
            .values({c.owner: owner, c.expires: now + self.lease, c.token: c.token + 1})
        )
        return [Lease(key, owner, (row[-1] or 0) + 1) for key, row in zip(keys, rows, strict=True)]

    def granted(self, owner: str) -> dict[str, Any]:
        """The lease columns of a row that is handed to `owner` as it is written (work accepted
        and started at once); the caller counts its token up."""
        c = self.columns
        return {c.owner.name: owner, c.expires.name: self._clock.now() + self.lease}

    def freed(self) -> dict[str, Any]:
        """The lease columns of a row nobody holds."""
        return {self.columns.owner.name: None, self.columns.expires.name: None}

    def _held(self, lease: Lease) -> ColumnElement[bool]:
        c = self.columns
        return and_(*(col == part for col, part in zip(c.key, lease.key, strict=True)),
                    c.owner == lease.owner, c.token == lease.token)

    def hold(self, session: Session, lease: Lease) -> None:
        """The fence: locks the row and raises LeaseLost unless `lease` is still its lease."""
        c = self.columns
        key = {f"key_{i}": part for i, part in enumerate(lease.key)}
        if len(key) != len(c.key):
            raise ValueError(f"a lease of {c.table.name} has {len(c.key)} key part(s)")
        row = session.execute(self._held_row, key).first()
        self.fence(lease, *(row or (None, None)))

    def fence(self, lease: Lease, owner: object, token: object) -> None:
        """`hold`'s check, for a caller that read the row's owner and token itself (in a
        statement of its own, the row locked as `hold` locks it: SELECT ... FOR UPDATE OF the
        table); None for both when there was no row."""
        if owner is None or owner != lease.owner or token != lease.token:
            raise LeaseLost(f"{self.columns.table.name} {lease.key}")

    def put_back(self, session: Session, lease: Lease, due: datetime | None = None, **values: Any) -> bool:
        """Frees the row for a later claim (at `due`, when the table has a due time), fenced:
        False when `lease` was no longer the row's lease."""
        c = self.columns
        changes = {**self.freed(), **values}
        if c.due is not None and due is not None:
            changes[c.due.name] = due
        done = rowcount(session.execute(update(c.table).where(self._held(lease)).values(changes)))
        if done and self.changes is not None and (due is None or due <= self._clock.now()):
            self.changes.announce(session)
        return bool(done)

    def announce(self, session: Session) -> None:
        """New work is due now: workers waiting on the queue look for it."""
        if self.changes is not None:
            self.changes.announce(session)

    # --- transactions of their own ---------------------------------------------------------------

    async def renew(self, leases: Iterable[Lease]) -> set[Key]:
        """Extends `leases`; returns the keys of those still held."""
        held, _ = await self._renew(list(leases))
        return held

    async def _renew(self, leases: list[Lease]) -> tuple[set[Key], set[Key]]:
        """(the keys still held, the keys taken over: their rows are there under another lease)."""
        if not leases:
            return set(), set()
        c = self.columns
        now = self._clock.now()

        def renew(session: Session) -> tuple[set[Key], set[Key]]:
            held = or_(*(self._held(lease) for lease in leases))
            session.execute(update(c.table).where(held).values({c.expires: now + self.lease}))
            mine = {tuple(row) for row in session.execute(select(*c.key).where(held))}
            keys = [lease.key for lease in leases]
            there = {tuple(row) for row in session.execute(select(*c.key).where(self._keyed(keys)))}
            return mine, there - mine

        return await self._run(renew)

    async def release(self, owner: str, *, where: Iterable[ColumnElement[bool]] = ()) -> int:
        """Gives up every lease of `owner` (it is stopping): another may claim at once."""
        c = self.columns

        def release(session: Session) -> int:
            released = rowcount(session.execute(update(c.table).where(c.owner == owner, *where).values(self.freed())))
            if released:
                self.announce(session)
            return released

        return await self._run(release)

    async def keep_renewed(
        self,
        held: Callable[[], Iterable[Lease]],
        lost: Callable[[Key], None],
        *,
        every_s: float | None = None,
    ) -> None:
        """Renews what `held()` names every third of a lease until cancelled, and calls
        `lost(key)` for each lease that was taken over meanwhile. Work whose row is gone is
        done (finished by its own holder, an instant ago): that is not a loss."""
        every_s = every_s or self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(every_s)
            leases = list(held())
            if not leases:
                continue
            try:
                _, taken = await self._renew(leases)
            except Exception:
                log.warning("renewing leases failed; trying again", exc_info=True)
                continue
            for key in taken:
                lost(key)
