"""Runs PENDING queries to their end: asks the banks still missing, records each outcome as it
arrives, finishes the query, and makes sure the "report ready" SMS is accepted exactly once.

Each execution runs under the trace context stored when the query was accepted, so the fan-out
and the SMS belong to the trace of the request that submitted it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from opentelemetry import propagate, trace

from report_service.models import READY
from report_service.queries import Changes, QueryStore, Subject
from report_service.reports import BankOutcome

log = logging.getLogger(__name__)


class BankFanOut(Protocol):
    def fan_out(self, subject: Subject, bank_codes: Sequence[str]) -> AsyncIterator[BankOutcome]:
        """Each named bank's outcome, as it arrives. Raises when the banks cannot be asked."""
        ...


class ReportReadyNotifier(Protocol):
    async def report_ready(self, query_id: str, phone: str) -> None:
        """Hands the SMS over (idempotent per query). Raises when it was not accepted."""
        ...


class QueryWorker:
    def __init__(
        self,
        store: QueryStore,
        banks: BankFanOut,
        notifier: ReportReadyNotifier,
        changes: Changes,
        tracer: trace.Tracer,
        *,
        pass_interval_s: float = 5.0,
        sweep_interval_s: float = 60.0,
    ) -> None:
        self._store = store
        self._banks = banks
        self._notifier = notifier
        self._changes = changes
        self._tracer = tracer
        self._pass_interval_s = pass_interval_s
        self._sweep_interval_s = sweep_interval_s
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="report_service.worker")

    def wake(self) -> None:
        """A query was accepted: look for work now rather than at the next pass."""
        self._wake.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        self._running.clear()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_sweep = float("-inf")
        while True:
            self._wake.clear()
            try:
                await self.run_pass()
                if loop.time() - last_sweep >= self._sweep_interval_s:
                    last_sweep = loop.time()
                    await self.sweep()
            except Exception:
                log.exception("worker pass failed; trying again at the next pass")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._pass_interval_s)

    # --- one pass -----------------------------------------------------------------------------

    async def run_pass(self) -> None:
        """Starts every PENDING query not already running here (on start-up: the ones left
        unfinished by a stop) and retries "report ready" SMS the notifier has not accepted."""
        for query_id in await self._store.pending_query_ids():
            if query_id not in self._running:
                task = asyncio.create_task(self.execute(query_id), name=f"query {query_id}")
                self._running[query_id] = task
                task.add_done_callback(lambda _t, q=query_id: self._running.pop(q, None))
        for query_id, phone, trace_context in await self._store.unsent_report_ready():
            if query_id not in self._running:
                with self._tracer.start_as_current_span(
                    "query.report_ready_sms", context=propagate.extract(trace_context)
                ) as span:
                    span.set_attribute("cardcheck.query_id", query_id)
                    await self._send_report_ready(query_id, phone)

    async def sweep(self) -> list[str]:
        swept = await self._store.sweep()
        if swept:
            log.info("deleted %d expired reports", len(swept))
            self._changes.notify()
        return swept

    async def execute(self, query_id: str) -> None:
        work = await self._store.pending_work(query_id)
        if work is None:
            return
        context = propagate.extract(work.trace_context)
        with self._tracer.start_as_current_span("query.execute", context=context) as span:
            span.set_attribute("cardcheck.query_id", query_id)
            span.set_attribute("cardcheck.banks_total", work.query.banks_total)
            span.set_attribute("cardcheck.banks_missing", len(work.missing_banks))
            if work.missing_banks:
                if not await self._ask_banks(query_id, work):
                    return  # stays PENDING: a later pass asks the banks still missing
            status = await self._store.finish(query_id)
            self._changes.notify()
            if status is None:
                return
            span.set_attribute("cardcheck.query_status", status)
            log.info("query %s finished %s", query_id, status)
            if status == READY:
                await self._send_report_ready(query_id, work.subject.phone)

    async def _ask_banks(self, query_id: str, work) -> bool:
        asked = set(work.missing_banks)
        answered: set[str] = set()
        try:
            async for outcome in self._banks.fan_out(work.subject, work.missing_banks):
                if outcome.bank_code not in asked or outcome.bank_code in answered:
                    continue
                answered.add(outcome.bank_code)
                if await self._store.record_outcome(query_id, outcome):
                    self._changes.notify()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("query %s: asking the banks failed (%s); will retry", query_id, type(error).__name__)
            return False
        silent = asked - answered
        if silent:
            # The connector ended its stream without a word for these banks.
            for code in sorted(silent):
                await self._store.record_outcome(
                    query_id,
                    BankOutcome(bank_code=code, kind="ERROR", detail="no outcome from bank_connector"),
                )
            self._changes.notify()
        return True

    async def _send_report_ready(self, query_id: str, phone: str) -> None:
        try:
            await self._notifier.report_ready(query_id, phone)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning(
                "query %s: the notifier did not accept the report-ready SMS (%s); will retry",
                query_id,
                type(error).__name__,
            )
            return
        await self._store.mark_report_ready_sent(query_id)
