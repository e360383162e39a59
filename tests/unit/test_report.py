"""lab.verdicts.report: the rich report, the text/markdown/JSON/SVG exports and the live progress view,
all rendered from a run stored on disk (synthetic cells with the cover letter's numbers)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from rich.console import Console

from lab.verdicts.expect import evaluate
from lab.verdicts.report import MatrixProgress, render, to_json, to_markdown, to_svg, to_text
from lab.verdicts.results import CellResult, RunData, RunMeta, RunStore


@dataclass(frozen=True)
class Exp:
    stock_kernel: str = "stock"
    nodrop_kernel: str = "nodrop"
    collapse_max_ratio: float = 0.05
    nodrop_hold_min_ratio: float = 0.50
    no_regression_min_ratio: float = 0.90
    nodrop_retrans_max_fraction: float = 0.001
    delay_min_ratio: float = 0.90
    tcg_cross_kernel_min_ratio: float = 0.40
    vhost_min_gbps: float = 10.0


# (txqueuelen, rtt_ms) -> (stock, nodrop) Mbit/s: shared/DESIGN.md's reference results.
REFERENCE = {
    "tap": {
        (1000, 0): (2194, 2185),
        (100, 0): (1986, 2269),
        (10, 0): (625, 1989),
        (1, 0): (2.2, 1113),
        (1000, 60): (172, 341),
        (1000, 120): (98, 255),
    },
    "vhost": {
        (1000, 0): (23404, 23859),
        (100, 0): (23373, 23890),
        (10, 0): (25838, 23730),
        (1, 0): (0.7, 19245),
        (1000, 60): (397, 398),
        (1000, 120): (201, 200),
    },
}


def reference_cells(repeats: int = 1, accel: str = "kvm", scale: float = 1.0) -> list[CellResult]:
    out = []
    for backend, table in REFERENCE.items():
        for (qlen, rtt), pair in table.items():
            for kernel, mbps in zip(("stock", "nodrop"), pair):
                for rep in range(1, repeats + 1):
                    cid = f"{backend}-qlen{qlen}-rtt{rtt}-{kernel}" + (f"-r{rep}" if repeats > 1 else "")
                    bad = kernel == "stock" and qlen <= 10
                    out.append(
                        CellResult(
                            cell=cid,
                            kernel=kernel,
                            backend=backend,
                            txqueuelen=qlen,
                            rtt_ms=rtt,
                            repeat=rep,
                            throughput_mbps=mbps * scale * (1 + 0.01 * (rep - 1)),
                            tcp_out_segs=int(mbps * 1e6),
                            retransmits=881 if bad else 0,
                            tap_tx_dropped=405 if bad else 0,
                            qdisc_drops=0,
                            qdisc_requeues=7,
                            measured_rtt_ms=rtt + 0.25,
                            accel="kvm",
                            host_accel=accel,
                            kernel_recipe=kernel,
                            kernel_release="6.12.117+deb12-amd64",
                            started_at="2025-01-01T12:00:00+00:00",
                            finished_at="2025-01-01T12:00:40+00:00",
                        )
                    )
    return out


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
    return evaluate(run.summaries(), Exp(), run.host_accel())


@pytest.fixture
def run(tmp_path) -> RunData:
    return store_run(tmp_path, reference_cells())


def rich_text(run: RunData, props, width: int = 120, **kw) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    render(run, props, console, **kw)
    return console.export_text()


# --------------------------------------------------------------------------- rich


def test_render_shows_numbers_verdicts_and_environment(run):
    out = rich_text(run, props_for(run))
    for number in ("23404", "23859", "19245", "0.7", "2194", "2185", "1113", "2.2", "172", "341"):
        assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d.])", out), number
    assert "vhost/stock-collapses-qlen1" in out and "PASS" in out and "FAIL" not in out
    assert "vhost: stock qlen1 0.7 Mbit/s = 0.00003 x stock" in out
    wide = rich_text(run, props_for(run), width=250)  # the whole detail on one line
    assert "vhost: stock qlen1 0.7 Mbit/s = 0.00003 x stock qlen1000 23404 Mbit/s (<= 0.05)" in wide
    assert "6.12.117+deb12-amd64" in out and "AMD EPYC 7B13" in out and "41m10s" in out
    assert "24 planned" in out and "24 ok" in out
    assert "881/0" in out and "405/0" in out  # retransmits and tap drops, stock/nodrop


def test_render_rows_in_cover_letter_order(run):
    out = rich_text(run, props_for(run))
    vhost = out[out.index("vhost_net") :]
    labels = re.findall(r"(qlen \d+|RTT \d+ ms)", vhost)[:6]
    assert labels == ["qlen 1000", "qlen 100", "qlen 10", "qlen 1", "RTT 60 ms", "RTT 120 ms"]


def test_render_failures_errors_and_warnings(tmp_path):
    cells = reference_cells()
    cells = [replace(c, tap_tx_dropped=405) if c.cell == "vhost-qlen1-rtt0-nodrop" else c for c in cells]
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
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    render(run, props_for(run), console)
    html = console.export_html(inline_styles=True)
    assert re.search(r'<span style="[^"]*color: #800000[^"]*">\s*ERROR', html)


def test_render_repeats_show_median_and_range(tmp_path):
    run = store_run(tmp_path, reference_cells(repeats=3))
    out = rich_text(run, props_for(run))
    assert "2216 [2194\u20132238]" in out  # median of 2194, 2216, 2238


def test_render_na_under_tcg(tmp_path):
    run = store_run(tmp_path, reference_cells(accel="tcg"))
    out = rich_text(run, props_for(run))
    assert "n/a" in out and "not applicable under TCG" in out and "host tcg" in out


def test_compare_adds_delta_column(tmp_path, run):
    other = store_run(tmp_path / "other", reference_cells(scale=0.5), run_id="20241201-000000-vhost-matrix")
    out = rich_text(run, props_for(run), compare=other)
    assert "+100.0%/+100.0%" in out and "20241201-000000-vhost-matrix" in out
    text = to_text(run, props_for(run), compare=other)
    assert "+100.0%/+100.0%" in text


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
    assert "PASS" in text and "vhost/nodrop-holds-qlen1" in text


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
    assert "| qlen 1000 | 2194 | 2185 | 1.00 |" in md
    assert "| **PASS** | `vhost/stock-collapses-qlen1` |" in md
    assert "## Environment" in md


def test_json_keys(run):
    props = props_for(run)
    doc = json.loads(json.dumps(to_json(run, props)))
    assert set(doc) >= {"run", "cells", "properties"}
    assert doc["run"]["run_id"] == "20250101-120000-vhost-matrix" and doc["run"]["planned"]
    need = {
        "kernel",
        "backend",
        "txqueuelen",
        "rtt_ms",
        "repeat",
        "status",
        "throughput_mbps",
        "retransmits",
        "tap_tx_dropped",
        "qdisc_drops",
        "measured_rtt_ms",
        "accel",
    }
    assert len(doc["cells"]) == 24 and all(need <= set(c) for c in doc["cells"])
    assert all({"name", "passed", "detail"} <= set(p) for p in doc["properties"])
    assert doc["all_passed"] is True


def test_svg_written(tmp_path, run):
    path = to_svg(tmp_path / "out" / "report.svg", run, props_for(run))
    svg = path.read_text()
    assert svg.lstrip().startswith("<svg") and "23859" in svg


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
