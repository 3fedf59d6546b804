"""Generates the Python stubs from protos/: `python -m cardcheck.protogen`.

The .pyi beside them come from mypy-protobuf: typed messages, enums and stubs, where a stub made
on a `grpc.aio.Channel` is the async one (its calls awaitable, its streams async iterators)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "cardcheck" / "v1").glob("*.proto"))


def _plugin(name: str) -> str:
    # mypy-protobuf's plugins are scripts beside this interpreter, whether or not it is on PATH.
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise SystemExit(f"{name} not found: install mypy-protobuf (the dev extra)")
    return f"--plugin={name}={found}"


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out = str(out_dir)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        _plugin("protoc-gen-mypy"),
        _plugin("protoc-gen-mypy_grpc"),
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *(str(p.relative_to(PROTO_DIR)) for p in proto_files()),
    ]
    # protoc resolves the relative proto paths against -I, so run from the proto root.
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    generate(ROOT)
    print(f"generated stubs for {len(proto_files())} protos into {ROOT / 'cardcheck' / 'v1'}", file=sys.stderr)


if __name__ == "__main__":
    main()
