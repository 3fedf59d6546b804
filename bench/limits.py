"""Rate limiting and load shedding, measured in one run.

    python -m bench limits [--seconds=1.25] [--rounds=4] [--in-flight=64] [--redis=redis://...]

1. Limiter decisions per second: the gateway's in-process bucket and its Redis backend (GCRA in
   one Lua script, one EVALSHA a decision) beside the `limits` package (a widely used peer) with
   its in-memory storage and its async Redis storage (moving and fixed window) on the same
   Redis, with one decision in flight and with 32.
2. SubmitQuery throughput through a real gateway process while every request is refused by the
   global admission limit (SERVICE_BUSY), beside a bare grpc.aio server answering the same
   method with an empty Query. Both are driven by the same client in this process. Target:
   shedding at least 50 % of the echo's throughput. For reading the figure, three more servers:
   the bare echo behind the runtime's tracing interceptor (what every service pays per call,
   gateway or not), the gateway with tracing sampled off (OTEL_TRACES_SAMPLER=always_off), and
   the gateway with its limits on Redis, and the gateway with metrics off (CARDCHECK_METRICS=off:
   the cost of metrics, target at most 5 % of throughput). The server's own CPU time per request (from /proc)
   does not depend on whether the client or the server is the bottleneck, nor much on what
   else the machine is running: the echo's CPU per request over the gateway's is printed too.

The machine is shared and noisy: candidates are measured in interleaved rounds and each figure
is the median over the rounds; a ratio is the median of the per-round ratios.

The session token the load carries is minted with the gateway's master key (passed to the
process): it is authentic, so each request goes through the signature check, the user's own
limit and the global limit, as a real user's would; shed requests never reach the database.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from bank_sim.process import free_port
from bench._processes import cpu_seconds, start
from cardcheck.runtime.clock import SystemClock
from cardcheck.runtime.errors import from_rpc_error
from cardcheck.runtime.keys import Keyring
from cardcheck.v1 import common_pb2, gateway_pb2

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = "/cardcheck.v1.CardCheck/SubmitQuery"
KEYS = [f"user-{i}" for i in range(1000)]

# --- 1. limiter decisions ------------------------------------------------------------------------


async def _decisions(decide: Callable[[str], Awaitable[object]], seconds: float, in_flight: int) -> float:
    """Decisions per second with `in_flight` concurrent callers."""
    count = 0
    stop_at = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal count
        i = offset
        while time.perf_counter() < stop_at:
            for _ in range(50):
                await decide(KEYS[i % len(KEYS)])
                i += 7
            count += 50

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    return count / (time.perf_counter() - started)


@dataclass
class Candidate:
    name: str
    store: str
    in_flight: int
    decide: Callable[[str], Awaitable[object]]
    rates: list[float] = field(default_factory=list)


async def limiter_table(redis_url: str, seconds: float, rounds: int) -> list[Candidate]:
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import MemoryStorage, RedisStorage
    from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

    from gateway.limits import Rate, RedisLimiter, RedisStore, TokenBucketLimiter

    rate = Rate(per_second=100, burst=100)
    item = RateLimitItemPerSecond(100)
    prefix = f"cardcheck-bench-{secrets.token_hex(4)}"
    uri = redis_url.replace("redis://", "async+redis://", 1)

    local = TokenBucketLimiter.of(rate, SystemClock())
    memory_moving = MovingWindowRateLimiter(MemoryStorage())
    memory_fixed = FixedWindowRateLimiter(MemoryStorage())
    store = RedisStore.from_url(redis_url, prefix=prefix, timeout_s=5)  # measure, never fail over
    shared = RedisLimiter(store, "bench", rate)
    # One storage per strategy: their keys would collide (same prefix, item and identifier).
    moving = MovingWindowRateLimiter(RedisStorage(uri, implementation="redispy", key_prefix=f"{prefix}-mw"))
    fixed = FixedWindowRateLimiter(RedisStorage(uri, implementation="redispy", key_prefix=f"{prefix}-fw"))

    candidates = [
        Candidate("cardcheck TokenBucketLimiter (GCRA)", "in process", 1, local.acquire),
        Candidate(
            "limits MemoryStorage + MovingWindow", "in process", 1, lambda k: memory_moving.hit(item, k)
        ),
        Candidate("limits MemoryStorage + FixedWindow", "in process", 1, lambda k: memory_fixed.hit(item, k)),
    ]
    for in_flight in (1, 32):
        candidates += [
            Candidate("cardcheck RedisLimiter (GCRA, Lua)", "redis", in_flight, shared.acquire),
            Candidate(
                "limits RedisStorage + MovingWindow", "redis", in_flight, lambda k: moving.hit(item, k)
            ),
            Candidate("limits RedisStorage + FixedWindow", "redis", in_flight, lambda k: fixed.hit(item, k)),
        ]
    try:
        for candidate in candidates:  # warm up: connections, scripts loaded
            await candidate.decide("warm")
        for _ in range(rounds):
            for candidate in candidates:
                candidate.rates.append(await _decisions(candidate.decide, seconds, candidate.in_flight))
    finally:
        with contextlib.suppress(Exception):
            keys = [key async for key in store.client.scan_iter(match=f"{prefix}*")]
            if keys:
                await store.client.delete(*keys)
        await store.close()
    return candidates


# --- 2. shedding ----------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    address: str
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    answers: Counter = field(default_factory=Counter)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def _until_answering(server: Server, metadata, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_unary(SUBMIT, request_serializer=lambda m: m.SerializeToString())
        while True:
            try:
                await call(gateway_pb2.SubmitQueryRequest(), metadata=metadata, timeout=2)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return  # answering (a refusal is an answer)
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} did not come up")
            await asyncio.sleep(0.2)


async def _drive(server: Server, metadata, seconds: float, in_flight: int, channels: int = 4) -> None:
    """`in_flight` concurrent callers over `channels` channels for `seconds` after a warm-up."""
    opened = [grpc.aio.insecure_channel(server.address) for _ in range(channels)]
    calls = [
        c.unary_unary(
            SUBMIT,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=common_pb2.Query.FromString,
        )
        for c in opened
    ]
    request = gateway_pb2.SubmitQueryRequest()
    measuring = False
    count = 0

    async def worker(n: int, stop_at: float) -> None:
        nonlocal count
        call = calls[n % channels]
        while time.perf_counter() < stop_at:
            try:
                await call(request, metadata=metadata, timeout=30)
                reason = "OK"
            except grpc.aio.AioRpcError as error:
                typed = from_rpc_error(error)
                reason = typed.reason if typed is not None else error.code().name
            if measuring:
                count += 1
                server.answers[reason] += 1

    try:
        warm_until = time.perf_counter() + 0.5
        await asyncio.gather(*(worker(n, warm_until) for n in range(in_flight)))
        measuring = True
        cpu_before = cpu_seconds(server.process.pid)
        started = time.perf_counter()
        await asyncio.gather(*(worker(n, started + seconds) for n in range(in_flight)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(server.process.pid) - cpu_before
    finally:
        for channel in opened:
            await channel.close()
    server.rps.append(count / elapsed)
    server.cpu_us.append(cpu / max(count, 1) * 1e6)


def _start_echo(name: str, traced_dir: Path | None) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bench.limits", "--echo-server", str(port)]
    if traced_dir is not None:
        argv.append(str(traced_dir))
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server(name, process, f"127.0.0.1:{port}")


def _start_gateway(name: str, data_dir: Path, master_key: str, **extra_env: str) -> Server:
    address = f"127.0.0.1:{free_port()}"
    env = dict(
        CARDCHECK_GATEWAY_ADDR=address,
        CARDCHECK_MASTER_KEY=master_key,
        # One admission, then one per ~12 days: every request after the first is shed.
        CARDCHECK_SUBMIT_GLOBAL_RPS="0.000001",
        CARDCHECK_SUBMIT_GLOBAL_BURST="1",
        # The user's own limit admits everything, so the global limit is what answers.
        CARDCHECK_SUBMIT_USER_PER_MINUTE="1000000000",
        CARDCHECK_SUBMIT_USER_BURST="1000000000",
        **extra_env,
    )
    return Server(name, start("gateway", data_dir, env, address).process, address)


def _token(master_key: str) -> str:
    from gateway.sessions import SessionTokens

    tokens = SessionTokens(Keyring(base64.b64decode(master_key)).subkey("session-token"))
    return tokens.sign(secrets.token_urlsafe(16), str(uuid.uuid4()), datetime.now(UTC) + timedelta(hours=1))


async def shedding_table(redis_url: str, seconds: float, rounds: int, in_flight: int) -> list[Server]:
    master_key = base64.b64encode(os.urandom(32)).decode()
    metadata = (("authorization", f"Bearer {_token(master_key)}"),)
    prefix = f"cardcheck-bench-{secrets.token_hex(4)}"
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="cardcheck-bench-") as tmp:
        data = Path(tmp)
        try:
            # One after the other: the gateways share one data dir (SQLite tables, spans).
            for start in (
                lambda: _start_echo("echo (bare grpc.aio)", None),
                lambda: _start_echo("echo + tracing", data / "echo"),
                lambda: _start_gateway("gateway", data, master_key),
                lambda: _start_gateway("gateway, metrics off", data, master_key, CARDCHECK_METRICS="off"),
                lambda: _start_gateway(
                    "gateway, tracing off", data, master_key, OTEL_TRACES_SAMPLER="always_off"
                ),
                lambda: _start_gateway(
                    "gateway, redis limits",
                    data,
                    master_key,
                    CARDCHECK_REDIS_URL=redis_url,
                    CARDCHECK_REDIS_KEY_PREFIX=prefix,
                    CARDCHECK_REDIS_TIMEOUT_S="5",
                ),
            ):
                servers.append(start())
                await _until_answering(servers[-1], metadata)
            for round_ in range(rounds):
                # Each round starts one server further on: the one driven right after another
                # server's load came out measurably slower, whichever it was.
                shift = round_ % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    await _drive(server, metadata, seconds, in_flight)
        finally:
            for server in servers:
                server.stop()
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
    return servers


# --- the echo server ------------------------------------------------------------------------------


async def _serve_echo(port: int, traced_dir: Path | None) -> None:
    async def submit(request, context):
        return common_pb2.Query()

    interceptors = []
    if traced_dir is not None:  # the runtime's tracing, as every service has it
        from cardcheck.runtime.telemetry import make_tracer_provider, server_interceptors

        interceptors = server_interceptors(make_tracer_provider("echo", traced_dir))
    server = grpc.aio.server(interceptors=interceptors)
    handler = grpc.unary_unary_rpc_method_handler(
        submit,
        request_deserializer=gateway_pb2.SubmitQueryRequest.FromString,
        response_serializer=common_pb2.Query.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("cardcheck.v1.CardCheck", {"SubmitQuery": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


# --- the tables -----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench limits")
    parser.add_argument("--seconds", type=float, default=1.25, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (median reported)")
    parser.add_argument("--in-flight", type=int, default=64, help="concurrent SubmitQuery calls")
    parser.add_argument("--redis", default=os.environ.get("CARDCHECK_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args(argv)

    print(
        f"limiter decisions per second (median of {args.rounds} rounds of {args.seconds:g} s; {args.redis})",
        flush=True,
    )
    candidates = asyncio.run(limiter_table(args.redis, args.seconds, args.rounds))
    print(f"{'limiter':<38} {'store':<11} {'in flight':>9} {'decisions/s':>12}")
    for c in candidates:
        print(f"{c.name:<38} {c.store:<11} {c.in_flight:>9} {statistics.median(c.rates):>12,.0f}")

    print(
        f"\nSubmitQuery, every gateway request shed by the global limit ({args.in_flight} in flight, "
        f"median of {args.rounds} rounds of {args.seconds:g} s)",
        flush=True,
    )
    servers = asyncio.run(shedding_table(args.redis, args.seconds, args.rounds, args.in_flight))
    echo = servers[0]
    print(f"{'server':<24} {'requests/s':>11} {'vs echo':>8} {'server CPU µs/req':>18}  answers")
    for server in servers:
        ratio = statistics.median(r / e for r, e in zip(server.rps, echo.rps, strict=True))
        total = sum(server.answers.values())
        answers = ", ".join(f"{reason} {n / total:.1%}" for reason, n in server.answers.most_common())
        print(
            f"{server.name:<24} {statistics.median(server.rps):>11,.0f} {ratio:>8.0%} "
            f"{statistics.median(server.cpu_us):>18,.0f}  {answers}"
        )
    gateway = servers[2]
    ratio = statistics.median(r / e for r, e in zip(gateway.rps, echo.rps, strict=True))
    cost = statistics.median(echo.cpu_us) / statistics.median(gateway.cpu_us)
    print(
        f"\ntarget: the gateway sheds at >= 50% of the bare echo's throughput: {ratio:.0%} "
        f"({'met' if ratio >= 0.5 else 'MISSED'}); by server CPU per request it is {cost:.0%} "
        f"as cheap as the echo"
    )
    unmetered = servers[3]
    kept = statistics.median(g / u for g, u in zip(gateway.rps, unmetered.rps, strict=True))
    cpu = statistics.median(gateway.cpu_us) / statistics.median(unmetered.cpu_us)
    print(
        f"target: metrics cost the shedding gateway <= 5% of its throughput: metrics on / off "
        f"{kept:.1%} of the requests/s ({'met' if kept >= 0.95 else 'MISSED'}), {cpu:.1%} of the server CPU per request"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--echo-server":
        asyncio.run(_serve_echo(int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else None))
    else:
        sys.exit(main(sys.argv[1:]))
