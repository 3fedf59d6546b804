"""The services a bench runs as child processes: each on its address, data and log under a work
directory, waited for until SERVING (bank_sim/process.py underneath); and the CPU time a
process has spent, to put beside what it did."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from bank_sim.process import Child, clean_env, start_serving


def start(
    module: str, work: Path, env: Mapping[str, str], address: str, args: Sequence[str] = ()
) -> Child:
    """`python -m module args` SERVING on `address`, logging warnings and worse unless `env`
    says otherwise, its log `work/<module>-<port>.log`."""
    work.mkdir(parents=True, exist_ok=True)
    return start_serving(
        module, args, clean_env(work, **{"CARDCHECK_LOG_LEVEL": "WARNING", **env}), address,
        work / f"{module.rsplit('.', 1)[-1]}-{address.rpartition(':')[2]}.log", timeout=120,
    )


def cpu_seconds(pid: int | None) -> float:
    """A process's user + system CPU time so far (0 when unknown)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
