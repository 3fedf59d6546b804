"""report_service accepting and running queries, on SQLite and on PostgreSQL.

    python -m bench queries [--quick] [--cpu] [--db=sqlite|postgres|both] [--rate=Q/S,...] [--tracing=sampled|full|off]

Every bank at a fixed 200 ms (bank_sim), the real bank_connector and notifier, report_service as
a real process on each database in turn; this process is the load generator. Figures:

  1. low load (one query at a time, all 24 banks): from acceptance to READY, as report_service
     records it (ready_at - submitted_at) and as a client watching the query sees it (CreateQuery
     sent -> the READY event of WatchQuery), against the 200 ms floor and against a reference
     measured in the same run: the same 24-bank FanOut asked of bank_connector directly.
     Target: p50 within 50 ms of the floor.
  2. steady load: new queries arriving at a fixed rate (open loop, each for a new user): the rate
     accepted, CreateQuery latency, and acceptance -> READY (report_service's own instants);
  3. acceptance throughput: 32 clients submitting back to back for a few seconds; queries per
     second durably accepted (query, its work and its audit entry committed), (a) while the ones
     accepted before are being run by the same process (all 24 banks each, on this one machine),
     and (b) by a replica that only accepts (CARDCHECK_REPORT_MAX_RUNNING=0: the durable
     acceptance alone, gRPC + the transaction). The backlog left is not waited for.
  4. CPU per query: report_service's CPU time (user + system, from /proc/<pid>/stat) per query
     over whole journeys as the gateway makes them, 16 at a time, each for a new user:
     CreateQuery, WatchQuery until READY, GetReport, and in between the run (the FanOut stream,
     the outcomes recorded, the report sealed, the report-ready SMS handed to the notifier).
     `--cpu` measures only this (after a short warm-up): the figure to compare before and
     after a change to report_service, steadier than any latency on a shared machine.

`--tracing` (default `sampled`: 1 % of traces, as a busy deployment would run) applies to
bank_connector and report_service; bank_sim and the notifier run untraced."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import grpc

from bank_sim.process import ROOT, Child, free_port
from bench import percentile
from bench._processes import cpu_seconds, start
from cardcheck import dataset
from cardcheck.banks import BANK_CODES
from cardcheck.v1 import (
    bank_connector_pb2,
    bank_connector_pb2_grpc,
    common_pb2,
    report_service_pb2,
    report_service_pb2_grpc,
)

LATENCY_MS = 200
SEED, PEOPLE = 20261124, 200
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
TRACING = {
    "off": {"OTEL_SDK_DISABLED": "true"},
    "sampled": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "full": {},
}
PENDING = common_pb2.QUERY_STATUS_PENDING
READY = common_pb2.QUERY_STATUS_READY


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


@dataclass
class Figures:
    db: str
    low_server_ms: list[float] = field(default_factory=list)
    low_client_ms: list[float] = field(default_factory=list)
    low_accept_ms: list[float] = field(default_factory=list)
    steady: list[dict] = field(default_factory=list)
    burst: dict = field(default_factory=dict)
    accept_only: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)


_PHONES = itertools.count(1)


class Client:
    def __init__(self, address: str, person: dataset.Person) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = report_service_pb2_grpc.ReportServiceStub(self.channel)
        self.person = person

    async def create(self, user: str) -> common_pb2.Query:
        # A phone of its own for every query: the notifier caps "report ready" SMS per phone.
        subject = report_service_pb2.Subject(
            name=self.person.name, id_number=self.person.id_number, phone=f"139{next(_PHONES):08d}"
        )
        response = await self.stub.CreateQuery(
            report_service_pb2.CreateQueryRequest(
                user_id=user,
                subject=subject,
                bank_codes=list(BANK_CODES),
                agreement_version="2026-11",
                idempotency_key=user,
            ),
            timeout=30,
        )
        return response.query

    async def until_finished(self, user: str, query_id: str) -> common_pb2.Query:
        async for event in self.stub.WatchQuery(
            report_service_pb2.ReportServiceWatchQueryRequest(user_id=user, query_id=query_id), timeout=120
        ):
            if event.query.status != PENDING:
                return event.query
        raise RuntimeError("the watch ended while the query was PENDING")

    async def get(self, user: str, query_id: str) -> common_pb2.Query:
        response = await self.stub.GetQuery(
            report_service_pb2.GetQueryRequest(user_id=user, query_id=query_id), timeout=30
        )
        return response.query

    async def report(self, user: str, query_id: str) -> common_pb2.Report:
        response = await self.stub.GetReport(
            report_service_pb2.ReportServiceGetReportRequest(user_id=user, query_id=query_id), timeout=30
        )
        return response.report


def _server_ms(query: common_pb2.Query) -> float:
    ready = query.ready_at.ToDatetime(UTC)
    submitted = query.submitted_at.ToDatetime(UTC)
    return (ready - submitted).total_seconds() * 1000


async def low_load(client: Client, figures: Figures, count: int) -> None:
    for i in range(count + 3):
        user = f"low-{uuid.uuid4().hex}"
        started = time.perf_counter()
        accepted = await client.create(user)
        accepted_at = time.perf_counter()
        final = await client.until_finished(user, accepted.query_id)
        finished = time.perf_counter()
        if final.status != READY:
            raise RuntimeError(f"query ended {final.status}")
        if i >= 3:  # the first ones warm connections and code paths
            figures.low_accept_ms.append((accepted_at - started) * 1000)
            figures.low_client_ms.append((finished - started) * 1000)
            figures.low_server_ms.append(_server_ms(final))


async def steady(client: Client, rate: float, seconds: float) -> dict:
    accepted: list[tuple[str, str]] = []
    accept_ms: list[float] = []
    refused = 0
    tasks = []

    async def one() -> None:
        nonlocal refused
        user = f"steady-{uuid.uuid4().hex}"
        started = time.perf_counter()
        try:
            query = await client.create(user)
        except grpc.aio.AioRpcError:
            refused += 1
            return
        accept_ms.append((time.perf_counter() - started) * 1000)
        accepted.append((user, query.query_id))

    loop = asyncio.get_running_loop()
    begin = loop.time()
    n = 0
    while (due := begin + n / rate) < begin + seconds:
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(one()))
        n += 1
    await asyncio.gather(*tasks)
    offered_window = loop.time() - begin
    # Then let what was accepted finish, and read report_service's own instants.
    deadline = loop.time() + 60
    ready_ms: list[float] = []
    unfinished = 0
    for user, query_id in accepted:
        while True:
            query = await client.get(user, query_id)
            if query.status != PENDING or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        if query.status == READY:
            ready_ms.append(_server_ms(query))
        else:
            unfinished += 1
    return {
        "rate": rate,
        "offered": n,
        "accepted_per_s": len(accepted) / offered_window,
        "refused": refused,
        "accept_ms": accept_ms,
        "ready_ms": ready_ms,
        "unfinished": unfinished,
    }


async def burst(client: Client, concurrency: int, seconds: float) -> dict:
    accept_ms: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds

    async def worker() -> None:
        while loop.time() < stop_at:
            started = time.perf_counter()
            try:
                await client.create(f"burst-{uuid.uuid4().hex}")
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] = errors.get(error.code().name, 0) + 1
                continue
            accept_ms.append((time.perf_counter() - started) * 1000)

    begin = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = loop.time() - begin
    return {
        "accepted_per_s": len(accept_ms) / elapsed,
        "accepted": len(accept_ms),
        "accept_ms": accept_ms,
        "errors": errors,
        "seconds": elapsed,
    }


async def cpu_per_query(client: Client, pid: int, count: int, concurrency: int = 16) -> dict:
    """`count` journeys, `concurrency` at a time: report_service's CPU ms per query."""
    users = iter(range(count))
    done = 0

    async def journeys() -> None:
        nonlocal done
        for _ in users:
            user = f"cpu-{uuid.uuid4().hex}"
            accepted = await client.create(user)
            final = await client.until_finished(user, accepted.query_id)
            if final.status != READY:
                raise RuntimeError(f"query ended {final.status}")
            await client.report(user, accepted.query_id)
            done += 1

    begin_cpu, begin = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(journeys() for _ in range(concurrency)))
    await asyncio.sleep(0.5)  # the last report-ready SMS handed over, its work row deleted
    cpu, elapsed = cpu_seconds(pid) - begin_cpu, time.perf_counter() - begin
    return {"queries": done, "cpu_ms": cpu * 1000 / done, "per_s": done / elapsed}


async def fan_out_reference(address: str, person: dataset.Person, count: int) -> list[float]:
    """The same 24-bank fan-out asked of bank_connector directly: what report_service builds on."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = bank_connector_pb2_grpc.BankConnectorStub(channel)
        latencies = []
        for i in range(count + 3):
            started = time.perf_counter()
            outcomes = [
                o
                async for o in stub.FanOut(
                    bank_connector_pb2.FanOutRequest(
                        id_number=person.id_number, name=person.name, bank_codes=list(BANK_CODES)
                    ),
                    timeout=30,
                )
            ]
            if len(outcomes) != len(BANK_CODES):
                raise RuntimeError("the reference fan-out lost banks")
            if i >= 3:
                latencies.append((time.perf_counter() - started) * 1000)
        return latencies


def pg_schema() -> tuple[str, str]:
    """A fresh PostgreSQL schema for one benchmark: its name and the SQLAlchemy URL on it."""
    import psycopg

    schema = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = PG_ADMIN_DSN.replace("postgresql://", "postgresql+psycopg://", 1)
    return schema, f"{url}?options=-csearch_path%3D{schema}"


def drop_pg_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def measure_db(db: str, work: Path, base_env: dict[str, str], person: dataset.Person, args) -> Figures:
    figures = Figures(db)
    data_dir = work / db
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    schema = None
    env = dict(base_env)
    if db == "postgres":
        schema, url = pg_schema()
        env["CARDCHECK_DATABASE_URL"] = url
    address = f"127.0.0.1:{free_port()}"
    env["CARDCHECK_REPORT_SERVICE_ADDR"] = address
    children: list[Child] = []
    try:
        children.append(start("report_service", data_dir, env, address))
        pid = children[0].process.pid

        async def run() -> None:
            client = Client(address, person)
            try:
                if args.cpu:
                    await low_load(client, figures, 5)
                    figures.cpu = await cpu_per_query(client, pid, 150 if args.quick else 400)
                    return
                await low_load(client, figures, 12 if args.quick else 25)
                figures.cpu = await cpu_per_query(client, pid, 150 if args.quick else 400)
                for rate in args.rates:
                    figures.steady.append(await steady(client, rate, 4 if args.quick else 8))
                figures.burst = await burst(client, 32, 3 if args.quick else 5)
            finally:
                await client.channel.close()

        asyncio.run(run())
        children[0].stop(timeout=60)  # its backlog stays in the database, unrun
        if args.cpu:
            return figures
        accept_only = f"127.0.0.1:{free_port()}"
        children.append(
            start(
                "report_service",
                data_dir,
                {**env, "CARDCHECK_REPORT_SERVICE_ADDR": accept_only, "CARDCHECK_REPORT_MAX_RUNNING": "0"},
                accept_only,
            )
        )

        async def run_accept_only() -> None:
            client = Client(accept_only, person)
            try:
                figures.accept_only = await burst(client, 32, 3 if args.quick else 5)
            finally:
                await client.channel.close()

        asyncio.run(run_accept_only())
    finally:
        for child in children:
            code = child.stop(timeout=60)
            if code != 0:
                print(f"report_service on {db} exited with {code}; its log: {child.log_path}")
        if schema is not None:
            drop_pg_schema(schema)
    return figures


def report(all_figures: list[Figures], reference_ms: list[float], cpu_only: bool = False) -> list[str]:
    names = [f.db for f in all_figures]
    width = 46
    lines = [f"{'':{width}}" + "".join(f"{n:>18}" for n in names)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:{width}}" + "".join(f"{v:>18}" for v in values))

    def cpu_rows() -> None:
        lines.append(f"{'4. report_service CPU per query, 16 at a time':{width}}")
        row("  CPU ms per query", [f"{f.cpu['cpu_ms']:.2f}" for f in all_figures])
        row("  queries (done /s)", [f"{f.cpu['queries']} ({f.cpu['per_s']:.0f}/s)" for f in all_figures])

    if cpu_only:
        cpu_rows()
        return lines

    ref50 = percentile(reference_ms, 0.5)
    lines.append(
        f"reference: direct 24-bank FanOut via bank_connector, p50 {_ms(ref50)} ms, "
        f"p90 {_ms(percentile(reference_ms, 0.9))} ms (n={len(reference_ms)}); floor {LATENCY_MS} ms"
    )
    lines.append("")
    lines.append(f"{'1. low load, one query at a time':{width}}" + "".join(f"{n:>18}" for n in names))
    row(
        "  accepted -> READY p50 (report_service) ms",
        [_ms(percentile(f.low_server_ms, 0.5)) for f in all_figures],
    )
    row("  accepted -> READY p90 ms", [_ms(percentile(f.low_server_ms, 0.9)) for f in all_figures])
    row("  accepted -> READY max ms", [_ms(max(f.low_server_ms, default=math.nan)) for f in all_figures])
    row(
        "  p50 over the 200 ms floor ms",
        [_ms(percentile(f.low_server_ms, 0.5) - LATENCY_MS) for f in all_figures],
    )
    row(
        "  p50 over the direct fan-out ms",
        [_ms(percentile(f.low_server_ms, 0.5) - ref50) for f in all_figures],
    )
    row(
        "  client: CreateQuery sent -> READY seen p50 ms",
        [_ms(percentile(f.low_client_ms, 0.5)) for f in all_figures],
    )
    row("  client: CreateQuery p50 ms", [_ms(percentile(f.low_accept_ms, 0.5)) for f in all_figures])
    for i, rate in enumerate(all_figures[0].steady and [s["rate"] for s in all_figures[0].steady] or []):
        lines.append(f"{f'2. steady load, {rate:g} new queries/s':{width}}")
        runs = [f.steady[i] for f in all_figures]
        row("  accepted /s", [f"{r['accepted_per_s']:.1f}" for r in runs])
        row("  refused / unfinished after 60 s", [f"{r['refused']} / {r['unfinished']}" for r in runs])
        row(
            "  CreateQuery p50 / p99 ms",
            [
                f"{_ms(percentile(r['accept_ms'], 0.5))} / {_ms(percentile(r['accept_ms'], 0.99))}"
                for r in runs
            ],
        )
        row("  accepted -> READY p50 ms", [_ms(percentile(r["ready_ms"], 0.5)) for r in runs])
        row("  accepted -> READY p99 ms", [_ms(percentile(r["ready_ms"], 0.99)) for r in runs])
    for label, key in (
        ("3a. acceptance, 32 clients, running its work", "burst"),
        ("3b. acceptance, 32 clients, accepting only", "accept_only"),
    ):
        lines.append(f"{label:{width}}")
        runs = [getattr(f, key) for f in all_figures]
        row("  queries durably accepted /s", [f"{r['accepted_per_s']:.0f}" for r in runs])
        row(
            "  CreateQuery p50 / p99 ms",
            [
                f"{_ms(percentile(r['accept_ms'], 0.5))} / {_ms(percentile(r['accept_ms'], 0.99))}"
                for r in runs
            ],
        )
        row("  refused", [str(sum(r["errors"].values())) for r in runs])
    cpu_rows()
    lines.append("")
    for f in all_figures:
        p50 = percentile(f.low_server_ms, 0.5)
        verdict = "met" if p50 - LATENCY_MS <= 50 else "MISSED"
        lines.append(
            f"target, {f.db}: low-load p50 within 50 ms of the {LATENCY_MS} ms floor: {verdict} "
            f"(+{p50 - LATENCY_MS:.1f} ms; +{p50 - ref50:.1f} ms over the direct fan-out)"
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench queries")
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter windows")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--rate", default="10,25", help="steady arrival rates, queries/s, comma-separated")
    parser.add_argument("--tracing", choices=sorted(TRACING), default="sampled")
    parser.add_argument("--cpu", action="store_true", help="only report_service's CPU per query (figure 4)")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rate.split(",") if r]
    work = ROOT / "var" / "bench" / "queries"
    work.mkdir(parents=True, exist_ok=True)
    person = dataset.pick_demo_person(dataset.generate(SEED, PEOPLE))
    started_at = time.monotonic()
    sim = f"127.0.0.1:{free_port()}"
    connector = f"127.0.0.1:{free_port()}"
    notifier = f"127.0.0.1:{free_port()}"
    children: list[Child] = []
    try:
        children.append(
            start(
                "bank_sim",
                work,
                {"CARDCHECK_BANK_SIM_ADDR": sim, **TRACING["off"]},
                sim,
                ["--seed", str(SEED), "--people", str(PEOPLE), "--bank-latency-ms", str(LATENCY_MS)],
            )
        )
        children.append(
            start(
                "bank_connector",
                work,
                {
                    "CARDCHECK_BANK_SIM_ADDR": sim,
                    "CARDCHECK_BANK_CONNECTOR_ADDR": connector,
                    **TRACING[args.tracing],
                },
                connector,
            )
        )
        shutil.rmtree(work / "notifier", ignore_errors=True)
        (work / "notifier").mkdir()
        children.append(
            start(
                "notifier",
                work / "notifier",
                {"CARDCHECK_NOTIFIER_ADDR": notifier, **TRACING["off"]},
                notifier,
            )
        )
        print(
            f"bank_sim (every bank at {LATENCY_MS} ms), bank_connector and notifier up in "
            f"{time.monotonic() - started_at:.1f} s; tracing {args.tracing}",
            flush=True,
        )
        reference = [] if args.cpu else asyncio.run(fan_out_reference(connector, person, 12 if args.quick else 25))
        base_env = {
            "CARDCHECK_BANK_CONNECTOR_ADDR": connector,
            "CARDCHECK_NOTIFIER_ADDR": notifier,
            **TRACING[args.tracing],
        }
        dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
        figures = []
        for db in dbs:
            print(f"measuring report_service on {db} ...", flush=True)
            figures.append(measure_db(db, work, base_env, person, args))
    finally:
        for child in reversed(children):
            child.stop()
    print()
    for line in report(figures, reference, args.cpu):
        print(line)
    print(f"\n(run took {time.monotonic() - started_at:.0f} s; logs under {work})")
    return 0
