"""cardcheck.v1.Notifier over gRPC: translates protobuf to the Outbox and back."""

from __future__ import annotations

from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from cardcheck.runtime.errors import handles_errors
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc
from notifier.messages import KINDS, Delivery
from notifier.outbox import Outbox

_KIND_PREFIX = "MESSAGE_KIND_"
_STATUS = {
    "QUEUED": notifier_pb2.DELIVERY_STATUS_QUEUED,
    "DELIVERED": notifier_pb2.DELIVERY_STATUS_DELIVERED,
    "FAILED": notifier_pb2.DELIVERY_STATUS_FAILED,
}


def _kind_name(kind: notifier_pb2.MessageKind.ValueType) -> str | None:
    """MESSAGE_KIND_SMS_CODE -> SMS_CODE; None for UNSPECIFIED or a number we do not know."""
    try:
        name = notifier_pb2.MessageKind.Name(kind).removeprefix(_KIND_PREFIX)
    except ValueError:
        return None
    return name if name in KINDS else None


def _timestamp(instant: datetime | None) -> timestamp_pb2.Timestamp | None:
    if instant is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def _delivery_pb(delivery: Delivery) -> notifier_pb2.GetDeliveryResponse:
    return notifier_pb2.GetDeliveryResponse(
        message_id=delivery.message_id,
        kind=notifier_pb2.MessageKind.Value(_KIND_PREFIX + delivery.kind),
        status=_STATUS[delivery.status],
        attempts=delivery.attempts,
        created_at=_timestamp(delivery.created_at),
        delivered_at=_timestamp(delivery.delivered_at),
        last_error=delivery.last_error or "",
        next_attempt_at=_timestamp(delivery.next_attempt_at),
        last_attempt_at=_timestamp(delivery.last_attempt_at),
        retry_until=_timestamp(delivery.retry_until),
    )


class NotifierServicer(notifier_pb2_grpc.NotifierServicer):
    def __init__(self, outbox: Outbox, *, send_wait_s: float, sandbox: bool = True) -> None:
        """`sandbox` off (production mode): the inbox is not served at all."""
        self._outbox = outbox
        self._send_wait_s = send_wait_s
        self._sandbox = sandbox

    def _wait_s(self, context) -> float:
        """How long Send waits for the first attempt: a little, and never up to the caller's
        deadline (the answer must reach them; the attempt carries on either way)."""
        remaining = context.time_remaining()
        if remaining is None:
            return self._send_wait_s
        return max(0.0, min(self._send_wait_s, remaining * 0.8 - 0.1))

    @handles_errors
    async def Send(self, request, context):
        delivery = await self._outbox.send(
            request.idempotency_key,
            request.phone,
            _kind_name(request.kind),
            dict(request.params),
            wait_s=self._wait_s(context),
        )
        return notifier_pb2.SendResponse(message_id=delivery.message_id, status=_STATUS[delivery.status])

    @handles_errors
    async def GetDelivery(self, request, context):
        return _delivery_pb(await self._outbox.delivery(request.message_id))

    @handles_errors
    async def ListMessages(self, request, context):
        if not self._sandbox:
            # Production mode: a surface that does not exist, as if the method were never there.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if not self._outbox.sandbox:
            # An operator's misuse (the inbox exists only in sandbox), not a refusal a user sees.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the inbox exists only in sandbox mode")
        messages = await self._outbox.inbox(request.phone)
        return notifier_pb2.ListMessagesResponse(
            messages=[
                notifier_pb2.Message(
                    message_id=m.message_id,
                    phone=m.phone,
                    kind=m.kind,
                    body=m.body,
                    created_at=_timestamp(m.created_at),
                )
                for m in messages
            ]
        )
