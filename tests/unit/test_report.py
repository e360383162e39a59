"""lab.verdicts.report: the rich report, the text/markdown/JSON/SVG exports and the live progress view,
all rendered from a run stored on disk (synthetic cells with the cover letter's numbers)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from lab.events import CellFinished, CellStarted, HostCrash, ModulesSwapped, Step
from lab.verdicts.expect import evaluate
from lab.verdicts.report import MatrixProgress, render, to_json, to_markdown, to_plot, to_svg, to_text
from lab.verdicts.results import CellResult, RunData, RunMeta, RunStore
from tests.helpers import EXP, reference_results


def reference_cells(repeats: int = 1, accel: str = "kvm", scale: float = 1.0, noise: float = 0.0) -> list[CellResult]:
    """The cover letter's numbers (tests.helpers), with the timing fields a stored run has."""
    return [
        replace(c, host_accel=accel, accel="kvm", kernel_release="6.12.117+deb12-amd64", started_at="2025-01-01T12:00:00+00:00",
                finished_at="2025-01-01T12:00:40+00:00")
        for c in reference_results(repeats=repeats, accel=accel, scale=scale, noise=noise)
    ]


def store_run(tmp_path: Path, cells: list[CellResult], run_id="20250101-120000-vhost-matrix") -> RunData:
    store = RunStore(tmp_path / "runs" / run_id)
    store.create(
        RunMeta(
            run_id=run_id,
            matrix="vhost-matrix",
            lab_name="vhl",
            config_path="lab.toml",
            started_at="2025-01-01T12:00:00+00:00",
            finished_at="2025-01-01T12:41:10+00:00",
            argv=["lab", "run", "vhost-matrix"],
            duration_s=10,
            planned=[c.cell for c in cells],
            hosts={
                "lab1/stock": {
                    "kernel_recipe": "stock",
                    "kernel_release": "6.12.117+deb12-amd64",
                    "accel": cells[0].host_accel,
                    "cpu_model": "AMD EPYC 7B13",
                }
            },
        )
    )
    for c in cells:
        store.append(c)
    return store.load()


def props_for(run: RunData):
    return evaluate(run.summaries(), EXP, run.host_accel(), salt=run.meta.run_id)


@pytest.fixture
def run(tmp_path) -> RunData:
    return store_run(tmp_path, reference_cells())


def rich_text(run: RunData, props, width: int = 120, **kw) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    render(run, props, console, **kw)
    return console.export_text()


# --------------------------------------------------------------------------- rich


def test_render_shows_numbers_verdicts_and_environment(run):
    out = rich_text(run, props_for(run), width=200)
    for number in ("23404", "23859", "19245", "0.7", "2194", "2185", "1113", "2.2", "172", "341"):
        assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d.])", out), number
    assert "vhost/stock-collapses-qlen1" in out and "FAIL" not in out
    assert "vhost: stock qlen1 0.7 Mbit/s = 0.00003 x stock qlen1000 23404 Mbit/s (<= 0.05)" in out
    assert "6.12.117+deb12-amd64" in out and "AMD EPYC 7B13" in out and "41m10s" in out
    assert "24 planned" in out and "24 ok" in out
    # one repeat: the comparisons cannot decide, and the report says so rather than PASS
    assert "inconclusive" in out and "INCONCLUSIVE" in out


def test_render_rows_in_cover_letter_order(run):
    out = rich_text(run, props_for(run), width=200)
    vhost = out[out.index("vhost_net") :]
    labels = re.findall(r"(qlen \d+|RTT \d+ ms)", vhost)[:6]
    assert labels == ["qlen 1000", "qlen 100", "qlen 10", "qlen 1", "RTT 60 ms", "RTT 120 ms"]


def test_render_comparisons_with_ci_verdict_and_noise(tmp_path):
    run = store_run(tmp_path, reference_cells(repeats=5, noise=0.02))
    out = rich_text(run, props_for(run), width=220)
    row = next(ln for ln in out.splitlines() if "qlen 1 " in ln and "19" in ln)
    assert re.search(r"\d+ \[\d+\S\d+\] faster", row), row  # nodrop/stock at qlen 1: ratio [CI] faster
    row = next(ln for ln in out.splitlines() if "qlen 1000" in ln and "2194" in ln or "qlen 1000" in ln and "22" in ln)
    assert " same" in row and "%" in row  # the CI sits within +-10 %, and the CVs are shown
    assert "PASS: 13 properties hold" in out


def test_render_failures_errors_and_warnings(tmp_path):
    cells = reference_cells()
    cells = [replace(c, ring_drops=405) if c.cell == "vhost-qlen1-rtt0-nodrop" else c for c in cells]
    cells = [
        replace(c, status="error", throughput_mbps=None, error="iperf3: connection refused")
        if c.cell == "tap-qlen10-rtt0-nodrop"
        else c
        for c in cells
    ]
    run = store_run(tmp_path, cells)
    with open(run.run_dir / "results.jsonl", "ab") as f:
        f.write(b'{"cell": "torn')
    run = RunStore(run.run_dir).load()
    props = props_for(run)
    out = rich_text(run, props, width=400)  # tmp paths are long; keep the warning on one line
    assert "FAIL" in out and "vhost/nodrop-no-ring-drops" in out
    assert "ERROR" in out and "tap-qlen10-rtt0-nodrop: iperf3: connection refused" in out
    assert "torn last line" in out and "results.jsonl:25" in out
    assert "1 error" in out


def test_render_error_cells_are_red(tmp_path):
    cells = [
        replace(c, status="error", throughput_mbps=None, error="boom") if c.cell == "vhost-qlen1-rtt0-stock" else c
        for c in reference_cells()
    ]
    run = store_run(tmp_path, cells)
    console = Console(record=True, width=160, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    render(run, props_for(run), console)
    html = console.export_html(inline_styles=True)
    assert re.search(r'<span style="[^"]*color: #800000[^"]*">\s*ERROR', html)


def test_render_repeats_show_median_and_range(tmp_path):
    cells = reference_cells(repeats=3)
    cells = [replace(c, throughput_mbps=c.throughput_mbps * (1 + 0.01 * (c.repeat - 1))) for c in cells]
    out = rich_text(store_run(tmp_path, cells), [], width=200)
    assert "2216 [2194\u20132238]" in out  # median of 2194, 2216, 2238


def test_render_na_under_tcg(tmp_path):
    run = store_run(tmp_path, reference_cells(accel="tcg"))
    out = rich_text(run, props_for(run), width=200)
    assert "n/a" in out and "not applicable under TCG" in out and "host tcg" in out


def test_render_crashes_retries_swaps_in_the_environment(tmp_path):
    cells = reference_cells()
    cells = [replace(c, attempts=2, host_crashes=[{"at": "t", "oops": "Oops: int3: 0000 [#1]", "console_log": "/x.log"}])
             if c.cell == "tap-qlen1-rtt0-stock" else c for c in cells]
    store = RunStore(tmp_path / "runs" / "r1")
    store.create(RunMeta(run_id="r1", matrix="vhost-matrix", planned=[c.cell for c in cells], extra={
        "host_crashes": [{"at": "2026-12-01T10:00:00", "oops": "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI", "cell": "tap-qlen1-rtt0-stock",
                          "stage": "cell", "console_log": "/runs/r1/logs/lab1-console.log"}],
        "lab_session": {"boots": [{"boot_id": "lab1@1"}, {"boot_id": "lab1@2"}], "swaps": [{"seconds": 2.0}, {"seconds": 4.0}]},
        "arms": [{"name": "stock", "recipe": "stock"}, {"name": "nodrop", "recipe": "nodrop"}], "baseline": "stock",
    }))
    for c in cells:
        store.append(c)
    out = rich_text(store.load(), [], width=300)
    assert "1 lab host crash(es), 1 cell attempt(s) retried" in out
    assert "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI (during tap-qlen1-rtt0-stock, cell; console /runs/r1/logs/lab1-console.log)" in out
    assert "2 lab host boot(s), 2 module swaps (median 3.0s)" in out
    assert "(1 retried)" in out


def test_a_host_lost_without_an_oops_shows_its_stall(tmp_path):
    cells = reference_cells()
    store = RunStore(tmp_path / "runs" / "r1")
    store.create(RunMeta(run_id="r1", matrix="vhost-matrix", planned=[c.cell for c in cells], extra={
        "host_crashes": [{"at": "t", "oops": None, "stall": "watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [python:253]",
                          "cell": "tap-qlen1-rtt0-stock", "stage": "guest boot", "console_log": "/c.log"}]}))
    for c in cells:
        store.append(c)
    out = rich_text(store.load(), [], width=300)
    assert "t: no oops; stalled: watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [python:253] (during tap-qlen1-rtt0-stock, guest boot" in out


def test_compare_uses_the_same_statistics(tmp_path):
    run = store_run(tmp_path, reference_cells(repeats=4, noise=0.01))
    other = store_run(tmp_path / "other", reference_cells(repeats=4, noise=0.01, scale=0.5), run_id="20241201-000000-vhost-matrix")
    out = rich_text(run, props_for(run), compare=other, width=260)
    assert "vs other run" in out and re.search(r"2\.0\d? \[\S+\] faster", out)
    text = to_text(run, props_for(run), compare=other)
    assert "faster" in text


def test_render_empty_run(tmp_path):
    store = RunStore(tmp_path / "r")
    store.create(RunMeta(run_id="r", matrix="m"))
    out = rich_text(store.load(), [])
    assert "no cell results" in out and "no properties evaluated" in out


# --------------------------------------------------------------------------- exports


@pytest.mark.parametrize("repeats,compare", [(1, False), (3, True)])
def test_text_fits_a_mail(tmp_path, repeats, compare):
    cells = reference_cells(repeats=repeats)
    cells[0] = replace(cells[0], status="error", throughput_mbps=None, error="x" * 200)  # long error text
    run = store_run(tmp_path, cells)
    other = store_run(tmp_path / "o", reference_cells(), run_id="20241201-000000-vhost-matrix") if compare else None
    text = to_text(run, props_for(run), compare=other)
    assert max(len(line) for line in text.splitlines()) <= 78
    assert text.isascii()
    assert "vhost/nodrop-holds-qlen1" in text and "Comparisons" in text


def test_text_layout_like_the_cover_letter(run):
    text = to_text(run, props_for(run))
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.strip().startswith("qlen 1000") and "2194" in ln)
    assert re.search(r"qlen 1000\s+2194\s+2185\s+1\.00", row)
    rtt = next(ln for ln in lines if ln.strip().startswith("RTT 120 ms") and "98" in ln)
    assert re.search(r"RTT 120 ms\s+98\s+255\s+2\.60", rtt)
    assert "vhost: stock qlen1 0.7 Mbit/s = 0.00003 x stock qlen1000 23404 Mbit/s" in text.replace("\n        ", " ")


def test_markdown(run):
    md = to_markdown(run, props_for(run))
    assert re.search(r"\| qlen 1000 \| 2194 \| 2185 \| 1\.00 inconclusive", md)
    assert "| **PASS** | `vhost/stock-collapses-qlen1` |" in md
    assert "## Environment" in md


def test_json_keys_and_comparisons(tmp_path):
    run = store_run(tmp_path, reference_cells(repeats=3, noise=0.01))
    doc = json.loads(json.dumps(to_json(run, props_for(run))))
    assert set(doc) >= {"run", "cells", "comparisons", "properties", "verdict"}
    assert doc["run"]["run_id"] == "20250101-120000-vhost-matrix" and doc["run"]["planned"]
    need = {"kernel", "backend", "txqueuelen", "rtt_ms", "repeat", "status", "throughput_mbps", "retransmits", "tap_tx_dropped",
            "ring_drops", "qdisc_drops", "measured_rtt_ms", "accel", "attempts", "host_crashes", "boot_id"}
    assert len(doc["cells"]) == 72 and all(need <= set(c) for c in doc["cells"])
    assert all({"name", "verdict", "passed", "detail"} <= set(p) for p in doc["properties"])
    keys = {"backend", "txqueuelen", "rtt_ms", "a", "b", "n_a", "n_b", "median_a", "median_b", "ratio", "ci_low", "ci_high",
            "p_value", "verdict"}
    assert len(doc["comparisons"]) == 12 and all(keys <= set(c) for c in doc["comparisons"])
    assert {c["verdict"] for c in doc["comparisons"]} <= {"faster", "slower", "same", "inconclusive"}


def test_svg_and_plot_written(tmp_path):
    run = store_run(tmp_path, reference_cells(repeats=3, noise=0.05))
    svg = to_svg(tmp_path / "out" / "report.svg", run, props_for(run)).read_text()
    assert svg.lstrip().startswith("<svg") and "vhost_net" in svg
    png = to_plot(tmp_path / "out" / "plot.png", run)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert to_plot(tmp_path / "out" / "plot.svg", run).read_text().lstrip().startswith("<?xml")


# --------------------------------------------------------------------------- live progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_plain_lines_without_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    clock = FakeClock()
    ids = [f"vhost-qlen{q}-rtt0-stock" for q in (1000, 100, 10, 1)]
    with MatrixProgress(console, clock=clock) as p:
        p.start(4, ids)
        p.cell_started(ids[0])
        clock.t += 30
        p.cell_finished(ids[0], "ok", 23404.0)
        assert p.eta_s() == pytest.approx(90)  # 3 left x 30 s mean
        p.cell_started(ids[1])
        clock.t += 10
        p.cell_finished(ids[1], "error", None)
        assert p.left == 2 and p.eta_s() == pytest.approx(40)  # mean 20 s
    out = buf.getvalue()
    assert "\x1b[" not in out  # no colours or cursor movement in CI logs
    assert f"[1/4] {ids[0]} ok 23404 Mbit/s (1 done, 0 running, 3 left, ETA 1m30s)" in out
    assert f"[2/4] {ids[1]} error (2 done, 0 running, 2 left, 1 error, ETA 40s)" in out
    assert f"start {ids[1]}" in out


def test_progress_resume_counts_completed_and_parallel_eta():
    clock = FakeClock()
    p = MatrixProgress(Console(file=io.StringIO(), force_terminal=False), clock=clock)
    p.start(6, [f"c{i}" for i in range(6)], completed=["c0", "c1"])
    assert p.left == 4 and p.eta_s() is None
    p.cell_started("c2")
    p.cell_started("c3")
    clock.t += 20
    p.cell_finished("c2", "ok", 1.0)
    assert p.status_line().startswith("3 done, 1 running, 2 left")
    # 2 left x 20 s + c3's rest (20 - 20 = 0), on one runner
    assert p.eta_s() == pytest.approx(40)


def test_progress_live_terminal_mode_runs():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with MatrixProgress(console) as p:
        p.start(2, ["a", "b"])
        p.cell_started("a")
        p.cell_finished("a", "ok", 5.0)
        p.cell_started("b")
        p.cell_finished("b", "error")
    out = buf.getvalue()
    assert "a ok 5.0 Mbit/s" in out and "2/2" in out


def test_progress_renders_the_runs_events():
    buf = io.StringIO()
    p = MatrixProgress(Console(file=buf, force_terminal=False, width=200), clock=FakeClock())
    p.start(2, ["a", "b"])
    p(Step("lab1", "booting", elapsed_s=3))
    p(Step("lab1", "booting", elapsed_s=4))  # a tick of the same step: no new line
    p(ModulesSwapped("lab1", "stock", "nodrop", 2.5, {}))
    p(CellStarted("a", 1, 2, attempt=1))
    p(HostCrash("lab1", "2026-12-01T10:00:00", "Oops: int3: 0000 [#1]", "/r/logs/c.log"))
    p(CellStarted("a", 1, 2, attempt=2))
    p(CellFinished("a", "ok", 23404.0, "Mbit/s", 2, 30.0))
    p(CellFinished("b", "ok", 162000.0, "pps", 1, 30.0))
    p(object())  # not an event of lab.events: ignored
    out = buf.getvalue()
    assert out.count("lab1: booting") == 1
    assert "lab1: modules stock -> nodrop in 2.5s" in out
    assert "LAB HOST CRASHED: Oops: int3: 0000 [#1] (console /r/logs/c.log)" in out
    assert "start a (attempt 2)" in out and "a ok 23404 Mbit/s" in out and "b ok 162.0 kpps" in out
    assert "1 host crash(es)" in out
