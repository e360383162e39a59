"""lab.verdicts.expect: every property passes on the cover letter's numbers, fails with a detail naming
cells and numbers when the shape is wrong, and is n/a when its cells are absent or errored.

The synthetic result sets are the reference results of shared/DESIGN.md (the patch's
cover letter, Mbit/s, stock / nodrop); counters are made up to match their story
("default suffers from many retransmits, while patched does not").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.verdicts.expect import DESCRIPTIONS, Property, all_passed, evaluate, fmt_mbps, fmt_ratio
from lab.verdicts.results import CellResult, aggregate


@dataclass(frozen=True)
class Exp:
    """Stands in for lab.config.Expectations (lab.toml's [expectations] defaults)."""

    stock_kernel: str = "stock"
    nodrop_kernel: str = "nodrop"
    collapse_max_ratio: float = 0.05
    nodrop_hold_min_ratio: float = 0.50
    no_regression_min_ratio: float = 0.90
    nodrop_retrans_max_fraction: float = 0.001
    delay_min_ratio: float = 0.90
    tcg_cross_kernel_min_ratio: float = 0.40
    vhost_min_gbps: float = 10.0


EXP = Exp()

# (txqueuelen, rtt_ms) -> (stock, nodrop) Mbit/s, from the cover letter.
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


def cid(backend, qlen, rtt, kernel, repeat=1, repeats=1):
    return f"{backend}-qlen{qlen}-rtt{rtt}-{kernel}" + (f"-r{repeat}" if repeats > 1 else "")


def reference_results(backends=("tap", "vhost"), rtts=True, accel="kvm") -> list[CellResult]:
    out = []
    for backend in backends:
        for (qlen, rtt), pair in REFERENCE[backend].items():
            if rtt and not rtts:
                continue
            for kernel, mbps in zip(("stock", "nodrop"), pair):
                segs = int(mbps * 1e6 * 10 / 8 / 1448)  # 10 s of full-size segments
                stock_small_q = kernel == "stock" and qlen <= 10
                out.append(
                    CellResult(
                        cell=cid(backend, qlen, rtt, kernel),
                        kernel=kernel,
                        backend=backend,
                        txqueuelen=qlen,
                        rtt_ms=rtt,
                        throughput_mbps=float(mbps),
                        tcp_out_segs=segs,
                        retransmits=881 if stock_small_q else 0,
                        tap_tx_dropped=405 if stock_small_q else 0,
                        qdisc_drops=0,
                        qdisc_requeues=12,
                        measured_rtt_ms=rtt + 0.2,
                        accel="kvm",
                        host_accel=accel,
                    )
                )
    return out


def patch(results, cell_id, **changes):
    assert any(r.cell == cell_id for r in results), cell_id
    return [replace(r, **changes) if r.cell == cell_id else r for r in results]


def props_by_name(results, host_accel="kvm", exp=EXP) -> dict[str, Property]:
    return {p.name: p for p in evaluate(aggregate(results), exp, host_accel)}


# --------------------------------------------------------------------------- pass


def test_reference_results_pass_every_property():
    props = props_by_name(reference_results())
    assert sorted(props) == sorted(
        [f"tap/{n}" for n in DESCRIPTIONS if n != "vhost-absolute-throughput"]
        + [f"vhost/{n}" for n in DESCRIPTIONS if n != "delay-nodrop-vs-stock"]
    )
    assert {n: p.passed for n, p in props.items()} == {n: True for n in props}, [p.detail for p in props.values()]
    assert all_passed(props.values())
    assert all(p.description == DESCRIPTIONS[p.name.split("/", 1)[1]] for p in props.values())


def test_collapse_detail_names_cells_and_numbers():
    p = props_by_name(reference_results())["vhost/stock-collapses-qlen1"]
    assert p.detail == "vhost: stock qlen1 0.7 Mbit/s = 0.00003 x stock qlen1000 23404 Mbit/s (<= 0.05)"
    assert set(p.cells) == {"vhost-qlen1-rtt0-stock", "vhost-qlen1000-rtt0-stock"}


def test_pass_details():
    props = props_by_name(reference_results())
    assert props["tap/nodrop-holds-qlen1"].detail == (
        "tap: nodrop qlen1 1113 Mbit/s = 0.51 x nodrop qlen1000 2185 Mbit/s (>= 0.5)"
    )
    assert props["vhost/nodrop-no-regression"].detail == (
        "vhost: nodrop qlen1000 23859 Mbit/s = 1.02 x stock qlen1000 23404 Mbit/s (>= 0.9)"
    )
    delay = props["tap/delay-nodrop-vs-stock"]
    assert "rtt60 nodrop 341 / stock 172 Mbit/s = 1.98" in delay.detail
    assert "rtt120 nodrop 255 / stock 98 Mbit/s = 2.60" in delay.detail
    assert "23859 Mbit/s = 23.9 Gbit/s (>= 10 Gbit/s)" in props["vhost/vhost-absolute-throughput"].detail
    assert "tap tx_dropped = 0 in all 6 nodrop cell(s)" in props["vhost/nodrop-no-ring-drops"].detail


def test_measured_tcg_shape_from_design_passes_collapse():
    # DESIGN.md's nested TCG run: vhost_net 500 Mbit/s at qlen 1000, 1.7 at qlen 1.
    rs = reference_results(backends=("vhost",), rtts=False, accel="tcg")
    rs = patch(rs, "vhost-qlen1000-rtt0-stock", throughput_mbps=500.0)
    rs = patch(rs, "vhost-qlen1-rtt0-stock", throughput_mbps=1.7)
    props = props_by_name(rs, host_accel="tcg")
    assert props["vhost/stock-collapses-qlen1"].passed is True
    assert "= 0.0034 x" in props["vhost/stock-collapses-qlen1"].detail


# --------------------------------------------------------------------------- fail


def test_nodrop_ring_drops_fail_names_cell_and_count():
    rs = patch(reference_results(), "vhost-qlen1-rtt0-nodrop", tap_tx_dropped=405)
    p = props_by_name(rs)["vhost/nodrop-no-ring-drops"]
    assert p.passed is False
    assert "nodrop qlen1 rtt0 405 (vhost-qlen1-rtt0-nodrop)" in p.detail
    assert p.cells == ("vhost-qlen1-rtt0-nodrop",)
    assert not all_passed(props_by_name(rs).values())


def test_stock_not_collapsing_fails():
    rs = patch(reference_results(), "tap-qlen1-rtt0-stock", throughput_mbps=1500.0)
    p = props_by_name(rs)["tap/stock-collapses-qlen1"]
    assert p.passed is False
    assert p.detail == "tap: stock qlen1 1500 Mbit/s = 0.68 x stock qlen1000 2194 Mbit/s (<= 0.05)"


def test_nodrop_not_holding_fails():
    rs = patch(reference_results(), "vhost-qlen1-rtt0-nodrop", throughput_mbps=0.9)
    p = props_by_name(rs)["vhost/nodrop-holds-qlen1"]
    assert p.passed is False and "nodrop qlen1 0.9 Mbit/s = 0.000038 x nodrop qlen1000 23859" in p.detail


def test_nodrop_regression_fails():
    rs = patch(reference_results(), "tap-qlen1000-rtt0-nodrop", throughput_mbps=1500.0)
    p = props_by_name(rs)["tap/nodrop-no-regression"]
    assert p.passed is False
    assert p.detail == "tap: nodrop qlen1000 1500 Mbit/s = 0.68 x stock qlen1000 2194 Mbit/s (>= 0.9)"


def test_nodrop_retransmits_fail_names_cell():
    rs = patch(reference_results(), "vhost-qlen10-rtt0-nodrop", retransmits=50000)
    p = props_by_name(rs)["vhost/nodrop-retrans-low"]
    assert p.passed is False
    assert "qlen10 50000/20485151 = 0.0024" in p.detail and "over in vhost-qlen10-rtt0-nodrop" in p.detail
    assert p.cells == ("vhost-qlen10-rtt0-nodrop",)


def test_delay_fail_reports_ratio():
    rs = patch(reference_results(), "tap-qlen1000-rtt60-nodrop", throughput_mbps=100.0)
    p = props_by_name(rs)["tap/delay-nodrop-vs-stock"]
    assert p.passed is False
    assert "rtt60 nodrop 100 / stock 172 Mbit/s = 0.58 FAIL" in p.detail
    assert "rtt120 nodrop 255 / stock 98 Mbit/s = 2.60" in p.detail


def test_absolute_throughput_fails_on_slow_kvm():
    rs = reference_results()
    rs = patch(rs, "vhost-qlen1000-rtt0-nodrop", throughput_mbps=500.0)
    p = props_by_name(rs)["vhost/vhost-absolute-throughput"]
    assert p.passed is False and "500 Mbit/s = 0.5 Gbit/s (>= 10 Gbit/s)" in p.detail


# --------------------------------------------------------------------------- not applicable


def test_absolute_throughput_na_under_tcg():
    p = props_by_name(reference_results(accel="tcg"), host_accel="tcg")["vhost/vhost-absolute-throughput"]
    assert p.passed is None and "not applicable under TCG" in p.detail


def test_smoke_profile_has_no_delay_cells():
    p = props_by_name(reference_results(rtts=False))["tap/delay-nodrop-vs-stock"]
    assert p.passed is None and "no cells with rtt > 0" in p.detail


def test_errored_cell_makes_property_na_with_the_error():
    rs = patch(
        reference_results(),
        "vhost-qlen1-rtt0-stock",
        status="error",
        throughput_mbps=None,
        error="guest did not answer ssh",
    )
    props = props_by_name(rs)
    p = props["vhost/stock-collapses-qlen1"]
    assert p.passed is None
    assert "stock qlen1 rtt0 errored (vhost-qlen1-rtt0-stock: guest did not answer ssh)" in p.detail
    assert all_passed(props.values())  # n/a does not fail


def test_missing_cells_make_properties_na():
    rs = [r for r in reference_results(backends=("vhost",)) if r.kernel == "stock"]
    props = props_by_name(rs)
    for name in ("nodrop-no-ring-drops", "nodrop-holds-qlen1", "nodrop-no-regression", "nodrop-retrans-low"):
        assert props[f"vhost/{name}"].passed is None, name
    assert "no nodrop qlen1000 rtt0 cell in this run" in props["vhost/nodrop-no-regression"].detail
    assert props["vhost/stock-collapses-qlen1"].passed is True


def test_retrans_na_without_tcp_out_segs():
    rs = [replace(r, tcp_out_segs=None) for r in reference_results()]
    p = props_by_name(rs)["vhost/nodrop-retrans-low"]
    assert p.passed is None and "tcp_out_segs not measured" in p.detail


def test_ring_drops_na_without_counter():
    rs = [replace(r, tap_tx_dropped=None) for r in reference_results()]
    assert props_by_name(rs)["tap/nodrop-no-ring-drops"].passed is None


def test_empty_run_has_no_properties_and_does_not_pass():
    assert evaluate([], EXP, None) == []
    assert not all_passed([])


def test_all_passed_semantics():
    t, f, n = (Property("a", v, "") for v in (True, False, None))
    assert all_passed([t, n]) and not all_passed([t, f]) and not all_passed([n, n])


def test_other_kernel_names_from_expectations():
    rs = [replace(r, kernel={"stock": "base", "nodrop": "patched"}[r.kernel]) for r in reference_results()]
    props = props_by_name(rs, exp=Exp(stock_kernel="base", nodrop_kernel="patched"))
    assert all(p.passed for p in props.values())
    assert "base qlen1 0.7 Mbit/s" in props["vhost/stock-collapses-qlen1"].detail


# --------------------------------------------------------------------------- repeats


def test_repeats_use_medians_and_note_errors():
    rs = []
    for i, mbps in enumerate((0.5, 0.7, 30.0), start=1):  # one outlier repeat
        rs.append(
            CellResult(
                cell=cid("vhost", 1, 0, "stock", i, 4),
                kernel="stock",
                backend="vhost",
                txqueuelen=1,
                rtt_ms=0,
                repeat=i,
                throughput_mbps=mbps,
            )
        )
    rs.append(
        CellResult(
            cell=cid("vhost", 1, 0, "stock", 4, 4),
            kernel="stock",
            backend="vhost",
            txqueuelen=1,
            rtt_ms=0,
            repeat=4,
            status="error",
            error="timeout",
        )
    )
    rs.append(
        CellResult(
            cell="vhost-qlen1000-rtt0-stock",
            kernel="stock",
            backend="vhost",
            txqueuelen=1000,
            rtt_ms=0,
            throughput_mbps=23404.0,
        )
    )
    p = props_by_name(rs)["vhost/stock-collapses-qlen1"]
    assert p.passed is True
    assert "stock qlen1 0.7 Mbit/s" in p.detail and "1 of 4 repeats errored" in p.detail
    assert len(p.cells) == 5


# --------------------------------------------------------------------------- arithmetic


@settings(max_examples=200, deadline=None)
@given(
    st.floats(min_value=0, max_value=1e5, allow_nan=False),
    st.floats(min_value=0, max_value=1e5, allow_nan=False),
    st.floats(min_value=0.001, max_value=1.0),
)
def test_ratio_verdicts_match_the_arithmetic(qlen1, qlen1000, threshold):
    rs = [
        CellResult(cell="a", kernel="stock", backend="tap", txqueuelen=1, rtt_ms=0, throughput_mbps=qlen1),
        CellResult(cell="b", kernel="stock", backend="tap", txqueuelen=1000, rtt_ms=0, throughput_mbps=qlen1000),
        CellResult(cell="c", kernel="nodrop", backend="tap", txqueuelen=1, rtt_ms=0, throughput_mbps=qlen1),
        CellResult(cell="d", kernel="nodrop", backend="tap", txqueuelen=1000, rtt_ms=0, throughput_mbps=qlen1000),
    ]
    exp = Exp(collapse_max_ratio=threshold, nodrop_hold_min_ratio=threshold)
    props = props_by_name(rs, exp=exp)
    assert props["tap/stock-collapses-qlen1"].passed is (qlen1 <= threshold * qlen1000)
    assert props["tap/nodrop-holds-qlen1"].passed is (qlen1 >= threshold * qlen1000)


@pytest.mark.parametrize(
    "value,text",
    [
        (23404, "23404"),
        (625.4, "625"),
        (98.0, "98"),
        (2.2, "2.2"),
        (0.7, "0.7"),
        (0.034, "0.034"),
        (0, "0"),
        (None, "-"),
    ],
)
def test_fmt_mbps(value, text):
    assert fmt_mbps(value) == text


@pytest.mark.parametrize(
    "value,text",
    [
        (1.0195, "1.02"),
        (0.0000299, "0.00003"),
        (0.0034, "0.0034"),
        (0.05, "0.05"),
        (0.0000301, "0.00003"),
        (0, "0"),
        (None, "-"),
        (float("inf"), "inf"),
    ],
)
def test_fmt_ratio(value, text):
    assert fmt_ratio(value) == text
