"""What the notifier spends per call: one notifier process (sandbox provider, as in the mesh)
driven from this process, its CPU time from /proc/<pid>/stat around each phase.

    python -m bench notifier [--phones N] [--rounds R] [--concurrency C] [--db=sqlite|postgres]
                             [--provider=sandbox|console] [--tracing=sampled|full|off] [--profile DIR]

Each round takes N phones of its own and, `C` calls at a time:
  1. grpc.health.v1 Check, N times: the reference, a call through the same server and its
     interceptors that does no work of ours;
  2. Send, three per phone (SMS_CODE, CONSENT_RECEIPT, REPORT_READY: a journey's three), each
     answered DELIVERED (the sandbox's attempt is part of the Send);
  3. ListMessages, once per phone (its three messages, as a journey reads its code); not with
     `--provider=console`, which keeps no inbox and stands in for a vendor's: the text sealed
     until delivered, each delivery written after the provider took it.
Figures: the notifier's CPU µs per call of each phase (the median of the rounds), and each
over the reference's, the steadier figure on a shared machine. `--profile DIR` samples the
notifier with py-spy over the Send and ListMessages phases (DIR/notifier.txt and .top, as
`bench mesh --profile`); the sampling costs CPU of its own."""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bank_sim.process import ROOT, Child, free_port
from bench._processes import cpu_seconds, start
from bench.fanout import TRACING
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc

KINDS = (
    (notifier_pb2.MESSAGE_KIND_SMS_CODE, {"code": "123456", "purpose": "QUERY_AUTH"}),
    (notifier_pb2.MESSAGE_KIND_CONSENT_RECEIPT, {"agreement_version": "2025-01"}),
    (notifier_pb2.MESSAGE_KIND_REPORT_READY, {}),
)
DELIVERED = notifier_pb2.DELIVERY_STATUS_DELIVERED
PHASES = ("health Check", "Send", "ListMessages")


async def _metered(pid: int, calls: list[Callable[[], Awaitable[None]]], concurrency: int) -> float:
    """Runs `calls`, `concurrency` at a time; the process's CPU µs per call meanwhile."""
    supply = iter(calls)

    async def worker() -> None:
        for call in supply:
            await call()

    begin = cpu_seconds(pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (cpu_seconds(pid) - begin) * 1e6 / len(calls)


class Driver:
    def __init__(self, address: str, pid: int) -> None:
        self.pid = pid
        self.channel = grpc.aio.insecure_channel(address)
        self.notifier = notifier_pb2_grpc.NotifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def check(self) -> None:
        await self.health.Check(health_pb2.HealthCheckRequest(service="cardcheck.v1.Notifier"), timeout=30)

    async def send(self, key: str, phone: str, kind: int, params: dict[str, str]) -> None:
        reply = await self.notifier.Send(
            notifier_pb2.SendRequest(idempotency_key=key, phone=phone, kind=kind, params=params), timeout=30
        )
        if reply.status != DELIVERED:
            raise RuntimeError(f"a Send answered {notifier_pb2.DeliveryStatus.Name(reply.status)}")

    async def inbox(self, phone: str) -> None:
        reply = await self.notifier.ListMessages(notifier_pb2.ListMessagesRequest(phone=phone), timeout=30)
        if len(reply.messages) != len(KINDS):
            raise RuntimeError(f"an inbox of {len(reply.messages)} messages")

    async def round(self, phones: list[str], concurrency: int, inbox: bool = True) -> dict[str, float]:
        checks = [self.check for _ in phones]
        sends = [
            (lambda p=phone, k=kind, ps=params, n=n: self.send(f"bench-{p}-{n}", p, k, ps))
            for phone in phones for n, (kind, params) in enumerate(KINDS)
        ]
        random.shuffle(sends)  # a phone's three Sends not back to back, as in journeys
        reads = [(lambda p=phone: self.inbox(p)) for phone in phones]
        figures = {
            "health Check": await _metered(self.pid, checks, concurrency),
            "Send": await _metered(self.pid, sends, concurrency),
        }
        if inbox:
            figures["ListMessages"] = await _metered(self.pid, reads, concurrency)
        return figures


def _phones(count: int, taken: set[str]) -> list[str]:
    phones: list[str] = []
    while len(phones) < count:
        phone = f"1{random.choice('3456789')}{random.randrange(10**9):09d}"
        if phone not in taken:
            taken.add(phone)
            phones.append(phone)
    return phones


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench notifier")
    parser.add_argument("--phones", type=int, default=600, help="phones per round (three Sends each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--provider", choices=("sandbox", "console"), default="sandbox")
    parser.add_argument("--tracing", choices=sorted(TRACING), default="sampled", help="the notifier's tracing")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the notifier over Send and ListMessages")
    args = parser.parse_args(argv)
    work = ROOT / "var" / "bench" / "notifier"
    shutil.rmtree(work, ignore_errors=True)  # a fresh database every run
    work.mkdir(parents=True)
    address = f"127.0.0.1:{free_port()}"
    env = {"CARDCHECK_NOTIFIER_ADDR": address, "CARDCHECK_SMS_PROVIDER": args.provider, **TRACING[args.tracing]}
    inbox = args.provider == "sandbox"
    schema = None
    if args.db == "postgres":
        from bench.queries import pg_schema

        schema, env["CARDCHECK_DATABASE_URL"] = pg_schema()
    children: list[Child] = []
    started = time.monotonic()
    try:
        children.append(start("notifier", work, env, address))
        pid = children[0].process.pid

        async def run() -> list[dict[str, float]]:
            from bench.mesh import Profiles

            driver = Driver(address, pid)
            taken: set[str] = set()
            try:
                await driver.round(_phones(max(20, args.phones // 5), taken), args.concurrency, inbox)  # warm-up
                figures = []
                profiles = Profiles(args.profile, {"notifier": pid})
                profiles.start()
                try:
                    for _ in range(args.rounds):
                        figures.append(await driver.round(_phones(args.phones, taken), args.concurrency, inbox))
                finally:
                    profiles.stop()
                return figures
            finally:
                await driver.channel.close()

        rounds = uvloop.run(run())
    finally:
        for child in reversed(children):
            child.stop()
        if schema is not None:
            from bench.queries import drop_pg_schema

            drop_pg_schema(schema)
    print(f"notifier on {args.db}, {args.provider} provider, tracing {args.tracing}: {args.rounds} rounds of "
          f"{args.phones} phones, concurrency {args.concurrency}")
    print(f"{'call':<14}{'CPU µs/call':>12}{'vs Check':>10}   rounds")
    reference = [r["health Check"] for r in rounds]
    for phase in PHASES[:None if inbox else 2]:
        each = [r[phase] for r in rounds]
        # Paired by round (measured back to back), then the median.
        ratio = statistics.median(e / c for e, c in zip(each, reference, strict=True))
        print(f"{phase:<14}{statistics.median(each):>12.0f}{ratio:>10.2f}   {', '.join(f'{e:.0f}' for e in each)}")
    if inbox:
        per_journey = statistics.median(3 * r["Send"] + r["ListMessages"] for r in rounds) / 1000
        print(f"a journey's 3 Send + 1 ListMessages: {per_journey:.2f} ms CPU")
    print(f"(run took {time.monotonic() - started:.0f} s)")
    return 0
