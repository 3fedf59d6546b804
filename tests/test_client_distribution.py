"""The `cardcheck-client` distribution (clients/python): built from the tree's own files, it
holds the client and the public stubs only, installs into a virtualenv of its own with grpc and
protobuf alone, and talks from there to the gateway of a real mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness.mesh import start_mesh
from tests.test_dependencies import constraints

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "python"
SHIPPED = {
    "cardcheck/__init__.py",
    "cardcheck/client.py",
    "cardcheck/py.typed",
    "cardcheck/refusals.py",
    "cardcheck/v1/__init__.py",
    "cardcheck/v1/common_pb2.py",
    "cardcheck/v1/common_pb2.pyi",
    "cardcheck/v1/gateway_pb2.py",
    "cardcheck/v1/gateway_pb2.pyi",
    "cardcheck/v1/gateway_pb2_grpc.py",
    "cardcheck/v1/gateway_pb2_grpc.pyi",
}
SERVER_ONLY = ["sqlmodel", "sqlalchemy", "uvloop", "psycopg", "redis", "cryptography", "opentelemetry",
               "cardcheck.runtime", "gateway"]


def _outside_the_tree() -> dict[str, str]:
    # Nothing of the tree on the path: the virtualenv's own installation answers.
    return {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "PYTHONHOME"}}


def _run(*command, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=_outside_the_tree(), capture_output=True, text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="session")
def client_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("client-wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "-w", out, CLIENT, cwd=out)
    (wheel,) = out.glob("cardcheck_client-*.whl")
    return wheel


@pytest.fixture(scope="session")
def client_python(client_wheel, tmp_path_factory) -> Path:
    """A virtualenv holding the client wheel and what it requires, at the constrained versions."""
    venv = tmp_path_factory.mktemp("client-venv")
    _run(sys.executable, "-m", "venv", venv, cwd=venv)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "-c", ROOT / "constraints.txt", client_wheel, cwd=venv)
    return python


def test_the_client_requires_at_least_what_the_tree_pins() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    pins = constraints()
    names = set()
    for requirement in map(Requirement, project["dependencies"]):
        name = canonicalize_name(requirement.name)
        names.add(name)
        assert name in pins, f"{name}: the client requires what the tree does not pin"
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert lower == [pins[name]], f"{requirement}: its lower bound is not constraints.txt's {pins[name]}"
        assert requirement.specifier.contains(pins[name])
    assert names == {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == main["version"]


@pytest.mark.e2e
def test_the_wheel_holds_the_client_and_public_stubs_alone_as_in_the_tree(client_wheel) -> None:
    with zipfile.ZipFile(client_wheel) as wheel:
        files = {name for name in wheel.namelist() if not name.startswith("cardcheck_client-")}
        assert files == SHIPPED
        for name in files:
            assert wheel.read(name) == (ROOT / name).read_bytes(), f"{name} differs from the tree's"


@pytest.mark.e2e
def test_the_client_imports_without_the_servers_dependencies(client_python, tmp_path) -> None:
    probe = (
        "import importlib.util, json, sys\n"
        "import cardcheck.client\n"
        "print(json.dumps({'client': cardcheck.client.__file__,\n"
        "                  'present': [m for m in sys.argv[1:] if importlib.util.find_spec(m)]}))\n"
    )
    found = json.loads(_run(client_python, "-c", probe, *SERVER_ONLY, cwd=tmp_path))
    assert Path(found["client"]).is_relative_to(client_python.parent.parent)
    assert found["present"] == []


@pytest.mark.e2e
def test_the_installed_client_talks_to_a_real_gateway(client_python, tmp_path) -> None:
    journey = (
        "import asyncio, json, sys\n"
        "from cardcheck.client import CardCheckClient, Unauthenticated\n"
        "async def main(address):\n"
        "    async with CardCheckClient(address, timeout=20) as client:\n"
        "        banks = await client.list_banks()\n"
        "        agreement = await client.get_agreement()\n"
        "        try:\n"
        "            await client.list_queries()\n"
        "            refusal = None\n"
        "        except Unauthenticated as error:\n"
        "            refusal = [type(error).__name__, error.reason, error.message_zh]\n"
        "    print(json.dumps({'banks': len(banks), 'agreement': agreement.version, 'refusal': refusal}))\n"
        "asyncio.run(main(sys.argv[1]))\n"
    )
    mesh = start_mesh(tmp_path / "mesh")
    try:
        seen = json.loads(_run(client_python, "-c", journey, mesh.settings.addresses["gateway"], cwd=tmp_path))
    finally:
        assert mesh.stop() == 0, mesh.output()
    assert seen["banks"] == 24
    assert seen["agreement"]
    assert seen["refusal"] == ["Unauthenticated", "UNAUTHENTICATED", "请先登录"]
