"""bank_connector fanning out to bank_sim on this machine, beside a bare reference measured in
the same run: a minimal grpc.aio FanOut (bench/_fanout_reference.py) that gathers the same
bank calls against the same bank_sim with no retries, breaker, bulkhead, admission or tracing.
All three are real processes; this process is the load generator.

    python -m bench fanout [--quick] [--tracing=sampled|full|off]

Figures (every bank at a fixed 50 ms):
  1. 24-bank fan-out latency at concurrency 1 against the 50 ms floor (target: p50 within
     10 ms, p99 within 25 ms), beside the reference and the same calls made directly from
     this process with no hop (what the machine allows);
  2. complete 24-bank fan-outs per second at saturation (each one's peak over concurrency 8,
     16, 32, 64 and 256, each point the median of five windows, the two targets taking turns,
     each window started from idle): bank_connector / reference (target >= 80 %); beside each,
     the target process's CPU time per fan-out, a figure the machine's noise moves far less;
  3. one bank hanging: when the other 23 outcomes arrived, and when the fan-out ended, against
     the per-bank deadline;
  4. 64 and 256 concurrent fan-outs: throughput against the target's own peak (>= 90 %) and
     failed fan-outs (target: none); bank_connector's admission holds 16 fan-outs at work by
     default and queues the rest;
  5. K = 1, 6, 24, 48, 100 banks: latency and fan-outs per second (K > 24 repeats the bank
     codes, asked as ceil(K/24) fan-outs at once).

`--tracing` sets bank_connector's tracing: `sampled` (default; 1 % of traces, the parent's
decision kept, as a busy deployment would run), `full` (every span, to JSON-lines files) or
`off`. bank_sim runs untraced: it stands in for the banks, whose cost is not ours."""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from dataclasses import dataclass, field

import grpc
import uvloop

from bank_sim.process import ROOT, Child, free_port
from bench import percentile
from bench._processes import cpu_seconds, start
from cardcheck import dataset
from cardcheck.banks import BANK_CODES
from cardcheck.v1 import bank_connector_pb2, bank_connector_pb2_grpc, bank_pb2, bank_pb2_grpc, common_pb2

LATENCY_MS = 50
SEED, PEOPLE = 20261124, 200
ANSWERED = common_pb2.BANK_OUTCOME_KIND_ANSWERED
TRACING = {
    "off": {"OTEL_SDK_DISABLED": "true"},
    "sampled": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "full": {},
}


@dataclass
class Run:
    """What one load run saw: fan-outs completed in the measuring window, their latencies."""

    seconds: float
    cpu_s: float = 0.0  # the target process's CPU time over the measuring window
    completed: int = 0
    failed: int = 0  # over the whole run, warm-up included
    latencies_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_each(self) -> float:
        return self.cpu_s * 1000 / self.completed if self.completed else math.nan

    def percentile(self, fraction: float) -> float:
        return percentile(self.latencies_ms, fraction)


class Target:
    """A FanOut server under load (bank_connector or the reference)."""

    def __init__(self, name: str, address: str, person: dataset.Person, pid: int | None = None) -> None:
        self.name = name
        self.pid = pid
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.max_concurrent_streams", 10_000)])
        self.stub = bank_connector_pb2_grpc.BankConnectorStub(self.channel)
        self.person = person

    async def fan_out(self, codes: list[str], per_bank_ms: int = 0, deadline_s: float = 60.0) -> str | None:
        """One fan-out of `codes` (split into requests of at most 24); None when every bank
        answered, else what went wrong."""
        groups = [codes[i:i + len(BANK_CODES)] for i in range(0, len(codes), len(BANK_CODES))]
        results = await asyncio.gather(*(self._one(group, per_bank_ms, deadline_s) for group in groups))
        return next((r for r in results if r is not None), None)

    async def _one(self, codes: list[str], per_bank_ms: int, deadline_s: float) -> str | None:
        request = bank_connector_pb2.FanOutRequest(
            id_number=self.person.id_number, name=self.person.name, bank_codes=codes, per_bank_timeout_ms=per_bank_ms
        )
        try:
            outcomes = [o async for o in self.stub.FanOut(request, timeout=deadline_s)]
        except grpc.aio.AioRpcError as error:
            return error.code().name
        if len(outcomes) != len(codes):
            return "MISSING_OUTCOMES"
        bad = next((o for o in outcomes if o.kind != ANSWERED), None)
        return None if bad is None else f"{common_pb2.BankOutcomeKind.Name(bad.kind)}:{bad.detail}"

    async def load(self, codes: list[str], concurrency: int, seconds: float, warmup: float) -> Run:
        run = Run(seconds)
        begin = time.perf_counter() + warmup
        end = begin + seconds

        cpu_begin = cpu_end = 0.0

        async def meter() -> None:
            nonlocal cpu_begin, cpu_end
            await asyncio.sleep(max(begin - time.perf_counter(), 0))
            cpu_begin = cpu_seconds(self.pid)
            await asyncio.sleep(max(end - time.perf_counter(), 0))
            cpu_end = cpu_seconds(self.pid)

        async def worker() -> None:
            while time.perf_counter() < end:
                started = time.perf_counter()
                problem = await self.fan_out(codes)
                finished = time.perf_counter()
                if problem is not None:
                    run.failed += 1
                    run.failures[problem] = run.failures.get(problem, 0) + 1
                elif begin <= finished <= end:
                    run.completed += 1
                    if started >= begin:
                        run.latencies_ms.append((finished - started) * 1000)

        await asyncio.gather(meter(), *(worker() for _ in range(concurrency)))
        run.cpu_s = cpu_end - cpu_begin
        return run

    async def sequential(self, codes: list[str], count: int) -> Run:
        run = Run(0)
        for _ in range(count):
            started = time.perf_counter()
            problem = await self.fan_out(codes)
            if problem is not None:
                run.failed += 1
                run.failures[problem] = run.failures.get(problem, 0) + 1
            else:
                run.latencies_ms.append((time.perf_counter() - started) * 1000)
                run.completed += 1
        run.seconds = sum(run.latencies_ms) / 1000
        return run

    async def hanging(self, hung: str, per_bank_ms: int) -> tuple[float, float, float, str]:
        """(ms until the last answering bank, ms until the hung bank's outcome, ms until the
        fan-out ended, the hung bank's outcome)."""
        request = bank_connector_pb2.FanOutRequest(
            id_number=self.person.id_number, name=self.person.name, bank_codes=BANK_CODES, per_bank_timeout_ms=per_bank_ms
        )
        started = time.perf_counter()
        others_ms = hung_ms = 0.0
        hung_kind = ""
        async for outcome in self.stub.FanOut(request, timeout=30):
            at = (time.perf_counter() - started) * 1000
            if outcome.bank_code == hung:
                hung_ms, hung_kind = at, f"{common_pb2.BankOutcomeKind.Name(outcome.kind)}:{outcome.detail}"
            else:
                others_ms = at
        return others_ms, hung_ms, (time.perf_counter() - started) * 1000, hung_kind


class Direct(Target):
    """No middle hop: this process gathers the bank calls at bank_sim itself (the floor this
    machine allows; shown for the latency only)."""

    def __init__(self, sim_address: str, person: dataset.Person) -> None:
        self.name = "direct (no hop)"
        self.channel = grpc.aio.insecure_channel(sim_address)
        self.bank = bank_pb2_grpc.IssuingBankStub(self.channel)
        self.person = person

    async def fan_out(self, codes: list[str], per_bank_ms: int = 0, deadline_s: float = 60.0) -> str | None:
        requests = [bank_pb2.LookupCardsRequest(bank_code=c, id_number=self.person.id_number, name=self.person.name)
                    for c in codes]
        try:
            await asyncio.gather(*(self.bank.LookupCards(r, timeout=deadline_s) for r in requests))
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return None


async def settle(sim_address: str, connector_address: str, timeout_s: float = 30.0) -> None:
    """Waits until no bank call is in flight at bank_sim and bank_connector holds no request:
    each load run starts from idle, not from the previous run's leftovers."""
    deadline = time.perf_counter() + timeout_s
    async with grpc.aio.insecure_channel(sim_address) as sim, grpc.aio.insecure_channel(connector_address) as conn:
        control = bank_pb2_grpc.BankSimControlStub(sim)
        connector = bank_connector_pb2_grpc.BankConnectorStub(conn)
        while time.perf_counter() < deadline:
            banks = await control.GetBehaviour(bank_pb2.GetBehaviourRequest(), timeout=5)
            health = await connector.GetBankHealth(bank_connector_pb2.GetBankHealthRequest(), timeout=5)
            if not any(b.in_flight for b in banks.banks) and not health.requests_active + health.requests_queued:
                return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"bank_sim and bank_connector still busy after {timeout_s:.0f} s")


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


async def measure(connector: Target, reference: Target, sim_address: str, quick: bool) -> list[str]:
    verdicts = []
    window, warmup = (1.5, 0.4) if quick else (2.0, 0.5)
    targets = (connector, reference)
    for target in targets:  # connections up, code paths warm
        await target.sequential(list(BANK_CODES), 5)

    # 1. latency at concurrency 1
    count = 40 if quick else 150
    print(f"\n1. 24-bank fan-out at concurrency 1 ({count} fan-outs each, one of each in turn; floor {LATENCY_MS} ms)")
    print(f"{'':<17}{'p50 ms':>9}{'p99 ms':>9}{'p50-floor':>11}{'p99-floor':>11}{'failed':>8}")
    direct = Direct(sim_address, connector.person)
    await direct.sequential(list(BANK_CODES), 5)
    latency = {target.name: Run(0) for target in (*targets, direct)}
    for _ in range(count):  # in turn, so that a burst of the machine's other work lands on all three alike
        for target in (*targets, direct):
            taken = await target.sequential(list(BANK_CODES), 1)
            run = latency[target.name]
            run.completed += taken.completed
            run.failed += taken.failed
            run.latencies_ms += taken.latencies_ms
    for target in (*targets, direct):
        run = latency[target.name]
        p50, p99 = run.percentile(0.5), run.percentile(0.99)
        print(f"{target.name:<17}{_ms(p50):>9}{_ms(p99):>9}{_ms(p50 - LATENCY_MS):>11}{_ms(p99 - LATENCY_MS):>11}{run.failed:>8}")
    await direct.channel.close()
    run = latency[connector.name]
    ok = run.percentile(0.5) - LATENCY_MS <= 10 and run.percentile(0.99) - LATENCY_MS <= 25 and not run.failed
    bare = latency[reference.name]
    verdicts.append(
        f"latency at concurrency 1 (p50 <= floor+10, p99 <= floor+25): p50 +{run.percentile(0.5) - LATENCY_MS:.1f}, "
        f"p99 +{run.percentile(0.99) - LATENCY_MS:.1f} ms {'met' if ok else 'MISSED'}; over the reference: "
        f"p50 {run.percentile(0.5) - bare.percentile(0.5):+.1f}, p99 {run.percentile(0.99) - bare.percentile(0.99):+.1f} ms"
    )

    # 2 and 4. throughput: a sweep to find each one's peak, then 64 and 256 concurrent. The
    # machine is shared: each figure is the median of `rounds` windows, the two targets taking
    # turns, so that a burst of someone else's work lands on both alike.
    sweep = (8, 16, 32)
    rounds = 1 if quick else 5
    print(f"\n2. complete 24-bank fan-outs/s by concurrency (median of {rounds} x {window:.1f} s windows, taking turns)")
    print(f"{'concurrency':<12}" + "".join(f"{t.name + ' /s':>18}{'p99 ms':>9}{'CPU ms':>8}{'failed':>8}" for t in targets))
    runs: dict[tuple[str, int], Run] = {}
    for concurrency in (*sweep, 64, 256):
        taken: dict[str, list[Run]] = {t.name: [] for t in targets}
        for _ in range(rounds):
            for target in targets:
                taken[target.name].append(
                    await target.load(list(BANK_CODES), concurrency, window, warmup + (0.8 if concurrency >= 256 else 0))
                )
                await settle(sim_address, connector.address)
        line = f"{concurrency:<12}"
        for target in targets:
            ordered = sorted(taken[target.name], key=lambda r: r.per_second)
            run = ordered[len(ordered) // 2]
            merged: dict[str, int] = {}
            for r in ordered:
                for problem, n in r.failures.items():
                    merged[problem] = merged.get(problem, 0) + n
            run.failed, run.failures = sum(r.failed for r in ordered), merged
            runs[(target.name, concurrency)] = run
            line += f"{run.per_second:>18.1f}{_ms(run.percentile(0.99)):>9}{_ms(run.cpu_ms_each):>8}{run.failed:>8}"
        print(line, flush=True)
    peak = {t.name: max(run.per_second for (name, _), run in runs.items() if name == t.name) for t in targets}
    ratio = peak[connector.name] / peak[reference.name] if peak[reference.name] else math.nan
    print(f"peak: {connector.name} {peak[connector.name]:.1f}/s, {reference.name} {peak[reference.name]:.1f}/s, "
          f"ratio {ratio:.0%}")
    verdicts.append(f"saturation throughput >= 80 % of the reference: {ratio:.0%} {'met' if ratio >= 0.8 else 'MISSED'}")
    for concurrency in (64, 256):
        for target in targets:
            run = runs[(target.name, concurrency)]
            share = run.per_second / peak[target.name] if peak[target.name] else math.nan
            failures = ", ".join(f"{k} x{v}" for k, v in sorted(run.failures.items())) or "none"
            print(f"  {concurrency} concurrent, {target.name}: {share:.0%} of its peak; failed fan-outs: {failures}")
            if target is connector:
                ok = share >= 0.9 and run.failed == 0
                verdicts.append(f"{concurrency} concurrent: {share:.0%} of peak, {run.failed} failed "
                                f"(>= 90 %, none failed): {'met' if ok else 'MISSED'}")

    # 3. one bank hangs
    per_bank_ms = 1000
    hung = "ICBC"
    async with grpc.aio.insecure_channel(sim_address) as channel:
        control = bank_pb2_grpc.BankSimControlStub(channel)
        await control.SetBehaviour(
            bank_pb2.SetBehaviourRequest(bank_codes=[hung], behaviour=bank_pb2.BankBehaviour(hang_rate=1.0)), timeout=10
        )
        print(f"\n3. {hung} hangs; per-bank deadline {per_bank_ms} ms (3 fan-outs each, the worst shown)")
        print(f"{'':<16}{'other 23 by ms':>16}{'hung bank ms':>14}{'fan-out ms':>12}  hung bank's outcome")
        try:
            for target in targets:
                results = [await target.hanging(hung, per_bank_ms) for _ in range(3)]
                others, hung_at, total = (max(r[i] for r in results) for i in range(3))
                print(f"{target.name:<16}{others:>16.1f}{hung_at:>14.1f}{total:>12.1f}  {results[-1][3]}")
                if target is connector:
                    ok = others <= LATENCY_MS + 100 and per_bank_ms <= total <= per_bank_ms + 100
                    verdicts.append(f"one bank hanging: others by {others:.0f} ms, fan-out ended at {total:.0f} ms "
                                    f"(deadline {per_bank_ms}): {'met' if ok else 'MISSED'}")
        finally:
            await control.SetBehaviour(bank_pb2.SetBehaviourRequest(reset=True), timeout=10)

    # 5. K banks
    count, concurrency = (10, 16) if quick else (20, 16)
    print(f"\n5. K banks: latency at concurrency 1 ({count} fan-outs) and fan-outs/s at concurrency {concurrency}")
    print(f"{'K':<6}" + "".join(f"{t.name + ' p50':>20}{'p99':>8}{'/s':>8}" for t in targets))
    for k in (1, 6, 24, 48, 100):
        codes = (list(BANK_CODES) * math.ceil(k / len(BANK_CODES)))[:k]
        line = f"{k:<6}"
        for target in targets:
            sequential = await target.sequential(codes, count)
            loaded = await target.load(codes, concurrency, 1.0, warmup)
            line += f"{_ms(sequential.percentile(0.5)):>20}{_ms(sequential.percentile(0.99)):>8}{loaded.per_second:>8.1f}"
        print(line, flush=True)
    return verdicts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fanout")
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer samples")
    parser.add_argument("--tracing", choices=sorted(TRACING), default="sampled", help="bank_connector's tracing")
    parser.add_argument("--max-active", type=int, help="bank_connector's admission bound (its default otherwise)")
    args = parser.parse_args(argv)
    work = ROOT / "var" / "bench" / "fanout"
    work.mkdir(parents=True, exist_ok=True)
    person = dataset.pick_demo_person(dataset.generate(SEED, PEOPLE))
    sim_address = f"127.0.0.1:{free_port()}"
    connector_address = f"127.0.0.1:{free_port()}"
    reference_address = f"127.0.0.1:{free_port()}"
    started_at = time.monotonic()
    children: list[Child] = []
    try:
        children.append(start(
            "bank_sim", work, {"CARDCHECK_BANK_SIM_ADDR": sim_address, **TRACING["off"]}, sim_address,
            ["--seed", str(SEED), "--people", str(PEOPLE), "--bank-latency-ms", str(LATENCY_MS)],
        ))
        children.append(start(
            "bank_connector", work,
            {"CARDCHECK_BANK_SIM_ADDR": sim_address, "CARDCHECK_BANK_CONNECTOR_ADDR": connector_address,
             **TRACING[args.tracing],
             **({"CARDCHECK_BANK_CONNECTOR_MAX_ACTIVE": str(args.max_active)} if args.max_active else {})},
            connector_address,
        ))
        children.append(start(
            "bench._fanout_reference", work, {}, reference_address,
            ["--port", reference_address.rpartition(":")[2], "--bank-sim", sim_address],
        ))
        print(f"bank_sim, bank_connector (tracing {args.tracing}) and the reference up in "
              f"{time.monotonic() - started_at:.1f} s; every bank at {LATENCY_MS} ms")

        async def run() -> list[str]:
            connector = Target("bank_connector", connector_address, person, children[1].process.pid)
            reference = Target("reference", reference_address, person, children[2].process.pid)
            try:
                return await measure(connector, reference, sim_address, args.quick)
            finally:
                await connector.channel.close()
                await reference.channel.close()

        # the load generator on the services' loop too; its clock (uv_now) counts whole
        # milliseconds, so every figure here is timed with time.perf_counter instead
        verdicts = uvloop.run(run())
    finally:
        for child in reversed(children):
            child.stop()
    print("\nverdicts (bank_connector):")
    for verdict in verdicts:
        print(f"  {verdict}")
    print(f"\n(run took {time.monotonic() - started_at:.0f} s)")
    return 0
