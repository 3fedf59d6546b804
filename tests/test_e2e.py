"""The whole journey through real processes started by `cardcheck up`, on SQLite and on
PostgreSQL; the trace it leaves; grpcurl against the gateway; the supervisor's own duties."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from cardcheck import dataset
from cardcheck.banks import BANK_CODES
from cardcheck.cli.demo import Journey, walk
from cardcheck.v1 import common_pb2
from tests.conftest import pg_schema
from tests.harness.mesh import BIN, Mesh, start_mesh, wait_for

pytestmark = pytest.mark.e2e

SEED, PEOPLE = 4242, 40
PASSWORD = "246810"
CARD_TYPE = {common_pb2.CARD_TYPE_DEBIT: "DEBIT", common_pb2.CARD_TYPE_CREDIT: "CREDIT"}


def expected_cards(records: list[dataset.CardRecord], person: dataset.Person) -> list[tuple[str, str, str, str]]:
    """FORMAT.md's "What a bank answers", written out again independently of bank_sim."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return sorted(
        (r.bank, r.card_type, r.pan[:4], r.pan[-4:])
        for r in records
        if r.id_number.upper() == person.id_number.upper()
        and r.holder_name == person.name
        and r.status != "CLOSED"
        and r.reserved_phone is not None
        and (r.id_expiry is None or r.id_expiry >= today)
        and r.cnp_enabled
    )


@pytest.fixture(scope="module")
def records() -> list[dataset.CardRecord]:
    return dataset.generate(SEED, PEOPLE)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def mesh(request, tmp_path_factory, records):
    data_dir = tmp_path_factory.mktemp(f"mesh-{request.param}")
    dataset_file = data_dir / "cards.jsonl"
    dataset.dump(records, dataset_file)
    extra_env = {"CARDCHECK_SMS_RESEND_S": "1"}  # the demo runs twice within a minute
    with contextlib.ExitStack() as cleanup:
        if request.param == "postgres":  # one schema for the module's mesh
            extra_env["CARDCHECK_DATABASE_URL"] = cleanup.enter_context(pg_schema("e2e"))
        running = start_mesh(data_dir, "--dataset", str(dataset_file), extra_env=extra_env)
        running.dataset_file = dataset_file
        yield running
        code = running.stop()
        output = running.output()
        assert code == 0, output
        # Stopped in order: the public edge first, the banks last.
        stopped = [
            line.split("|")[0].strip() for line in output.splitlines() if "|" in line and line.endswith(" stopped")
        ]
        assert stopped == ["gateway", "report_service", "notifier", "bank_connector", "bank_sim"], stopped


async def test_the_journey_ends_in_the_report_the_banks_hold(mesh: Mesh, records, capsys) -> None:
    person = dataset.pick_demo_person(records)
    journey = Journey(mesh.settings, person, PASSWORD)
    try:
        report = await walk(journey)
    finally:
        await journey.close()
    # The watch showed each bank once, however many of them each event brought.
    watched = [line.split()[0] for line in capsys.readouterr().out.splitlines() if re.search(r"\[\d+/24\]$", line)]
    assert sorted(watched) == sorted(BANK_CODES), watched

    got = sorted((c.bank_code, CARD_TYPE[c.card_type], c.first4, c.last4) for c in report.cards)
    assert got == expected_cards(records, person)
    assert len(got) >= 5
    # One summary row per bank asked (all 24 answered), zero rows included, counts matching the cards.
    assert len(report.summary) == 24 and not report.unavailable_banks
    counts = Counter((bank, kind) for bank, kind, _, _ in got)
    for row in report.summary:
        assert (row.debit_count, row.credit_count) == (counts[(row.bank_code, "DEBIT")], counts[(row.bank_code, "CREDIT")])
    assert "出租、出借、出售" in report.notice
    assert report.expires_at.ToDatetime() - report.generated_at.ToDatetime() == __import__("datetime").timedelta(days=7)

    mesh.journey_person = person  # for the trace test below

    # The journey left an intact hash-chained audit trail, with no personal data in it.
    audit = await asyncio.to_thread(
        subprocess.run, [str(BIN / "cardcheck"), "audit", "verify"], env=mesh.env,
        capture_output=True, text=True, timeout=60,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert audit.stdout.startswith("audit trail OK")


def _spans(data_dir: Path) -> list[dict]:
    spans = []
    for file in (data_dir / "spans").glob("*.jsonl"):
        spans += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return spans


def test_submit_query_leaves_one_trace_across_every_service(mesh: Mesh, records) -> None:
    person = getattr(mesh, "journey_person", None)
    if person is None:
        pytest.fail("the journey test did not run first")
    by_id: dict[str, dict] = {}
    submit = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # span files are written in batches
        spans = _spans(mesh.data_dir)
        by_id = {s["context"]["span_id"]: s for s in spans}
        submit = next((s for s in spans if s["name"] == "/cardcheck.v1.CardCheck/SubmitQuery"), None)
        if submit:
            trace = [s for s in spans if s["context"]["trace_id"] == submit["context"]["trace_id"]]
            services = {s["resource"]["attributes"]["service.name"] for s in trace}
            if len(services) == 5 and sum(s["name"].endswith("/Send") for s in trace) >= 4:
                break
        time.sleep(0.5)
    assert submit is not None, "no SubmitQuery span"
    trace = [s for s in by_id.values() if s["context"]["trace_id"] == submit["context"]["trace_id"]]

    def service(span):
        return span["resource"]["attributes"]["service.name"]

    def parent(span):
        return by_id.get(span.get("parent_id"))

    def server_spans(svc, name):
        return [s for s in trace if service(s) == svc and s["name"] == name and s["kind"] == "SpanKind.SERVER"]

    # Each edge: a server span of the callee whose parent is the caller's client span.
    def assert_edge(caller, callee, method):
        found = server_spans(callee, method)
        assert found, f"no {callee} span for {method}"
        assert any(
            (client := parent(span)) is not None and service(client) == caller and client["kind"] == "SpanKind.CLIENT"
            for span in found
        ), f"no {callee} {method} span is a child of a {caller} client span"

    # And no server span but the root hangs loose: every call was made inside this trace.
    for span in trace:
        if span["kind"] == "SpanKind.SERVER" and span is not submit:
            assert parent(span) is not None and parent(span)["kind"] == "SpanKind.CLIENT", span["name"]

    assert {service(s) for s in trace} == {"gateway", "report_service", "bank_connector", "bank_sim", "notifier"}
    assert_edge("gateway", "report_service", "/cardcheck.v1.ReportService/CreateQuery")
    assert_edge("report_service", "bank_connector", "/cardcheck.v1.BankConnector/FanOut")
    assert_edge("report_service", "notifier", "/cardcheck.v1.Notifier/Send")  # "report ready"
    assert_edge("bank_connector", "bank_sim", "/cardcheck.v1.IssuingBank/LookupCards")
    # A bank call per bank, each its own span under the fan-out.
    bank_calls = server_spans("bank_sim", "/cardcheck.v1.IssuingBank/LookupCards")
    assert len(bank_calls) == 24

    # Nothing personal on any span of any trace.
    text = json.dumps(_spans(mesh.data_dir), ensure_ascii=False)
    for secret in (person.id_number, person.phone, person.name, person.card_number):
        assert secret not in text
    for record in records:
        assert record.pan not in text


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)  # the same gateway code: once is enough
def test_grpcurl_lists_services_and_calls_list_banks(mesh: Mesh) -> None:
    address = mesh.settings.addresses["gateway"]
    listed = subprocess.run([str(BIN / "grpcurl"), "-plaintext", address, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "cardcheck.v1.CardCheck" in services and "grpc.health.v1.Health" in services

    called = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-d", "{}", address, "cardcheck.v1.CardCheck/ListBanks"],
        capture_output=True, text=True, timeout=60,
    )
    assert called.returncode == 0, called.stderr
    banks = json.loads(called.stdout)["banks"]
    assert len(banks) == 24
    assert {"code": "ICBC", "name": "中国工商银行", "kind": "BANK_KIND_NATIONAL", "available": True} in banks

    refused = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-d", '{"purpose": "SMS_PURPOSE_REGISTER", "phone": "12"}',
         address, "cardcheck.v1.CardCheck/RequestSmsCode"],
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0
    assert "InvalidArgument" in refused.stderr or "INVALID_ARGUMENT" in refused.stderr


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)  # the same code paths: once is enough
def test_demo_command_runs_again_on_the_same_mesh(mesh: Mesh) -> None:
    """A second `cardcheck demo` finds the user registered and in cooldown, and still shows the report."""
    run = subprocess.run([str(BIN / "cardcheck"), "demo", "--dataset", str(mesh.dataset_file), "--payment-password", PASSWORD],
                         env=mesh.env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "signing in instead" in run.stdout
    waits = [int(w) for w in re.findall(r"waiting (\d+) s", run.stdout)]
    assert all(w <= 2 for w in waits), waits  # CARDCHECK_SMS_RESEND_S=1 reached the gateway, not 60 s
    assert "未满7天" in run.stdout
    assert "**** ****" in run.stdout and "demo: the whole journey succeeded" in run.stdout


def test_up_stops_everything_when_a_service_dies(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path / "data")
    try:
        children = mesh.children()
        assert set(children) == {"gateway", "report_service", "bank_connector", "notifier", "bank_sim"}
        os.kill(children["notifier"], signal.SIGKILL)
        code = mesh.process.wait(60)
    finally:
        mesh.stop()
    assert code == 1
    assert "notifier exited unexpectedly" in mesh.output()
    for pid in children.values():  # nothing left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_up_refuses_a_malformed_dataset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"bank": "ICBC", "pan": "123"}\n', encoding="utf-8")
    mesh = start_mesh(tmp_path / "data", "--dataset", str(bad), wait=False)
    code = mesh.process.wait(90)
    assert code != 0
    assert "line 1" in mesh.output()
    assert "bank_sim exited unexpectedly" in mesh.output()
    wait_for(mesh, "stopped")


def _demo(mesh: Mesh, dataset_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cardcheck"), "demo", "--dataset", str(dataset_file), "--payment-password", PASSWORD],
        env=mesh.env, capture_output=True, text=True, timeout=120,
    )


def _cards_shown(output: str) -> list[str]:
    return sorted(line.strip() for line in output.splitlines() if "**** ****" in line)


def test_a_master_key_rotation_keeps_the_account_and_the_report(tmp_path: Path, records) -> None:
    """`cardcheck keys rotate` between two runs of the mesh: the person signs in to the account
    registered under the old key and sees the report sealed under it; `cardcheck keys rewrap`
    moves everything to the new key, and with the old key destroyed the same still holds."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    dataset_file = tmp_path / "cards.jsonl"
    dataset.dump(records, dataset_file)
    extra_env = {"CARDCHECK_SMS_RESEND_S": "1"}
    runs = []
    for step in ("before", "rotated", "old key destroyed"):
        mesh = start_mesh(data_dir, "--dataset", str(dataset_file), extra_env=extra_env)
        try:
            run = _demo(mesh, dataset_file)
            assert run.returncode == 0, f"{step}: {run.stdout}{run.stderr}"
            runs.append(run.stdout)
            if step == "rotated":
                rewrapped = subprocess.run([str(BIN / "cardcheck"), "keys", "rewrap"], env=mesh.env,
                                           capture_output=True, text=True, timeout=120)
                assert rewrapped.returncode == 0, rewrapped.stdout + rewrapped.stderr
                counts = dict(re.findall(r"^(\w+): (\d+) rows rewrapped", rewrapped.stdout, re.MULTILINE))
                assert int(counts["gateway"]) >= 1 and int(counts["report_service"]) >= 1, rewrapped.stdout
        finally:
            assert mesh.stop() == 0, mesh.output()
        if step == "before":
            rotated = subprocess.run([str(BIN / "cardcheck"), "keys", "rotate"], env=mesh.env,
                                     capture_output=True, text=True, timeout=60)
            assert rotated.returncode == 0, rotated.stderr
        elif step == "rotated":
            for retired in (data_dir / "keys" / "retired").iterdir():
                retired.unlink()
    assert "signing in instead" in runs[1] and "signing in instead" in runs[2]
    assert _cards_shown(runs[0]) and _cards_shown(runs[1]) == _cards_shown(runs[0]) == _cards_shown(runs[2])


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)  # the same code on both: once is enough
def test_every_service_serves_metrics_after_the_journey(mesh: Mesh, records) -> None:
    import sqlite3

    from tests.harness.metrics import family_names, metrics_port, promtool_check, scrape, value

    scrapes = {service: scrape(metrics_port(address)) for service, address in mesh.settings.addresses.items()}
    for service, text in scrapes.items():
        promtool_check(text)
        assert value(text, "grpc_server_handled_total", grpc_code="OK") > 0, service
        assert "grpc.health" not in text  # probes are not the service's work
    gateway, reports = scrapes["gateway"], scrapes["report_service"]
    connector, notifier = scrapes["bank_connector"], scrapes["notifier"]
    assert value(gateway, "grpc_server_handled_total", grpc_method="SubmitQuery", grpc_code="OK") >= 1
    assert value(gateway, "grpc_client_handled_total", grpc_service="cardcheck.v1.ReportService") >= 1
    assert value(gateway, "cardcheck_gateway_limit_decisions_total", limit="submit_global", outcome="allowed") >= 1
    assert value(gateway, "cardcheck_gateway_sessions_active") >= 1
    assert value(reports, "cardcheck_report_queries_accepted_total") >= 1
    assert value(reports, "cardcheck_report_queries_ready_total") >= 1
    assert value(reports, "cardcheck_report_time_to_ready_seconds_count") >= 1
    assert value(reports, "cardcheck_report_queries", status="READY") >= 1
    # OK, or CANCELLED when the worker had every outcome before the stream's end was read.
    assert value(reports, "grpc_client_handled_total", grpc_method="FanOut") >= 1
    # Per bank, by bank code.
    assert value(connector, "cardcheck_bank_calls_total", bank="ICBC", outcome="ANSWERED") >= 1
    assert value(connector, "cardcheck_bank_attempt_seconds_count", bank="ICBC") >= 1
    assert value(connector, "cardcheck_bank_breaker_state", bank="ICBC") == 0
    assert value(notifier, "cardcheck_sms_deliveries_total", outcome="DELIVERED") >= 2
    assert "cardcheck_outbox_depth" in family_names(notifier)

    # No label value, nor anything else in the exposition, names the person.
    person = mesh.journey_person
    cards = [r.pan for r in records if r.id_number.upper() == person.id_number.upper()]
    with sqlite3.connect(mesh.data_dir / "gateway.db") as db:
        users = [row[0] for row in db.execute("SELECT user_id FROM gw_sessions")]
    personal = [person.phone, person.id_number, person.card_number, person.name, *cards, *users]
    assert users and cards
    for service, text in scrapes.items():
        for secret in personal:
            assert secret not in text and secret.lower() not in text.lower(), (service, secret)

    # docs/metrics.md documents exactly what the services expose, as they describe it.
    documented = documented_metrics()
    for service, text in scrapes.items():
        assert family_names(text) == documented[service].keys(), service
        for line in text.splitlines():
            if line.startswith("# HELP "):
                _, _, name, meaning = line.split(" ", 3)
                assert documented[service][name] == meaning, name


def documented_metrics() -> dict[str, dict[str, str]]:
    """docs/metrics.md's table, `| name | type | services | labels | meaning |`: each service's
    metrics and their meanings."""
    found: dict[str, dict[str, str]] = {}
    text = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            for service in cells[2].split(", "):
                found.setdefault(service, {})[cells[0].strip("`")] = cells[4]
    return found


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)  # the same code on both: once is enough
def test_prometheus_evaluates_the_dashboard_and_the_rules_on_the_mesh(mesh: Mesh, tmp_path: Path) -> None:
    """A real Prometheus scrapes the mesh after the journey: every dashboard query and every
    rule is valid PromQL, and the dashboard's queries find data (bar those that count what the
    journey never did)."""
    import urllib.parse
    import urllib.request

    import yaml

    from bank_sim.process import free_port
    from tests.harness.metrics import metrics_port, prometheus_binary
    from tests.test_alerting import RULES, alerts, dashboard_queries, rule_groups

    port = free_port()
    targets = [f"127.0.0.1:{metrics_port(address)}" for address in mesh.settings.addresses.values()]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "cardcheck", "static_configs": [{"targets": targets}]}],
    }))
    process = subprocess.Popen(
        [prometheus_binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"),
    )

    def query(expr: str) -> dict:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())

    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and not ready:
            time.sleep(0.5)
            with contextlib.suppress(OSError, ValueError):
                up = query("sum(up)")["data"]["result"]
                # three scrapes each, for rates, and the recording rules evaluated
                samples = query("min(count_over_time(up[1m]))")["data"]["result"]
                recorded = query("cardcheck:gateway_errors:ratio_rate5m")["data"]["result"]
                ready = bool(up and up[0]["value"][1] == str(len(targets)) and samples
                             and int(samples[0]["value"][1]) >= 3 and recorded)
        assert ready, json.dumps([query("up"), query("count_over_time(up[1m])"),
                                  query("cardcheck:gateway_errors:ratio_rate5m")])
        # What the journey did not do has no series: no refusal, no retry-worthy limit.
        may_be_empty = {"Rate-limit decisions refused, by limit", "Load shed and refusals by reason"}
        for title, expr in dashboard_queries():
            answer = query(expr)
            assert answer["status"] == "success", (title, expr, answer)
            assert answer["data"]["result"] or title in may_be_empty, (title, expr)
        for rule in [r for group in rule_groups() for r in group["rules"]]:
            answer = query(rule["expr"])
            assert answer["status"] == "success", (rule.get("alert") or rule.get("record"), answer)
        # No alert fires on a healthy mesh.
        firing = query('ALERTS{alertstate="firing"}')["data"]["result"]
        assert firing == [], firing
        assert len(alerts()) >= 9
    finally:
        process.terminate()
        process.wait(30)
