"""Waiting, bounded, for something that happens in the background."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]], *, within: float = 30.0, every: float = 0.02, what: str = "condition"
) -> T:
    """Calls `check` (plain or async) until it returns something truthy, and returns that; fails
    with `what` once `within` seconds passed. The bound only says when to give up, it is no
    speed target."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {within} s (last: {result!r})")
        await asyncio.sleep(every)
