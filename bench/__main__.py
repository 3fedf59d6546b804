"""`python -m bench [NAME ...] [OPTIONS]`: runs the named benchmarks (all when none is named),
each with the options that follow the names (`python -m bench limits --seconds 1.5`).

Each benchmark is a module bench/NAME.py with `main(argv: list[str]) -> int` that prints its
figures. Figures that targets are judged by are ratios against a reference measured in the
same run, since these machines are shared and noisy."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, options = argv[:first_option] or available(), argv[first_option:]
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    status = 0
    for name in names:
        print(f"\n== bench {name} ==", flush=True)
        module = importlib.import_module(f"bench.{name}")
        status |= module.main(options)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
