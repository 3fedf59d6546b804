"""The committed stubs are exactly what `make protos` generates from protos/."""

from __future__ import annotations

from pathlib import Path

from cardcheck import protogen

GENERATED = protogen.ROOT / "cardcheck" / "v1"


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "cardcheck" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.name != "__init__.py" and p.is_file()}
    assert set(fresh) == set(committed), "stubs added or removed: run `make protos`"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale stubs, run `make protos`: {stale}"


def test_every_proto_has_stubs() -> None:
    for proto in protogen.proto_files():
        stem = proto.stem
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert (GENERATED / f"{stem}{suffix}").is_file()
