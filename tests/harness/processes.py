"""One service as a real process (`python -m <service>`), as `cardcheck up` starts it: on an
address of its own, its output in a log file, stopped by SIGTERM or killed with -9."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bank_sim.process import clean_env, free_port
from tests.harness.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # in the child, between fork and exec
    # A test run that dies (or is killed at its timeout) takes its service processes with it.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ServiceProcess:
    """`python -m <module> [args]` listening on `address` (a free port unless given), ready once
    its health service says SERVING for `health_service` ("" is the server as a whole)."""

    def __init__(
        self,
        module: str,
        data_dir: Path,
        database_url: str | None = None,
        *,
        address: str | None = None,
        args: tuple[str, ...] = (),
        health_service: str = "",
        **env: str,
    ) -> None:
        self.module = module
        self.args = args
        self.data_dir = data_dir
        self.address = address or f"127.0.0.1:{free_port()}"
        self.port = int(self.address.rpartition(":")[2])
        self.health_service = health_service
        # Nothing of the caller's CARDCHECK_ or OTEL_ settings.
        self.env = clean_env(data_dir, **{f"CARDCHECK_{module.upper()}_ADDR": self.address, **env})
        if database_url:
            self.env["CARDCHECK_DATABASE_URL"] = database_url
        self.process: asyncio.subprocess.Process | None = None
        self.logs: list[Path] = []
        self.returncode: int | None = None

    async def start(self, *, wait: bool = True) -> None:
        """Starts it (again, after a stop or a kill: same address, same data) and, with `wait`,
        returns once it serves; fails with its output if it exits first."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / f"{self.module}-{self.port}-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, *self.args,
                env=self.env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent,
            )
        self.returncode = None
        if wait:
            await self.serving()

    async def serving(self, within: float = 60) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serves() -> bool:
                if self.process.returncode is not None:
                    raise AssertionError(f"{self.module} exited {self.process.returncode}:\n{self.output()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=self.health_service), timeout=1)
                    return reply.status == health_pb2.HealthCheckResponse.SERVING
                return False

            await eventually(serves, within=within, every=0.1, what=f"{self.module} serving")

    def kill(self) -> None:
        """kill -9: no shutdown hook runs, leases are left held."""
        self.process.send_signal(signal.SIGKILL)

    async def wait(self, within: float = 30) -> int:
        self.returncode = await asyncio.wait_for(self.process.wait(), within)
        return self.returncode

    async def terminate(self, within: float = 30) -> int:
        """SIGTERM, as Kubernetes and `cardcheck up` stop it: its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return await self.wait(within)

    async def stop(self) -> None:
        """SIGTERM, or -9 after 20 s; nothing when it is not running. For a test's cleanup."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
        self.returncode = await self.process.wait()

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs if log.exists())
