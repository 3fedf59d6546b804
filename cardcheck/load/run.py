"""`cardcheck load`: the command line and the run (provision users, drive the schedule, wait
for the journeys in flight, print the table, write the report, check the thresholds).

Exit codes: 0 the run finished and every threshold held; 1 a threshold failed, or the run could
not start (nobody to run as, no inbox); 2 a bad argument, said in one line."""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shlex
import signal
import sys
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from cardcheck import dataset
from cardcheck.client import CardCheckError, open_channel
from cardcheck.load import LOAD_TEST_PEOPLE, mix, report, schedule, thresholds
from cardcheck.load.inbox import Inbox
from cardcheck.load.journey import Journeys, Target
from cardcheck.load.progress import Progress, line
from cardcheck.load.recording import ALL_STAGES, Recorder
from cardcheck.load.users import (
    Provisioned,
    User,
    UsersError,
    failure_reason,
    people_of,
    provision,
    read_users_file,
)
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc

MARGIN = 1.25  # users provisioned per expected journey: Poisson counts vary (±3σ ≈ ±3√N)
PROBE_PHONE = "13800000000"


class BadArgument(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as every refusal of the command
        raise BadArgument(message)


def parser() -> argparse.ArgumentParser:
    load = _Parser(prog="cardcheck load", description="Load test the whole journey at an open-loop arrival rate.")
    what = load.add_argument_group("what to offer")
    what.add_argument("--rate", type=float, default=5.0, help="journeys arriving a second (Poisson; default 5)")
    what.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (default 30)")
    what.add_argument("--ramp", type=float, default=0.0, help="seconds over which the rate rises from 0, within the duration")
    what.add_argument("--mix", action="append", default=[], metavar="STAGES[:WEIGHT]",
                      help=f"a journey kind, e.g. register,query,watch,report:1 (repeatable; stages {', '.join(mix.STAGES)}; "
                      f"default {mix.DEFAULT_KIND})")
    what.add_argument("--seed", type=int, help="the seed of the arrivals and the mix's draws")
    where = load.add_argument_group("where")
    where.add_argument("--target", help="the gateway, host:port (default CARDCHECK_GATEWAY_ADDR)")
    where.add_argument("--inbox", help="notifier's sandbox inbox, host:port (default CARDCHECK_NOTIFIER_ADDR): "
                       "plaintext, or mTLS with --ca, --cert and --key (the operator's, in a mesh on TLS)")
    where.add_argument("--ca", type=Path, help="TLS: the CA certificate (PEM) that verifies the gateway")
    where.add_argument("--cert", type=Path, help="mTLS: the client certificate chain (PEM), with --key")
    where.add_argument("--key", type=Path, help="mTLS: the client private key (PEM), with --cert")
    where.add_argument("--tls", action="store_true", help="TLS with the system's roots (implied by --ca/--cert)")
    where.add_argument("--server-name", help="TLS: the name the gateway's certificate must carry, if not the target's host")
    where.add_argument("--connections", type=int, default=8, help="connections to the gateway (default 8)")
    who = load.add_argument_group("who")
    who.add_argument("--dataset", type=Path, help="the bank dataset bank_sim serves "
                     f"(default: the generated one of `cardcheck up --load-test`, {LOAD_TEST_PEOPLE} people)")
    who.add_argument("--users-file", type=Path, help="JSON Lines of people instead of a dataset (cardcheck/load/users.py)")
    who.add_argument("--users", type=int, help="users to provision (default: enough for the schedule)")
    who.add_argument("--skip-people", type=int, default=0, metavar="N",
                     help="leave out the first N people (those an earlier run on the same mesh used)")
    who.add_argument("--payment-password", default="135790")
    who.add_argument("--provision-concurrency", type=int, default=8, help="registrations at once before the run")
    bounds = load.add_argument_group("bounds and output")
    bounds.add_argument("--max-in-flight", type=int, default=1000,
                        help="journeys under way at most; an arrival beyond is counted DROPPED (default 1000)")
    bounds.add_argument("--timeout", type=float, default=120.0, help="seconds a journey may take (default 120)")
    bounds.add_argument("--report", type=Path, metavar="DIR", help="write summary.json and report.html into DIR")
    bounds.add_argument("--threshold", action="append", default=[], metavar="EXPR",
                        help="e.g. 'journey.p99_ms<5000' (repeatable): exit 1 when one fails")
    bounds.add_argument("--quiet", action="store_true", help="no progress line")
    return load


@dataclass
class Plan:
    kinds: list[mix.JourneyKind]
    thresholds: list[thresholds.Threshold]
    target: str
    inbox: str
    credentials: dict
    people: list[User]


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise BadArgument(f"{name} must be above 0, not {value:g}")


def plan(args: argparse.Namespace) -> Plan:
    """Checks every argument before anything is called (BadArgument)."""
    for name in ("rate", "duration", "timeout"):
        _positive(f"--{name}", getattr(args, name))
    if not (math.isfinite(args.ramp) and 0 <= args.ramp <= args.duration):
        raise BadArgument(f"--ramp must be from 0 to the duration ({args.duration:g} s), not {args.ramp:g}")
    for name in ("connections", "max_in_flight", "provision_concurrency"):
        if getattr(args, name) < 1:
            raise BadArgument(f"--{name.replace('_', '-')} must be at least 1")
    if args.users is not None and args.users < 0:
        raise BadArgument("--users must be 0 or more")
    if args.skip_people < 0:
        raise BadArgument("--skip-people must be 0 or more")
    if args.dataset is not None and args.users_file is not None:
        raise BadArgument("--dataset and --users-file exclude each other")
    try:
        kinds = mix.parse_mix(args.mix)
        checks = [thresholds.parse(text, ALL_STAGES) for text in args.threshold]
    except (mix.MixError, thresholds.ThresholdError) as error:
        raise BadArgument(str(error)) from None
    if (args.cert is None) != (args.key is None):
        raise BadArgument("--cert and --key go together")
    credentials: dict = {}
    for option, key in (("ca", "root_certificates"), ("cert", "certificate_chain"), ("key", "private_key")):
        path = getattr(args, option)
        if path is not None:
            try:
                credentials[key] = path.read_bytes()
            except OSError as error:
                raise BadArgument(f"--{option} {path}: {error.strerror or error}") from None
    if args.tls or credentials:
        credentials["tls"] = True
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        raise BadArgument(f"bad configuration: {error}") from None
    try:
        if args.users_file is not None:
            people = read_users_file(args.users_file, args.payment_password)
        else:
            records = dataset.load(args.dataset) if args.dataset else dataset.generate(people=LOAD_TEST_PEOPLE)
            people = people_of(records, args.payment_password)
    except (UsersError, dataset.DatasetError) as error:
        raise BadArgument(str(error)) from None
    except OSError as error:
        raise BadArgument(f"{args.dataset}: {error.strerror or error}") from None
    people = people[args.skip_people:]
    if not people:
        raise BadArgument(f"--skip-people {args.skip_people} leaves nobody to run as")
    for option in ("target", "inbox"):
        value = getattr(args, option)
        if value is not None and not value.rpartition(":")[2].isdigit():
            raise BadArgument(f"--{option} {value!r} is not host:port")
    return Plan(kinds, checks, args.target or settings.addresses["gateway"], args.inbox or settings.addresses["notifier"],
                credentials, people)


class Pool:
    """The people each journey kind draws from, one journey each."""

    def __init__(self) -> None:
        self.fresh: deque[User] = deque()  # for journeys that register
        self.ready: deque[User] = deque()  # provisioned

    def take(self, kind: mix.JourneyKind) -> User | None:
        source = self.fresh if kind.registers else self.ready
        return source.popleft() if source else None


def _needed(expected: float) -> int:
    return 0 if expected <= 0 else math.ceil(expected * MARGIN + 3 * math.sqrt(expected) + 2)


async def _check_inbox(channel: grpc.aio.Channel, address: str) -> str | None:
    try:
        await notifier_pb2_grpc.NotifierStub(channel).ListMessages(
            notifier_pb2.ListMessagesRequest(phone=PROBE_PHONE), timeout=10
        )
    except grpc.aio.AioRpcError as error:
        return f"the sandbox inbox at {address} does not answer: {error.code().name}: {error.details()}"
    return None


async def execute(args: argparse.Namespace, the_plan: Plan) -> int:
    out = Progress(quiet=args.quiet)
    rng = random.Random(args.seed)
    loop = asyncio.get_running_loop()
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel, not one shared
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    try:
        channels = [open_channel(the_plan.target, options=options, **the_plan.credentials) for _ in range(args.connections)]
    except ValueError as error:
        print(f"cardcheck load: {error}", file=sys.stderr)
        return 2
    target = Target(channels, rpc_timeout_s=min(30.0, args.timeout))
    # In a mesh on TLS the inbox answers the operator's identity alone: the --cert and --key given.
    mutual = "certificate_chain" in the_plan.credentials
    inbox_channel = open_channel(the_plan.inbox, **the_plan.credentials) if mutual else grpc.aio.insecure_channel(the_plan.inbox)
    inbox = Inbox(inbox_channel)
    try:
        problem = await _check_inbox(inbox_channel, the_plan.inbox)
        if problem is None:
            try:
                agreement = await target.client().get_agreement()
            except (CardCheckError, grpc.aio.AioRpcError) as error:
                problem = f"the gateway at {the_plan.target} does not answer: {failure_reason(error)}"
        if problem is not None:
            print(f"cardcheck load: {problem}", file=sys.stderr)
            return 1
        return await _run(args, the_plan, out, rng, loop, target, inbox, agreement.version)
    finally:
        await target.close()
        await inbox_channel.close()


async def _remember(inbox: Inbox, users: list[User], concurrency: int = 16) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(user: User) -> None:
        async with gate:
            await inbox.remember(user.phone)

    await asyncio.gather(*(one(user) for user in users))


@dataclass
class Cast:
    pool: Pool
    provisioned: Provisioned | None
    fresh: int  # people set aside for the journeys that register


async def _cast(args, the_plan: Plan, out: Progress, target: Target, inbox: Inbox, expected: float) -> Cast:
    """The users of the run: people for the journeys that register (from the end of the list),
    provisioned users for the others (from its start)."""
    loop = asyncio.get_running_loop()
    total_weight = sum(k.weight for k in the_plan.kinds)
    registering = sum(k.weight for k in the_plan.kinds if k.registers) / total_weight
    pool = Pool()
    people = list(the_plan.people)
    fresh = min(len(people), _needed(expected * registering))
    pool.fresh.extend(reversed(people[len(people) - fresh:]))
    people = people[: len(people) - fresh]
    await _remember(inbox, list(pool.fresh))
    wanted = args.users if args.users is not None else _needed(expected * (1 - registering))
    if not wanted:
        return Cast(pool, None, fresh)
    out.say(f"provisioning {wanted} users from {len(people)} people ({args.provision_concurrency} at once)")
    provisioned = await provision(
        people, wanted, target.client, inbox, concurrency=args.provision_concurrency,
        on_progress=lambda done, want: out.update(f"provisioning: {done}/{want} users", loop.time()),
    )
    out.done()
    pool.ready.extend(provisioned.users)
    skipped = ", ".join(
        f"{reason} {n}" + (f" (retry after {provisioned.retry_after[reason].total_seconds():.3g} s)"
                           if reason in provisioned.retry_after else "")
        for reason, n in provisioned.skipped.most_common()
    )
    seconds = max(provisioned.seconds, 1e-9)
    out.say(f"provisioned {len(provisioned.users)} users in {provisioned.seconds:.1f} s "
            f"({provisioned.registered} registered, {provisioned.registered / seconds:.1f}/s)"
            + (f"; set aside: {skipped}" if skipped else ""))
    if provisioned.users:
        used = args.skip_people + provisioned.tried
        out.say(f"this run takes the people before number {used}: a next run on this mesh may pass --skip-people {used}")
    return Cast(pool, provisioned, fresh)


async def _drive(args, the_plan: Plan, out: Progress, rng: random.Random, offsets: list[float], pool: Pool,
                 recorder: Recorder, journeys: Journeys) -> bool:
    """Starts each journey when it is due, then waits for those under way. False when stopped
    early (Ctrl-C, SIGTERM): the journeys under way are cancelled, the figures cover what ran."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def ticker() -> None:
        while True:
            out.update(line(recorder, loop.time(), args.duration, len(tasks)), loop.time())
            await asyncio.sleep(0.5)

    ticking = asyncio.create_task(ticker())
    stopper = asyncio.create_task(stop.wait())
    try:
        for offset in offsets:
            due = recorder.start + offset
            if due > loop.time():
                await asyncio.wait({stopper}, timeout=due - loop.time())
            if stop.is_set():
                break
            recorder.offered += 1
            if len(tasks) >= args.max_in_flight:
                recorder.error("DROPPED", "start", due)
                continue
            kind = mix.choose(the_plan.kinds, rng)
            user = pool.take(kind)
            if user is None:
                recorder.error("NO_USER", "start", due)
                continue
            recorder.journey_started(due)
            task = asyncio.create_task(journeys.run(kind, user, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        # Arrivals are over; what is under way finishes (each within its --timeout).
        while tasks and not stop.is_set():
            await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ticking.cancel()
        stopper.cancel()
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return not stop.is_set()


async def _run(args, the_plan: Plan, out: Progress, rng: random.Random, loop, target: Target, inbox: Inbox,
               agreement_version: str) -> int:
    offsets = schedule.arrival_offsets(args.rate, args.duration, args.ramp, rng)
    expected = schedule.expected_arrivals(args.rate, args.duration, args.ramp)
    out.say(f"cardcheck load: {len(offsets)} journeys due over {args.duration:g} s at {args.rate:g}/s against "
            f"{the_plan.target}; mix {', '.join(f'{k.name}:{k.weight:g}' for k in the_plan.kinds)}")
    cast = await _cast(args, the_plan, out, target, inbox, expected)
    if not cast.pool.ready and not cast.pool.fresh:
        print("cardcheck load: no user could be provisioned, nothing to run", file=sys.stderr)
        return 1

    window_s = max(1.0, math.ceil(args.duration / 150))  # at most 150 points over time
    recorder = Recorder(loop.time() + 0.05, window_s)
    journeys = Journeys(target, inbox, recorder, agreement_version, args.timeout)
    finished = await _drive(args, the_plan, out, rng, offsets, cast.pool, recorder, journeys)
    ended = loop.time()
    out.update(line(recorder, ended, args.duration, 0), ended, force=True)
    out.done()
    if finished:
        duration = args.duration
        elapsed = max(recorder.last_at, recorder.start + duration) - recorder.start
    else:
        out.say("cardcheck load: stopped early; the figures cover what ran")
        duration = elapsed = max(ended - recorder.start, 1e-9)
    summary = recorder.summary(duration, elapsed)
    print(report.table(summary, recorder))
    if args.report is not None:
        _write_report(args, the_plan, summary, recorder, cast, window_s)
    failed = False
    for check in the_plan.thresholds:
        ok, value = check.check(summary)
        print(f"threshold {check.text}: {'ok' if ok else 'FAILED'} ({'no samples' if value is None else f'{value:g}'})")
        failed = failed or not ok
    return 1 if failed else 0


def _write_report(args, the_plan: Plan, summary: dict, recorder: Recorder, cast: Cast, window_s: float) -> None:
    args.report.mkdir(parents=True, exist_ok=True)
    report.write_summary(args.report, summary)
    provisioned = cast.provisioned
    about = {
        "command": "cardcheck load " + shlex.join(args.argv),
        "written (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "target": the_plan.target,
        "schedule": f"Poisson {args.rate:g}/s for {args.duration:g} s" + (f", ramp {args.ramp:g} s" if args.ramp else ""),
        "mix": ", ".join(f"{k.name} (weight {k.weight:g})" for k in the_plan.kinds),
        "users": (f"{len(provisioned.users)} provisioned in {provisioned.seconds:.1f} s" if provisioned else "none provisioned")
        + f"; {cast.fresh} people set aside for registering",
        "connections": str(args.connections),
        "window": f"{window_s:g} s",
    }
    path = report.write_html(args.report, summary, recorder, about)
    print(f"\nreport: {args.report / 'summary.json'}, {path}")


def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
        args.argv = list(argv)
        the_plan = plan(args)
    except BadArgument as error:
        print(f"cardcheck load: {error}", file=sys.stderr)
        return 2
    import uvloop

    try:
        return uvloop.run(execute(args, the_plan))
    except KeyboardInterrupt:  # before the run (provisioning); during it Ctrl-C ends it with the figures
        print("\ncardcheck load: interrupted", file=sys.stderr)
        return 130
