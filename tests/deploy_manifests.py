"""The Kubernetes manifests (deploy/k8s), rendered and held to the code they run: each
container's environment is one the services accept, every address reaches a Service that reaches
the port its target listens on, the probes ask the health names the servers register, shutdown
and disruption budgets leave room to drain, the pods run locked down, secrets come only from
Secrets, and the network policies admit exactly the calls the code makes.

Each check is a `*_problems` function that lists what is wrong; CHECKS names them."""

from __future__ import annotations

import ast
import base64
import copy
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from bank_connector.config import ConnectorConfig
from bank_sim.app import _arguments as bank_sim_arguments
from bank_sim.app import start_options as bank_sim_start_options
from cardcheck.banks import BANK_CODES
from cardcheck.cli.config import SERVICE_MODELS, variables
from cardcheck.cli.config import accepted as accepted_variables
from cardcheck.runtime.certs import spiffe_id
from cardcheck.runtime.keys import load_master_key
from cardcheck.runtime.settings import Settings, SettingsError
from gateway.config import GatewayConfig
from gateway.face import face_provider_name
from notifier.config import NotifierConfig
from report_service.config import ReportServiceConfig
from tests.deploy_image import ROOT, SERVICES, container_command, final_stage, image_uid

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "staging": K8S / "overlays" / "staging",
    "production": K8S / "overlays" / "production",
}
REPLICATED = ("gateway", "report_service", "bank_connector", "notifier")
SIMULATED = ("bank_sim",)  # not deployed in production

# What a Secret reference stands for while the environment is checked: valid values of the right
# shape, so that the services' own validation runs on everything else.
SECRET_PLACEHOLDERS = {
    "CARDCHECK_MASTER_KEY": base64.b64encode(bytes(range(32))).decode(),
    "CARDCHECK_DATABASE_URL": "postgresql+psycopg://cardcheck@postgres.invalid:5432/cardcheck",
    "CARDCHECK_REDIS_URL": "redis://redis.invalid:6379/0",
    "CARDCHECK_SMS_WEBHOOK_SECRET": "placeholder-webhook-secret-0123456789",
    "CARDCHECK_RETIRED_MASTER_KEYS": base64.b64encode(bytes(range(1, 33))).decode(),
    "CARDCHECK_TENCENT_SECRET_ID": "AKIDplaceholder0123456789",
    "CARDCHECK_TENCENT_SECRET_KEY": "placeholder-tencent-secret-key",
}
SECRET_VARS = frozenset(SECRET_PLACEHOLDERS)
# Read only when set: the SMS and face vendors' secrets, the master keys a rotation retired.
OPTIONAL_SECRETS = frozenset(
    {"CARDCHECK_SMS_WEBHOOK_SECRET", "CARDCHECK_TENCENT_SECRET_ID", "CARDCHECK_TENCENT_SECRET_KEY",
     "CARDCHECK_RETIRED_MASTER_KEYS"}
)


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
    """The secret settings a service reads: the shared ones its code uses, and those its own
    settings model declares secret."""
    needed = {v.name for m in SERVICE_MODELS[service] if m is not Settings for v in variables(m) if v.secret}
    for _, tree in service_sources(service):
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "load_master_key":
                needed.add("CARDCHECK_MASTER_KEY")
            if isinstance(node, ast.Name) and node.id == "load_keyring":
                needed |= {"CARDCHECK_MASTER_KEY", "CARDCHECK_RETIRED_MASTER_KEYS"}
            if isinstance(node, ast.Name) and node.id == "make_engine":
                needed.add("CARDCHECK_DATABASE_URL")
            if isinstance(node, ast.Attribute) and node.attr == "redis_url":
                needed.add("CARDCHECK_REDIS_URL")
            if isinstance(node, ast.Constant) and node.value in SECRET_VARS:
                needed.add(node.value)
    return needed


def known_variables() -> tuple[set[str], tuple[str, ...]]:
    """Every CARDCHECK_* variable a service reads, as the settings models declare them: exact
    names, and the prefixes of patterns like CARDCHECK_BANK_ADDR_<CODE>."""
    return accepted_variables()


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


def service_of(container: dict) -> str:
    """The service a container runs, from its command (`<python> -m SERVICE ...`)."""
    command = container_command(container)
    if len(command) >= 3 and command[1] == "-m" and command[2] in SERVICES:
        return command[2]
    raise AssertionError(f"container {container['name']} runs {command}, not `python -m <service>`")


def served(m: Manifests) -> Iterator[tuple[dict, dict, str]]:
    """Each Deployment with its main container (the first, not an init container) and the
    service that container runs."""
    for deployment in m.deployments:
        container = pod_spec(deployment)["containers"][0]
        yield deployment, container, service_of(container)


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
        face_provider_name(settings, config)
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
            if container_env(m, container).get("CARDCHECK_LOG_FORMAT") != "json":
                problems.append(f"{service}: logs not in JSON (CARDCHECK_LOG_FORMAT): no trace ids to follow")
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
    for deployment, container, service in served(m):
        env = container_env(m, container)
        if deployment["metadata"]["name"] != service.replace("_", "-"):
            problems.append(f"Deployment {deployment['metadata']['name']} runs {service}")
        if env.get("CARDCHECK_BIND_HOST") != "0.0.0.0":
            problems.append(f"{service} binds {env.get('CARDCHECK_BIND_HOST', '127.0.0.1')}, not 0.0.0.0")
        grpc_ports = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == "grpc"]
        if grpc_ports != [listen_port(m, deployment)]:
            problems.append(f"{service} listens on {listen_port(m, deployment)}, its grpc port is {grpc_ports}")
        deployed = {service_of(pod_spec(d)["containers"][0]) for d in m.deployments}
        for caller, callee in sorted(edges):
            if caller == service and callee == "bank_sim" and callee not in deployed:
                # No simulator (production): every bank at its own address instead.
                unset = [c for c in BANK_CODES if f"CARDCHECK_BANK_ADDR_{c}" not in env]
                if unset:
                    problems.append(f"{service}: no bank_sim, and no address for the banks {', '.join(unset)}")
            elif caller == service and f"CARDCHECK_{callee.upper()}_ADDR" not in env:
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


def probe_port(m: Manifests, deployment: dict) -> int:
    """Where the kubelet's gRPC probe finds health: the gRPC port, or with TLS on the plaintext
    health port (cardcheck/runtime/security.py)."""
    container = pod_spec(deployment)["containers"][0]
    settings = Settings.from_env(container_env(m, container))
    service = service_of(container)
    return int(settings.health_address(service).rpartition(":")[2]) if settings.tls else settings.port(service)


def probe_problems(m: Manifests) -> list[str]:
    problems = []
    for deployment, container, service in served(m):
        port, names = probe_port(m, deployment), health_names(service)
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
                problems.append(f"{service}: {kind} asks port {probe['grpc'].get('port')}, health is on {port}")
            if container_port(deployment, port) is None:
                problems.append(f"{service}: its health port {port} is not a container port")
            asked = probe["grpc"].get("service", "")
            if kind == "readinessProbe" and asked not in names:
                problems.append(f"{service}: readiness asks {asked!r}, not one of its own {sorted(names)}")
            if kind == "livenessProbe" and asked != "":
                # A service's own name is NOT_SERVING while its database is down: a restart
                # would not bring the database back (cardcheck/runtime/readiness.py).
                problems.append(f"{service}: liveness asks {asked!r}, not the server as a whole (\"\")")
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
    for deployment, container, service in served(m):
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
    for deployment, _, service in served(m):
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
            for var in sorted(needed - OPTIONAL_SECRETS):
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


def metrics_port(m: Manifests, deployment: dict) -> int | None:
    """Where the service serves /metrics, as its settings say (None: metrics off)."""
    container = pod_spec(deployment)["containers"][0]
    address = Settings.from_env(container_env(m, container)).metrics_address(service_of(container))
    return None if address is None else int(address.rpartition(":")[2])


def scraper_rules(m: Manifests, deployment: dict) -> list[dict]:
    """The ingress rules of the policies selecting the pods that admit a namespace by label."""
    return [
        rule
        for p in m.of_kind("NetworkPolicy")
        if namespace_of(p) == namespace_of(deployment) and labels_match(p["spec"]["podSelector"], pod_labels(deployment))
        for rule in p["spec"].get("ingress", [])
        if any(peer.get("namespaceSelector", {}).get("matchLabels") for peer in rule.get("from", []))
    ]


def metrics_problems(m: Manifests) -> list[str]:
    """Every service serves /metrics on a port named `metrics`, which the pod's scrape
    annotations name and a NetworkPolicy opens to the scraper's namespace, and to nothing else."""
    problems = []
    for deployment in m.deployments:
        container = pod_spec(deployment)["containers"][0]
        service = service_of(container)
        port = metrics_port(m, deployment)
        if port is None:
            problems.append(f"{service} serves no metrics (CARDCHECK_METRICS off)")
            continue
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
        if named.get("metrics") != port:
            problems.append(f"{service} serves /metrics on {port}, its container port `metrics` is {named.get('metrics')}")
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        wanted = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
        for key, value in wanted.items():
            if annotations.get(key) != value:
                problems.append(f"{service}: pod annotation {key} is {annotations.get(key)!r}, not {value!r}")
        rules = scraper_rules(m, deployment)
        if not any(port_admitted(rule, deployment, port) for rule in rules):
            problems.append(f"{service}: no NetworkPolicy admits the scraper to its metrics port")
        if any(port_admitted(rule, deployment, listen_port(m, deployment)) for rule in rules):
            problems.append(f"{service}: the scraper's namespace may reach its gRPC port")
        if service != "gateway" and admitted_on(m, EXTERNAL, deployment, port, ignore=rules):
            problems.append(f"{service}: its metrics port is open to anyone")
    return problems


def admitted_on(m: Manifests, source: dict | str, target: dict, port: int, *, ignore: list[dict]) -> bool:
    """Whether a rule other than `ignore` admits `source` to `port` of `target`'s pods."""
    namespace = namespace_of(target)
    for policy in m.of_kind("NetworkPolicy"):
        if namespace_of(policy) != namespace or not labels_match(policy["spec"]["podSelector"], pod_labels(target)):
            continue
        for rule in policy["spec"].get("ingress", []):
            if any(rule is r for r in ignore) or not port_admitted(rule, target, port):
                continue
            peers = rule.get("from")
            if not peers or any(peer_admits(peer, source, namespace) for peer in peers):
                return True
    return False


def mounted_secret(deployment: dict, container: dict, path: Path) -> str | None:
    """The Secret whose volume is mounted where `path` is read, or None."""
    volumes = {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if Path(mount["mountPath"]) == path.parent and mount["name"] in volumes:
            return volumes[mount["name"]].get("secret", {}).get("secretName")
    return None


def tls_problems(m: Manifests) -> list[str]:
    """Off the sandbox, the mesh runs on TLS with no simulator; with TLS on, every file a
    service reads comes from a mounted Secret, and its own certificate is a cert-manager
    Certificate naming its identity (the URI SAN the servers authorize by)."""
    problems = []
    certificates = {c["spec"]["secretName"]: c["spec"] for c in m.of_kind("Certificate")}
    for deployment, container, service in served(m):
        settings = Settings.from_env(container_env(m, container))
        if not settings.sandbox and not settings.tls:
            problems.append(f"{service}: CARDCHECK_SANDBOX is off and CARDCHECK_TLS too: production in plaintext")
        if not settings.sandbox and service == "bank_sim":
            problems.append("bank_sim runs with CARDCHECK_SANDBOX off")
        if not settings.tls:
            continue
        own = settings.tls_files(service)
        wanted = [*own.paths()]
        if service == "gateway":
            wanted += [settings.gateway_public_files().certificate, settings.gateway_public_files().key]
        if service == "bank_connector":
            wanted += [path for code in sorted(settings.bank_addresses) for path in settings.bank_tls_files(code).paths()]
        for path in dict.fromkeys(wanted):
            if mounted_secret(deployment, container, path) is None:
                problems.append(f"{service} reads {path}, which no mounted Secret holds")
        secret = mounted_secret(deployment, container, own.certificate)
        spec = certificates.get(secret or "")
        if spec is None:
            problems.append(f"{service}: its certificate's Secret {secret} is no cert-manager Certificate's")
            continue
        if spec.get("uris") != [spiffe_id(service)]:
            problems.append(f"{service}: its Certificate names {spec.get('uris')}, not {spiffe_id(service)}")
        if not {"server auth", "client auth"} <= set(spec.get("usages", [])):
            problems.append(f"{service}: its Certificate is not for both server and client auth")
        if service.replace("_", "-") not in spec.get("dnsNames", []):
            problems.append(f"{service}: its Certificate lacks the Service's name {service.replace('_', '-')}")
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
    "metrics": metrics_problems,
    "tls": tls_problems,
}
