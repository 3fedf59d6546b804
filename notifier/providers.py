"""What puts a text on a phone, behind one interface: the sandbox inbox, the console, an SMS
vendor's HTTP webhook, or Tencent Cloud SMS (notifier/tencent.py).

A provider raises DeliveryError (with a short error class, never personal data) when the text
was not handed over; `retryable=False` says a retry cannot help (the vendor refused the request
itself). Any other exception counts as a retryable failure of its type's name."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sys
from dataclasses import dataclass
from typing import TextIO

import httpx

from cardcheck.runtime.clock import Clock
from cardcheck.runtime.logs import mask_phone
from cardcheck.runtime.settings import Settings
from notifier.config import NotifierConfig

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-CardCheck-Signature"
TIMESTAMP_HEADER = "X-CardCheck-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# A vendor answering these may accept the same request later; any other 4xx never will.
_RETRYABLE_4XX = {401, 403, 408, 409, 425, 429}


@dataclass(frozen=True)
class OutgoingSms:
    message_id: str  # the same for every attempt of one message: what a vendor dedupes on
    phone: str
    kind: str
    template: str
    body: str  # our text (the sandbox inbox, the webhook)
    # A vendor template's values in order (notifier/templates.py VENDOR_PARAMS); they may hold a code.
    params: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never the phone, the body or the parameters, wherever it ends up
        return f"OutgoingSms({self.message_id}, {self.kind}, {mask_phone(self.phone)})"


class DeliveryError(Exception):
    def __init__(self, error_class: str, *, retryable: bool = True) -> None:
        super().__init__(error_class)
        self.error_class = error_class
        self.retryable = retryable


class SmsProvider:
    """The interface. `keeps_inbox`: the message table is what reached the phone (sandbox only,
    the one place a body is stored in clear)."""

    name = "custom"
    keeps_inbox = False

    @property
    def delivers_by_recording(self) -> bool:
        """Whether a message is delivered once it is recorded, `deliver` doing nothing that
        could fail: its first attempt is then recorded with the message, in one transaction."""
        return False

    async def deliver(self, sms: OutgoingSms) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class SandboxProvider(SmsProvider):
    """Reaches no phone: the recorded message is the delivery (ListMessages reads it)."""

    name = "sandbox"
    keeps_inbox = True

    @property
    def delivers_by_recording(self) -> bool:
        # Not a subclass that does something on delivery (holds it, refuses it).
        return type(self).deliver is SandboxProvider.deliver

    async def deliver(self, sms: OutgoingSms) -> None:
        return None


class ConsoleProvider(SmsProvider):
    """One masked line per message on stdout, for a developer: never the body (it may hold a code)."""

    name = "console"

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out

    async def deliver(self, sms: OutgoingSms) -> None:
        out = self._out or sys.stdout
        out.write(f"sms {sms.message_id} to {mask_phone(sms.phone)}: {sms.kind} ({sms.template})\n")
        out.flush()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over `timestamp.body`, hex, versioned."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


class WebhookProvider(SmsProvider):
    """POSTs the message as JSON to the vendor's URL, signed, within a timeout.

    Body: {"message_id", "phone", "kind", "template", "text"}; headers: Idempotency-Key (the
    message_id, equal on every retry of one message), X-CardCheck-Timestamp (unix seconds, from
    the clock) and X-CardCheck-Signature (`v1=` + hex HMAC-SHA256 of `timestamp.body`). Any 2xx
    is an acknowledgement."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: str,
        timeout_s: float,
        clock: Clock,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = url
        self._secret = secret.encode()
        self._timeout_s = timeout_s
        self._clock = clock
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,  # a redirect would carry the phone somewhere unsigned-for
            transport=transport,
            headers={"User-Agent": "cardcheck-notifier"},
        )

    async def deliver(self, sms: OutgoingSms) -> None:
        body = json.dumps(
            {
                "message_id": sms.message_id,
                "phone": sms.phone,
                "kind": sms.kind,
                "template": sms.template,
                "text": sms.body,
            },
            ensure_ascii=False,
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        timestamp = str(int(self._clock.now().timestamp()))
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            IDEMPOTENCY_HEADER: sms.message_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        try:
            # httpx's timeout bounds each phase; this bounds the whole request.
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.post(self._url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            raise DeliveryError("TIMEOUT") from None
        except httpx.TransportError:
            raise DeliveryError("CONNECTION") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in _RETRYABLE_4XX
        raise DeliveryError(f"HTTP_{status}", retryable=retryable)

    async def close(self) -> None:
        await self._client.aclose()


def make_provider(config: NotifierConfig, settings: Settings, clock: Clock) -> SmsProvider:
    """The configured provider (SettingsError when the configuration does not allow one)."""
    name = config.provider_name(settings.sandbox)
    if name == "webhook":
        assert config.webhook_url and config.webhook_secret  # checked by NotifierConfig
        return WebhookProvider(config.webhook_url, config.webhook_secret, config.webhook_timeout_s, clock)
    if name == "tencent":
        from notifier.tencent import tencent_provider  # the SDK is loaded only where it is used

        return tencent_provider(config)
    if name == "console":
        return ConsoleProvider()
    return SandboxProvider()
