"""Bounded in-flight work: at most `max_active` requests are handled at once, up to
`max_queued` more wait their turn (in order, each within its own deadline), and beyond that a
request is refused at once with SERVICE_BUSY (RESOURCE_EXHAUSTED) and a retry delay. Overload
then means queueing or a clean refusal, never every call timing out together."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from cardcheck.runtime.errors import CardCheckError, Reason

RETRY_AFTER = timedelta(seconds=1)


class Admission:
    def __init__(self, max_active: int, max_queued: int) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError("at least one active request, and no negative queue")
        self.max_active = max_active
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_active)
        self.queued = 0
        self.refused = 0  # since start

    @property
    def active(self) -> int:
        return self.max_active - self._slots._value  # noqa: SLF001 - the semaphore keeps the count

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Holds one active slot for the body; waits for it if need be (a cancelled caller
        leaves the queue); raises SERVICE_BUSY when the queue is full."""
        if self._slots.locked() or self.queued:
            if self.queued >= self.max_queued:
                self.refused += 1
                raise CardCheckError(Reason.SERVICE_BUSY, "bank_connector is at capacity", retry_after=RETRY_AFTER)
            self.queued += 1
            try:
                await self._slots.acquire()
            finally:
                self.queued -= 1
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()
