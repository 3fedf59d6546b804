"""What idle WatchQuery watchers cost report_service, and how soon a change reaches a watcher.

    python -m bench watchers [--watchers=40] [--seconds=10] [--samples=20] [--db=sqlite|postgres|both]

bank_sim (every bank at 200 ms, one bank down), the real bank_connector and notifier, and
report_service as a real process; on PostgreSQL two replicas, one running the work and one
only serving (CARDCHECK_REPORT_MAX_RUNNING=0), which the watchers watch through: what the
first records must reach them across replicas. Figures:

  1. idle: N queries asking only the bank that is down, each watched; once each watcher has
     seen the failed first pass (the next pass is an hour away), the CPU-seconds the watched
     replica (and on PostgreSQL the working one) spend over T seconds (/proc/PID/stat);
  2. change to watcher: with the idle watchers still open, queries asking one working bank,
     each watched; from the instant report_service records the query READY (ready_at) to the
     READY event reaching its watcher, in ms. Same machine, same clock."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import time
import uuid
from datetime import UTC
from pathlib import Path

import grpc

from bank_sim.process import ROOT, Child, free_port
from bench import percentile
from bench._processes import cpu_seconds, start
from bench.queries import drop_pg_schema, pg_schema
from cardcheck import dataset
from cardcheck.v1 import bank_pb2, bank_pb2_grpc, common_pb2, report_service_pb2, report_service_pb2_grpc

LATENCY_MS = 200
SEED, PEOPLE = 20261124, 200
DOWN, WORKING = "BOC", "ICBC"
PENDING, READY = common_pb2.QUERY_STATUS_PENDING, common_pb2.QUERY_STATUS_READY
QUIET = {"OTEL_SDK_DISABLED": "true", "CARDCHECK_LOG_LEVEL": "WARNING"}
_PHONES = itertools.count(1)


class Watched:
    def __init__(self, address: str, person: dataset.Person) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = report_service_pb2_grpc.ReportServiceStub(self.channel)
        self.person = person

    async def create(self, bank: str) -> tuple[str, str]:
        user = f"watch-{uuid.uuid4().hex}"
        subject = report_service_pb2.Subject(
            name=self.person.name, id_number=self.person.id_number, phone=f"139{next(_PHONES):08d}"
        )
        created = await self.stub.CreateQuery(
            report_service_pb2.CreateQueryRequest(
                user_id=user, subject=subject, bank_codes=[bank], agreement_version="2026-11", idempotency_key=user
            ),
            timeout=30,
        )
        return user, created.query.query_id

    def watch(self, user: str, query_id: str):
        return self.stub.WatchQuery(report_service_pb2.ReportServiceWatchQueryRequest(user_id=user, query_id=query_id))


async def _idle_watcher(client: Watched, failed: asyncio.Event, calls: list) -> None:
    user, query_id = await client.create(DOWN)
    call = client.watch(user, query_id)
    calls.append(call)
    async for event in call:
        if event.new_outcomes:  # the down bank's failure: nothing more for an hour
            failed.set()


async def _latency(creator: Watched, watcher: Watched) -> float | None:
    user, query_id = await creator.create(WORKING)
    outcomes = 0  # the state so far: each message has only what is new
    async for event in watcher.watch(user, query_id):
        outcomes += len(event.new_outcomes)
        if event.query.status == READY:
            seen = time.time()
            if event.query.HasField("ready_at") and outcomes == 1:
                return (seen - event.query.ready_at.ToDatetime(UTC).timestamp()) * 1000
        elif event.query.status != PENDING:
            raise RuntimeError(f"query ended {event.query.status}")
    return None


def measure(db: str, work: Path, base_env: dict[str, str], person: dataset.Person, args) -> dict:
    data_dir = work / db
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    env = {
        **base_env,
        # A failed bank is asked again only after a long wait: the watched queries stay idle.
        "CARDCHECK_REPORT_RETRY_FIRST_S": "3600",
        "CARDCHECK_REPORT_RETRY_MAX_S": "3600",
    }
    schema = None
    if db == "postgres":
        schema, env["CARDCHECK_DATABASE_URL"] = pg_schema()
    children: dict[str, Child] = {}
    try:
        running = f"127.0.0.1:{free_port()}"
        children["running"] = start("report_service", data_dir, {**QUIET, **env, "CARDCHECK_REPORT_SERVICE_ADDR": running}, running)
        watched = running
        if db == "postgres":
            watched = f"127.0.0.1:{free_port()}"
            children["watched"] = start(
                "report_service",
                data_dir,
                {**QUIET, **env, "CARDCHECK_REPORT_SERVICE_ADDR": watched, "CARDCHECK_REPORT_MAX_RUNNING": "0"},
                watched,
            )

        async def run() -> dict:
            creator, watcher = Watched(running, person), Watched(watched, person)
            calls: list = []
            try:
                failed = [asyncio.Event() for _ in range(args.watchers)]
                idle = [asyncio.create_task(_idle_watcher(watcher, f, calls)) for f in failed]
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in failed)), 120)
                await asyncio.sleep(1.0)  # let the first passes settle
                before = {name: cpu_seconds(child.process.pid) for name, child in children.items()}
                await asyncio.sleep(args.seconds)
                cpu = {name: cpu_seconds(child.process.pid) - before[name] for name, child in children.items()}
                latencies = []
                for _ in range(args.samples):
                    latency = await asyncio.wait_for(_latency(creator, watcher), 60)
                    if latency is not None:
                        latencies.append(latency)
                for call in calls:
                    call.cancel()
                await asyncio.gather(*idle, return_exceptions=True)
                return {"db": db, "cpu": cpu, "latency_ms": latencies}
            finally:
                await creator.channel.close()
                await watcher.channel.close()

        return asyncio.run(run())
    finally:
        for child in children.values():
            child.stop(timeout=60)
        if schema is not None:
            drop_pg_schema(schema)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench watchers")
    parser.add_argument("--watchers", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args(argv)
    work = ROOT / "var" / "bench" / "watchers"
    work.mkdir(parents=True, exist_ok=True)
    person = dataset.pick_demo_person(dataset.generate(SEED, PEOPLE))
    sim, connector, notifier = (f"127.0.0.1:{free_port()}" for _ in range(3))
    children: list[Child] = []
    results = []
    try:
        children.append(
            start("bank_sim", work, {**QUIET, "CARDCHECK_BANK_SIM_ADDR": sim}, sim,
                  ["--seed", str(SEED), "--people", str(PEOPLE), "--bank-latency-ms", str(LATENCY_MS)])
        )
        with grpc.insecure_channel(sim) as channel:
            bank_pb2_grpc.BankSimControlStub(channel).SetBehaviour(
                bank_pb2.SetBehaviourRequest(bank_codes=[DOWN], behaviour=bank_pb2.BankBehaviour(down=True)),
                timeout=10,
            )
        children.append(
            start("bank_connector", work, {**QUIET, "CARDCHECK_BANK_SIM_ADDR": sim, "CARDCHECK_BANK_CONNECTOR_ADDR": connector},
                  connector)
        )
        shutil.rmtree(work / "notifier", ignore_errors=True)
        (work / "notifier").mkdir()
        children.append(start("notifier", work / "notifier", {**QUIET, "CARDCHECK_NOTIFIER_ADDR": notifier}, notifier))
        base_env = {"CARDCHECK_BANK_CONNECTOR_ADDR": connector, "CARDCHECK_NOTIFIER_ADDR": notifier}
        for db in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
            print(f"measuring report_service on {db} ...", flush=True)
            results.append(measure(db, work, base_env, person, args))
    finally:
        for child in reversed(children):
            child.stop()
    print()
    for result in results:
        cpu = ", ".join(f"{name} replica {seconds:.2f}" for name, seconds in result["cpu"].items())
        lat = result["latency_ms"]
        print(f"{result['db']}: {args.watchers} idle watchers over {args.seconds:g} s: CPU-seconds {cpu}")
        print(
            f"{result['db']}: change -> watcher ms (n={len(lat)}): p50 {percentile(lat, 0.5):.1f}, "
            f"p90 {percentile(lat, 0.9):.1f}, max {max(lat, default=float('nan')):.1f}"
        )
    return 0
