"""The Kubernetes manifests (deploy/k8s) and the container image (Dockerfile), held to the code
they run: each container's environment is one the services accept, every address reaches a
Service that reaches the port its target listens on, the probes ask the health names the
servers register, the network policies admit exactly the calls the code makes, and the image's
command starts each of the five services from a regular install.

Each check is a function that lists what is wrong; the tests assert the list is empty for every
kustomization, and that a deliberately broken copy of the manifests makes it non-empty. The checks
themselves are in tests/deploy_manifests.py and tests/deploy_image.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bank_sim.process import free_port
from cardcheck.runtime.settings import Settings
from tests.deploy_image import (
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    SERVICES,
    container_command,
    dockerfile_stages,
    exec_form,
    final_stage,
    ignored_by,
    image_env,
    image_problems,
)
from tests.deploy_manifests import (
    CHECKS,
    KUSTOMIZATIONS,
    SECRET_PLACEHOLDERS,
    SIMULATED,
    Manifests,
    code_edges,
    container_env,
    containers,
    kubectl,
    pod_spec,
    read_base,
    rendered,
    replicas,
    service_of,
)

# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def manifests(request) -> Manifests:
    return Manifests(rendered(request.param))


@pytest.fixture
def base() -> Manifests:
    return Manifests(rendered("base"))


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomizations_render_the_whole_mesh(name: str) -> None:
    m = Manifests(rendered(name))
    expected = [s for s in SERVICES if name != "production" or s not in SIMULATED]
    assert sorted(service_of(containers(d)[0]) for d in m.deployments) == sorted(expected)
    assert {s["metadata"]["name"] for s in m.of_kind("Service")} == {s.replace("_", "-") for s in expected}
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


def test_production_runs_on_cert_manager_certificates_without_the_simulator() -> None:
    m = Manifests(rendered("production"))
    config = _configmap(m)
    assert config["CARDCHECK_SANDBOX"] == "false" and config["CARDCHECK_TLS"] == "on"
    assert config["CARDCHECK_LOG_FORMAT"] == "json" and "CARDCHECK_BANK_SIM_ADDR" not in config
    assert not [d for d in m.of_kind("NetworkPolicy") if "bank-sim" in d["metadata"]["name"]]
    issued = {c["spec"]["secretName"]: c["spec"]["issuerRef"]["name"] for c in m.of_kind("Certificate")}
    assert {issued[f"{s.replace('_', '-')}-tls"] for s in SERVICES if s not in SIMULATED} == {"cardcheck-mesh"}
    gateway = _container(m, "gateway")
    env = {v["name"]: v.get("value") for v in gateway["env"]}
    assert env["CARDCHECK_TLS_CERT_FILE"] == "/var/run/cardcheck/tls/tls.crt"
    assert env["CARDCHECK_GATEWAY_PUBLIC_CERT_FILE"] == "/var/run/cardcheck/public-tls/tls.crt"
    assert issued["gateway-public-tls"] == "public-issuer"
    assert config["CARDCHECK_FACE_PROVIDER"] == config["CARDCHECK_SMS_PROVIDER"] == "tencent"
    tencent = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in gateway["env"] if "TENCENT" in v["name"]}
    assert {ref["name"] for ref in tencent.values()} == {"gateway-secrets"}
    assert not any(ref.get("optional") for ref in tencent.values())


PRODUCTION_BREAKAGES: dict[str, tuple[str, Callable[[Manifests], object]]] = {
    "tls off": ("tls", lambda m: _configmap(m).update(CARDCHECK_TLS="off")),
    "certificate not mounted": (
        "tls", lambda m: _container(m, "notifier").update(
            volumeMounts=[v for v in _container(m, "notifier")["volumeMounts"] if v["name"] != "tls"])
    ),
    "another identity": (
        "tls", lambda m: m.named("Certificate", "notifier-tls")["spec"].update(uris=["spiffe://cardcheck/gateway"])
    ),
    "probe on the mTLS port": (
        "probes", lambda m: _container(m, "report_service")["readinessProbe"]["grpc"].update(port=50052)
    ),
    "a bank without an address": ("addresses", lambda m: _configmap(m).pop("CARDCHECK_BANK_ADDR_ICBC")),
}


@pytest.mark.parametrize("breakage", sorted(PRODUCTION_BREAKAGES))
def test_each_production_check_catches_its_breakage(breakage: str) -> None:
    check, breaks = PRODUCTION_BREAKAGES[breakage]
    m = Manifests(rendered("production"))
    assert CHECKS[check](m) == []
    breaks(m)
    assert CHECKS[check](m), f"{check} did not notice: {breakage}"


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
    "text logs": ("environment", lambda m: _configmap(m).update(CARDCHECK_LOG_FORMAT="text")),
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
    "liveness on the service's name": (
        "probes",
        lambda m: _container(m, "report_service")["livenessProbe"]["grpc"].update(service="cardcheck.v1.ReportService"),
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
    "metrics off": ("metrics", lambda m: _configmap(m).update(CARDCHECK_METRICS="off")),
    "metrics port unnamed": ("metrics", lambda m: _container(m, "notifier")["ports"].pop(1)),
    "metrics moved": ("metrics", lambda m: _configmap(m).update(CARDCHECK_BANK_SIM_METRICS_ADDR="0.0.0.0:9100")),
    "no scrape annotation": (
        "metrics", lambda m: m.deployment_of("gateway")["spec"]["template"]["metadata"].pop("annotations")
    ),
    "scrape on another port": (
        "metrics", lambda m: m.deployment_of("report_service")["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/port": "50052"})
    ),
    "scraper shut out": ("metrics", lambda m: m.docs.remove(m.named("NetworkPolicy", "cardcheck-metrics-ingress"))),
    "scraper reaches grpc": (
        "metrics", lambda m: _policy(m, "cardcheck-metrics-ingress")["ingress"][0]["ports"].append(
            {"port": "grpc", "protocol": "TCP"})
    ),
    "metrics public": (
        "metrics", lambda m: _policy(m, "bank-sim-ingress")["ingress"].append(
            {"ports": [{"port": "metrics", "protocol": "TCP"}]})
    ),
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
    "text logs": (r"CARDCHECK_LOG_FORMAT=json", "CARDCHECK_LOG_FORMAT=text"),
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
