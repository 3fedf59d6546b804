"""Running queries durably: the work rows (rs_work) and their leases, each bank's outcome recorded
as it arrives, the query finished once. Plain storage, no gRPC; time from the injected clock.

The leases are cardcheck.runtime.work's over rs_work (its `passes` is the fencing token): a
worker claims due work, renews it while it works, and one that stops renewing (killed, cut off)
loses it when it expires; another then takes over with only the banks still missing. Every
write a worker makes for a query first checks it still holds that very lease, so one that lost
it (and may still be talking to the banks) cannot record over the one that took over. Each
recorded change is announced on the queries channel, which wakes the watchers of that query
on every replica (cardcheck.runtime.changes).

Failed banks (ERROR, TIMED_OUT, CIRCUIT_OPEN) are asked again in later passes, with a growing
wait between passes, until ready_by (submitted + 24 h). The query finishes when every bank has
answered, or at ready_by with the others in unavailable_banks; FAILED only if none answered."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    String,
    bindparam,
    cast,
    delete,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlmodel import Session

from cardcheck.banks import BY_CODE
from cardcheck.runtime.changes import Channel
from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.database import table_of
from cardcheck.runtime.statements import Statement
from cardcheck.runtime.work import Lease, LeaseColumns, LeaseLost, WorkQueue
from report_service import audit
from report_service.models import (
    EXECUTE,
    NOTIFY,
    BankOutcomeRow,
    QueryRow,
    QueryStatus,
    ReportRow,
    WorkRow,
)
from report_service.queries import Query, QueryStore, Subject, query_of
from report_service.reports import ANSWERED, BankOutcome, build_report
from report_service.storage import Storage

log = logging.getLogger(__name__)

WorkKey = tuple[str, str]  # (query_id, kind)
__all__ = ["Claim", "ExecutionStore", "LeaseLost", "Recorded", "WorkKey"]


@dataclass(frozen=True)
class Claim:
    """A claimed piece of work and what is needed to do it."""

    query_id: str
    kind: str  # EXECUTE or NOTIFY
    passes: int  # claims so far, this one included
    query: Query
    subject: Subject
    trace_context: dict[str, str] = field(default_factory=dict)
    missing_banks: tuple[str, ...] = ()  # EXECUTE: the banks without an answer yet
    final: bool = False  # EXECUTE: ready_by has come: finish with what there is
    owner: str = ""  # who holds the lease; `passes` is its fencing token

    @property
    def key(self) -> WorkKey:
        return (self.query_id, self.kind)

    @property
    def lease(self) -> Lease:
        return Lease(self.key, self.owner, self.passes)


@dataclass(frozen=True)
class Recorded:
    """The result of recording outcomes: the query's status after it, and the SMS lease when the
    report was just generated (the worker that finished the query sends it)."""

    status: QueryStatus
    notify: Claim | None = None


@dataclass(frozen=True)
class _Finished:
    status: QueryStatus
    query: Query | None = None  # READY: what the SMS needs
    trace_context: str = "{}"
    owner: str = ""  # READY: whose the NOTIFY work is


_WORK = table_of(WorkRow)
_OUTCOMES = table_of(BankOutcomeRow)
_QUERIES = table_of(QueryRow)
# The statements of every batch of outcomes and every finish, built once: building them again
# each time cost more than running them (as in report_service.audit).
_RUNNING_COLUMNS = [
    _QUERIES.c[name] for name in (
        "query_id", "user_id", "status", "bank_codes", "agreement_version", "submitted_at", "ready_by",
        "ready_at", "expires_at", "banks_answered", "banks_total", "trace_context",
    )
]


class _joined(FunctionElement[str]):
    """The strings aggregated, ';' between them (group_concat, string_agg)."""

    type = String()
    name = "joined"
    inherit_cache = True


@compiles(_joined, "sqlite")
def _joined_sqlite(element: _joined, compiler: Any, **kw: Any) -> str:
    return f"group_concat({compiler.process(element.clauses, **kw)}, ';')"


@compiles(_joined, "postgresql")
def _joined_postgresql(element: _joined, compiler: Any, **kw: Any) -> str:
    return f"string_agg({compiler.process(element.clauses, **kw)}, ';')"


_COMMA: ColumnElement[str] = literal_column("','", String())
# A running query under its EXECUTE lease in one statement, the work row locked as
# WorkQueue.hold locks it: its owner and token (the fence), the query (as _RUNNING_COLUMNS),
# and for a batch of outcomes the outcomes stored so far, as "id,bank,kind;...".
_HELD = (
    select(_WORK.c.lease_owner, _WORK.c.passes, *_RUNNING_COLUMNS)
    .select_from(_WORK.join(_QUERIES, _QUERIES.c.query_id == _WORK.c.query_id))
    .where(_WORK.c.query_id == bindparam("query_id"), _WORK.c.kind == EXECUTE)
    .with_for_update(of=_WORK)
)
_HELD_AND_STORED = Statement(_HELD.add_columns(
    select(_joined(cast(_OUTCOMES.c.id, String) + _COMMA + _OUTCOMES.c.bank_code + _COMMA + _OUTCOMES.c.kind))
    .where(_OUTCOMES.c.query_id == _QUERIES.c.query_id)
    .scalar_subquery()
    .label("stored")
))
_HELD_ONLY = Statement(_HELD)
# A claim's queries and the banks that answered them, as Core rows: ORM objects cost a claim
# most of its CPU and are never changed.
_CLAIMED = Statement(select(*_RUNNING_COLUMNS, _QUERIES.c.subject_sealed).where(
    _QUERIES.c.query_id.in_(bindparam("query_ids", expanding=True))
))
_ANSWERED_OF = Statement(select(_OUTCOMES.c.query_id, _OUTCOMES.c.bank_code).where(
    _OUTCOMES.c.query_id.in_(bindparam("query_ids", expanding=True)), _OUTCOMES.c.kind == ANSWERED
))
_OUTCOMES_OF = Statement(select(
    _OUTCOMES.c.query_id, _OUTCOMES.c.bank_code, _OUTCOMES.c.kind, _OUTCOMES.c.cards_sealed, _OUTCOMES.c.detail
).where(_OUTCOMES.c.query_id == bindparam("query_id")))
_INSERT_OUTCOMES = Statement(insert(_OUTCOMES))
# An UPDATE's SET clause names the columns its parameters give (all but the bound key).
_REPLACE_OUTCOME = Statement(update(_OUTCOMES).where(_OUTCOMES.c.id == bindparam("outcome_id")))
_UPDATE_QUERY = Statement(update(_QUERIES).where(_QUERIES.c.query_id == bindparam("of_query")))
_DELETE_EXECUTE = Statement(delete(_WORK).where(_WORK.c.query_id == bindparam("query_id"), _WORK.c.kind == EXECUTE))
_DELETE_NOTIFY = Statement(delete(_WORK).where(_WORK.c.query_id == bindparam("query_id"), _WORK.c.kind == NOTIFY))
_INSERT_REPORT = Statement(insert(table_of(ReportRow)))
# The SET clause names the columns its parameters give, and kind from new_kind.
_EXECUTE_TO_NOTIFY = Statement(
    update(_WORK)
    .where(_WORK.c.query_id == bindparam("of_query"), _WORK.c.kind == EXECUTE)
    .values(kind=bindparam("new_kind"))
)
WORK_LEASES = LeaseColumns(
    _WORK,
    key=(_WORK.c.query_id, _WORK.c.kind),
    owner=_WORK.c.lease_owner,
    expires=_WORK.c.lease_expires_at,
    token=_WORK.c.passes,
    due=_WORK.c.due_at,
)


class ExecutionStore:
    def __init__(
        self,
        db: Storage,
        queries: QueryStore,
        clock: Clock,
        *,
        lease: timedelta,
        work_changes: Channel | None = None,
        query_changes: Channel | None = None,
    ) -> None:
        """`work_changes` wakes the workers when work is free to claim now; `query_changes` the
        watchers of a query when it changed."""
        self._db = db
        self._queries = queries
        self._clock = clock
        self.queue = WorkQueue(WORK_LEASES, db.write, clock, lease=lease, changes=work_changes)
        self._query_changes = query_changes

    def _changed(self, session: Session | Connection, query_id: str) -> None:
        if self._query_changes is not None:
            self._query_changes.announce(session, query_id)

    # --- claiming, renewing, releasing ------------------------------------------------------

    async def claim(self, owner: str, limit: int) -> list[Claim]:
        """Leases up to `limit` pieces of due work whose lease is free, oldest due first."""
        if limit <= 0:
            return []
        now = self._clock.now()

        def claim(session: Session) -> list[tuple[str, int, Query, bytes, str, tuple[str, ...], bool]]:
            due = self.queue.claim(session, owner, limit)
            if not due:
                return []
            query_ids = sorted({lease.key[0] for lease in due})
            connection = session.connection()
            queries = {row.query_id: row for row in _CLAIMED.run(connection, {"query_ids": query_ids})}
            answered: dict[str, set[str]] = {}
            for query_id, bank_code in _ANSWERED_OF.run(connection, {"query_ids": query_ids}):
                answered.setdefault(query_id, set()).add(bank_code)
            claimed = []
            asked = []
            for lease in due:
                query_id, kind = lease.key
                query_row = queries.get(query_id)
                if query_row is None:  # no such query (cannot happen unless rows were removed by hand)
                    session.execute(delete(_WORK).where(_WORK.c.query_id == query_id))
                    continue
                query = query_of(query_row)
                missing = tuple(b for b in query.bank_codes if b not in answered.get(query_id, set()))
                final = now >= query.ready_by
                if kind == EXECUTE and query.status == QueryStatus.PENDING and missing and not final:
                    asked.append(
                        audit.AuditEvent(
                            audit.BANKS_ASKED,
                            query_id,
                            query.user_id,
                            {"banks": list(missing), "pass": lease.token},
                        )
                    )
                claimed.append(
                    (
                        kind,
                        lease.token,
                        query,
                        query_row.subject_sealed,
                        query_row.trace_context,
                        missing,
                        final,
                    )
                )
            self._queries.audit.append(session, asked, now)
            return claimed

        claims = []
        for kind, passes, query, sealed, trace_context, missing, final in await self._db.write(claim):
            if query.status != (QueryStatus.PENDING if kind == EXECUTE else QueryStatus.READY) or not sealed:
                # Nothing left to do (finishing and sweeping delete their work rows, so this is
                # a stray): never let one row come back at every pass.
                log.warning(
                    "query %s: dropping %s work for a query that is %s", query.query_id, kind, query.status
                )
                await self._drop(Lease((query.query_id, kind), owner, passes))
                continue
            try:
                subject = self._queries.open_subject(query.query_id, sealed)
            except Exception:
                # Kept, not dropped: claimed again when the lease runs out, once the key is right.
                log.error("query %s: its sealed subject does not open (wrong master key?)", query.query_id)
                continue
            claims.append(
                Claim(
                    query_id=query.query_id,
                    kind=kind,
                    passes=passes,
                    query=query,
                    subject=subject,
                    trace_context=json.loads(trace_context or "{}"),
                    missing_banks=missing if kind == EXECUTE else (),
                    final=final if kind == EXECUTE else False,
                    owner=owner,
                )
            )
        return claims

    async def _drop(self, lease: Lease) -> None:
        def drop(session: Session) -> None:
            self.queue.hold(session, lease)
            session.execute(delete(_WORK).where(_WORK.c.query_id == lease.key[0], _WORK.c.kind == lease.key[1]))

        with contextlib.suppress(LeaseLost):
            await self._db.write(drop)

    async def release(self, owner: str) -> int:
        """Gives up every lease of this worker (it is stopping): another may claim at once."""
        return await self.queue.release(owner)

    # --- running a query --------------------------------------------------------------------

    async def record(self, claim: Claim, outcomes: Sequence[BankOutcome]) -> Recorded | None:
        """Records the banks' outcomes that just arrived, in one transaction: an answer is final,
        a failure replaces an earlier failure of that bank. When every bank has now answered,
        the query is finished in the same transaction. Returns None while it stays PENDING."""
        now = self._clock.now()
        query_id, owner = claim.query_id, claim.owner
        outcomes = [o for o in outcomes if o.bank_code in BY_CODE]

        def record(connection: Connection) -> _Finished | None:
            # Core statements on a connection, without an ORM session: a batch is up to every
            # bank's outcome at once, and a query's outcomes come in one to three of them.
            row = self._held(connection, claim, _HELD_AND_STORED)
            stored: dict[str, tuple[int | None, str]] = {}
            for outcome in row.stored.split(";") if row.stored else ():
                outcome_id, bank_code, kind = outcome.split(",")
                stored[bank_code] = (int(outcome_id), kind)
            banks = set(json.loads(row.bank_codes))
            arrived: dict[str, BankOutcome] = {}  # this batch's, in clear: the report needs no opening of them
            new_rows = []
            replaced = []
            for outcome in outcomes:
                if outcome.bank_code not in banks:
                    continue
                known = stored.get(outcome.bank_code)
                if known is not None and known[1] == ANSWERED:
                    continue  # answered before: an answer is never replaced
                values = {
                    "kind": outcome.kind,
                    "cards_sealed": self._queries.seal_cards(query_id, outcome.bank_code, outcome.cards),
                    "detail": outcome.detail[:200],
                    "recorded_at": now,
                }
                if known is None:
                    new_rows.append({"query_id": query_id, "bank_code": outcome.bank_code, **values})
                    stored[outcome.bank_code] = (None, outcome.kind)
                else:
                    replaced.append({"outcome_id": known[0], **values})
                    stored[outcome.bank_code] = (known[0], outcome.kind)
                arrived[outcome.bank_code] = outcome
            # One entry for the batch, never the card counts: the trail outlives the report
            # (report_service.audit).
            events = [
                audit.AuditEvent(
                    audit.BANK_OUTCOMES,
                    query_id,
                    row.user_id,
                    {"outcomes": [[bank_code, outcome.kind] for bank_code, outcome in arrived.items()]},
                )
            ] if arrived else []
            if new_rows:
                _INSERT_OUTCOMES.run(connection, new_rows)
            if replaced:
                _REPLACE_OUTCOME.run(connection, replaced)
            answered = sum(1 for _, kind in stored.values() if kind == ANSWERED)
            self._changed(connection, query_id)
            result = None
            if banks and all(b in stored and stored[b][1] == ANSWERED for b in banks):
                # Only the banks recorded before this batch are read back (and their cards opened).
                earlier = (
                    self._outcomes(connection, query_id, exclude=arrived) if stored.keys() - arrived.keys() else []
                )
                result = self._finish(connection, row, [*earlier, *arrived.values()], owner, now, events, answered)
            else:
                _UPDATE_QUERY.run(connection, {"of_query": query_id, "banks_answered": answered})
            self._queries.audit.append(connection, events, now)
            return result

        return self._recorded(await self._db.write_core(record), claim.subject)

    async def end_pass(self, claim: Claim, retry_delay: timedelta) -> Recorded | None:
        """After a pass over the banks: finish the query if every bank answered or ready_by has
        come; otherwise put it back for the next pass after `retry_delay` (never later than
        ready_by) and give up the lease. Returns None when the query stays PENDING."""
        now = self._clock.now()
        query_id, owner = claim.query_id, claim.owner

        def end(session: Session) -> _Finished | None:
            connection = session.connection()
            row = self._held(connection, claim, _HELD_ONLY)
            stored = self._outcomes(connection, query_id)
            answered = {o.bank_code for o in stored if o.kind == ANSWERED}
            banks = json.loads(row.bank_codes)
            ready_by = as_utc(row.ready_by)
            if all(b in answered for b in banks) or now >= ready_by:
                events: list[audit.AuditEvent] = []
                result = self._finish(connection, row, stored, owner, now, events, row.banks_answered)
                self._queries.audit.append(session, events, now)
                self._changed(session, query_id)
                return result
            self.queue.put_back(session, claim.lease, min(now + retry_delay, ready_by))
            return None

        return self._recorded(await self._db.write(end), claim.subject)

    def _held(self, connection: Connection, claim: Claim, statement: Statement[Any]) -> Any:
        """The running query of `claim`, read as `statement` reads it with the lease's fence:
        LeaseLost unless the EXECUTE lease is still the claim's and the query PENDING."""
        row = statement.run(connection, {"query_id": claim.query_id}).first()
        self.queue.fence(claim.lease, *((row.lease_owner, row.passes) if row is not None else (None, None)))
        assert row is not None  # the fence passed
        if row.status != QueryStatus.PENDING:
            raise LeaseLost(f"{EXECUTE} {claim.query_id}")
        return row

    def _outcomes(self, connection: Connection, query_id: str, exclude: Container[str] = ()) -> list[BankOutcome]:
        """The query's recorded outcomes (cards opened), but those of the banks in `exclude`."""
        # Core rows, not ORM objects: outcome_of reads only these columns.
        rows = _OUTCOMES_OF.run(connection, {"query_id": query_id})
        return [self._queries.outcome_of(o) for o in rows if o.bank_code not in exclude]

    def _finish(
        self,
        connection: Connection,
        row: Row[Any],
        outcomes: list[BankOutcome],
        owner: str,
        now: datetime,
        events: list[audit.AuditEvent],
        banks_answered: int,
    ) -> _Finished:
        """READY with a sealed report when at least one bank answered, else FAILED (only ever
        reached at ready_by). The EXECUTE work goes; a READY query gets its NOTIFY work, leased
        to this worker, in the same transaction. `row`: the query as _HELD reads it."""
        banks = json.loads(row.bank_codes)
        answered = {o.bank_code for o in outcomes if o.kind == ANSWERED}
        unanswered = [b for b in banks if b not in answered]
        if len(unanswered) == len(banks):
            _DELETE_EXECUTE.run(connection, {"query_id": row.query_id})
            # Nothing more will be asked or sent about this person: the subject goes.
            _UPDATE_QUERY.run(
                connection,
                {"of_query": row.query_id, "status": QueryStatus.FAILED, "subject_sealed": b"",
                 "banks_answered": banks_answered},
            )
            events.append(
                audit.AuditEvent(audit.QUERY_FAILED, row.query_id, row.user_id, {"unanswered": unanswered})
            )
            return _Finished(QueryStatus.FAILED)
        expires_at = now + self._queries.retention
        # Banks whose last outcome is a failure, or that have none, are the unavailable ones.
        content = build_report(banks, outcomes)
        wrapped_key, ciphertext = self._queries.vault.seal(row.query_id, content)
        _INSERT_REPORT.run(
            connection,
            {"query_id": row.query_id, "wrapped_key": wrapped_key, "ciphertext": ciphertext, "generated_at": now,
             "expires_at": expires_at},
        )
        _UPDATE_QUERY.run(
            connection,
            {"of_query": row.query_id, "status": QueryStatus.READY, "ready_at": now, "expires_at": expires_at,
             "banks_answered": banks_answered},
        )
        # The EXECUTE work row becomes the NOTIFY one (one statement for its delete and the
        # other's insert): due now, its first pass leased to this worker.
        _EXECUTE_TO_NOTIFY.run(
            connection,
            {"of_query": row.query_id, "new_kind": NOTIFY, "due_at": now, "passes": 1, **self.queue.granted(owner),
             "created_at": now},
        )
        events.append(
            # What the report says stays in it: the trail outlives it (report_service.audit).
            audit.AuditEvent(
                audit.REPORT_GENERATED, row.query_id, row.user_id, facts={"submitted_at": as_utc(row.submitted_at)}
            )
        )
        query = dataclasses.replace(
            query_of(row), status=QueryStatus.READY, ready_at=now, expires_at=expires_at, banks_answered=banks_answered
        )
        return _Finished(QueryStatus.READY, query, row.trace_context, owner)

    def _recorded(self, finished: _Finished | None, subject: Subject) -> Recorded | None:
        """`subject`: the claim's, opened when it was claimed (the sealed one never changes
        while the query runs): the SMS goes to its phone."""
        if finished is None:
            return None
        if finished.query is None:
            return Recorded(finished.status)
        query = finished.query
        notify = Claim(
            owner=finished.owner,
            query_id=query.query_id,
            kind=NOTIFY,
            passes=1,
            query=query,
            subject=subject,
            trace_context=json.loads(finished.trace_context or "{}"),
        )
        return Recorded(finished.status, notify)

    # --- the "report ready" SMS -------------------------------------------------------------

    async def notified(self, query_id: str) -> None:
        """The notifier accepted the SMS: the work is done (whoever holds its lease)."""

        def done(connection: Connection) -> None:
            _DELETE_NOTIFY.run(connection, {"query_id": query_id})

        await self._db.write_core(done)

    async def notify_later(self, claim: Claim, delay: timedelta) -> None:
        now = self._clock.now()

        def later(session: Session) -> None:
            self.queue.put_back(session, claim.lease, now + delay)

        await self._db.write(later)
