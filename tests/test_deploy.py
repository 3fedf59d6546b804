"""The Kubernetes manifests (deploy/k8s) and the container image (Dockerfile), held to the code
they run: each container's environment is one the services accept, every address reaches a
Service that reaches the port its target listens on, the probes ask the health names the
servers register, the network policies admit exactly the calls the code makes, and the image's
command starts each of the five services from a regular install.

Each check is a function that lists what is wrong; the tests assert the list is empty for every
kustomization, and that a deliberately broken copy of the manifests makes it non-empty."""

from __future__ import annotations

import ast
import base64
import copy
import fnmatch
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bank_connector.config import ConnectorConfig
from bank_sim.app import _arguments as bank_sim_arguments
from bank_sim.app import start_options as bank_sim_start_options
from bank_sim.process import free_port
from cardcheck.runtime.keys import load_master_key
from cardcheck.runtime.settings import DEFAULT_PORTS, Settings, SettingsError
from gateway.config import GatewayConfig
from gateway.face import face_verifier_for
from notifier.config import NotifierConfig
from report_service.config import ReportServiceConfig

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "staging": K8S / "overlays" / "staging"}
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICES = tuple(DEFAULT_PORTS)  # gateway, report_service, bank_connector, notifier, bank_sim
REPLICATED = ("gateway", "report_service", "bank_connector", "notifier")

# What a Secret reference stands for while the environment is checked: valid values of the right
# shape, so that the services' own validation runs on everything else.
SECRET_PLACEHOLDERS = {
    "CARDCHECK_MASTER_KEY": base64.b64encode(bytes(range(32))).decode(),
    "CARDCHECK_DATABASE_URL": "postgresql+psycopg://cardcheck@postgres.invalid:5432/cardcheck",
    "CARDCHECK_REDIS_URL": "redis://redis.invalid:6379/0",
    "CARDCHECK_SMS_WEBHOOK_SECRET": "placeholder-webhook-secret-0123456789",
}
SECRET_VARS = frozenset(SECRET_PLACEHOLDERS)


# ---------------------------------------------------------------------------------------------
# Rendering


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(directory: Path) -> list[dict]:
    """The kustomization rendered by `kubectl kustomize`. Without kubectl, the base is read file
    by file (a ConfigMap generator becomes a plain ConfigMap) and overlays are skipped; in CI a
    missing kubectl is a failure."""
    tool = kubectl()
    if tool is not None:
        done = subprocess.run(
            [tool, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    if os.environ.get("CI"):
        pytest.fail("kubectl is required in CI to render deploy/k8s (kubectl kustomize)")
    if directory != KUSTOMIZATIONS["base"]:
        pytest.skip("kubectl not found: an overlay needs kustomize to render")
    return read_base(directory)


def read_base(directory: Path) -> list[dict]:
    """The base without kustomize: its resources as written and its generated ConfigMaps."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    understood = {"apiVersion", "kind", "resources", "configMapGenerator"}
    unknown = set(kustomization) - understood
    assert not unknown, f"install kubectl: reading the base by hand does not know {sorted(unknown)}"
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        docs += [doc for doc in yaml.safe_load_all((directory / resource).read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env_file in generator.get("envs", []):
            data |= read_env_file(directory / env_file)
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        labels = generator.get("options", {}).get("labels", {})
        docs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"], "labels": labels},
             "data": data}
        )
    return docs


def read_env_file(path: Path) -> dict[str, str]:
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            data[key] = value
    return data


_rendered: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    if name not in _rendered:
        _rendered[name] = render(KUSTOMIZATIONS[name])
    return copy.deepcopy(_rendered[name])


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def manifests(request) -> Manifests:
    return Manifests(rendered(request.param))


@pytest.fixture
def base() -> Manifests:
    return Manifests(rendered("base"))


# ---------------------------------------------------------------------------------------------
# The image


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


def service_of(container: dict) -> str:
    """The service a container runs, from its command (`<python> -m SERVICE ...`)."""
    command = container_command(container)
    if len(command) >= 3 and command[1] == "-m" and command[2] in SERVICES:
        return command[2]
    raise AssertionError(f"container {container['name']} runs {command}, not `python -m <service>`")


# ---------------------------------------------------------------------------------------------
# What the code says


def service_sources(service: str) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted((ROOT / service).rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _string_choices(node: ast.expr) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]
    return None


def code_edges() -> set[tuple[str, str]]:
    """(caller, callee) for every `settings.addresses[...]` a service's code reads: where it opens
    a channel to another service. A name bound by a comprehension or a for loop over a literal
    tuple stands for each of its strings; anything else fails, so a new form is noticed."""
    edges = set()
    for service in SERVICES:
        for path, tree in service_sources(service):
            bound: dict[str, list[str]] = {}
            for node in ast.walk(tree):
                comprehensions = ast.ListComp | ast.DictComp | ast.SetComp | ast.GeneratorExp
                loops = node.generators if isinstance(node, comprehensions) else []
                if isinstance(node, ast.For):
                    loops = [node]
                for loop in loops:
                    if isinstance(loop.target, ast.Name) and (choices := _string_choices(loop.iter)):
                        bound[loop.target.id] = choices
            for node in ast.walk(tree):
                if not (
                    isinstance(node, ast.Subscript)
                    and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "addresses"
                    and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "settings"
                ):
                    continue
                key = node.slice
                callees = _string_choices(key) or (bound.get(key.id) if isinstance(key, ast.Name) else None)
                assert callees, f"{path}:{node.lineno}: cannot tell which service settings.addresses[...] names"
                edges |= {(service, callee) for callee in callees if callee != service}
    return edges


def health_names(service: str) -> set[str]:
    """The service names a process registers on grpc.health.v1 besides "": the last string
    argument of each Registration(...) in its app.py."""
    tree = ast.parse((ROOT / service / "app.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Registration":
            strings = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            names.update(strings[-1:])
    return names


def secrets_needed(service: str) -> set[str]:
    """The secret settings a service reads, from its code."""
    needed = set()
    for _, tree in service_sources(service):
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "load_master_key":
                needed.add("CARDCHECK_MASTER_KEY")
            if isinstance(node, ast.Name) and node.id == "make_engine":
                needed.add("CARDCHECK_DATABASE_URL")
            if isinstance(node, ast.Attribute) and node.attr == "redis_url":
                needed.add("CARDCHECK_REDIS_URL")
            if isinstance(node, ast.Constant) and node.value in SECRET_VARS:
                needed.add(node.value)
    return needed


def known_variables() -> tuple[set[str], tuple[str, ...]]:
    """Every CARDCHECK_* variable the code reads: exact names, and prefixes (`startswith`, or the
    leading text of an f-string like f"CARDCHECK_SMS_CAP_{kind}")."""
    exact = {f"CARDCHECK_{service.upper()}_ADDR" for service in SERVICES}
    prefixes = set()
    paths = [p for s in (*SERVICES, "cardcheck/runtime") for p in sorted((ROOT / s).rglob("*.py"))]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("CARDCHECK_"):
                exact.add(node.value)
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                lead = node.values[0].value
                if isinstance(lead, str) and lead.startswith("CARDCHECK_") and len(lead) > len("CARDCHECK_"):
                    prefixes.add(lead)
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) in ("startswith", "removeprefix")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith("CARDCHECK_")
            ):
                prefixes.add(node.args[0].value)
    return exact, tuple(prefixes)


# ---------------------------------------------------------------------------------------------
# The manifests


def labels_match(selector: Mapping, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against a set of labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise AssertionError(f"unknown selector operator {operator}")
    return True


class Manifests:
    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def named(self, kind: str, name: str) -> dict:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}"
        return found[0]

    @property
    def deployments(self) -> list[dict]:
        return self.of_kind("Deployment")

    def deployment_of(self, service: str) -> dict:
        found = [d for d in self.deployments if service_of(containers(d)[0]) == service]
        assert len(found) == 1, f"{len(found)} Deployments run {service}"
        return found[0]

    def configmap(self, name: str) -> dict:
        return self.named("ConfigMap", name)

    def pods_selected(self, selector: Mapping, namespace: str | None) -> list[dict]:
        return [
            d for d in self.deployments
            if namespace_of(d) == namespace and labels_match(selector, pod_labels(d))
        ]


def namespace_of(doc: dict) -> str | None:
    return doc["metadata"].get("namespace")


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def containers(deployment: dict) -> list[dict]:
    spec = pod_spec(deployment)
    return [*spec.get("initContainers", []), *spec["containers"]]


def replicas(deployment: dict) -> int:
    return deployment["spec"].get("replicas", 1)


def container_env(m: Manifests, container: dict, *, with_optional: bool = True) -> dict[str, str]:
    """The container's environment: its ConfigMaps, then its own env; a Secret reference stands
    for its placeholder (optional ones only `with_optional`)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= m.configmap(source["configMapRef"]["name"]).get("data", {})
        else:
            raise AssertionError(f"{container['name']}: envFrom {source} is not a ConfigMap")
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = str(var["value"])
            continue
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            assert name in SECRET_PLACEHOLDERS, f"no placeholder for the secret variable {name}: add one"
            if with_optional or not ref["secretKeyRef"].get("optional", False):
                env[name] = SECRET_PLACEHOLDERS[name]
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[name] = m.configmap(key["name"])["data"][key["key"]]
        else:
            raise AssertionError(f"{container['name']}: {name} comes from {ref}, which the checks do not know")
    return env


def check_environment(service: str, env: Mapping[str, str], args: list[str]) -> None:
    """Raises SettingsError (or SystemExit, for bank_sim's arguments) where the service would
    refuse to start: the shared settings, then its own."""
    settings = Settings.from_env(env)
    if settings.master_key:
        load_master_key(settings.master_key, Path("/nonexistent"))
    if service == "gateway":
        config = GatewayConfig.from_env(env)
        try:
            config.limit_rates()
        except ValueError as error:
            raise SettingsError(f"gateway rate limits: {error}") from None
        face_verifier_for(settings)
    elif service == "report_service":
        ReportServiceConfig.from_env(env)
    elif service == "bank_connector":
        ConnectorConfig.from_env(env)
    elif service == "notifier":
        NotifierConfig.from_env(env).provider_name(settings.sandbox)
    elif service == "bank_sim":
        bank_sim_start_options(bank_sim_arguments(args), env)


def environment_problems(m: Manifests) -> list[str]:
    problems = []
    exact, prefixes = known_variables()
    for deployment in m.deployments:
        for container in containers(deployment):
            service = service_of(container)
            args = container_command(container)[3:]
            for with_optional in (True, False):
                env = container_env(m, container, with_optional=with_optional)
                try:
                    check_environment(service, env, args)
                except (SettingsError, ValueError) as error:
                    problems.append(f"{service} refuses its environment: {error}")
                except SystemExit:
                    problems.append(f"{service} refuses its arguments {args}")
            for var in container_env(m, container):
                if var.startswith("CARDCHECK_") and var not in exact and not var.startswith(prefixes):
                    problems.append(f"{service}: no code reads {var} (a misspelt setting is silently ignored)")
    return problems


def service_for_host(m: Manifests, host: str, namespace: str | None) -> dict | None:
    """The Service a host name reaches from a pod in `namespace`: a short name, or
    NAME.NAMESPACE[.svc[.cluster.local]]."""
    parts = host.removeprefix("dns:///").split(".")
    name = parts[0]
    target_namespace = parts[1] if len(parts) > 1 else namespace
    if len(parts) > 2 and parts[2:] not in (["svc"], ["svc", "cluster", "local"]):
        return None
    for service in m.of_kind("Service"):
        if service["metadata"]["name"] == name and namespace_of(service) == target_namespace:
            return service
    return None


def container_port(deployment: dict, target: int | str) -> int | None:
    for container in pod_spec(deployment)["containers"]:
        for port in container.get("ports", []):
            if target in (port["containerPort"], port.get("name")):
                return port["containerPort"]
    return None


def listen_port(m: Manifests, deployment: dict) -> int:
    container = pod_spec(deployment)["containers"][0]
    return Settings.from_env(container_env(m, container)).port(service_of(container))


def address_problems(m: Manifests) -> list[str]:
    problems = []
    edges = code_edges()
    for deployment in m.deployments:
        container = pod_spec(deployment)["containers"][0]
        service = service_of(container)
        env = container_env(m, container)
        if deployment["metadata"]["name"] != service.replace("_", "-"):
            problems.append(f"Deployment {deployment['metadata']['name']} runs {service}")
        if env.get("CARDCHECK_BIND_HOST") != "0.0.0.0":
            problems.append(f"{service} binds {env.get('CARDCHECK_BIND_HOST', '127.0.0.1')}, not 0.0.0.0")
        grpc_ports = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == "grpc"]
        if grpc_ports != [listen_port(m, deployment)]:
            problems.append(f"{service} listens on {listen_port(m, deployment)}, its grpc port is {grpc_ports}")
        for caller, callee in sorted(edges):
            if caller == service and f"CARDCHECK_{callee.upper()}_ADDR" not in env:
                problems.append(f"{service} calls {callee} but CARDCHECK_{callee.upper()}_ADDR is unset")
        for callee in SERVICES:
            address = env.get(f"CARDCHECK_{callee.upper()}_ADDR")
            if address is None:
                continue
            host, _, port = address.rpartition(":")
            target = service_for_host(m, host, namespace_of(deployment))
            if target is None:
                problems.append(f"{service}: CARDCHECK_{callee.upper()}_ADDR={address} names no Service")
                continue
            ports = [p for p in target["spec"]["ports"] if p["port"] == int(port)]
            if not ports:
                problems.append(f"{service}: {address} is not a port of Service {target['metadata']['name']}")
                continue
            # A Service's selector is a plain label map, a workload's has matchLabels.
            selected = m.pods_selected({"matchLabels": target["spec"].get("selector", {})}, namespace_of(target))
            runs = sorted(service_of(pod_spec(d)["containers"][0]) for d in selected)
            if runs != [callee]:
                problems.append(f"{service}: Service {target['metadata']['name']} selects {runs}, not {callee}")
                continue
            if (service, callee) in edges and target["spec"].get("clusterIP") != "None":
                # One connection to a virtual IP would pin each caller replica to one pod.
                problems.append(f"{service}: Service {target['metadata']['name']} is not headless, so calls to "
                                f"{callee} are not spread over its pods")
            # Headless: the caller connects to each pod on the address's own port.
            reached = int(port) if target["spec"].get("clusterIP") == "None" else container_port(
                selected[0], ports[0].get("targetPort", ports[0]["port"])
            )
            if reached != listen_port(m, selected[0]):
                problems.append(
                    f"{service}: {address} reaches port {reached} of {callee}, which listens on "
                    f"{listen_port(m, selected[0])}"
                )
    return problems


def probe_problems(m: Manifests) -> list[str]:
    problems = []
    for deployment in m.deployments:
        container = pod_spec(deployment)["containers"][0]
        service = service_of(container)
        port, names = listen_port(m, deployment), health_names(service)
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(kind)
            if probe is None:
                if kind != "startupProbe":
                    problems.append(f"{service}: no {kind}")
                continue
            if "grpc" not in probe:
                problems.append(f"{service}: {kind} is not a gRPC health check")
                continue
            if probe["grpc"].get("port") != port:
                problems.append(f"{service}: {kind} asks port {probe['grpc'].get('port')}, it listens on {port}")
            asked = probe["grpc"].get("service", "")
            if kind == "readinessProbe" and asked not in names:
                problems.append(f"{service}: readiness asks {asked!r}, not one of its own {sorted(names)}")
            if kind != "readinessProbe" and asked not in names | {""}:
                problems.append(f"{service}: {kind} asks {asked!r}, which it does not serve")
    return problems


def pre_stop_seconds(container: dict) -> float | None:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"):
        return float(command[1])
    return None


def shutdown_problems(m: Manifests) -> list[str]:
    problems = []
    for deployment in m.deployments:
        container = pod_spec(deployment)["containers"][0]
        service = service_of(container)
        env = container_env(m, container)
        grace = Settings.from_env(env).shutdown_grace_s
        pause = pre_stop_seconds(container)
        if pause is None or pause < 1:
            problems.append(f"{service}: no preStop pause, so calls still arrive after SIGTERM")
            pause = 0
        # After the server stops, the notifier drains the deliveries in flight (notifier/app.py).
        drain = min(grace, NotifierConfig.from_env(env).webhook_timeout_s + 1) if service == "notifier" else 0
        period = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        # The pause, the in-flight calls' grace and the drain all count against the period, plus
        # a margin for the other shutdown hooks (channels, the database, leases given back).
        if period < pause + grace + drain + 5:
            problems.append(
                f"{service}: terminationGracePeriodSeconds {period} < preStop {pause:g} + "
                f"CARDCHECK_SHUTDOWN_GRACE_S {grace:g} + drain {drain:g} + 5"
            )
    return problems


def disruption_problems(m: Manifests) -> list[str]:
    problems = []
    for deployment in m.deployments:
        service = service_of(pod_spec(deployment)["containers"][0])
        count = replicas(deployment)
        if service in REPLICATED and count < 2:
            problems.append(f"{service} runs {count} replica(s); it is meant to run several")
        if service == "bank_sim" and count != 1:
            problems.append(f"bank_sim runs {count} replicas: BankSimControl would change only one")
        if count < 2:
            continue
        budgets = [
            pdb for pdb in m.of_kind("PodDisruptionBudget")
            if namespace_of(pdb) == namespace_of(deployment)
            and labels_match(pdb["spec"]["selector"], pod_labels(deployment))
        ]
        if len(budgets) != 1:
            problems.append(f"{service}: {len(budgets)} PodDisruptionBudgets select it, not 1")
            continue
        spec = budgets[0]["spec"]
        others = [d for d in m.pods_selected(spec["selector"], namespace_of(deployment)) if d is not deployment]
        if others:
            problems.append(f"{service}: its PodDisruptionBudget also selects {[d['metadata']['name'] for d in others]}")
        if "maxUnavailable" in spec:
            value = spec["maxUnavailable"]
            allowed = int(str(value).rstrip("%")) > 0
        else:
            value = spec.get("minAvailable", 1)
            minimum = (
                -(-count * int(value[:-1]) // 100) if isinstance(value, str) and value.endswith("%") else int(value)
            )
            allowed = minimum < count
        if not allowed:
            problems.append(f"{service}: its PodDisruptionBudget never lets a pod go (a node drain would hang)")
    return problems


def quantity(value: str | int | float) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def security_problems(m: Manifests) -> list[str]:
    problems = []
    uid = image_uid(final_stage())
    for deployment in m.deployments:
        pod = pod_spec(deployment)
        name = deployment["metadata"]["name"]
        pod_security = pod.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{name}: {flag}")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service account token it never uses")
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{name}: service links put <SERVICE>_* variables in its environment")
        mounts_from = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in containers(deployment):
            where = f"{name}/{container['name']}"
            ctx = container.get("securityContext", {})
            merged = pod_security | ctx
            if merged.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not set")
            if merged.get("runAsUser") == 0:
                problems.append(f"{where}: runs as uid 0")
            if "runAsUser" in merged and uid is not None and merged["runAsUser"] != uid:
                problems.append(f"{where}: runs as uid {merged['runAsUser']}, the image's user is {uid}")
            if ctx.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: the root filesystem is writable")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation is allowed")
            if ctx.get("privileged"):
                problems.append(f"{where}: privileged")
            capabilities = ctx.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
                problems.append(f"{where}: capabilities are not all dropped")
            if merged.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: no seccomp profile")
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                if request is None or limit is None:
                    problems.append(f"{where}: no {resource} request and limit")
                elif quantity(request) > quantity(limit):
                    problems.append(f"{where}: {resource} request {request} above its limit {limit}")
            writable = {
                mount["mountPath"].rstrip("/") for mount in container.get("volumeMounts", [])
                if mount["name"] in mounts_from and not mount.get("readOnly")
            }
            data_dir = str(Settings.from_env(container_env(m, container)).data_dir).rstrip("/")
            for needed in (data_dir, "/tmp"):
                if needed not in writable:
                    problems.append(f"{where}: {needed} is not a writable emptyDir on the read-only root")
    return problems


PERSONAL_OR_SECRET = {
    "a mobile number": re.compile(r"(?<!\d)1[3-9]\d{9}(?!\d)"),
    "an identity card number": re.compile(r"(?<!\d)\d{17}[\dXx](?!\d)"),
    "a card number": re.compile(r"(?<!\d)\d{13,19}(?!\d)"),
    "credentials in a URL": re.compile(r"://[^/@\s]+@"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|MASTER_KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)


def looks_like_key(value: str) -> bool:
    """Random bytes written out, 16 or more: hex, or base64 with the mixed case and digits that
    random data has and a setting (a path, a name) has not."""
    if re.fullmatch(r"[0-9a-fA-F]{32,}", value):
        return True
    return (
        len(value) >= 22
        and re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", value) is not None
        and not value.startswith("/")
        and all(re.search(kind, value) for kind in ("[A-Z]", "[a-z]", "[0-9]"))
    )


def clear_text_problems(where: str, values: Mapping[str, str]) -> list[str]:
    problems = []
    for key, value in values.items():
        value = str(value)
        if key in SECRET_VARS or SECRET_NAME.search(key):
            problems.append(f"{where}: {key} is a secret, kept in clear")
        for what, pattern in PERSONAL_OR_SECRET.items():
            if pattern.search(value):
                problems.append(f"{where}: {key} holds {what}")
        if looks_like_key(value):
            problems.append(f"{where}: {key} holds what looks like a key")
    return problems


def secret_problems(m: Manifests) -> list[str]:
    problems = []
    readers: dict[str, set[str]] = {}
    for configmap in m.of_kind("ConfigMap"):
        problems += clear_text_problems(f"ConfigMap {configmap['metadata']['name']}", configmap.get("data", {}))
    for secret in m.of_kind("Secret"):
        if secret.get("data") or secret.get("stringData"):
            problems.append(f"Secret {secret['metadata']['name']} carries values in the manifests")
    for deployment in m.deployments:
        for container in containers(deployment):
            service = service_of(container)
            literals = {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}
            problems += clear_text_problems(f"{service} env", literals)
            from_secret = {
                v["name"]: v["valueFrom"]["secretKeyRef"]
                for v in container.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})
            }
            needed = secrets_needed(service)
            for var in sorted(needed - {"CARDCHECK_SMS_WEBHOOK_SECRET"}):
                # Without them each replica would generate its own master key and keep its own
                # SQLite file and rate limits, all lost with the pod's emptyDir.
                if var not in from_secret or from_secret[var].get("optional"):
                    problems.append(f"{service} reads {var} but no required Secret reference gives it")
            for var in sorted(set(from_secret) - needed):
                problems.append(f"{service} is given {var}, which it never reads")
            for ref in from_secret.values():
                readers.setdefault(ref["name"], set()).add(service)
    for name, services in sorted(readers.items()):
        # One service broken into must hold no other's master key or database credentials.
        if len(services) > 1:
            problems.append(f"Secret {name} is read by {', '.join(sorted(services))}: each needs its own")
    return problems


EXTERNAL = "outside the namespace"


def port_admitted(rule: dict, deployment: dict, port: int) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in entry or container_port(deployment, entry["port"]) == port:
            return True
    return False


def peer_admits(peer: dict, source: dict | str, namespace: str | None) -> bool:
    if set(peer) == {"podSelector"}:
        return source != EXTERNAL and namespace_of(source) == namespace and labels_match(peer["podSelector"], pod_labels(source))
    if "namespaceSelector" in peer and not peer["namespaceSelector"]:
        # Every namespace: anything outside may carry the labels; inside, the podSelector decides.
        if source == EXTERNAL:
            return True
        return labels_match(peer.get("podSelector", {}), pod_labels(source))
    if set(peer) == {"ipBlock"} and source == EXTERNAL:
        return True
    raise AssertionError(f"the check cannot judge the NetworkPolicy peer {peer}")


def admitted(m: Manifests, source: dict | str, target: dict) -> bool:
    """Would the network policies let `source` (a Deployment's pods, or EXTERNAL) open a
    connection to the gRPC port of `target`'s pods?"""
    namespace = namespace_of(target)
    port = listen_port(m, target)
    policies = [
        p for p in m.of_kind("NetworkPolicy")
        if namespace_of(p) == namespace and labels_match(p["spec"]["podSelector"], pod_labels(target))
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if not port_admitted(rule, target, port):
                continue
            peers = rule.get("from")
            if not peers or any(peer_admits(peer, source, namespace) for peer in peers):
                return True
    return False


def network_problems(m: Manifests) -> list[str]:
    problems = []
    edges = code_edges()
    by_service = {service_of(pod_spec(d)["containers"][0]): d for d in m.deployments}
    for target_name, target in sorted(by_service.items()):
        public = target_name == "gateway"  # reachable by anyone, so by the other services too
        for source_name, source in sorted(by_service.items()):
            calls = (source_name, target_name) in edges
            if calls and not admitted(m, source, target):
                problems.append(f"{source_name} calls {target_name}, and the network policies refuse it")
            if not calls and not public and admitted(m, source, target):
                problems.append(f"{source_name} may reach {target_name}, which it never calls")
        if admitted(m, EXTERNAL, target) != public:
            problems.append(f"{target_name} is {'not ' if public else ''}reachable from outside the namespace")
    return problems


CHECKS: dict[str, Callable[[Manifests], list[str]]] = {
    "environment": environment_problems,
    "addresses": address_problems,
    "probes": probe_problems,
    "shutdown": shutdown_problems,
    "disruption": disruption_problems,
    "security": security_problems,
    "secrets": secret_problems,
    "network": network_problems,
}


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomizations_render_the_whole_mesh(name: str) -> None:
    m = Manifests(rendered(name))
    assert sorted(service_of(containers(d)[0]) for d in m.deployments) == sorted(SERVICES)
    assert {s["metadata"]["name"] for s in m.of_kind("Service")} == {s.replace("_", "-") for s in SERVICES}
    for service in m.of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]


def test_reading_the_base_by_hand_agrees_with_kustomize() -> None:
    # What the checks see without kubectl is what kustomize renders, but for the generated
    # ConfigMap's hash suffix.
    if kubectl() is None:
        pytest.skip("kubectl not found")

    def normal(docs: list[dict]) -> list[str]:
        return sorted(
            re.sub(r"(cardcheck-config)-[a-z0-9]{10}\b", r"\1", json.dumps(d, sort_keys=True)) for d in docs
        )

    assert normal(read_base(KUSTOMIZATIONS["base"])) == normal(rendered("base"))


def test_the_code_opens_channels_along_the_documented_edges() -> None:
    # The network policy's comment and the README's drawing; a new call shows up here first.
    assert code_edges() == {
        ("gateway", "report_service"),
        ("gateway", "bank_connector"),
        ("gateway", "notifier"),
        ("report_service", "bank_connector"),
        ("report_service", "notifier"),
        ("bank_connector", "bank_sim"),
    }


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_manifests_hold(manifests: Manifests, check: str) -> None:
    assert CHECKS[check](manifests) == []


def test_the_image_definition_holds() -> None:
    assert image_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text()) == []


def test_every_container_command_starts_a_service_module(base: Manifests) -> None:
    for deployment in base.deployments:
        for container in containers(deployment):
            service = service_of(container)
            assert importlib.util.find_spec(f"{service}.__main__") is not None, service
            assert container_command(container)[0] == exec_form(final_stage().last("ENTRYPOINT"))[0]


# Each check meets a manifest broken the way a real edit could break it.


def _container(m: Manifests, service: str) -> dict:
    return pod_spec(m.deployment_of(service))["containers"][0]


def _configmap(m: Manifests) -> dict:
    return m.of_kind("ConfigMap")[0]["data"]


def _policy(m: Manifests, name: str) -> dict:
    return m.named("NetworkPolicy", name)["spec"]


def _pdb(m: Manifests, name: str) -> dict:
    return m.named("PodDisruptionBudget", name)["spec"]


def _min_available_all(m: Manifests, service: str) -> None:
    spec = _pdb(m, service)
    del spec["maxUnavailable"]
    spec["minAvailable"] = replicas(m.deployment_of(service))


BREAKAGES: dict[str, tuple[str, Callable[[Manifests], object]]] = {
    "sandbox off": ("environment", lambda m: _configmap(m).update(CARDCHECK_SANDBOX="false")),
    "negative grace": ("environment", lambda m: _configmap(m).update(CARDCHECK_SHUTDOWN_GRACE_S="-1")),
    "misspelt setting": ("environment", lambda m: _configmap(m).update(CARDCHECK_SHUTDOWN_GRACE="10")),
    "bad notifier cap": ("environment", lambda m: _configmap(m).update(CARDCHECK_SMS_CAP_SMS_CODE="lots")),
    "webhook with no url": ("environment", lambda m: _configmap(m).update(CARDCHECK_SMS_PROVIDER="webhook")),
    "bank_sim bad latency": ("environment", lambda m: _configmap(m).update(CARDCHECK_BANK_LATENCY_MS="-5")),
    "wrong port": ("addresses", lambda m: _configmap(m).update(CARDCHECK_NOTIFIER_ADDR="notifier:50055")),
    "no such service": ("addresses", lambda m: _configmap(m).update(CARDCHECK_BANK_SIM_ADDR="banks:50060")),
    "loopback bind": ("addresses", lambda m: _configmap(m).pop("CARDCHECK_BIND_HOST")),
    "address unset": ("addresses", lambda m: _configmap(m).pop("CARDCHECK_REPORT_SERVICE_ADDR")),
    "virtual ip": ("addresses", lambda m: m.named("Service", "notifier")["spec"].pop("clusterIP")),
    "container port moved": (
        "addresses", lambda m: _container(m, "report_service")["ports"][0].update(containerPort=50099)
    ),
    "service selects another": (
        "addresses",
        lambda m: m.named("Service", "notifier")["spec"]["selector"].update({"app.kubernetes.io/name": "gateway"}),
    ),
    "readiness on another port": (
        "probes", lambda m: _container(m, "gateway")["readinessProbe"]["grpc"].update(port=50052)
    ),
    "readiness on another name": (
        "probes",
        lambda m: _container(m, "notifier")["readinessProbe"]["grpc"].update(service="cardcheck.v1.Notify"),
    ),
    "liveness over tcp": (
        "probes", lambda m: _container(m, "bank_sim").update(livenessProbe={"tcpSocket": {"port": 50060}})
    ),
    "short termination": (
        "shutdown", lambda m: pod_spec(m.deployment_of("notifier")).update(terminationGracePeriodSeconds=25)
    ),
    "no preStop": ("shutdown", lambda m: _container(m, "gateway").pop("lifecycle")),
    "one gateway": ("disruption", lambda m: m.deployment_of("gateway")["spec"].update(replicas=1)),
    "no budget": ("disruption", lambda m: m.docs.remove(m.named("PodDisruptionBudget", "report-service"))),
    "budget selects nothing": (
        "disruption",
        lambda m: _pdb(m, "bank-connector")["selector"]["matchLabels"].update({"app.kubernetes.io/name": "x"}),
    ),
    "budget blocks drains": ("disruption", lambda m: _min_available_all(m, "notifier")),
    "writable root": (
        "security", lambda m: _container(m, "report_service")["securityContext"].update(readOnlyRootFilesystem=False)
    ),
    "capabilities kept": ("security", lambda m: _container(m, "bank_sim")["securityContext"].pop("capabilities")),
    "root user": ("security", lambda m: pod_spec(m.deployment_of("gateway"))["securityContext"].update(runAsUser=0)),
    "escalation": (
        "security", lambda m: _container(m, "notifier")["securityContext"].update(allowPrivilegeEscalation=True)
    ),
    "no limits": ("security", lambda m: _container(m, "bank_connector")["resources"].pop("limits")),
    "data dir not mounted": ("security", lambda m: _container(m, "gateway")["volumeMounts"].pop(0)),
    "token mounted": (
        "security", lambda m: pod_spec(m.deployment_of("bank_sim")).update(automountServiceAccountToken=True)
    ),
    "master key in configmap": (
        "secrets", lambda m: _configmap(m).update(CARDCHECK_MASTER_KEY=SECRET_PLACEHOLDERS["CARDCHECK_MASTER_KEY"])
    ),
    "phone in configmap": ("secrets", lambda m: _configmap(m).update(CARDCHECK_LOG_LEVEL="13800138000")),
    "key under another name": (
        "secrets", lambda m: _configmap(m).update(CARDCHECK_SEED=SECRET_PLACEHOLDERS["CARDCHECK_MASTER_KEY"])
    ),
    "password in a url": (
        "secrets", lambda m: _configmap(m).update(OTEL_EXPORTER_OTLP_ENDPOINT="https://u:pw@otel.invalid")
    ),
    "database url literal": (
        "secrets", lambda m: _container(m, "notifier")["env"].__setitem__(
            1, {"name": "CARDCHECK_DATABASE_URL", "value": "postgresql+psycopg://u:pw@db/cardcheck"})
    ),
    "no redis for the gateway": (
        "secrets", lambda m: _container(m, "gateway").update(
            env=[v for v in _container(m, "gateway")["env"] if v["name"] != "CARDCHECK_REDIS_URL"])
    ),
    "key where it is not read": (
        "secrets", lambda m: _container(m, "bank_connector").setdefault("env", []).append(
            {"name": "CARDCHECK_MASTER_KEY",
             "valueFrom": {"secretKeyRef": {"name": "bank-connector-secrets", "key": "master-key"}}})
    ),
    "secret values committed": (
        "secrets", lambda m: m.docs.append(
            {"kind": "Secret", "metadata": {"name": "gateway-secrets"}, "stringData": {"master-key": "x"}})
    ),
    "one secret for two services": (
        "secrets", lambda m: next(
            v for v in _container(m, "notifier")["env"] if v["name"] == "CARDCHECK_MASTER_KEY"
        )["valueFrom"]["secretKeyRef"].update(name="gateway-secrets")
    ),
    "a caller left out": (
        "network", lambda m: _policy(m, "notifier-ingress")["ingress"][0]["from"].pop(1)
    ),
    "a caller too many": (
        "network",
        lambda m: _policy(m, "bank-sim-ingress")["ingress"][0]["from"].append(
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}})
    ),
    "a callee's policy gone": ("network", lambda m: m.docs.remove(m.named("NetworkPolicy", "notifier-ingress"))),
    "no policy selects bank_sim": (
        "network", lambda m: [m.docs.remove(m.named("NetworkPolicy", name))
                              for name in ("cardcheck-deny-ingress", "bank-sim-ingress")]
    ),
    "internal made public": ("network", lambda m: _policy(m, "report-service-ingress")["ingress"][0].pop("from")),
    "gateway closed": ("network", lambda m: _policy(m, "gateway-ingress")["ingress"][0]["ports"][0].update(port=1)),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_check_finds_a_broken_manifest(breakage: str) -> None:
    check, breaking = BREAKAGES[breakage]
    m = Manifests(rendered("base"))
    assert CHECKS[check](m) == []
    breaking(m)
    assert CHECKS[check](m), f"the {check} check did not notice: {breakage}"


IMAGE_BREAKAGES = {
    "no user": (r"^USER .*$", ""),
    "root user": (r"^USER .*$", "USER 0:0"),
    "named user": (r"^USER .*$", "USER cardcheck"),
    "shell entrypoint": (r"^ENTRYPOINT .*$", "ENTRYPOINT python -m"),
    "editable install": (r"pip install -c /src/constraints.txt /src", "pip install -c /src/constraints.txt -e /src"),
    "one stage": (r"^FROM \$\{PYTHON_IMAGE\} AS runtime$", ""),
    "wrong python": (r"^ARG PYTHON_IMAGE=.*$", "ARG PYTHON_IMAGE=python:3.12-slim"),
    "venv not copied": (r"^COPY --from=build .*$", ""),
}


@pytest.mark.parametrize("breakage", sorted(IMAGE_BREAKAGES))
def test_the_image_check_finds_a_broken_dockerfile(breakage: str) -> None:
    pattern, replacement = IMAGE_BREAKAGES[breakage]
    broken, count = re.subn(pattern, replacement, DOCKERFILE.read_text(), flags=re.M)
    assert count, f"the Dockerfile no longer has what {breakage!r} breaks"
    assert image_problems(broken, DOCKERIGNORE.read_text())


@pytest.mark.parametrize("line", ["!var", "!.venv", "!.git", "!**/__pycache__"])
def test_the_image_check_finds_a_leaky_dockerignore(line: str) -> None:
    assert image_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text() + line + "\n")


# ---------------------------------------------------------------------------------------------
# The image's command, run


def build_install(tmp_path: Path) -> Path:
    """What the image's build stage installs: a wheel of exactly what the Dockerfile copies
    (less what .dockerignore leaves out), unpacked to a folder that stands for site-packages."""
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    source = tmp_path / "src"
    build = dockerfile_stages(DOCKERFILE.read_text())[0]
    for rest in build.all("COPY"):
        for item in rest.split()[:-1]:
            for path in [ROOT / item, *(ROOT / item).rglob("*")] if (ROOT / item).is_dir() else [ROOT / item]:
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and not ignored_by(patterns, relative):
                    (source / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, source / relative)
    wheels = tmp_path / "wheels"
    # Offline: the build backend is the virtualenv's own setuptools (the dev dependencies bring a
    # recent one, grpcio-tools needs it), and nothing is fetched.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    site = tmp_path / "site"
    with zipfile.ZipFile(next(wheels.glob("cardcheck-*.whl"))) as wheel:
        wheel.extractall(site)
    return site


def health_status(address: str, service: str) -> int | None:
    """The health of `service` at `address`, None while it does not answer yet."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
            return reply.status
    except grpc.RpcError as error:
        # The server is up but has never heard of the name: the probe would fail forever.
        assert error.code() != grpc.StatusCode.NOT_FOUND, f"{address} serves no health status for {service!r}"
        return None


@pytest.fixture
def secret_urls(request, database_url) -> dict[str, dict[str, str]]:
    """What each service's Secret would hand it: on PostgreSQL, one database where each of the
    three that keep state logs in as its own role (deploy/postgres/roles.sql), and the gateway's
    Redis, as at scale; on SQLite, neither (the embedded default)."""
    if database_url is None:
        return {}
    urls: dict[str, dict[str, str]] = {
        service: {"CARDCHECK_DATABASE_URL": url}
        for service, url in request.getfixturevalue("pg_service_roles").items()
    }
    urls["gateway"] |= {
        "CARDCHECK_REDIS_URL": request.getfixturevalue("redis_url"),
        "CARDCHECK_REDIS_KEY_PREFIX": f"deploy-{secrets.token_hex(4)}",
    }
    return urls


@pytest.mark.e2e
def test_the_image_command_starts_and_stops_each_service(base: Manifests, tmp_path: Path, secret_urls) -> None:
    """Each Deployment's command, on a regular install of what the image copies, with its
    environment from the manifests (loopback ports instead of Services; the Secret's database
    and Redis URLs from the test's PostgreSQL and Redis, or the embedded default): SERVING on its
    readiness name, then gone with exit code 0 soon after SIGTERM. On PostgreSQL the three
    services that keep state migrate one database at the same time, each as its own role."""
    site = build_install(tmp_path)
    image = final_stage()
    ports = {service: free_port() for service in SERVICES}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("CARDCHECK_", "OTEL_", "PYTHON"))}
    base_env |= {k: v for k, v in image_env(image).items() if k not in ("PATH", "HOME", "CARDCHECK_DATA_DIR")}
    base_env["PYTHONPATH"] = str(site)

    where = subprocess.run(
        [sys.executable, "-c", "import sys; print(*(__import__(s).__file__ for s in sys.argv[1:]))", *SERVICES],
        env=base_env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert all(Path(f).is_relative_to(site) for f in where.stdout.split()), where.stdout

    started: dict[str, tuple[subprocess.Popen, str, float]] = {}
    try:
        for deployment in base.deployments:
            container = pod_spec(deployment)["containers"][0]
            service = service_of(container)
            manifest_env = container_env(base, container)
            env = base_env | manifest_env
            env.pop("CARDCHECK_DATABASE_URL", None)
            env.pop("CARDCHECK_REDIS_URL", None)
            # Only what this container's Secret references name (the prefix goes with Redis).
            wanted = set(manifest_env) | ({"CARDCHECK_REDIS_KEY_PREFIX"} if "CARDCHECK_REDIS_URL" in manifest_env else set())
            env |= {k: v for k, v in secret_urls.get(service, {}).items() if k in wanted}
            env |= {f"CARDCHECK_{s.upper()}_ADDR": f"127.0.0.1:{port}" for s, port in ports.items()}
            env |= {"CARDCHECK_BIND_HOST": "127.0.0.1", "CARDCHECK_DATA_DIR": str(tmp_path / service)}
            command = [sys.executable, *container_command(container)[1:]]
            with (tmp_path / f"{service}.log").open("wb") as log:
                process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
            readiness = container["readinessProbe"]["grpc"]["service"]
            started[service] = (process, readiness, Settings.from_env(env).shutdown_grace_s)

        deadline = time.monotonic() + 90
        waiting = dict(started)
        while waiting and time.monotonic() < deadline:
            for service, (process, readiness, _) in list(waiting.items()):
                assert process.poll() is None, (tmp_path / f"{service}.log").read_text()
                if health_status(f"127.0.0.1:{ports[service]}", readiness) == health_pb2.HealthCheckResponse.SERVING:
                    del waiting[service]
            time.sleep(0.2)
        assert not waiting, f"not SERVING within 90 s: {sorted(waiting)}"
    finally:
        for process, _, _ in started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for service, (process, _, grace) in started.items():
            try:
                codes[service] = process.wait(timeout=grace + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[service] = process.wait(timeout=10)
    assert codes == dict.fromkeys(started, 0), {s: (tmp_path / f"{s}.log").read_text()[-2000:] for s in codes}
    # The one database holds each stateful service's tables, in the schema of its own role.
    for service, urls in secret_urls.items():
        import sqlalchemy as sa

        url = sa.engine.make_url(urls["CARDCHECK_DATABASE_URL"])
        engine = sa.create_engine(url)
        try:
            tables = set(sa.inspect(engine).get_table_names(schema=url.username))
        finally:
            engine.dispose()
        assert f"alembic_version_{service}" in tables, (service, tables)
