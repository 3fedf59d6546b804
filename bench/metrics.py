"""`python -m bench metrics [--seconds S] [--rounds N]`: what serving metrics costs. Two
bank_connectors against one bank_sim (banks answering at once), one with metrics on
(CARDCHECK_METRICS=on, the default) and one off, driven in alternating rounds by the same
closed-loop load of 24-bank fan-outs; prints fan-outs per second and CPU per fan-out of each,
and their ratio (target: on costs at most 5 % of throughput). Tracing is off in both, so the
figure is metrics' own cost."""

from __future__ import annotations

import argparse
import statistics
import time

import uvloop

from bank_sim.process import ROOT, Child, free_port
from bench._processes import start
from bench.fanout import PEOPLE, SEED, TRACING, Target, settle
from cardcheck import dataset
from cardcheck.banks import BANK_CODES

CONCURRENCY = 16


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench metrics")
    parser.add_argument("--seconds", type=float, default=2.0, help="each round's measured window")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    work = ROOT / "var" / "bench" / "metrics"
    work.mkdir(parents=True, exist_ok=True)
    person = dataset.pick_demo_person(dataset.generate(SEED, PEOPLE))
    sim = f"127.0.0.1:{free_port()}"
    addresses = {"on": f"127.0.0.1:{free_port()}", "off": f"127.0.0.1:{free_port()}"}
    children: list[Child] = []
    try:
        children.append(start("bank_sim", work, {"CARDCHECK_BANK_SIM_ADDR": sim, "CARDCHECK_METRICS": "off",
                                                 **TRACING["off"]}, sim, ["--seed", str(SEED), "--people", str(PEOPLE)]))
        pids = {}
        for mode, address in addresses.items():
            child = start("bank_connector", work, {
                "CARDCHECK_BANK_SIM_ADDR": sim, "CARDCHECK_BANK_CONNECTOR_ADDR": address,
                "CARDCHECK_METRICS": mode, **TRACING["off"]}, address)
            children.append(child)
            pids[mode] = child.process.pid

        async def run() -> dict[str, list[tuple[float, float]]]:
            targets = {mode: Target(f"metrics {mode}", address, person, pids[mode]) for mode, address in addresses.items()}
            for address in addresses.values():
                await settle(sim, address)
            figures: dict[str, list[tuple[float, float]]] = {mode: [] for mode in targets}
            try:
                for _ in range(args.rounds):
                    for mode, target in targets.items():
                        result = await target.load(list(BANK_CODES), CONCURRENCY, args.seconds, warmup=0.5)
                        figures[mode].append((result.per_second, result.cpu_ms_each))
            finally:
                for target in targets.values():
                    await target.channel.close()
            return figures

        started = time.monotonic()
        figures = uvloop.run(run())
    finally:
        for child in reversed(children):
            child.stop()
    rate = {mode: statistics.median(r for r, _ in runs) for mode, runs in figures.items()}
    cpu = {mode: statistics.median(c for _, c in runs) for mode, runs in figures.items()}
    for mode in ("off", "on"):
        print(f"metrics {mode:>3}: {rate[mode]:8.1f} fan-outs/s  {cpu[mode]:6.2f} ms CPU each  "
              f"(rounds: {', '.join(f'{r:.0f}' for r, _ in figures[mode])})")
    # Paired by round (the two ran back to back), then the median: steadier on a shared machine.
    ratio = statistics.median(on[0] / off[0] for on, off in zip(figures["on"], figures["off"], strict=True))
    cpu_ratio = statistics.median(on[1] / off[1] for on, off in zip(figures["on"], figures["off"], strict=True))
    print(f"throughput with metrics on / off: {ratio:.3f}; CPU per fan-out on / off: {cpu_ratio:.3f} "
          "(medians of the rounds' ratios)")
    print(f"verdict: {'PASS' if ratio >= 0.95 else 'FAIL'} (on costs at most 5 % of throughput)  "
          f"(run took {time.monotonic() - started:.0f} s)")
    return 0
