"""The container image (Dockerfile, .dockerignore), read and checked: built in stages on a slim
Python 3.11, the project installed (not editable) in a build stage and copied to the runtime
stage, started by an exec-form `<python> -m SERVICE` as a numeric non-root user, and a build
context that leaves out keys, databases, the virtualenv, .git and bytecode but not what the
build copies."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from cardcheck.runtime.settings import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICES = tuple(DEFAULT_PORTS)  # gateway, report_service, bank_connector, notifier, bank_sim


@dataclass
class Stage:
    image: str
    alias: str | None
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_stages(text: str) -> list[Stage]:
    """The build stages, with ARG defaults declared before the first FROM substituted."""
    logical, pending = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], ""), rest).split()
            words = [w for w in words if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias, []))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(rest: str | None) -> list[str] | None:
    if rest is None:
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def image_env(stage: Stage) -> dict[str, str]:
    env = {}
    for rest in stage.all("ENV"):
        for word in shlex.split(rest):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def image_uid(stage: Stage) -> int | None:
    user = stage.last("USER")
    if user is None:
        return None
    uid = user.partition(":")[0]
    return int(uid) if uid.isdigit() else None


def ignored_by(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rules, enough for this file: the last matching pattern wins, `!`
    re-includes, a pattern that matches a folder covers what is in it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        forms = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            ignored = not negate
    return ignored


def image_problems(dockerfile: str, dockerignore: str) -> list[str]:
    problems = []
    stages = dockerfile_stages(dockerfile)
    if len(stages) < 2:
        return ["the image is not built in stages (a build stage and a runtime stage)"]
    final, builds = stages[-1], stages[:-1]
    for stage in stages:
        if not re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", stage.image):
            problems.append(f"stage {stage.alias or stage.image}: base {stage.image!r} is not a slim Python 3.11")
    installs = [run for stage in builds for run in stage.all("RUN") if "pip install" in run]
    if not installs:
        problems.append("no build stage installs the project with pip")
    if any(re.search(r"(^|\s)(-e|--editable)(\s|$)", run) for run in installs):
        problems.append("the project is installed editable: the runtime image would need the source tree")
    if any("pip install" in run for run in final.all("RUN")):
        problems.append("the runtime stage installs packages itself instead of taking the build's")
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    if entrypoint is None:
        problems.append("ENTRYPOINT is not in exec form: a shell would be PID 1 and keep SIGTERM from the service")
    elif entrypoint[1:] != ["-m"] or not entrypoint[0].endswith(("/python", "/python3")):
        problems.append(f"ENTRYPOINT {entrypoint} is not `<python> -m` (the command names the service)")
    else:
        copied = [rest for rest in final.all("COPY") if rest.startswith("--from=")]
        venv = entrypoint[0].rsplit("/bin/", 1)[0]
        if not any(rest.split()[-1].rstrip("/") == venv for rest in copied):
            problems.append(f"the runtime stage does not copy {venv} from a build stage")
    cmd = exec_form(final.last("CMD"))
    if cmd is not None and cmd[:1] and cmd[0] not in SERVICES:
        problems.append(f"CMD {cmd} does not name a service")
    if image_env(final).get("CARDCHECK_LOG_FORMAT") != "json":
        problems.append("the image does not set CARDCHECK_LOG_FORMAT=json: its logs would carry no trace ids")
    user = final.last("USER")
    uid = image_uid(final)
    if user is None:
        problems.append("no USER: the image runs as root")
    elif uid is None:
        problems.append(f"USER {user} is not numeric: runAsNonRoot cannot verify a name")
    elif uid == 0:
        problems.append("USER 0 is root")
    patterns = [
        line.strip() for line in dockerignore.splitlines() if line.strip() and not line.startswith("#")
    ]
    for secret_or_bulk in (".venv/bin/python", "var/keys/master.key", "var/gateway.db", ".git/config",
                           "cardcheck/__pycache__/keys.cpython-311.pyc"):
        if not ignored_by(patterns, secret_or_bulk):
            problems.append(f".dockerignore lets {secret_or_bulk} into the build context")
    for build in builds:
        for rest in build.all("COPY"):
            if rest.startswith("--"):
                continue
            for source in rest.split()[:-1]:
                if ignored_by(patterns, source.rstrip("/")):
                    problems.append(f".dockerignore leaves out {source}, which the build copies")
    return problems


def final_stage() -> Stage:
    return dockerfile_stages(DOCKERFILE.read_text())[-1]


def container_command(container: dict, stage: Stage | None = None) -> list[str]:
    """What the container runs: Kubernetes' command/args over the image's ENTRYPOINT/CMD."""
    stage = stage or final_stage()
    entrypoint = exec_form(stage.last("ENTRYPOINT")) or []
    cmd = exec_form(stage.last("CMD")) or []
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*entrypoint, *container.get("args", cmd)]
