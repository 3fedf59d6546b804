"""Runs the work of report_service: claims due work (report_service.execution), asks the banks
still missing and records each outcome as it arrives, finishes queries, has the notifier accept
each "report ready" SMS, and deletes expired reports.

Each execution runs under the trace context stored when the query was accepted, so the fan-out
and the SMS belong to the trace of the request that submitted it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any, Protocol

import grpc
from opentelemetry import propagate, trace

from cardcheck.runtime.backoff import Backoff
from cardcheck.runtime.changes import Channel
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.waiting import wait_for_event
from cardcheck.runtime.work import Lease, LeaseLost, worker_name
from report_service.config import DEFAULT_RETRY
from report_service.execution import Claim, ExecutionStore, Recorded, WorkKey
from report_service.models import EXECUTE, QueryStatus
from report_service.queries import Query, Subject
from report_service.reports import BankOutcome

log = logging.getLogger(__name__)
SMS_RETRY = timedelta(seconds=5)
# How long a pass waits after a bank's outcome for others to record with it: at most this much
# later on a watch and to READY, against a transaction (and a wake of every watcher) per batch.
# Banks asked together at the same latency reach this process spread over tens of ms when the
# connector is busy; 10 ms after the first gathered a query's outcomes into one transaction for
# 2 % of queries in `bench mesh`, 50 ms for 60 %, the rest in two or three. Waiting 50 ms after
# the latest instead (a burst is recorded once it pauses), up to GATHER_MAX_S after the first,
# records the banks that answer together in one.
GATHER_S = 0.05
GATHER_MAX_S = 0.25


class BankFanOut(Protocol):
    def fan_out(self, subject: Subject, bank_codes: Sequence[str]) -> AsyncIterator[BankOutcome]:
        """Each named bank's outcome, as it arrives. Raises when the banks cannot be asked."""
        ...


class ReportReadyNotifier(Protocol):
    async def report_ready(self, query_id: str, phone: str) -> None:
        """Hands the SMS over (idempotent per query). Raises when it was not accepted."""
        ...


_END = object()


class _Arrivals:
    """The fan-out's items as they arrive, handed over in batches: the next item and whatever
    follows it, each within `gather_s` of the one before and all within `gather_max_s` of the
    first, until the batch has the items expected or the stream ends (an error or _END). The
    banks asked together mostly answer together, and each transaction costs about as much again
    as the outcomes it records. Timers, not a wait per item: the one waiting for a batch wakes
    once for it, however many items it gathers."""

    def __init__(self, gather_s: float, gather_max_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._gather_s = gather_s
        self._gather_max_s = gather_max_s
        self._items: list[object] = []
        self._expected = 0
        self._waiting: asyncio.Future[None] | None = None
        self._quiet: asyncio.TimerHandle | None = None  # gather_s after the latest item
        self._last_call: asyncio.TimerHandle | None = None  # gather_max_s after the first

    def put(self, item: object) -> None:
        self._items.append(item)
        if self._waiting is None or self._waiting.done():
            return
        if len(self._items) >= self._expected or not isinstance(item, BankOutcome):
            self._hand_over()
            return
        if self._last_call is None:
            self._last_call = self._loop.call_later(self._gather_max_s, self._hand_over)
        if self._quiet is not None:
            self._quiet.cancel()
        self._quiet = self._loop.call_later(self._gather_s, self._hand_over)

    def _hand_over(self) -> None:
        for timer in (self._quiet, self._last_call):
            if timer is not None:
                timer.cancel()
        self._quiet = self._last_call = None
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    async def batch(self, expected: int) -> list[object]:
        """The next batch: `expected` is how many items would complete it."""
        self._expected = expected
        if not self._items or (len(self._items) < expected and isinstance(self._items[-1], BankOutcome)):
            self._waiting = self._loop.create_future()
            if self._items:  # arrived meanwhile: gather what follows them from now on
                self._last_call = self._loop.call_later(self._gather_max_s, self._hand_over)
                self._quiet = self._loop.call_later(self._gather_s, self._hand_over)
            try:
                await self._waiting
            finally:
                self._hand_over()
                self._waiting = None
        batch, self._items = self._items, []
        return batch


class QueryWorker:
    def __init__(
        self,
        store: ExecutionStore,
        banks: BankFanOut,
        notifier: ReportReadyNotifier,
        changes: Channel,
        tracer: trace.Tracer,
        *,
        sweep: Callable[[], Awaitable[list[str]]],
        audit_head: Callable[[], Awaitable[tuple[int, str] | None]] | None = None,
        owner: str | None = None,
        lease_s: float = 30.0,
        retry: Backoff | None = None,
        pass_interval_s: float = 2.0,
        sweep_interval_s: float = 60.0,
        max_running: int = 64,
        gather_s: float = GATHER_S,
        gather_max_s: float = GATHER_MAX_S,
    ) -> None:
        self._store = store
        self._banks = banks
        self._notifier = notifier
        self._changes = changes
        self._tracer = tracer
        self._sweep = sweep
        self._audit_head = audit_head
        self._logged_head: tuple[int, str] | None = None
        self.owner = owner or worker_name()
        self._lease_s = lease_s
        self._retry = retry or DEFAULT_RETRY
        self._pass_interval_s = pass_interval_s
        self._sweep_interval_s = sweep_interval_s
        self._max_running = max_running
        self._gather_s = gather_s
        self._gather_max_s = max(gather_max_s, gather_s)
        # Work free to claim now (accepted or given back, here or on another replica).
        self._work = store.queue.changes or Channel("work")
        self._background: list[asyncio.Task[None]] = []
        self._running: dict[WorkKey, asyncio.Task[None]] = {}
        self._leases: dict[WorkKey, Lease] = {}

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if not self._background:
            self._background = [
                asyncio.create_task(self._loop(), name="report_service.worker"),
                asyncio.create_task(
                    self._store.queue.keep_renewed(self._leases.values, self._lost, every_s=self._lease_s / 3),
                    name="report_service.leases",
                ),
            ]

    def wake(self) -> None:
        """A query was accepted: look for work now rather than at the next pass."""
        self._work.notify()

    @property
    def running(self) -> set[WorkKey]:
        return set(self._running)

    @property
    def work_changes(self) -> Channel:
        return self._work

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self._lease_s)

    def has_room(self) -> bool:
        return bool(self._background) and len(self._running) < self._max_running

    def run_accepted(self, query: Query, subject: Subject, trace_context: dict[str, str]) -> None:
        """Runs the first pass of a query this worker was leased when it was accepted."""
        claim = Claim(
            query_id=query.query_id,
            kind=EXECUTE,
            passes=1,
            query=query,
            subject=subject,
            trace_context=trace_context,
            missing_banks=query.bank_codes,
            owner=self.owner,
        )
        if claim.key not in self._running:
            self._spawn(claim, self._execute(claim))

    async def stop(self) -> None:
        """Stops working and gives the leases back, so that another worker (or this service
        started again) takes the work over at once instead of after the leases expire."""
        tasks = [*self._background, *self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._background = []
        self._running.clear()
        self._leases.clear()
        try:
            await self._store.release(self.owner)
        except Exception:
            log.warning("could not give the leases back; they will expire", exc_info=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_sweep = float("-inf")
        while True:
            changed = self._work.current()
            try:
                await self.run_pass()
                if loop.time() - last_sweep >= self._sweep_interval_s:
                    last_sweep = loop.time()
                    await self.sweep()
            except Exception:
                log.exception("worker pass failed; trying again at the next pass")
            # The pass interval still finds work come due (a retry) or whose lease expired.
            await wait_for_event(changed, self._pass_interval_s)

    def _lost(self, key: WorkKey) -> None:
        task = self._running.get(key)
        if task is not None:
            log.warning("lost the lease on %s of query %s; stopping that work", key[1], key[0])
            task.cancel()

    # --- one pass -----------------------------------------------------------------------------

    async def run_pass(self, *, wait: bool = False) -> list[asyncio.Task[None]]:
        """Claims due work up to this worker's capacity and starts it; with `wait`, returns only
        when what it started has ended (for tests)."""
        claims = await self._store.claim(self.owner, self._max_running - len(self._running))
        started = []
        for claim in claims:
            if claim.key in self._running:
                # Ours and still running, though its lease expired unrenewed: the work carries
                # on under the lease this claim gave (the old one is fenced out).
                self._leases[claim.key] = claim.lease
                continue
            work = self._execute(claim) if claim.kind == EXECUTE else self._notify(claim)
            started.append(self._spawn(claim, work))
        if wait and started:
            await asyncio.gather(*started, return_exceptions=True)
        return started

    def _held(self, claim: Claim) -> Claim:
        """The claim under the lease this worker holds for it now (a later claim of its own)."""
        lease = self._leases.get(claim.key)
        if lease is None or lease.token == claim.passes:
            return claim
        return dataclasses.replace(claim, passes=lease.token)

    def _spawn(self, claim: Claim, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        key = claim.key
        task = asyncio.create_task(work, name=f"{key[1]} {key[0]}")
        self._running[key] = task
        self._leases[key] = claim.lease

        def done(finished: asyncio.Task[None]) -> None:
            if self._running.get(key) is finished:
                del self._running[key]
                del self._leases[key]
            if not finished.cancelled() and finished.exception() is not None:
                # Its lease runs out and the work is claimed again.
                log.error("%s of query %s failed", key[1], key[0], exc_info=finished.exception())

        task.add_done_callback(done)
        return task

    async def sweep(self) -> list[str]:
        swept = await self._sweep()
        if swept:
            log.info("deleted %d expired reports", len(swept))
            self._changes.notify()
        await self._log_audit_head()
        return swept

    async def _log_audit_head(self) -> None:
        """The audit trail's head, each time a sweep finds it moved: logs kept elsewhere then
        hold earlier heads, for `cardcheck audit verify --head SEQ:HASH` to check the newest
        entries were not deleted with the head moved back (report_service.audit)."""
        if self._audit_head is None:
            return
        head = await self._audit_head()
        # Forward only: a read that was overtaken by a newer one logs nothing. The same entry
        # with another hash is a `rekey` (the chain hashed again): the new head is logged too.
        logged = self._logged_head or (0, "")
        if head is not None and (head[0] > logged[0] or (head[0] == logged[0] and head[1] != logged[1])):
            self._logged_head = head
            log.info("audit head %d:%s", *head)

    # --- running a query ----------------------------------------------------------------------

    async def _execute(self, claim: Claim) -> None:
        query_id = claim.query_id
        context = propagate.extract(claim.trace_context)
        with self._tracer.start_as_current_span("query.execute", context=context) as span:
            span.set_attribute("cardcheck.query_id", query_id)
            span.set_attribute("cardcheck.banks_total", claim.query.banks_total)
            span.set_attribute("cardcheck.banks_missing", len(claim.missing_banks))
            span.set_attribute("cardcheck.pass", claim.passes)
            try:
                result = None
                if claim.missing_banks and not claim.final:
                    result = await self._ask_banks(claim)
                if result is None:
                    result = await self._store.end_pass(self._held(claim), self._retry.delay(claim.passes))
            except LeaseLost:
                log.info("query %s: another worker holds it now", query_id)
                return
            except Exception:
                # E.g. the database went away: the lease runs out and the query is claimed again.
                log.exception(
                    "query %s: this pass failed; it is taken up again when its lease expires", query_id
                )
                return
            if result is None:
                log.info(
                    "query %s: %d bank(s) still to answer; asking again later",
                    query_id,
                    len(claim.missing_banks),
                )
                return
            span.set_attribute("cardcheck.query_status", result.status)
            log.info("query %s finished %s", query_id, result.status)
        if result.status == QueryStatus.READY and result.notify is not None:
            self._spawn(result.notify, self._notify(result.notify))

    async def _ask_banks(self, claim: Claim) -> Recorded | None:
        """One pass over the missing banks. Outcomes are recorded as they arrive; those that
        arrive together, each within `gather_s` of the one before, are recorded in one
        transaction (and reach the watchers as one change). Returns the result once the query
        is finished, None when banks are still missing after the pass."""
        asked = set(claim.missing_banks)
        arrived: set[str] = set()
        arrivals = _Arrivals(self._gather_s, self._gather_max_s)

        async def pump() -> None:
            try:
                async for outcome in self._banks.fan_out(claim.subject, claim.missing_banks):
                    arrivals.put(outcome)
                arrivals.put(_END)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                arrivals.put(error)

        pumping = asyncio.create_task(pump())
        try:
            ended = False
            while not ended:
                batch = await arrivals.batch(len(asked - arrived))
                outcomes = []
                for item in batch:
                    if isinstance(item, BankOutcome):
                        if item.bank_code in asked and item.bank_code not in arrived:
                            arrived.add(item.bank_code)
                            outcomes.append(item)
                    elif isinstance(item, Exception):
                        ended = True
                        log.warning(
                            "query %s: asking the banks failed (%s); will retry",
                            claim.query_id,
                            type(item).__name__,
                        )
                    else:
                        ended = True
                        silent = sorted(asked - arrived)
                        # The connector ended its stream without a word for these banks.
                        outcomes.extend(
                            BankOutcome(bank_code=code, kind="ERROR", detail="no outcome from bank_connector")
                            for code in silent
                        )
                        arrived.update(silent)
                if outcomes:
                    result = await self._store.record(self._held(claim), outcomes)
                    if result is not None:
                        return result
            return None
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping

    # --- the "report ready" SMS -----------------------------------------------------------------

    async def _notify(self, claim: Claim) -> None:
        query_id = claim.query_id
        with self._tracer.start_as_current_span(
            "query.report_ready_sms", context=propagate.extract(claim.trace_context)
        ) as span:
            span.set_attribute("cardcheck.query_id", query_id)
            try:
                await self._notifier.report_ready(query_id, claim.subject.phone)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                delay = SMS_RETRY  # a notifier outage is short next to a bank's: ask again soon
                refusal = from_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else None
                if refusal is not None and refusal.retry_after is not None:
                    delay = max(delay, refusal.retry_after)  # e.g. the per-phone cap: not before it allows
                log.warning(
                    "query %s: the notifier did not accept the report-ready SMS (%s); trying again in %s",
                    query_id,
                    refusal.reason if refusal is not None else type(error).__name__,
                    delay,
                )
                await self._store.notify_later(self._held(claim), delay)
                return
            await self._store.notified(query_id)
