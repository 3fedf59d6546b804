"""The whole mesh on this machine: the five services as real processes, every bank at a fixed
50 ms, the limits that stop one caller raised so that one machine can drive it (the per-caller
SMS budget and SubmitQuery's global admission; every other rule as deployed). This process is
the load generator, closed loop at concurrency 32.

    python -m bench mesh [--quick] [--people N] [--tracing=sampled|full|off] [--profile DIR]

Figures:
  1. the fan-out ceiling: complete 24-bank FanOut calls a second straight at bank_connector
     (measured before the journeys and again after them; the higher counts);
  2. registrations a second through the public gateway (RequestSmsCode REGISTER, the code from
     the sandbox inbox, Register), one per person of the dataset bank_sim serves;
  3. whole journeys a second, each by a user registered in 2 (a user queries once a week):
     RequestSmsCode QUERY_AUTH, the code from the sandbox inbox, SubmitQuery, WatchQuery until
     READY, GetReport;
and the ratio of 2 and 3 to 1 (targets: journeys >= 50 %, registrations >= 25 %), and each
service process's CPU time per fan-out, registration and journey (from /proc/<pid>/stat), the
figure the machine's noise moves least; and the gRPC calls each service served per journey
(its grpc_server_handled_total, read from /metrics before and after the journeys). Each phase's
window opens after a warm-up and closes when its last person or user has been taken, while every
worker is still busy.

`--tracing` sets every service's tracing but bank_sim's (as in `bench fanout`): `sampled`
(default; 1 % of traces), `full` (every span, to JSON-lines files) or `off`. `--profile DIR`
samples each service with py-spy while the journeys run (only threads holding the GIL: where
Python spends CPU): DIR/<service>.txt, collapsed stacks
(what flame graph tools read), and DIR/<service>.top, the functions with the most time of their
own and in total. The sampling costs CPU of its own: compare the figures of runs without it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import uvloop

from bank_sim.process import ROOT, Child, free_port
from bench import percentile
from bench.fanout import TRACING, Target, cpu_seconds, settle, start
from cardcheck import dataset
from cardcheck.banks import BANK_CODES
from cardcheck.refusals import from_rpc_error
from cardcheck.runtime.settings import DEFAULT_PORTS, METRICS_PORT_OFFSET
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, notifier_pb2, notifier_pb2_grpc

LATENCY_MS = 50
CONCURRENCY = 32
SEED = 20261124
PASSWORD = "135790"
FACE_TOKEN = "sandbox:pass"
SMS_CODE = re.compile(r"(?<!\d)\d{6}(?!\d)")
SERVICES = ("gateway", "report_service", "notifier", "bank_connector", "bank_sim")
READY = common_pb2.QUERY_STATUS_READY
PENDING = common_pb2.QUERY_STATUS_PENDING
# What one machine driving the mesh needs raised: every caller is 127.0.0.1, and the journeys'
# SubmitQuery calls come faster than a deployment's global admission lets in. The per-user,
# per-session and per-phone rules stay as deployed: each user registers once and queries once.
RAISED_LIMITS = {
    "CARDCHECK_SMS_CALLER_PER_HOUR": "100000000",
    "CARDCHECK_SMS_CALLER_BURST": "100000000",
    "CARDCHECK_SUBMIT_GLOBAL_RPS": "100000",
    "CARDCHECK_SUBMIT_GLOBAL_BURST": "100000",
}


def people(records: list[dataset.CardRecord]) -> list[dataset.Person]:
    """Everyone who can register (as `dataset.pick_demo_person` chooses one): an ACTIVE,
    card-not-present card with a reserved phone, a known region; one person per phone."""
    found: dict[str, dataset.Person] = {}
    phones: set[str] = set()
    for record in records:
        key = record.id_number.upper()
        region = dataset.region_of(key)
        if (key in found or region is None or record.status != "ACTIVE" or not record.cnp_enabled
                or record.reserved_phone is None or record.reserved_phone in phones):
            continue
        phones.add(record.reserved_phone)
        found[key] = dataset.Person(record.holder_name, key, record.reserved_phone, record.pan, region)
    return list(found.values())


class Processes:
    """The services' CPU time (user + system) so far, and this process's."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, float]:
        taken = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        taken["load generator"] = cpu_seconds(os.getpid())
        return taken


@dataclass
class Phase:
    """One closed-loop phase: what completed inside its window, and the CPU spent there."""

    name: str
    seconds: float = 0.0
    completed: int = 0
    failures: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)  # of the journeys inside the window

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def cpu_ms_each(self, process: str) -> float:
        return self.cpu_s.get(process, math.nan) * 1000 / self.completed if self.completed else math.nan


async def closed_loop(
    name: str, items: list, work: Callable[[object], Awaitable[dict[str, float]]], processes: Processes,
    warmup_s: float, concurrency: int = CONCURRENCY,
) -> Phase:
    """`work(item)` for every item, `concurrency` at a time. The window opens `warmup_s` after
    the start and closes when the last item is taken (every worker still busy then)."""
    phase = Phase(name)
    supply: Iterator = iter(items)
    opened: list[float] = []
    closed: list[float] = []
    cpu: dict[str, dict[str, float]] = {}
    started = time.perf_counter()

    async def opener() -> None:
        await asyncio.sleep(warmup_s)
        if not closed:
            opened.append(time.perf_counter())
            cpu["begin"] = processes.sample()

    async def worker() -> None:
        for item in supply:
            begun = time.perf_counter()
            try:
                stages = await work(item)
            except Exception as error:  # noqa: BLE001 (every failure is counted by what it was)
                phase.failures[_reason(error)] += 1
                continue
            finished = time.perf_counter()
            if opened and not closed:
                phase.completed += 1
                if begun >= opened[0]:
                    phase.latencies_ms.append((finished - begun) * 1000)
                    for stage, ms in stages.items():
                        phase.stages_ms.setdefault(stage, []).append(ms)
        if not closed:  # the first worker out of items: the others are still at work
            closed.append(time.perf_counter())
            cpu["end"] = processes.sample()

    opening = asyncio.create_task(opener())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    opening.cancel()
    if not opened:
        raise RuntimeError(f"{name}: too few items for a {warmup_s:.1f} s warm-up "
                           f"({len(items)} taken in {time.perf_counter() - started:.1f} s)")
    phase.seconds = closed[0] - opened[0]
    phase.cpu_s = {k: cpu["end"][k] - cpu["begin"][k] for k in cpu["begin"]}
    return phase


def _reason(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        typed = from_rpc_error(error)
        return typed.reason if typed is not None else error.code().name
    return f"{type(error).__name__}: {error}"[:80]


class Stages:
    """How long each stage of one journey took, in ms."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = (now - self._last) * 1000
        self._last = now


@dataclass
class User:
    person: dataset.Person
    token: str = ""
    known: set[str] = field(default_factory=set)  # inbox message ids already read


class Public:
    """The journey's calls: the gateway's public API and the sandbox inbox."""

    def __init__(self, gateway_address: str, notifier_address: str) -> None:
        options = [("grpc.max_concurrent_streams", 10_000)]
        self.channels = [grpc.aio.insecure_channel(gateway_address, options=options),
                         grpc.aio.insecure_channel(notifier_address, options=options)]
        self.gateway = gateway_pb2_grpc.CardCheckStub(self.channels[0])
        self.inbox = notifier_pb2_grpc.NotifierStub(self.channels[1])
        self.agreement = ""

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def code(self, user: User) -> str:
        """The new code SMS in the user's sandbox inbox (asked at once, then every 10-50 ms)."""
        pause = 0.0
        for _ in range(200):
            reply = await self.inbox.ListMessages(notifier_pb2.ListMessagesRequest(phone=user.person.phone), timeout=30)
            for message in reply.messages:
                if message.kind == "SMS_CODE" and message.message_id not in user.known:
                    user.known.add(message.message_id)
                    found = SMS_CODE.search(message.body)
                    if found is None:
                        raise RuntimeError("no 6-digit code in the code SMS")
                    return found.group()
            pause = min(0.05, pause + 0.01)
            await asyncio.sleep(pause)
        raise RuntimeError("no code SMS arrived")

    async def register(self, user: User) -> dict[str, float]:
        person = user.person
        stages = Stages()
        challenge = await self.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(phone=person.phone, purpose=common_pb2.SMS_PURPOSE_REGISTER), timeout=30
        )
        code = await self.code(user)
        stages.done("sms_code")
        session = await self.gateway.Register(
            gateway_pb2.RegisterRequest(
                name=person.name, id_number=person.id_number, phone=person.phone,
                challenge_id=challenge.challenge_id, sms_code=code, card_number=person.card_number,
                payment_password=PASSWORD, region=person.region,
            ),
            timeout=30,
        )
        user.token = session.session_token
        stages.done("register")
        return stages.ms

    async def journey(self, user: User) -> dict[str, float]:
        stages = Stages()
        metadata = (("authorization", f"Bearer {user.token}"),)
        challenge = await self.gateway.RequestSmsCode(
            gateway_pb2.RequestSmsCodeRequest(purpose=common_pb2.SMS_PURPOSE_QUERY_AUTH), metadata=metadata, timeout=30
        )
        code = await self.code(user)
        stages.done("sms_code")
        query = await self.gateway.SubmitQuery(
            gateway_pb2.SubmitQueryRequest(
                agreement_version=self.agreement, consent_given=True, challenge_id=challenge.challenge_id,
                sms_code=code, face_token=FACE_TOKEN, idempotency_key=secrets.token_hex(8),
            ),
            metadata=metadata, timeout=30,
        )
        stages.done("submit")
        status = query.status
        if status == PENDING:
            stream = self.gateway.WatchQuery(
                gateway_pb2.WatchQueryRequest(query_id=query.query_id), metadata=metadata, timeout=60
            )
            # Read to its end, which follows the event out of PENDING at once: a cancelled
            # stream costs the gateway and report_service more than its end does.
            async for event in stream:
                status = event.query.status
        if status != READY:
            raise RuntimeError(f"query ended {common_pb2.QueryStatus.Name(status)}")
        stages.done("ready")
        report = await self.gateway.GetReport(
            gateway_pb2.GetReportRequest(query_id=query.query_id, payment_password=PASSWORD),
            metadata=metadata, timeout=30,
        )
        if len(report.summary) != len(BANK_CODES):
            raise RuntimeError(f"a report of {len(report.summary)} banks")
        stages.done("report")
        return stages.ms


async def fan_outs(connector: Target, processes: Processes, sim_address: str, windows: int,
                   seconds: float) -> Phase:
    """The median of `windows` closed-loop windows of 24-bank FanOut at bank_connector."""
    taken = []
    for _ in range(windows):
        run = await _metered(connector.load(list(BANK_CODES), CONCURRENCY, seconds, 0.5), processes, 0.5, seconds)
        taken.append(run)
        await settle(sim_address, connector.address)
    taken.sort(key=lambda p: p.per_second)
    return taken[len(taken) // 2]


async def _metered(load: Awaitable, processes: Processes, warmup_s: float, seconds: float) -> Phase:
    """Runs `load` (a fanout Target.load) while sampling every process's CPU over its window."""

    async def meter() -> dict[str, float]:
        await asyncio.sleep(warmup_s)
        begin = processes.sample()
        await asyncio.sleep(seconds)
        end = processes.sample()
        return {k: end[k] - begin[k] for k in begin}

    run, cpu = await asyncio.gather(load, meter())
    phase = Phase("fan-out", seconds=run.seconds, completed=run.completed, cpu_s=cpu,
                  latencies_ms=run.latencies_ms)
    phase.failures.update(run.failures)
    return phase


class Calls:
    """The gRPC calls each service served, from its /metrics (at its gRPC port + 1000)."""

    LINE = re.compile(r'grpc_server_handled_total\{([^}]*)\} ([0-9.e+]+)')

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = {s: a for s, a in addresses.items() if s in SERVICES}

    def sample(self) -> Counter:
        served: Counter = Counter()
        for service, address in self.addresses.items():
            host, _, port = address.rpartition(":")
            url = f"http://{host}:{int(port) + METRICS_PORT_OFFSET}/metrics"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
                for labels, value in self.LINE.findall(response.read().decode()):
                    named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                    served[(service, named["grpc_method"])] += float(value)
        return served

    @staticmethod
    def per_item(before: Counter, after: Counter, items: int) -> list[str]:
        """Calls served per item between two samples, by service and method, most first."""
        taken = after - before
        return [f"  {service:<16}{method:<24}{n / items:>6.2f}"
                for (service, method), n in sorted(taken.items(), key=lambda kv: -kv[1]) if n / items >= 0.01]


class Profiles:
    """py-spy sampling each service process into `directory` (nothing without one)."""

    def __init__(self, directory: Path | None, pids: dict[str, int]) -> None:
        self.directory = directory
        self.pids = pids
        self.running: list[tuple[subprocess.Popen, Path]] = []

    def start(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if py_spy is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        for name, pid in self.pids.items():
            out = self.directory / f"{name}.txt"
            command = [py_spy, "record", "--pid", str(pid), "--rate", "50", "--gil", "--format", "raw", "--output", str(out)]
            self.running.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                                 out))

    def stop(self) -> None:
        for process, out in self.running:
            process.send_signal(signal.SIGINT)
            process.wait(30)
            with contextlib.suppress(OSError):
                _summary(out, out.with_suffix(".top"))
        if self.running:
            print(f"profiles in {self.directory}", flush=True)
        self.running = []


def _summary(collapsed: Path, top: Path) -> None:
    """py-spy's raw stacks (`frame;frame;... count`) folded by function, heaviest first: the
    time of its own and in total."""
    own: Counter = Counter()
    total: Counter = Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples", "", "self %  function"]
    lines += [f"{100 * n / samples:6.1f}  {f}" for f, n in own.most_common(40)]
    lines += ["", "total %  function"]
    lines += [f"{100 * n / samples:7.1f}  {f}" for f, n in total.most_common(80)]
    top.write_text("\n".join(lines) + "\n")


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def report(ceiling: Phase, later: Phase, phases: list[Phase]) -> list[str]:
    best = max(ceiling, later, key=lambda p: p.per_second)
    print(f"\nfan-out ceiling: {ceiling.per_second:.1f}/s before the journeys, {later.per_second:.1f}/s after; "
          f"{best.per_second:.1f}/s counts")
    print(f"\n{'':<16}{'per s':>9}{'of ceiling':>12}{'p50 ms':>9}{'p99 ms':>9}{'done':>7}{'failed':>8}"
          f"{'window s':>10}")
    for phase in (best, *phases):
        share = phase.per_second / best.per_second if best.per_second else math.nan
        print(f"{phase.name:<16}{phase.per_second:>9.1f}{share:>12.1%}{_ms(percentile(phase.latencies_ms, 0.5)):>9}"
              f"{_ms(percentile(phase.latencies_ms, 0.99)):>9}{phase.completed:>7}{sum(phase.failures.values()):>8}"
              f"{phase.seconds:>10.1f}")
    for phase in phases:
        print(f"  {phase.name} stages, p50/p99 ms: " + ", ".join(
            f"{stage} {_ms(percentile(ms, 0.5))}/{_ms(percentile(ms, 0.99))}" for stage, ms in phase.stages_ms.items()
        ))
    for phase in (best, *phases):
        if phase.failures:
            shown = ", ".join(f"{k} x{v}" for k, v in phase.failures.most_common(5))
            print(f"  {phase.name} failures: {shown}")
    print("\nCPU ms per completed fan-out / registration / journey, by process")
    print(f"{'':<16}" + "".join(f"{p.name:>14}" for p in (best, *phases)))
    for process in (*SERVICES, "load generator"):
        print(f"{process:<16}" + "".join(f"{_ms(p.cpu_ms_each(process)):>14}" for p in (best, *phases)))
    services_total = [sum(p.cpu_ms_each(s) for s in SERVICES) for p in (best, *phases)]
    print(f"{'services':<16}" + "".join(f"{_ms(t):>14}" for t in services_total))
    # The fan-out's own CPU, measured in the same run, as the unit: a busy machine inflates every
    # CPU figure alike, and this ratio much less.
    print(f"{'in fan-outs':<16}" + "".join(f"{t / services_total[0]:>14.2f}" for t in services_total))
    verdicts = []
    for phase, target in zip(phases, (0.25, 0.5), strict=True):
        share = phase.per_second / best.per_second if best.per_second else math.nan
        verdicts.append(f"{phase.name} >= {target:.0%} of the fan-out ceiling: {share:.1%} "
                        f"{'met' if share >= target else 'MISSED'}")
    return verdicts


async def measure(addresses: dict[str, str], pids: dict[str, int], persons: list[dataset.Person],
                  quick: bool, profile: Path | None = None) -> list[str]:
    processes = Processes(pids)
    profiles = Profiles(profile, {k: v for k, v in pids.items() if k != "bank_sim"})
    windows, seconds = (1, 2.0) if quick else (3, 3.0)
    connector = Target("bank_connector", addresses["bank_connector"], persons[0], pids["bank_connector"])
    public = Public(addresses["gateway"], addresses["notifier"])
    calls = Calls(addresses)
    try:
        await connector.sequential(list(BANK_CODES), 5)
        ceiling = await fan_outs(connector, processes, addresses["bank_sim"], windows, seconds)
        print(f"fan-out ceiling: {ceiling.per_second:.1f}/s", flush=True)

        public.agreement = (await public.gateway.GetAgreement(gateway_pb2.GetAgreementRequest(), timeout=30)).version
        users = [User(p) for p in persons]
        warmup = 1.0 if quick else 2.0
        registrations = await closed_loop("registration", users, public.register, processes, warmup)
        registrations.name = "registration"
        print(f"registrations: {registrations.per_second:.1f}/s", flush=True)
        registered = [u for u in users if u.token]
        profiles.start()
        served = calls.sample()
        try:
            journeys = await closed_loop("journey", registered, public.journey, processes, warmup)
        finally:
            profiles.stop()
        print(f"journeys: {journeys.per_second:.1f}/s", flush=True)
        await settle(addresses["bank_sim"], addresses["bank_connector"])
        print("\ncalls served per journey (all the phase's journeys, warm-up included):")
        print("\n".join(Calls.per_item(served, calls.sample(), len(registered))), flush=True)
        await settle(addresses["bank_sim"], addresses["bank_connector"])
        later = await fan_outs(connector, processes, addresses["bank_sim"], windows, seconds)
        return report(ceiling, later, [registrations, journeys])
    finally:
        await connector.channel.close()
        await public.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench mesh")
    parser.add_argument("--quick", action="store_true", help="fewer people, shorter windows")
    parser.add_argument("--people", type=int, help="people in the dataset (default 1200, --quick 500)")
    parser.add_argument("--tracing", choices=sorted(TRACING), default="sampled", help="the services' tracing")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy each service during the journeys")
    args = parser.parse_args(argv)
    generated = args.people or (500 if args.quick else 1200)
    work = ROOT / "var" / "bench" / "mesh"
    shutil.rmtree(work, ignore_errors=True)  # every run on fresh databases
    work.mkdir(parents=True)
    persons = people(dataset.generate(SEED, generated))
    addresses = {s: f"127.0.0.1:{free_port()}" for s in DEFAULT_PORTS}
    common = {f"CARDCHECK_{s.upper()}_ADDR": a for s, a in addresses.items()}
    started_at = time.monotonic()
    children: list[Child] = []
    try:
        children.append(start(
            "bank_sim", work, {**common, **TRACING["off"]}, addresses["bank_sim"],
            ["--seed", str(SEED), "--people", str(generated), "--bank-latency-ms", str(LATENCY_MS)],
        ))
        for service in ("bank_connector", "notifier", "report_service", "gateway"):
            children.append(start(service, work, {**common, **RAISED_LIMITS, **TRACING[args.tracing]},
                                  addresses[service]))
        pids = {child.module: child.process.pid for child in children}
        print(f"the five services up in {time.monotonic() - started_at:.1f} s (tracing {args.tracing}); every bank "
              f"at {LATENCY_MS} ms; {len(persons)} people; concurrency {CONCURRENCY}; raised: "
              + ", ".join(f"{k}={v}" for k, v in RAISED_LIMITS.items()), flush=True)
        verdicts = uvloop.run(measure(addresses, pids, persons, args.quick, args.profile))
    finally:
        for child in reversed(children):
            child.stop()
    print("\nverdicts:")
    for verdict in verdicts:
        print(f"  {verdict}")
    print(f"\n(run took {time.monotonic() - started_at:.0f} s)")
    return 0
