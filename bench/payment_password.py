"""The cost of checking a payment password, measured in one run.

    python -m bench payment_password [--seconds=1.5] [--rounds=3] [--users=48] [--in-flight=16]

1. CPU-seconds per verification and verifications per second (one thread, and one thread per
   usable core) of: (a) argon2-cffi's defaults (argon2id, 64 MiB, t=3, p=4), what the gateway
   stored before; (b) the keyed hash it stores now (HMAC-SHA256 under a subkey of the master
   key, gateway/payment_passwords.py); (c) for reference, OWASP's minimum argon2id (19 MiB,
   t=2, p=1), the cheapest memory-hard alternative. CPU time is the process's (argon2's lanes
   run on threads of their own), so it does not depend on what else the machine is doing.
2. GetReport per second through a real gateway built in this process (its SQLite database, a
   small report_service answering GetReport, the client in the same process), `--in-flight`
   calls at a time: first on users whose hash is today's default argon2 (each user's first
   GetReport checks it and stores it again under the keyed scheme, as after a deploy), then on
   the same users with the keyed hash.

The machine is shared and noisy: the candidates of (1) are measured in interleaved rounds, each
figure is the median over the rounds, and the ratios are the medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from argon2 import PasswordHasher, Type
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from sqlmodel import Session

from cardcheck.runtime.clock import SystemClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import load_keyring
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings
from cardcheck.runtime.telemetry import make_tracer_provider
from cardcheck.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, report_service_pb2_grpc
from gateway.config import GatewayConfig
from gateway.payment_passwords import PaymentPasswordHashes, usable_cores
from gateway.sessions import Sessions
from gateway.users import Identity, UserRow, Users

PASSWORD = "135790"
USER_ID = "00000000-0000-4000-8000-000000000001"

# --- 1. one verification ------------------------------------------------------------------------


def _candidates() -> dict[str, Callable[[], object]]:
    default = PasswordHasher()
    default_hash = default.hash(PASSWORD)
    owasp = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, type=Type.ID)
    owasp_hash = owasp.hash(PASSWORD)
    keyed = PaymentPasswordHashes(b"k" * 32)
    keyed_hash = keyed.hash(USER_ID, PASSWORD)
    return {
        "(a) argon2 defaults": lambda: default.verify(default_hash, PASSWORD),
        "(b) keyed HMAC-SHA256": lambda: keyed.verify(USER_ID, keyed_hash, PASSWORD),
        "(c) argon2id 19 MiB t=2": lambda: owasp.verify(owasp_hash, PASSWORD),
    }


def _one_thread(verify: Callable[[], object], seconds: float) -> tuple[float, float]:
    """CPU-seconds per verification and verifications per second, one after another."""
    count, cpu, wall = 0, time.process_time(), time.perf_counter()
    deadline = wall + seconds
    while True:
        for _ in range(16 if count >= 16 else 1):
            verify()
            count += 1
        if time.perf_counter() >= deadline:
            break
    return (time.process_time() - cpu) / count, count / (time.perf_counter() - wall)


def _all_cores(verify: Callable[[], object], seconds: float, threads: int) -> float:
    """Verifications per second with one thread per core, as the gateway's executor runs them."""
    deadline = time.perf_counter() + seconds

    def work() -> int:
        done = 0
        while time.perf_counter() < deadline or done == 0:
            verify()
            done += 1
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda _: work(), range(threads)))
    return total / (time.perf_counter() - start)


def verification_costs(seconds: float, rounds: int) -> None:
    candidates = _candidates()
    threads = usable_cores()
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    rate: dict[str, list[float]] = {name: [] for name in candidates}
    parallel: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, verify in candidates.items():
            per, per_s = _one_thread(verify, seconds / 2)
            cpu[name].append(per)
            rate[name].append(per_s)
            parallel[name].append(_all_cores(verify, seconds / 2, threads))
    print(f"1. one payment password verification ({rounds} rounds, median; {threads} usable cores)")
    print(f"   {'scheme':26} {'CPU per check':>14} {'checks/s, 1 thread':>19} {f'checks/s, {threads} threads':>20}")
    for name in candidates:
        per = statistics.median(cpu[name])
        shown = f"{per * 1e3:.1f} ms" if per >= 1e-3 else f"{per * 1e6:.1f} µs"
        print(
            f"   {name:26} {shown:>14} {statistics.median(rate[name]):>19,.0f}"
            f" {statistics.median(parallel[name]):>20,.0f}"
        )
    a, b, c = candidates
    cpu_ratio = statistics.median(x / y for x, y in zip(cpu[a], cpu[b], strict=True))
    owasp_ratio = statistics.median(x / y for x, y in zip(cpu[a], cpu[c], strict=True))
    print(f"   (a)/(b) CPU per check: {cpu_ratio:,.0f}x; (a)/(c): {owasp_ratio:.1f}x")
    search = statistics.median(cpu[a]) * 1e6 / 3600
    print(
        f"   a search of all 10^6 passwords: (a) {search:.0f} CPU-hours per account from a dump alone;"
        f" (c) {statistics.median(cpu[c]) * 1e6 / 3600:.0f} CPU-hours; (b) impossible without the key"
    )


# --- 2. GetReport through a real gateway -----------------------------------------------------------


class _Reports(report_service_pb2_grpc.ReportServiceServicer):
    async def GetReport(self, request, context):
        return common_pb2.Report(
            query_id=request.query_id,
            summary=[common_pb2.BankSummary(bank_code="ICBC", bank_name="中国工商银行", debit_count=1)],
        )


async def _users_with_old_hashes(settings: Settings, count: int) -> list[str]:
    """`count` users (and a session each) whose stored hash is today's default argon2, as rows
    the gateway wrote before the keyed scheme. Returns their session tokens."""
    db = Database(make_engine(None, settings.data_dir, "gateway"))
    keyring = load_keyring(None, None, settings.data_dir)
    clock = SystemClock()
    users, sessions = Users(db, keyring, clock), Sessions(db, keyring, clock)
    old_hash = PasswordHasher().hash(PASSWORD)
    tokens = []
    for n in range(count):
        user = await users.create(
            Identity(f"用户{n}", f"11010119800101{n:03d}1", f"1380000{n:04d}"), "CN-BJ", PASSWORD, "ICBC"
        )

        def store(session: Session, user_id: str = user.user_id) -> None:
            row = session.get(UserRow, user_id)
            row.payment_password_hash = old_hash
            session.add(row)

        await db.run(store)
        tokens.append((await sessions.open(user.user_id)).token)
    users.close()
    db.dispose()
    return tokens


async def _drive(stub: gateway_pb2_grpc.CardCheckStub, tokens: list[str], calls: int, in_flight: int) -> float:
    """`calls` GetReports, round-robin over the users, `in_flight` at a time: calls per second."""
    queue = list(range(calls))
    failures: list[BaseException] = []

    async def worker() -> None:
        while queue:
            n = queue.pop()
            request = gateway_pb2.GetReportRequest(query_id="q1", payment_password=PASSWORD)
            try:
                await stub.GetReport(request, metadata=(("authorization", f"Bearer {tokens[n % len(tokens)]}"),))
            except grpc.aio.AioRpcError as error:
                failures.append(error)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} GetReports failed, e.g. {failures[0]}")
    return calls / elapsed


async def get_report_rates(user_count: int, in_flight: int, seconds: float) -> None:
    from gateway.app import build

    with tempfile.TemporaryDirectory(prefix="bench-payment-password-") as tmp:
        data_dir = Path(tmp)
        reports = grpc.aio.server()
        report_service_pb2_grpc.add_ReportServiceServicer_to_server(_Reports(), reports)
        reports_port = reports.add_insecure_port("127.0.0.1:0")
        await reports.start()
        addresses = {service: f"127.0.0.1:{port}" for service, port in DEFAULT_PORTS.items()}
        addresses.update(gateway="127.0.0.1:0", report_service=f"127.0.0.1:{reports_port}")
        settings = Settings(addresses=addresses, data_dir=data_dir)
        # Unlimited per-user budget: this measures the checks, not the limiter.
        config = GatewayConfig(report_user_per_minute=1e9, report_user_burst=1e9)
        host = await build(
            settings,
            config=config,
            tracer_provider=make_tracer_provider(
                "gateway", data_dir, exporter=InMemorySpanExporter(), sampler=ALWAYS_OFF
            ),
        )
        port = await host.start()
        tokens = await _users_with_old_hashes(settings, user_count)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = gateway_pb2_grpc.CardCheckStub(channel)
        try:
            cpu = time.process_time()
            before = await _drive(stub, tokens, user_count, in_flight)
            before_cpu = (time.process_time() - cpu) / user_count
            # Every hash is keyed now; warm, then as many calls as take about `seconds`.
            await _drive(stub, tokens, 200, in_flight)
            probe = await _drive(stub, tokens, 500, in_flight)
            calls = max(500, int(probe * seconds))
            cpu = time.process_time()
            after = await _drive(stub, tokens, calls, in_flight)
            after_cpu = (time.process_time() - cpu) / calls
        finally:
            await channel.close()
            await host.stop(0)
            await reports.stop(0)
        rows = Database(make_engine(None, data_dir, "gateway"))
        with rows.session() as session:
            upgraded = sum(
                1 for row in session.exec(UserRow.__table__.select()).all()
                if row.payment_password_hash.startswith("hmac-sha256$")
            )
        rows.dispose()
    print(f"\n2. GetReport through a real gateway ({in_flight} in flight, client and gateway in this process)")
    print(f"   old argon2-default hashes ({user_count} users, each upgraded): {before:8,.1f} GetReport/s,"
          f" {before_cpu * 1e3:6.1f} ms CPU each")
    print(f"   keyed hashes ({calls} calls):{'':22} {after:8,.1f} GetReport/s, {after_cpu * 1e3:6.1f} ms CPU each")
    print(f"   after/before: {after / before:.1f}x; hashes upgraded: {upgraded}/{user_count}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench payment_password")
    parser.add_argument("--seconds", type=float, default=1.5, help="per candidate and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=48, help="users with an old hash for part 2")
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args(argv)
    verification_costs(args.seconds, args.rounds)
    asyncio.run(get_report_rates(args.users, args.in_flight, args.seconds * 2))
    return 0
