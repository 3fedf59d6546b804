"""Waiting for an asyncio event with a timeout, without losing a cancellation.

On Python 3.11 `asyncio.wait_for(event.wait(), t)` returns normally when the task is cancelled
just as the event is set (the inner wait is done, so wait_for hands back its result and the
cancellation is dropped: gh-86296). A service loop that waits so and is cancelled at stop while
work wakes it then never stops, and neither does the stop awaiting it. `asyncio.timeout` cancels
the task itself and never swallows a cancellation from outside."""

from __future__ import annotations

import asyncio


async def wait_for_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Waits until `event` is set or `timeout_s` passes: whether it was set."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
