"""`cardcheck load` and `cardcheck up --load-test`: the pure parts (the Poisson schedule, the
thresholds, the mix, recording from the scheduled start), then real runs against real meshes:
a load-test mesh completes journeys and leaves summary.json and a self-contained report.html, a
failing threshold exits 1, a default mesh's refusals are counted by reason, and the profile is
refused outside sandbox."""

from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
from pathlib import Path

import pytest

from cardcheck import dataset
from cardcheck.load import mix, run, schedule, thresholds
from cardcheck.load.recording import ALL_STAGES, SUMMARY_STAGES, Recorder
from tests.harness.mesh import BIN, Mesh, start_mesh

SEED, PEOPLE = 777, 120
SHAPE = {"journeys", "errors", "rate", "stages"}
FIGURES = {"p50_ms", "p90_ms", "p99_ms", "max_ms"}


# --- the schedule --------------------------------------------------------------------------


def test_arrivals_are_poisson_at_the_rate() -> None:
    rate, duration = 40.0, 250.0
    offsets = schedule.arrival_offsets(rate, duration, rng=random.Random(1))
    expected = rate * duration
    assert abs(len(offsets) - expected) < 4 * expected**0.5
    assert offsets == sorted(offsets) and 0 <= offsets[0] and offsets[-1] < duration
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    # Exponential gaps: mean 1/rate and a standard deviation as large (evenly spaced would be 0).
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    # Counts per second vary like a Poisson count: variance about the mean.
    per_second = [0] * int(duration)
    for offset in offsets:
        per_second[int(offset)] += 1
    assert statistics.variance(per_second) == pytest.approx(rate, rel=0.25)


def test_a_ramp_rises_linearly_from_nothing() -> None:
    rate, duration = 40.0, 200.0
    offsets = schedule.arrival_offsets(rate, duration, ramp=duration, rng=random.Random(2))
    assert schedule.expected_arrivals(rate, duration, duration) == rate * duration / 2
    first_half = sum(1 for o in offsets if o < duration / 2)
    # Λ(T/2) = rate T/8 of the rate T/2 in all: a quarter of the arrivals in the first half.
    assert first_half / len(offsets) == pytest.approx(0.25, abs=0.02)
    held = schedule.arrival_offsets(rate, duration, ramp=duration / 4, rng=random.Random(3))
    assert len([o for o in held if o >= duration / 4]) == pytest.approx(rate * duration * 3 / 4, rel=0.05)


@pytest.mark.parametrize("bad", [(0, 10, 0), (5, 0, 0), (5, 10, 11), (5, 10, -1)])
def test_a_schedule_needs_a_rate_a_duration_and_a_ramp_within_it(bad) -> None:
    with pytest.raises(ValueError):
        schedule.arrival_offsets(*bad)


# --- thresholds and the mix ----------------------------------------------------------------

SUMMARY = {
    "journeys": {"started": 10, "completed": 8},
    "errors": {"RATE_LIMITED": 2},
    "rate": {"offered": 5.0, "achieved": 4.0},
    "stages": {
        **{s: {"p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 30.0, "max_ms": 40.0} for s in SUMMARY_STAGES},
        "report": {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None},
    },
}


@pytest.mark.parametrize(
    ("text", "holds"),
    [
        ("journey.p99_ms<5000", True),
        ("journey.p99_ms < 30", False),
        ("journey.p99_ms<=30", True),
        ("submit.max_ms>=40.5", False),
        ("errors<3", True),
        ("errors.RATE_LIMITED==2", True),
        ("errors.SERVICE_BUSY<1", True),
        ("journeys.completed>9", False),
        ("rate.achieved>=4", True),
        ("report.p50_ms<1e9", False),  # nothing recorded: not met
        ("register.p50_ms<1e9", False),
    ],
)
def test_thresholds_check_the_summary(text: str, holds: bool) -> None:
    threshold = thresholds.parse(text, ALL_STAGES)
    assert threshold.check(SUMMARY)[0] is holds


@pytest.mark.parametrize(
    "text", ["journey.p99<5000", "journey.p99_ms<", "journey.p99_ms=5", "nobody.p50_ms<1", "journey.p99_ms<abc",
             "rate.peak<1", "journey.p99_ms<inf", ""],
)
def test_a_malformed_threshold_is_refused(text: str) -> None:
    with pytest.raises(thresholds.ThresholdError):
        thresholds.parse(text, ALL_STAGES)


def test_the_mix_draws_kinds_by_weight_and_refuses_nonsense() -> None:
    kinds = mix.parse_mix(["register,query,watch,report:1", "sign_in,query:3"])
    assert [k.stages for k in kinds] == [("register", "query", "watch", "report"), ("sign_in", "query")]
    assert mix.parse_mix([])[0].name == mix.DEFAULT_KIND
    rng = random.Random(4)
    drawn = [mix.choose(kinds, rng).name for _ in range(4000)]
    assert drawn.count("sign_in,query") / len(drawn) == pytest.approx(0.75, abs=0.03)
    for bad in ["report", "query,register", "register,sign_in", "query,report", "query:0", "query:x", "fly", "query,query"]:
        with pytest.raises(mix.MixError):
            mix.parse_kind(bad)
    with pytest.raises(mix.MixError):
        mix.parse_mix(["query", "query:2"])


# --- recording -----------------------------------------------------------------------------


def test_a_journey_counts_from_its_scheduled_start_in_hdr_histograms() -> None:
    recorder = Recorder(start=100.0, window_s=1.0)
    for i in range(1, 1001):  # journeys due at 100 + i/1000, each answered 1 ms per i later
        due = 100.0 + i / 1000
        recorder.journey_started(due)
        recorder.record("submit", due + i / 1000 - 0.0005, due + i / 1000)  # the stage alone: 0.5 ms
        recorder.record("journey", due, due + i / 1000)
    # A journey the tool got round to 2 s late, whose calls then took 10 ms: 2.01 s, not 10 ms.
    recorder.journey_started(102.0)
    recorder.record("journey", 102.0, 104.01)
    summary = recorder.summary(duration=2.0, elapsed=4.01)
    assert set(summary) == SHAPE and list(summary["stages"]) == list(SUMMARY_STAGES)
    journey = summary["stages"]["journey"]
    assert journey["p50_ms"] == pytest.approx(500, rel=0.01)
    assert journey["p99_ms"] == pytest.approx(990, rel=0.01)
    assert journey["max_ms"] == pytest.approx(2010, rel=0.001)
    assert summary["stages"]["submit"]["max_ms"] == pytest.approx(0.5, abs=0.01)
    assert summary["stages"]["report"] == dict.fromkeys(FIGURES)
    assert summary["journeys"] == {"started": 1001, "completed": 1001}
    series = recorder.series()
    assert [row["t"] for row in series] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [row["completed"] for row in series] == [499, 500, 1, 0, 1]  # by when they ended (100 + 2i/1000)
    assert sum(count for _, _, count in recorder.distribution("journey")) == 1001


def test_errors_are_counted_by_reason_with_their_retry_info() -> None:
    from datetime import timedelta

    recorder = Recorder(start=0.0)
    recorder.error("RATE_LIMITED", "sms_code", 0.5, timedelta(seconds=30), "caller")
    recorder.error("RATE_LIMITED", "sms_code", 0.6, timedelta(seconds=59), "caller")
    recorder.error("GRPC_UNAVAILABLE", "submit", 0.7)
    assert recorder.summary(1.0, 1.0)["errors"] == {"RATE_LIMITED": 2, "GRPC_UNAVAILABLE": 1}
    refusal = recorder.refusals["RATE_LIMITED"]
    assert (refusal.retry_min, refusal.retry_max) == (timedelta(seconds=30), timedelta(seconds=59))
    assert refusal.limits == {"caller": 2}


@pytest.mark.parametrize(
    "argv",
    [["--rate", "0"], ["--rate", "x"], ["--ramp", "40", "--duration", "30"], ["--mix", "report"],
     ["--threshold", "journey.p99<1"], ["--cert", "/nonexistent"], ["--dataset", "/nonexistent", "--users-file", "/x"],
     ["--users-file", "/nonexistent/users.jsonl"], ["--target", "nowhere"], ["--connections", "0"], ["--bogus"]],
)
def test_a_bad_argument_is_one_line_and_exit_code_2(argv: list[str], capsys) -> None:
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cardcheck load: ") and err.count("\n") == 1, err


# --- real runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("load-people") / "cards.jsonl"
    dataset.dump(dataset.generate(SEED, PEOPLE), path)
    return path


@pytest.fixture(scope="module")
def load_test_mesh(tmp_path_factory, people_file) -> Mesh:
    mesh = start_mesh(tmp_path_factory.mktemp("load-mesh"), "--load-test", "--dataset", str(people_file))
    yield mesh
    assert mesh.stop() == 0, mesh.output()


def load(mesh: Mesh, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cardcheck"), "load", *args], env=mesh.env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_load_test_profile_says_what_it_changed(load_test_mesh: Mesh) -> None:
    said = next(line for line in load_test_mesh.output().splitlines() if "load-test profile" in line)
    assert "CARDCHECK_SMS_CALLER_PER_HOUR=" in said and "CARDCHECK_SUBMIT_GLOBAL_RPS=" in said


def test_a_run_completes_journeys_and_writes_the_report(load_test_mesh: Mesh, people_file, tmp_path) -> None:
    out = tmp_path / "report"
    done = load(load_test_mesh, "--rate", "4", "--duration", "3", "--dataset", str(people_file), "--seed", "5",
                "--report", str(out), "--threshold", "journey.p99_ms<60000", "--threshold", "journey.p50_ms<0.001")
    assert done.returncode == 1, done.stdout + done.stderr  # the second threshold cannot hold
    assert "threshold journey.p99_ms<60000: ok" in done.stdout
    assert "threshold journey.p50_ms<0.001: FAILED" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SHAPE
    assert set(summary["journeys"]) == {"started", "completed"} and set(summary["rate"]) == {"offered", "achieved"}
    assert list(summary["stages"]) == list(SUMMARY_STAGES)
    assert all(set(figures) == FIGURES for figures in summary["stages"].values())
    assert summary["errors"] == {}, done.stdout
    assert summary["journeys"]["completed"] == summary["journeys"]["started"] > 0
    for figures in summary["stages"].values():
        assert 0 < figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert summary["stages"]["journey"]["p50_ms"] > summary["stages"]["submit"]["p50_ms"]
    assert re.search(r"^journey +\d+ ", done.stdout, re.MULTILINE)  # the table

    page = (out / "report.html").read_text()
    assert page.count("<svg") >= 4 + len(SUMMARY_STAGES)  # four over time, one histogram per stage
    assert "histogram" in page and "throughput" in page and "errors over time" in page
    # Self-contained: no script, stylesheet, image or font fetched from anywhere.
    assert not re.search(r"<script|<link|<img|@import|url\(|src=", page)
    assert set(re.findall(r"https?://[^\s\"'<]+", page)) <= {"http://www.w3.org/2000/svg"}


def test_journeys_that_register_are_timed_stage_by_stage(load_test_mesh: Mesh, people_file, tmp_path) -> None:
    out = tmp_path / "report"
    done = load(load_test_mesh, "--rate", "3", "--duration", "2", "--dataset", str(people_file), "--seed", "6",
                "--mix", "register,query,watch,report", "--report", str(out), "--threshold", "journey.p99_ms<60000")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {} and summary["journeys"]["completed"] > 0
    assert summary["stages"]["register"]["p50_ms"] > 0


def test_a_default_mesh_refuses_by_reason_and_the_run_goes_on(people_file, tmp_path) -> None:
    """One machine is one caller: past the SMS budget's burst (20) of a mesh without the profile
    its codes are refused RATE_LIMITED with a RetryInfo, counted, and the run ends normally."""
    mesh = start_mesh(tmp_path / "mesh", "--dataset", str(people_file))
    try:
        out = tmp_path / "report"
        done = load(mesh, "--rate", "10", "--duration", "2", "--users", "16", "--dataset", str(people_file),
                    "--seed", "7", "--report", str(out))
    finally:
        assert mesh.stop() == 0, mesh.output()
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"].get("RATE_LIMITED", 0) >= 5, summary
    row = next(line for line in done.stdout.splitlines() if line.startswith("RATE_LIMITED"))
    assert "sms_code" in row and "caller" in row and re.search(r"\d s$", row), row  # the RetryInfo's wait
    assert "Traceback" not in done.stderr


def test_the_load_test_profile_is_refused_outside_sandbox(tmp_path) -> None:
    done = subprocess.run(
        [str(BIN / "cardcheck"), "up", "--load-test", "--data-dir", str(tmp_path / "data")],
        env={"PATH": "/usr/bin:/bin", "CARDCHECK_SANDBOX": "false"}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.count("\n") == 1 and "sandbox" in done.stdout
    assert not (tmp_path / "data").exists()  # refused before anything started
