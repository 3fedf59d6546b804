"""Generates the Python stubs (with .pyi) from protos/: `python -m cardcheck.protogen`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "cardcheck" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out = str(out_dir)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
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
