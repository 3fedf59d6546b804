"""The gateway's peak memory under oversized requests: a signed-in user sends SubmitQuery with
~1.3 million junk bank codes (3.9 MB, under grpc's default 4 MiB receive limit) three times.

    python -m bench oversized [--codes N] [--requests N]

Two gateways as real processes, beside one bank_sim, bank_connector and notifier (registration
needs them): one with its own receive limit (gateway/app.py, 32 KiB), one with the limit set back
to grpc's default (CARDCHECK_GATEWAY_MAX_RECEIVE_BYTES=4194304), so that one run shows both.
For each: what the requests were answered, how long each took, and the gateway's peak resident
memory (VmHWM, reset to the resident size first) before and after them."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from dataclasses import dataclass

import grpc

from bank_sim.process import ROOT, Child, PeakMemory, free_port
from bench._processes import start
from cardcheck import dataset
from cardcheck.cli.demo import Journey
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings
from cardcheck.v1 import common_pb2, gateway_pb2

SEED, PEOPLE = 20261124, 50
GRPC_DEFAULT = 4 * 1024 * 1024
QUIET = {"CARDCHECK_LOG_LEVEL": "WARNING", "OTEL_SDK_DISABLED": "true"}


@dataclass
class Figures:
    limit: str
    answers: list[str]
    seconds: list[float]
    peak_before_kb: int
    peak_after_kb: int
    resident_after_kb: int

    @property
    def growth_mb(self) -> float:
        return (self.peak_after_kb - self.peak_before_kb) / 1024


async def measure(limit: str, gateway: Child, notifier: str, person: dataset.Person, junk: bytes,
                  requests: int) -> Figures:
    addresses = {service: f"127.0.0.1:{port}" for service, port in DEFAULT_PORTS.items()}
    addresses.update(gateway=gateway.address, notifier=notifier)
    journey = Journey(Settings(addresses=addresses), person, "258013")
    try:
        challenge_id, code = await journey.sms_code(common_pb2.SMS_PURPOSE_REGISTER)
        session = await journey.call(
            journey.gateway.Register,
            gateway_pb2.RegisterRequest(
                name=person.name, id_number=person.id_number, phone=person.phone, challenge_id=challenge_id,
                sms_code=code, card_number=person.card_number, payment_password=journey.payment_password,
                region=person.region,
            ),
        )
        metadata = (("authorization", f"Bearer {session.session_token}"),)
        submit = journey.gateway_channel.unary_unary("/cardcheck.v1.CardCheck/SubmitQuery")
        peak = PeakMemory(gateway.process.pid)
        peak.reset()
        before = peak.peak_kb()
        answers, seconds = [], []
        for _ in range(requests):
            started = time.perf_counter()
            try:
                await submit(junk, metadata=metadata, timeout=300)
                answers.append("OK")
            except grpc.aio.AioRpcError as error:
                answers.append(error.code().name)
            seconds.append(time.perf_counter() - started)
        await asyncio.sleep(0.2)
        return Figures(limit, answers, seconds, before, peak.peak_kb(), peak.resident_kb())
    finally:
        await journey.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench oversized")
    parser.add_argument("--codes", type=int, default=1_300_000, help="junk bank codes per request")
    parser.add_argument("--requests", type=int, default=3, help="oversized requests per gateway")
    args = parser.parse_args(argv)
    junk = gateway_pb2.SubmitQueryRequest(bank_codes=["!"] * args.codes).SerializeToString()
    work = ROOT / "var" / "bench" / "oversized"
    shutil.rmtree(work, ignore_errors=True)
    person = dataset.pick_demo_person(dataset.generate(SEED, PEOPLE))
    sim, connector, notifier = (f"127.0.0.1:{free_port()}" for _ in range(3))
    children: list[Child] = []
    figures = []
    try:
        children.append(start("bank_sim", work / "bank_sim", {**QUIET, "CARDCHECK_BANK_SIM_ADDR": sim},
                              sim, ["--seed", str(SEED), "--people", str(PEOPLE)]))
        children.append(start("bank_connector", work / "bank_connector",
                              {**QUIET, "CARDCHECK_BANK_SIM_ADDR": sim, "CARDCHECK_BANK_CONNECTOR_ADDR": connector}, connector))
        children.append(start("notifier", work / "notifier", {**QUIET, "CARDCHECK_NOTIFIER_ADDR": notifier}, notifier))
        for name, extra in (
            ("32 KiB (gateway/app.py)", {}),
            ("4 MiB (grpc's default)", {"CARDCHECK_GATEWAY_MAX_RECEIVE_BYTES": str(GRPC_DEFAULT)}),
        ):
            address = f"127.0.0.1:{free_port()}"
            gateway = start("gateway", work / f"gateway-{len(figures)}", {
                **QUIET, "CARDCHECK_GATEWAY_ADDR": address, "CARDCHECK_NOTIFIER_ADDR": notifier,
                "CARDCHECK_BANK_CONNECTOR_ADDR": connector, **extra,
            }, address)
            children.append(gateway)
            print(f"measuring the gateway with a receive limit of {name} ...", flush=True)
            figures.append(asyncio.run(measure(name, gateway, notifier, person, junk, args.requests)))
            gateway.stop()
    finally:
        for child in reversed(children):
            child.stop()
    print(f"\n{args.requests} SubmitQuery calls, each {args.codes:,} junk bank codes ({len(junk) / 1e6:.2f} MB), "
          "from a signed-in user")
    print(f"{'receive limit':<26}{'answers':<21}{'VmHWM before':>13}{'after':>10}{'growth':>10}"
          f"{'VmRSS after':>13}   seconds each")
    for f in figures:
        answers = ", ".join(sorted(set(f.answers)))
        print(f"{f.limit:<26}{answers:<21}{f.peak_before_kb / 1024:>10.0f} MB{f.peak_after_kb / 1024:>7.0f} MB"
              f"{f.growth_mb:>7.0f} MB{f.resident_after_kb / 1024:>10.0f} MB   "
              + " ".join(f"{t:.2f}" for t in f.seconds))
    bounded = figures[0]
    ok = set(bounded.answers) == {"RESOURCE_EXHAUSTED"} and bounded.growth_mb < 50
    print(f"\nbounded gateway: every call RESOURCE_EXHAUSTED and peak growth under 50 MB: {'yes' if ok else 'NO'}")
    return 0 if ok else 1
