"""The mesh as `cardcheck up` runs it: all five services as real processes on free ports, for the
end-to-end tests and the probes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bank_sim.process import free_port
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings

BIN = Path(sys.executable).parent


@dataclass
class Mesh:
    process: subprocess.Popen
    env: dict[str, str]
    data_dir: Path
    log: Path

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        """The pid of each service process `cardcheck up` started."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == self.process.pid and len(cmdline) >= 3 and cmdline[1] == b"-m":
                found[cmdline[2].decode()] = int(entry.name)
        return found

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_mesh(
    data_dir: Path, *args: str, extra_env: dict[str, str] | None = None, wait: bool = True, tls: bool = False
) -> Mesh:
    """`tls`: `cardcheck up --tls`, and CARDCHECK_TLS=on in `env` so that the test's own
    channels (mesh.settings) speak TLS too; each server's plaintext health port is a free one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({f"CARDCHECK_{service.upper()}_ADDR": f"127.0.0.1:{free_port()}" for service in DEFAULT_PORTS})
    if tls:
        args = ("--tls", *args)
        env["CARDCHECK_TLS"] = "on"
        env.update({f"CARDCHECK_{service.upper()}_HEALTH_ADDR": f"127.0.0.1:{free_port()}" for service in DEFAULT_PORTS})
    env.update({"CARDCHECK_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"})
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.update(extra_env or {})
    log = data_dir / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "cardcheck"), "up", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    mesh = Mesh(process, env, data_dir, log)
    if wait:
        wait_for(mesh, "all five services SERVING")
    return mesh


def wait_for(mesh: Mesh, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in mesh.output():
            return
        if mesh.process.poll() is not None and text not in mesh.output():
            raise AssertionError(f"cardcheck up exited {mesh.process.returncode}:\n{mesh.output()}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} within {timeout}s:\n{mesh.output()}")
