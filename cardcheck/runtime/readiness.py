"""Readiness that follows a service's dependencies: every few seconds each one is asked
something cheap (the database a `SELECT 1`, Redis a PING), and while one does not answer the
service's own health names are NOT_SERVING, so that a load balancer (a Kubernetes readiness
probe on the service's name) sends its calls elsewhere. The server's overall name ("") stays
SERVING: the process is alive and needs no restart, and it turns SERVING again by itself once
the dependency answers.

The checks make no spans (instrumentation suppressed): a probe every 2 s is not the service's
work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2
from opentelemetry.instrumentation.utils import suppress_instrumentation

if TYPE_CHECKING:
    import redis.asyncio
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Dependency:
    """Something a service cannot do its work without. `check()` returns when it answers and
    raises (anything) when it does not."""

    name: str  # for the log line: "database", "redis"
    check: Callable[[], Awaitable[object]]


def database(engine: Engine) -> Dependency:
    from sqlalchemy import text

    def select_one() -> None:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    return Dependency("database", lambda: asyncio.to_thread(select_one))


def redis_server(client: redis.asyncio.Redis) -> Dependency:
    return Dependency("redis", client.ping)


class Readiness:
    """Checks `dependencies` every `every_s` seconds and sets `names` on `health` to match. A
    check that takes longer than `timeout_s` counts as failed; one still running when the
    next is due is not started again (a database that hangs holds one worker thread, not one
    per round)."""

    def __init__(
        self,
        health_servicer: health.aio.HealthServicer,
        names: Sequence[str],
        dependencies: Sequence[Dependency],
        *,
        every_s: float = 2.0,
        timeout_s: float | None = None,
    ) -> None:
        self._health = health_servicer
        self._names = [n for n in names if n]  # "" is liveness: never touched here
        self._dependencies = list(dependencies)
        self._every_s = every_s
        self._timeout_s = min(every_s, 1.0) if timeout_s is None else timeout_s
        self._pending: dict[str, asyncio.Task[object]] = {}
        self._down: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return not self._down

    def start(self) -> None:
        if self._dependencies and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="readiness")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._pending.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._task = None
        self._pending.clear()

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._every_s)

    async def check_once(self) -> None:
        down = set()
        for dependency in self._dependencies:
            if not await self._answers(dependency):
                down.add(dependency.name)
        for name in sorted(down - self._down):
            log.warning("%s unreachable: not ready (health NOT_SERVING)", name)
        for name in sorted(self._down - down):
            log.info("%s answers again: ready", name)
        if bool(down) != bool(self._down):
            for service in self._names:
                await self._health.set(service, NOT_SERVING if down else SERVING)
        self._down = down

    async def _answers(self, dependency: Dependency) -> bool:
        task = self._pending.get(dependency.name)
        if task is None:
            with suppress_instrumentation():  # the task copies this context, and no span is made
                task = asyncio.ensure_future(dependency.check())
            self._pending[dependency.name] = task
        done, _ = await asyncio.wait({task}, timeout=self._timeout_s)
        if not done:
            return False  # still waiting: kept for the next round
        del self._pending[dependency.name]
        error = task.exception()
        if error is not None:
            log.debug("%s check failed: %s", dependency.name, type(error).__name__)
            return False
        return True
