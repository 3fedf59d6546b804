"""What a run leaves: the table at the end, summary.json (the figures thresholds and CI read)
and report.html, one self-contained file (inline SVG, no script, nothing fetched) with the
latency percentiles, throughput and errors over time and a latency histogram per stage."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from cardcheck.load.progress import fmt_ms
from cardcheck.load.recording import Recorder

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _retry(refusal) -> str:
    if refusal.retry_max is None:
        return "–"
    low, high = refusal.retry_min.total_seconds(), refusal.retry_max.total_seconds()
    return f"{low:.3g} s" if low == high else f"{low:.3g}–{high:.3g} s"


def _rows_text(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def stage_rows(summary: Mapping, recorder: Recorder) -> list[list[str]]:
    rows = []
    for name, figures in summary["stages"].items():
        hist = recorder.stages.get(name)
        rows.append([name, str(hist.get_total_count() if hist else 0),
                     *(fmt_ms(figures[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))])
    return rows


def error_rows(recorder: Recorder) -> list[list[str]]:
    return [
        [reason, str(r.count), ", ".join(f"{s} {n}" for s, n in r.stages.most_common()),
         ", ".join(f"{limit} {n}" for limit, n in r.limits.most_common()) or "–", _retry(r)]
        for reason, r in sorted(recorder.refusals.items(), key=lambda kv: -kv[1].count)
    ]


def table(summary: Mapping, recorder: Recorder) -> str:
    journeys, rate = summary["journeys"], summary["rate"]
    text = [
        f"journeys: {journeys['started']} started, {journeys['completed']} completed; "
        f"rate offered {rate['offered']:g}/s, achieved {rate['achieved']:g}/s",
        "",
        _rows_text(["stage", "count", "p50", "p90", "p99", "max"], stage_rows(summary, recorder)),
    ]
    if recorder.refusals:
        text += ["", _rows_text(["error", "count", "at stage", "limit", "retry after"], error_rows(recorder))]
    return "\n".join(text)


def write_summary(directory: Path, summary: Mapping) -> Path:
    path = directory / "summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# --- report.html -------------------------------------------------------------------------------

W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 260, 60, 150, 30, 40


def _nice(top: float) -> float:
    if top <= 0:
        return 1.0
    step = 10 ** len(str(int(top))) / 10
    for factor in (1, 2, 2.5, 5, 10):
        if top <= step * factor:
            return step * factor
    return top


def line_chart(title: str, xs: Sequence[float], series: Mapping[str, Sequence[float | None]], unit: str) -> str:
    values = [v for vs in series.values() for v in vs if v is not None]
    top = _nice(max(values, default=0))
    right = max(xs, default=0) or 1
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + pw * x / right

    def py(y: float) -> float:
        return TOP + ph * (1 - y / top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img">',
             f'<text x="{LEFT}" y="18" font-weight="bold">{html.escape(title)}</text>']
    for i in range(5):
        y = top * i / 4
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="11">{y:g}</text>')
    for i in range(6):
        x = right * i / 5
        parts.append(f'<text x="{px(x):.1f}" y="{TOP + ph + 16}" text-anchor="middle" font-size="11">{x:.0f} s</text>')
    parts.append(f'<text x="12" y="{TOP + ph / 2}" font-size="11" transform="rotate(-90 12 {TOP + ph / 2})" '
                 f'text-anchor="middle">{html.escape(unit)}</text>')
    for n, (name, vs) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        runs: list[list[str]] = []
        run: list[str] = []
        for x, v in zip(xs, vs, strict=True):
            if v is None:
                if run:
                    runs.append(run)
                run = []
            else:
                run.append(f"{px(x):.1f},{py(v):.1f}")
        if run:
            runs.append(run)
        for points in runs:
            if len(points) == 1:
                cx, cy = points[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
            else:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(points)}"/>')
        ly = TOP + 14 * n
        parts.append(f'<rect x="{W - RIGHT + 10}" y="{ly}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{W - RIGHT + 24}" y="{ly + 9}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(title: str, bins: Sequence[tuple[float, float, int]]) -> str:
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    top = 4 * max(1, math.ceil(max((c for _, _, c in bins), default=0) / 4))  # whole counts on the ticks
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img">',
             f'<text x="{LEFT}" y="18" font-weight="bold">{html.escape(title)}</text>']
    if not bins:
        parts.append(f'<text x="{LEFT}" y="{TOP + 30}">no samples</text></svg>')
        return "".join(parts)
    width = pw / len(bins)
    for i in range(5):
        y = TOP + ph * (1 - i / 4)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{top * i / 4:g}</text>')
    for i, (low, high, count) in enumerate(bins):
        h = ph * count / top
        x = LEFT + i * width
        parts.append(f'<rect x="{x + 1:.1f}" y="{TOP + ph - h:.1f}" width="{max(1.0, width - 2):.1f}" height="{h:.1f}" '
                     f'fill="{COLOURS[0]}"><title>{low:g}–{high:g} ms: {count}</title></rect>')
        if i % max(1, len(bins) // 8) == 0:
            parts.append(f'<text x="{x + width / 2:.1f}" y="{TOP + ph + 16}" text-anchor="middle" '
                         f'font-size="10">{fmt_ms(low)}</text>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{H - 4}" text-anchor="middle" font-size="11">latency, log-spaced '
                 'bins (each labelled where it starts)</text></svg>')
    return "".join(parts)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(directory: Path, summary: Mapping, recorder: Recorder, about: Mapping[str, str]) -> Path:
    series = recorder.series()
    xs = [row["t"] for row in series]
    step = recorder.window_s

    def stage_figure(stage: str, key: str) -> list[float | None]:
        return [row["stages"].get(stage, {}).get(key) for row in series]

    reasons = list(recorder.errors())[: len(COLOURS)]
    charts = [
        line_chart("journey latency over time (from each scheduled start)", xs,
                   {"p50": stage_figure("journey", "p50_ms"), "p90": stage_figure("journey", "p90_ms"),
                    "p99": stage_figure("journey", "p99_ms"), "max": stage_figure("journey", "max_ms")}, "ms"),
        line_chart("p99 of each stage over time", xs,
                   {name: stage_figure(name, "p99_ms") for name in summary["stages"] if name != "journey"}, "ms"),
        line_chart("throughput", xs, {"started/s": [row["started"] / step for row in series],
                                      "completed/s": [row["completed"] / step for row in series]}, "journeys/s"),
        line_chart("errors over time", xs,
                   {reason: [row["errors"].get(reason, 0) / step for row in series] for reason in reasons}
                   or {"none": [0.0 for _ in series]}, "errors/s"),
    ]
    histograms = [histogram_chart(f"{name}: latency histogram", recorder.distribution(name)) for name in summary["stages"]]
    journeys, rate = summary["journeys"], summary["rate"]
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>cardcheck load report</title>',
        "<style>body{font-family:sans-serif;margin:2em;max-width:800px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}svg{display:block;margin:1em 0}</style>",
        "</head><body>", "<h1>cardcheck load report</h1>",
        _html_table(["", ""], [[k, v] for k, v in about.items()]),
        f"<p>{journeys['started']} journeys started, {journeys['completed']} completed; rate offered "
        f"{rate['offered']:g}/s, achieved {rate['achieved']:g}/s. Journey latency runs from each journey's "
        "scheduled start (no coordinated omission); a stage's from its first call.</p>",
        _html_table(["stage", "count", "p50", "p90", "p99", "max"], stage_rows(summary, recorder)),
    ]
    if recorder.refusals:
        page += ["<h2>errors</h2>", _html_table(["error", "count", "at stage", "limit", "retry after"], error_rows(recorder))]
    page += ["<h2>over time</h2>", *charts, "<h2>latency per stage</h2>", *histograms,
             "<h2>summary.json</h2>", f"<pre>{html.escape(json.dumps(summary, indent=2))}</pre>", "</body></html>"]
    path = directory / "report.html"
    path.write_text("\n".join(page) + "\n", encoding="utf-8")
    return path
