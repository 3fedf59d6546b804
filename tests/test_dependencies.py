"""The dependency pins agree: pyproject.toml's direct pins, constraints.txt's whole tree, the
virtualenv the tests run in, and the image's install."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def test_every_direct_dependency_is_pinned_and_constrained_to_the_same_version() -> None:
    pins = constraints()
    for requirement in direct_requirements():
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{requirement} is not pinned exactly"
        assert pins.get(canonicalize_name(requirement.name)) == spec.version, (
            f"pyproject.toml pins {requirement.name} {spec.version}, constraints.txt "
            f"{pins.get(canonicalize_name(requirement.name))}: run `make constraints`"
        )


def test_the_virtualenv_holds_exactly_the_constrained_versions() -> None:
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if canonicalize_name(d.metadata["Name"]) not in {"pip", "setuptools", "wheel", "cardcheck"}
    }
    pins = constraints()
    assert {name: installed.get(name) for name in pins} == pins
    assert sorted(set(installed) - set(pins)) == [], "installed but not in constraints.txt: run `make constraints`"


def test_the_image_and_the_virtualenv_install_under_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -e '\.\[dev\]'", makefile)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN .*pip install -c /src/constraints\.txt /src$", dockerfile, re.MULTILINE)
