"""Send, look up and (sandbox) list messages.

Send validates, renders the newest template, records the message durably under its
idempotency key (the same key gives one message, whatever the retries) and starts the first
attempt at once; it waits for that attempt only briefly and answers QUEUED if it is still
running or failed, the delivery worker retrying from then on. With the sandbox inbox, where
recording a message is delivering it, the first attempt is recorded with the message."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping

from opentelemetry import propagate

from cardcheck.runtime.clock import Clock, as_utc
from cardcheck.runtime.errors import CardCheckError, FieldViolation, Reason, invalid_argument
from cardcheck.runtime.logs import mask_phone
from notifier.config import NotifierConfig
from notifier.delivery import DeliveryWorker
from notifier.messages import (
    FAILED,
    PHONE,
    AnyMessage,
    Delivery,
    InboxMessage,
    Message,
    MessageSealing,
    MessageStore,
    delivery_of,
    validate_send,
)
from notifier.providers import SmsProvider
from notifier.templates import TemplateBook

log = logging.getLogger(__name__)


class Outbox:
    def __init__(
        self,
        store: MessageStore,
        templates: TemplateBook,
        provider: SmsProvider,
        worker: DeliveryWorker,
        sealing: MessageSealing,
        clock: Clock,
        config: NotifierConfig,
    ) -> None:
        self._store = store
        self._templates = templates
        self._provider = provider
        self._worker = worker
        self._sealing = sealing
        self._clock = clock
        self._config = config

    @property
    def sandbox(self) -> bool:
        """The inbox exists, and bodies are kept in clear, only with the sandbox provider."""
        return self._provider.keeps_inbox

    async def send(
        self,
        idempotency_key: str,
        phone: str,
        kind: str | None,
        params: Mapping[str, str],
        *,
        wait_s: float = 0.0,
    ) -> Delivery:
        """Records the message (or finds the one recorded under this key) and waits up to
        `wait_s` for an attempt this call started."""
        validate_send(idempotency_key, phone, kind, params)
        assert kind is not None
        template = self._templates.newest[kind]
        body = template.render(params)
        phone_hashes = self._sealing.phone_hashes(phone)  # the current key's first
        message_id = uuid.uuid4().hex
        by_recording = self._worker.delivers_by_recording
        carrier: dict[str, str] = {}
        if not by_recording:  # the trace later attempts continue (a message delivered has none)
            propagate.inject(carrier)
        now = self._clock.now()
        message = Message(
            message_id=message_id,
            idempotency_key=idempotency_key,
            phone_hash=phone_hashes[0],
            phone_sealed=self._sealing.seal_phone(message_id, phone),
            kind=kind,
            template=template.name,
            body=body if self.sandbox else None,
            body_sealed=None
            if self.sandbox
            else self._sealing.seal_body(message_id, body, template.vendor_params(params)),
            body_digest=self._sealing.body_digest(body),
            status="QUEUED",
            created_at=now,
            retry_until=now + self._config.retry_windows[kind],
            trace_context=json.dumps(carrier) if carrier else None,
        )
        recorded: AnyMessage
        recorded, created = await self._store.record(
            message, self._config.caps[kind], self._worker.owner, phone_hashes, delivered=by_recording
        )
        if created:
            log.info("sms %s (%s) to %s recorded", recorded.message_id, kind, mask_phone(phone))
            if by_recording:
                return await self._worker.delivered_by_recording(message, phone)
        else:
            self._check_same_message(recorded, phone, kind, params)
            if recorded.status != FAILED:
                return delivery_of(recorded)
            # An earlier delivery failed for good: asking again tries again, the same message.
            template_again = self._templates.named.get(recorded.template, template)
            recorded, rearmed = await self._store.rearm(
                recorded.message_id,
                None
                if self.sandbox
                else self._sealing.seal_body(
                    recorded.message_id, template_again.render(params), template_again.vendor_params(params)
                ),
                self._clock.now() + self._config.retry_windows[kind],
                self._worker.owner,
            )
            if not rearmed:
                return delivery_of(recorded)
            log.info(
                "sms %s (%s) to %s asked for again after failing",
                recorded.message_id,
                kind,
                mask_phone(phone),
            )
        attempt = self._worker.dispatch(recorded)
        if wait_s > 0:
            try:
                delivered = await asyncio.wait_for(asyncio.shield(attempt), wait_s)
            except TimeoutError:
                pass  # still under way: the caller hears QUEUED
            else:
                if delivered is not None:
                    return delivered
        return await self.delivery(recorded.message_id)

    def _check_same_message(
        self, recorded: Message, phone: str, kind: str, params: Mapping[str, str]
    ) -> None:
        """A key names one message: the same phone, kind and text (rendered with the template
        version the message was recorded with). The stored digests may be under a retired key."""
        same = self._sealing.phone_matches(phone, recorded.phone_hash) and recorded.kind == kind
        if same and recorded.body_digest is not None:
            template = self._templates.named.get(recorded.template)
            if template is not None:
                same = self._sealing.body_matches(template.render(params), recorded.body_digest)
        if not same:
            raise invalid_argument(
                [FieldViolation("idempotency_key", "already used for a different phone, kind or text")]
            )

    async def delivery(self, message_id: str) -> Delivery:
        if not message_id:
            raise invalid_argument([FieldViolation("message_id", "required")])
        row = await self._store.get(message_id)
        if row is None:
            raise CardCheckError(Reason.NOT_FOUND, "no such message")
        return delivery_of(row)

    async def inbox(self, phone: str) -> list[InboxMessage]:
        """The sandbox inbox of one phone, newest first. The caller checks sandbox mode."""
        if not PHONE.match(phone):
            raise invalid_argument([FieldViolation("phone", "must be an 11-digit mainland mobile number")])
        return [
            InboxMessage(
                message_id=row.message_id,
                phone=phone,  # every row found by the phone's digest was sent to it
                kind=row.kind,
                body=row.body or "",
                created_at=as_utc(row.created_at),
            )
            for row in await self._store.for_phone(self._sealing.phone_hashes(phone))
        ]
