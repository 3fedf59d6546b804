"""The delivery worker: hands recorded messages to the provider, at least once.

Each replica claims due messages with a lease (see MessageStore.claim_due), so two replicas
on one database never try the same message at the same time; a replica that dies mid-attempt
leaves a lease that runs out, and the message is tried again by whoever claims next. A failed
attempt is retried after the backoff of cardcheck.runtime.backoff, within the message's retry
window. A replica that stops gives its messages back and the others' workers wake at once.

Every attempt is a span `sms.deliver` under the trace of the Send that recorded the message,
with the masked phone only, never the text."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from datetime import timedelta

from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from cardcheck.runtime.backoff import Backoff
from cardcheck.runtime.changes import Channel
from cardcheck.runtime.logs import mask_phone
from cardcheck.runtime.waiting import wait_for_event
from cardcheck.runtime.work import Lease, worker_name
from notifier.config import NotifierConfig
from notifier.messages import (
    DELIVERED,
    FAILED,
    AnyMessage,
    Delivery,
    Message,
    MessageSealing,
    MessageStore,
    delivery_of,
    lease_of,
)
from notifier.providers import DeliveryError, OutgoingSms, SmsProvider

log = logging.getLogger(__name__)


class DeliveryWorker:
    def __init__(
        self,
        store: MessageStore,
        sealing: MessageSealing,
        provider: SmsProvider,
        config: NotifierConfig,
        tracer: trace.Tracer,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self.owner = worker_name()
        self._store = store
        self._sealing = sealing
        self._provider = provider
        self._config = config
        self._tracer = tracer
        self._backoff = backoff or Backoff(config.retry_base_s, config.retry_max_s)
        # A message free to try now (given back by a replica that stopped), or a free slot here.
        self._changes = store.queue.changes or Channel("messages")
        self._loop_task: asyncio.Task[None] | None = None
        self._attempts: dict[str, asyncio.Task[Delivery | None]] = {}
        self._leases: dict[str, Lease] = {}  # the lease each attempt runs under
        # Messages whose attempt here is done with the provider and only records and winds up:
        # claimed again meanwhile (the retry it recorded, come due), they get an attempt of their own.
        self._settled: set[str] = set()

    @property
    def lease(self) -> timedelta:
        return self._config.lease

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="notifier.delivery")

    def wake(self) -> None:
        self._changes.notify()

    async def stop(self, drain_s: float) -> None:
        """Stops claiming, lets attempts under way finish for up to `drain_s`, cancels the rest
        and frees what this replica still holds, so a restart delivers it at once."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        running = list(self._attempts.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=drain_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            released = await self._store.release(self.owner)
        except Exception as error:  # the leases run out by themselves
            log.warning("could not release held messages: %s", type(error).__name__)
        else:
            if released:
                log.info("released %d messages not delivered before the stop", released)

    async def purge(self) -> int:
        """Deletes the messages past retention (every replica may: deleting twice is harmless)."""
        deleted = await self._store.purge(self._config.retention)
        if deleted:
            log.info("deleted %d messages past their %d-day retention", deleted, self._config.retention.days)
        return deleted

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_purge = -math.inf
        while True:
            if loop.time() - last_purge >= self._config.purge_interval_s:
                last_purge = loop.time()
                try:
                    await self.purge()
                except Exception as error:
                    log.warning("deleting messages past retention failed (%s); trying later", type(error).__name__)
            changed = self._changes.current()
            full = False
            try:
                full = await self._claim_and_dispatch()
            except Exception as error:
                log.warning("claiming due messages failed (%s); trying again", type(error).__name__)
            if full:
                # Every slot taken: the next free slot wakes the loop (the poll, should it not).
                await wait_for_event(changed, self._config.poll_interval_s)
                continue
            # The poll still finds retries come due and leases that expired.
            await wait_for_event(changed, self._config.poll_interval_s)

    # --- attempts -----------------------------------------------------------------------------

    async def _claim_and_dispatch(self) -> bool:
        free = self._config.max_in_flight - len(self._attempts)
        if free <= 0:
            return True
        claimed, expired = await self._store.claim_due(self.owner, free)
        for row in expired:
            log.warning("sms %s (%s) not delivered within its retry window: FAILED", row.message_id, row.kind)
        for row in claimed:
            self.dispatch(row)
        return len(claimed) == free

    async def run_once(self) -> int:
        """One claim and the attempts it starts, awaited (tests and tools). Returns how many."""
        claimed, _ = await self._store.claim_due(self.owner, self._config.max_in_flight)
        await asyncio.gather(*(self.dispatch(row) for row in claimed))
        return len(claimed)

    def dispatch(self, row: AnyMessage) -> asyncio.Task[Delivery | None]:
        """Runs one attempt of a message this replica holds the lease of. The attempt belongs to
        the worker, not to the caller: a Send whose caller goes away does not cancel it."""
        self._leases[row.message_id] = lease_of(row)
        running = self._attempts.get(row.message_id)
        if running is not None and row.message_id not in self._settled:
            # Claimed again while its attempt still runs here (the lease ran out under a slow
            # provider): that attempt carries on under the new lease.
            return running
        self._settled.discard(row.message_id)
        task = asyncio.create_task(self._attempt(row), name=f"sms {row.message_id}")
        self._attempts[row.message_id] = task

        def done(task: asyncio.Task[Delivery | None], message_id: str = row.message_id) -> None:
            was_full = len(self._attempts) >= self._config.max_in_flight
            if self._attempts.get(message_id) is not task:
                return  # a later attempt of the same message runs: the entries are its own
            self._attempts.pop(message_id, None)
            self._leases.pop(message_id, None)
            self._settled.discard(message_id)
            if was_full:
                # A slot came free for a loop that found them all taken. Otherwise nothing
                # waits for it: waking the loop would cost a claim that finds nothing.
                self._changes.notify()

        task.add_done_callback(done)
        return task

    @property
    def delivers_by_recording(self) -> bool:
        """The provider delivers a message by recording it (the sandbox inbox): a Send records
        it DELIVERED, its one attempt made in the same transaction, and nothing is dispatched."""
        return self._provider.delivers_by_recording

    async def delivered_by_recording(self, message: Message, phone: str) -> Delivery:
        """What is left of the attempt recorded with `message`: its span (under the Send's),
        the provider's call, measured, and the log line."""
        masked = mask_phone(phone)
        # Not made the current span: nothing under it makes spans of its own.
        span = self._tracer.start_span("sms.deliver", kind=trace.SpanKind.CLIENT, attributes={
            "cardcheck.message_id": message.message_id,
            "cardcheck.sms.kind": message.kind,
            "cardcheck.sms.attempt": message.attempts,
            "cardcheck.sms.provider": self._provider.name,
            "cardcheck.sms.phone": masked,
        })
        try:
            await self._provider.deliver(
                OutgoingSms(message.message_id, phone, message.kind, message.template, message.body or "")
            )
        finally:
            span.end()
        log.info("sms %s (%s) to %s delivered, attempt %d", message.message_id, message.kind, masked, message.attempts)
        return delivery_of(message)

    async def _attempt(self, row: AnyMessage) -> Delivery | None:
        """The attempt; the message's delivery when this attempt recorded it delivered, else None
        (what became of the message is then read from its row)."""
        parent = propagate.extract(json.loads(row.trace_context or "{}"))
        with self._tracer.start_as_current_span(
            "sms.deliver",
            context=parent,
            kind=trace.SpanKind.CLIENT,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            span.set_attribute("cardcheck.message_id", row.message_id)
            span.set_attribute("cardcheck.sms.kind", row.kind)
            span.set_attribute("cardcheck.sms.attempt", row.attempts)
            span.set_attribute("cardcheck.sms.provider", self._provider.name)
            try:
                return await self._try(row, span)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Storage failed after the attempt: the lease runs out and it is tried again.
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                log.warning("sms %s: recording the attempt failed (%s)", row.message_id, type(error).__name__)
                return None

    async def _try(self, row: AnyMessage, span: trace.Span) -> Delivery | None:
        try:
            sms = self._sealing.outgoing(row)
        except Exception:  # InvalidTag: sealed under another key
            sms, unreadable = None, True
        else:
            unreadable = False
        if sms is None:
            error_class = "UNREADABLE" if unreadable else "NO_TEXT"
            await self._failed(row, span, error_class, retryable=False, masked="?")
            return None
        masked = mask_phone(sms.phone)
        span.set_attribute("cardcheck.sms.phone", masked)
        try:
            await self._provider.deliver(sms)
        except asyncio.CancelledError:
            raise
        except DeliveryError as error:
            await self._failed(row, span, error.error_class, retryable=error.retryable, masked=masked)
            return None
        except Exception as error:
            await self._failed(row, span, type(error).__name__[:40], retryable=True, masked=masked)
            return None
        self._settled.add(row.message_id)
        delivered_at = await self._store.record_success(row.message_id)
        log.info("sms %s (%s) to %s delivered, attempt %d", row.message_id, row.kind, masked, row.attempts)
        if delivered_at is None:
            return None
        # What the row now says, without reading it again.
        return dataclasses.replace(delivery_of(row), status=DELIVERED, delivered_at=delivered_at, next_attempt_at=None)

    async def _failed(
        self, row: AnyMessage, span: trace.Span, error_class: str, *, retryable: bool, masked: str
    ) -> None:
        span.set_attribute("cardcheck.sms.error_class", error_class)
        span.set_status(Status(StatusCode.ERROR, error_class))
        # The lease this attempt ends under, taken before the retry it records can be claimed.
        lease = self._leases.get(row.message_id, lease_of(row))
        self._settled.add(row.message_id)
        outcome = await self._store.record_failure(lease, error_class, retryable=retryable, next_delay=self._backoff)
        if outcome is None:
            log.info(
                "sms %s: attempt %d failed (%s) after its lease passed on",
                row.message_id,
                row.attempts,
                error_class,
            )
        elif outcome.status == FAILED:
            log.warning(
                "sms %s (%s) to %s failed for good after %d attempts (%s)",
                row.message_id,
                row.kind,
                masked,
                row.attempts,
                error_class,
            )
        else:
            log.warning(
                "sms %s (%s) to %s: attempt %d failed (%s), next at %s",
                row.message_id,
                row.kind,
                masked,
                row.attempts,
                error_class,
                outcome.next_attempt_at.isoformat() if outcome.next_attempt_at else "?",
            )
