"""`cardcheck up`: the five services as real processes on loopback, on the embedded default.

Children run in their own session so that Ctrl-C reaches only this supervisor, which then stops
them in order (the public edge first, the banks last). Each child also gets SIGTERM if the
supervisor itself dies, so nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cardcheck.load import LOAD_TEST_PEOPLE
from cardcheck.runtime.access import OPERATOR
from cardcheck.runtime.certs import missing, write_development_set
from cardcheck.runtime.files import private_directory
from cardcheck.runtime.security import operator_channel
from cardcheck.runtime.settings import Settings, SettingsError

START_ORDER = ("bank_sim", "bank_connector", "notifier", "report_service", "gateway")
# `--load-test`: the limits that stop one machine from driving a load test, raised. One machine
# is one caller to the gateway for every phone it registers, and it runs again on the same
# phones; the limits per user and per session stay as they are (a load test runs one journey per
# user), and so do the capacity bounds (queues, concurrency), which are what it measures.
LOAD_TEST_ENV = {
    "CARDCHECK_SMS_CALLER_PER_HOUR": "10000000",  # each caller's SMS codes: 60 an hour
    "CARDCHECK_SMS_CALLER_BURST": "100000",  # and a burst of 20
    "CARDCHECK_SMS_ESCALATION_S": "1",  # each caller's cooldowns per phone: 60 s up to 1 h
    "CARDCHECK_SMS_RESEND_S": "1",  # a phone's next code of a purpose: 60 s (runs again on the same phones)
    "CARDCHECK_SMS_PHONE_DAILY_CAP": "10000",  # a phone's anonymous codes a day: 8
    "CARDCHECK_SMS_CAP_SMS_CODE": "off",  # notifier's code SMS per phone: 10/h, 20/d
    "CARDCHECK_SUBMIT_GLOBAL_RPS": "100000",  # SubmitQuery admitted a second over all users: 50
    "CARDCHECK_SUBMIT_GLOBAL_BURST": "100000",  # and its burst of 100
}

STOP_ORDER = tuple(reversed(START_ORDER))
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    pump: asyncio.Task | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


def _say(message: str) -> None:
    print(f"cardcheck up: {message}", flush=True)


async def _pump(child: Child, width: int) -> None:
    assert child.process is not None and child.process.stdout is not None
    prefix = f"{child.name:<{width}} | "
    async for raw in child.process.stdout:
        sys.stdout.write(prefix + raw.decode("utf-8", "replace"))
        sys.stdout.flush()


async def _wait_serving(name: str, settings: Settings, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    address = settings.addresses[name]
    async with operator_channel(settings, name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                # grpcio-health-checking's stubs declare HealthStub without its methods.
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)  # type: ignore[attr-defined]
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{name} not SERVING on {address}")
            await asyncio.sleep(0.1)


async def _stop(child: Child, grace: float) -> int | None:
    process = child.process
    if process is None:
        return None
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            _say(f"{child.name} did not stop within {grace:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if child.pump is not None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(child.pump, 2)
    return process.returncode


def _development_certificates(settings: Settings) -> str | None:
    """Makes the development certificates when missing (and no file of TLS is named by hand);
    what is still wrong, or None."""
    tls_dir = settings.tls_dir or settings.data_dir / "tls"
    by_hand = settings.tls_ca_file or settings.tls_cert_file or settings.tls_key_file
    if not by_hand and missing(tls_dir):
        written = write_development_set(tls_dir, datetime.now(UTC))
        _say(f"TLS: wrote the development CA and certificates to {tls_dir} ({len(written)} files)")
    problems = [f"{service}: {line}" for service in (*START_ORDER, OPERATOR) for line in settings.tls_missing(service)]
    return f"TLS: {problems[0]}" if problems else None


def load_test_profile(env: dict[str, str]) -> list[str]:
    """Sets LOAD_TEST_ENV in `env`, except what the environment sets already: what it did, a line each."""
    said = []
    for name, value in LOAD_TEST_ENV.items():
        if env.get(name):
            said.append(f"{name}={env[name]} (kept from the environment)")
        else:
            env[name] = value
            said.append(f"{name}={value}")
    return said


async def run_up(
    dataset: Path | None,
    data_dir: Path | None,
    ready_timeout: float,
    extra_env: dict[str, str] | None = None,
    load_test: bool = False,
) -> int:
    env = dict(os.environ) | (extra_env or {})
    if data_dir is not None:
        env["CARDCHECK_DATA_DIR"] = str(data_dir)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        settings = Settings.from_env(env)
    except SettingsError as error:
        _say(f"bad configuration: {error}")
        return 2
    if load_test and not settings.sandbox:
        _say("--load-test raises limits that protect real users: it runs in sandbox only (CARDCHECK_SANDBOX is off)")
        return 2
    if load_test:
        _say("load-test profile (sandbox only): " + ", ".join(load_test_profile(env)))
        if dataset is None:
            _say(f"load-test profile: bank_sim generates {LOAD_TEST_PEOPLE} people (the default is 200)")
    if dataset is not None and not dataset.is_file():
        _say(f"no dataset at {dataset}")
        return 2
    private_directory(settings.data_dir)  # 0700: keys, SQLite files and spans live in it
    if settings.tls:
        problem = _development_certificates(settings)
        if problem:
            _say(problem)
            return 2

    children = {name: Child(name, [sys.executable, "-m", name]) for name in START_ORDER}
    if dataset is not None:
        children["bank_sim"].argv += ["--dataset", str(dataset.resolve())]
    elif load_test:
        children["bank_sim"].argv += ["--people", str(LOAD_TEST_PEOPLE)]
    width = max(map(len, START_ORDER))
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)

    died: list[Child] = []

    async def watch(child: Child) -> None:
        assert child.process is not None
        await child.process.wait()
        child.exited.set()
        if not stop_requested.is_set():
            died.append(child)
            stop_requested.set()

    watchers = []
    for child in children.values():
        child.process = await asyncio.create_subprocess_exec(
            *child.argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        child.pump = asyncio.create_task(_pump(child, width))
        watchers.append(asyncio.create_task(watch(child)))

    deadline = loop.time() + ready_timeout
    ready = asyncio.gather(*(_wait_serving(n, settings, deadline) for n in START_ORDER))
    stop_wait = asyncio.create_task(stop_requested.wait())
    waiting: set[asyncio.Future[Any]] = {ready, stop_wait}
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if ready in done and ready.exception() is not None:
        _say(f"{ready.exception()}; stopping everything")
        exit_code = 1
    elif ready in done:
        _say(
            "all five services SERVING; gateway at "
            f"{settings.addresses['gateway']}{' (TLS)' if settings.tls else ''}, data in {settings.data_dir} "
            "(Ctrl-C stops them)"
        )
        await stop_wait
    else:
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ready

    for child in died:
        assert child.process is not None  # it ran: watch() saw it exit
        _say(f"{child.name} exited unexpectedly with code {child.process.returncode}; stopping the others")
        exit_code = 1
    grace = settings.shutdown_grace_s + 5
    for name in STOP_ORDER:
        code = await _stop(children[name], grace)
        if children[name] not in died and code not in (0, None):
            _say(f"{name} stopped with exit code {code}")
            exit_code = exit_code or 1
    for task in watchers:
        task.cancel()
    stop_wait.cancel()
    _say("stopped" if exit_code == 0 else f"stopped with exit code {exit_code}")
    return exit_code
