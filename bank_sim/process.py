"""`python -m bank_sim` (or another service) as a child process on free ports, for tests and
benchmarks: started, waited for until SERVING, and stopped with SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


# Ports are drawn below Linux's ephemeral range (32768-60999 by default): a port the kernel
# hands out for port 0 is one it may next give an outgoing connection (to PostgreSQL, say) as
# its local port, and the service meant to bind it then fails with "Address already in use".
# The port + 1000 (metrics) and + 2000 (plaintext health with TLS) stay below that range too.
_PORTS = range(20_000, 30_000)
_OFFSETS = (0, 1000, 2000)
_handed_out: set[int] = set()
_draw = random.Random()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free on 127.0.0.1 right now, as are the ports 1000 and 2000 above it, and not
    handed out before by this process."""
    for _ in range(1000):
        port = _draw.choice(_PORTS)
        if port not in _handed_out and all(_bindable(port + offset) for offset in _OFFSETS):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def free_port_run(count: int, attempts: int = 50) -> int:
    """The first of `count` consecutive ports that are free right now."""
    for _ in range(attempts):
        base = free_port()
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no run of {count} free ports found")


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without CARDCHECK_* and OTEL_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARDCHECK_", "OTEL_"))}
    env["CARDCHECK_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Child:
    """A service process. `address` is where it serves."""

    def __init__(self, module: str, args: Sequence[str], env: Mapping[str, str], address: str, log_path: Path):
        self.module = module
        self.address = address
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=ROOT, env=dict(env),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_serving(self, timeout: float = 60.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    # grpcio-health-checking's stubs declare HealthStub without its methods.
                    status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)  # type: ignore[attr-defined]
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.module} not SERVING on {self.address}:\n{self.output()}")
                time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class PeakMemory:
    """A process's peak resident memory (VmHWM, /proc/<pid>/status), and how far it grew since
    `reset()`, which brings the peak down to the current resident size (clear_refs 5) where the
    kernel allows; else growth is counted from the peak at reset."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.at_reset_kb = self.peak_kb()

    def _status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} for process {self.pid}")

    def peak_kb(self) -> int:
        return self._status_kb("VmHWM")

    def resident_kb(self) -> int:
        return self._status_kb("VmRSS")

    def reset(self) -> None:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            pass
        self.at_reset_kb = self.peak_kb()

    def growth_kb(self) -> int:
        return self.peak_kb() - self.at_reset_kb


def start_serving(
    module: str, args: Sequence[str], env: Mapping[str, str], address: str, log_path: Path, timeout: float = 60.0
) -> Child:
    """`python -m module args` SERVING on `address`, or stopped again and the error raised."""
    child = Child(module, args, env, address, log_path)
    try:
        child.wait_serving(timeout)
    except BaseException:
        child.stop()
        raise
    return child


def start_bank_sim(
    data_dir: Path, args: Sequence[str] = ("--seed", "7", "--people", "50"), env: Mapping[str, str] | None = None
) -> Child:
    """A bank_sim process on a free port, SERVING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    return start_serving(
        "bank_sim", args, clean_env(data_dir, CARDCHECK_BANK_SIM_ADDR=address, **dict(env or {})), address,
        data_dir / f"bank_sim-{port}.log",
    )
