"""The properties asserted over a matrix run; one module for the CLI and pytest alike.

Every property compares medians of aggregated cells (lab.verdicts.results.CellSummary)
against a threshold of [expectations] in lab.toml. Properties are evaluated
per backend present in the run and are named "<backend>/<property>", e.g.
"vhost/stock-collapses-qlen1". A property whose cells are absent (a smoke
profile without RTT cells) or errored is not failed but not applicable
(passed=None), with a detail that says which cell is missing and why.

The thresholds encode the *shape* of the cover letter's results (stock
collapses at txqueuelen 1, nodrop holds), which survives emulation; absolute
throughput only means something with hardware KVM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from lab.verdicts.results import CellSummary

# Stable property names (the part after "<backend>/") with their one-line descriptions.
DESCRIPTIONS: dict[str, str] = {
    "nodrop-no-ring-drops": "the patched kernel never tail-drops at the tap's ptr_ring (tap tx_dropped == 0)",
    "stock-collapses-qlen1": "the stock kernel collapses at txqueuelen 1 (the bug the patch fixes is reproduced)",
    "nodrop-holds-qlen1": "the patched kernel keeps most of its throughput at txqueuelen 1",
    "nodrop-no-regression": "the patched kernel is not slower than stock at the default txqueuelen 1000",
    "nodrop-retrans-low": "the patched kernel causes (almost) no TCP retransmits at RTT 0",
    "delay-nodrop-vs-stock": "with netem delay on the tap, the patched kernel is at least as fast as stock",
    "vhost-absolute-throughput": "vhost_net reaches the expected absolute throughput (hardware KVM only)",
}


class ExpectationsLike(Protocol):
    """The attributes of lab.config.Expectations that evaluate() reads (duck-typed)."""

    @property
    def stock_kernel(self) -> str: ...
    @property
    def nodrop_kernel(self) -> str: ...
    @property
    def collapse_max_ratio(self) -> float: ...
    @property
    def nodrop_hold_min_ratio(self) -> float: ...
    @property
    def no_regression_min_ratio(self) -> float: ...
    @property
    def nodrop_retrans_max_fraction(self) -> float: ...
    @property
    def delay_min_ratio(self) -> float: ...

    @property
    def vhost_min_gbps(self) -> float: ...


@dataclass(frozen=True)
class Property:
    """The verdict of one property: passed True/False, or None when not applicable."""

    name: str
    passed: bool | None
    detail: str
    cells: tuple[str, ...] = ()
    description: str = ""

    @property
    def verdict(self) -> str:
        """ "PASS", "FAIL" or "n/a"."""
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]

    def to_dict(self) -> dict[str, object]:
        """JSON form: name, passed, detail, cells, description."""
        return {
            "name": self.name,
            "passed": self.passed,
            "detail": self.detail,
            "cells": list(self.cells),
            "description": self.description,
        }


# --------------------------------------------------------------------------- formatting


def fmt_mbps(v: float | None) -> str:
    """Mbit/s like the cover letter: 23404, 625, 2.2, 0.7."""
    if v is None:
        return "-"
    if v >= 10:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    if v == 0:
        return "0"
    return f"{v:.2g}" if v >= 0.001 else f"{v:.1e}"


def fmt_ratio(r: float | None) -> str:
    """A ratio without exponent: 27493, 50.5, 1.02, 0.51, and two significant digits below 0.1: 0.0034."""
    if r is None or math.isnan(r):
        return "-"
    if math.isinf(r):
        return "inf"
    if r == 0:
        return "0"
    if r >= 100:
        return f"{r:.0f}"
    if r >= 10:
        return f"{r:.1f}"
    if r >= 0.1:
        return f"{r:.2f}"
    decimals = min(12, 1 - math.floor(math.log10(r)))  # 0.0000299 -> 6 -> "0.000030"
    return f"{r:.{decimals}f}".rstrip("0")


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, inf when only b is 0, None when either is unknown or both are 0."""
    if a is None or b is None:
        return None
    if b == 0:
        return None if a == 0 else math.inf
    return a / b


def _num(v: float) -> str:
    return f"{v:g}"


# --------------------------------------------------------------------------- lookup


@dataclass
class _Index:
    """The summaries of one backend, looked up by (kernel, txqueuelen, rtt_ms)."""

    backend: str
    by_key: dict[tuple[str, int, float], CellSummary] = field(default_factory=dict)

    def find(self, kernel: str, qlen: int, rtt: float) -> tuple[CellSummary | None, str]:
        """The summary with a usable throughput, or None and why it is unusable."""
        what = f"{kernel} qlen{qlen} rtt{_num(rtt)}"
        s = self.by_key.get((kernel, qlen, rtt))
        if s is None:
            return None, f"{self.backend}: no {what} cell in this run"
        if s.n_ok == 0:
            why = s.errors[0] if s.errors else "no ok attempt"
            return None, f"{self.backend}: {what} errored ({why})"
        if s.throughput_mbps is None:
            return None, f"{self.backend}: {what} has no throughput measurement"
        return s, ""


def _mbps(s: CellSummary) -> float:
    assert s.throughput_mbps is not None  # _Index.find guarantees it
    return float(s.throughput_mbps.median)


def _partial(*ss: CellSummary) -> str:
    # Say when a median rests on fewer repeats than planned, so a reader can weigh it.
    notes = [f"{s.label}: {s.n_error} of {s.n_ok + s.n_error} repeats errored" for s in ss if s.n_error]
    return f" [{'; '.join(notes)}]" if notes else ""


def _ids(*ss: CellSummary | None) -> tuple[str, ...]:
    return tuple(c for s in ss if s is not None for c in s.cell_ids)


# --------------------------------------------------------------------------- the properties


def _ratio_property(
    name: str,
    idx: _Index,
    a_key: tuple[str, int, float],
    b_key: tuple[str, int, float],
    threshold: float,
    at_most: bool,
) -> Property:
    """a <= threshold x b (at_most) or a >= threshold x b, on median throughputs."""
    full = f"{idx.backend}/{name}"
    desc = DESCRIPTIONS[name]
    a, why_a = idx.find(*a_key)
    b, why_b = idx.find(*b_key)
    if a is None or b is None:
        return Property(full, None, "; ".join(w for w in (why_a, why_b) if w), _ids(a, b), desc)
    va, vb = _mbps(a), _mbps(b)
    # Compare by multiplication: no division by a zero baseline, same verdict otherwise.
    passed = va <= threshold * vb if at_most else va >= threshold * vb
    op = "<=" if at_most else ">="
    detail = (
        f"{idx.backend}: {a.kernel} qlen{a.txqueuelen} {fmt_mbps(va)} Mbit/s = {fmt_ratio(ratio(va, vb))} x "
        f"{b.kernel} qlen{b.txqueuelen} {fmt_mbps(vb)} Mbit/s ({op} {_num(threshold)})"
    )
    return Property(full, passed, detail + _partial(a, b), _ids(a, b), desc)


def _no_ring_drops(idx: _Index, exp: ExpectationsLike) -> Property:
    name = "nodrop-no-ring-drops"
    full, desc = f"{idx.backend}/{name}", DESCRIPTIONS[name]
    cells = [s for s in idx.by_key.values() if s.kernel == exp.nodrop_kernel]
    ok = [s for s in cells if s.n_ok > 0]
    measured = [s for s in ok if s.tap_tx_dropped is not None]
    if not measured:
        why = "no" if not cells else ("no ok" if not ok else "no tap tx_dropped measured in any")
        return Property(full, None, f"{idx.backend}: {why} {exp.nodrop_kernel} cell", _ids(*cells), desc)
    dropping = [s for s in measured if (s.tap_tx_dropped.sum if s.tap_tx_dropped else 0) > 0]
    unmeasured = len(ok) - len(measured)
    tail = f"; {unmeasured} cell(s) without the counter" if unmeasured else ""
    if dropping:
        worst = ", ".join(
            f"{s.label} {int(s.tap_tx_dropped.sum)} ({', '.join(s.cell_ids)})"  # type: ignore[union-attr]
            for s in dropping
        )
        return Property(full, False, f"{idx.backend}: tap tx_dropped > 0 in {worst}{tail}", _ids(*dropping), desc)
    return Property(
        full,
        True,
        f"{idx.backend}: tap tx_dropped = 0 in all {len(measured)} {exp.nodrop_kernel} cell(s){tail}",
        _ids(*measured),
        desc,
    )


def _retrans_low(idx: _Index, exp: ExpectationsLike) -> Property:
    name = "nodrop-retrans-low"
    full, desc = f"{idx.backend}/{name}", DESCRIPTIONS[name]
    cells = [s for s in idx.by_key.values() if s.kernel == exp.nodrop_kernel and s.rtt_ms == 0]
    ok = [s for s in cells if s.n_ok > 0]
    if not ok:
        why = "no" if not cells else "no ok"
        return Property(full, None, f"{idx.backend}: {why} {exp.nodrop_kernel} cell at rtt 0", _ids(*cells), desc)
    no_segs = [s for s in ok if s.tcp_out_segs is None or not s.tcp_out_segs.sum]
    if no_segs:
        return Property(
            full,
            None,
            f"{idx.backend}: tcp_out_segs not measured in {', '.join(s.label for s in no_segs)}",
            _ids(*ok),
            desc,
        )
    parts: list[str] = []
    bad: list[CellSummary] = []
    f = exp.nodrop_retrans_max_fraction
    for s in ok:
        # iperf3's sender retransmits; nstat's count when iperf3 did not report any.
        stat = s.retransmits if s.retransmits is not None else s.host_retrans_segs
        if stat is None:
            return Property(full, None, f"{idx.backend}: no retransmit count in {s.label}", _ids(*ok), desc)
        segs = s.tcp_out_segs.sum  # type: ignore[union-attr]
        frac = stat.sum / segs
        parts.append(f"qlen{s.txqueuelen} {int(stat.sum)}/{int(segs)} = {fmt_ratio(frac)}")
        if stat.sum > f * segs:
            bad.append(s)
    limit = f"(<= {_num(f)} expected)" if bad else f"(all <= {_num(f)})"
    detail = f"{idx.backend}: {exp.nodrop_kernel} retransmits/segments {'; '.join(parts)} {limit}"
    if bad:
        detail += f"; over in {', '.join(c for s in bad for c in s.cell_ids)}"
    return Property(full, not bad, detail, _ids(*(bad or ok)), desc)


def _delay(idx: _Index, exp: ExpectationsLike, tcg: bool = False) -> Property:
    min_ratio = exp.delay_min_ratio
    name = "delay-nodrop-vs-stock"
    full, desc = f"{idx.backend}/{name}", DESCRIPTIONS[name]
    points = sorted({(q, r) for (_, q, r) in idx.by_key if r > 0}, key=lambda p: (p[1], -p[0]))
    if not points:
        return Property(full, None, f"{idx.backend}: no cells with rtt > 0 in this run", (), desc)
    parts: list[str] = []
    skipped: list[str] = []
    used: list[CellSummary] = []
    failed = False
    for qlen, rtt in points:
        st, why_s = idx.find(exp.stock_kernel, qlen, rtt)
        nd, why_n = idx.find(exp.nodrop_kernel, qlen, rtt)
        if st is None or nd is None:
            skipped.append("; ".join(w for w in (why_s, why_n) if w))
            continue
        used += [st, nd]
        vs, vn = _mbps(st), _mbps(nd)
        ok = vn >= min_ratio * vs
        failed |= not ok
        parts.append(
            f"rtt{_num(rtt)} {exp.nodrop_kernel} {fmt_mbps(vn)} / {exp.stock_kernel} {fmt_mbps(vs)} Mbit/s"
            f" = {fmt_ratio(ratio(vn, vs))}{'' if ok else ' FAIL'}"
        )
    if not parts:
        return Property(full, None, "; ".join(skipped), (), desc)
    detail = f"{idx.backend}: {'; '.join(parts)} (>= {_num(min_ratio)}{_TCG_NOTE if tcg else ''})"
    if skipped:
        detail += f"; skipped: {'; '.join(skipped)}"
    return Property(full, not failed, detail + _partial(*used), _ids(*used), desc)


def _absolute(idx: _Index, exp: ExpectationsLike, host_accel: str | None) -> Property:
    name = "vhost-absolute-throughput"
    full, desc = f"{idx.backend}/{name}", DESCRIPTIONS[name]
    if host_accel == "tcg":
        return Property(
            full,
            None,
            f"{idx.backend}: not applicable under TCG (absolute numbers mean nothing under emulation)",
            (),
            desc,
        )
    s, why = idx.find(exp.nodrop_kernel, 1000, 0)
    if s is None:
        return Property(full, None, why, (), desc)
    gbps = _mbps(s) / 1000.0
    passed = gbps >= exp.vhost_min_gbps
    detail = (
        f"{idx.backend}: {s.label} {fmt_mbps(_mbps(s))} Mbit/s = {gbps:.1f} Gbit/s "
        f"(>= {_num(exp.vhost_min_gbps)} Gbit/s)"
    )
    return Property(full, passed, detail + _partial(s), s.cell_ids, desc)


def backends_in_order(summaries: Iterable[CellSummary]) -> list[str]:
    """The backends present, in the cover letter's order (TAP, then vhost_net), then others as they appear."""
    seen = list(dict.fromkeys(s.backend for s in summaries))
    return sorted(seen, key=lambda b: ({"tap": 0, "vhost": 1}.get(b, 2), seen.index(b)))


def evaluate(
    summaries: Iterable[CellSummary], expectations: ExpectationsLike, host_accel: str | None
) -> list[Property]:
    """Evaluate every property for every backend present in `summaries`.

    `host_accel` is the lab host's accelerator ("kvm" | "tcg" | None = unknown);
    under TCG the absolute-throughput property is not applicable.
    """
    summaries = list(summaries)
    exp = expectations
    stock, nodrop = exp.stock_kernel, exp.nodrop_kernel
    props: list[Property] = []
    tcg = host_accel == "tcg"
    regression_min = exp.no_regression_min_ratio
    for backend in backends_in_order(summaries):
        idx = _Index(backend)
        for s in summaries:
            if s.backend == backend:
                idx.by_key[(s.kernel, s.txqueuelen, s.rtt_ms)] = s
        props.append(_no_ring_drops(idx, exp))
        props.append(
            _ratio_property("stock-collapses-qlen1", idx, (stock, 1, 0), (stock, 1000, 0), exp.collapse_max_ratio, True)
        )
        props.append(
            _ratio_property(
                "nodrop-holds-qlen1", idx, (nodrop, 1, 0), (nodrop, 1000, 0), exp.nodrop_hold_min_ratio, False
            )
        )
        props.append(
            _ratio_property(
                "nodrop-no-regression", idx, (nodrop, 1000, 0), (stock, 1000, 0), regression_min, False
            )
        )
        props.append(_retrans_low(idx, exp))
        if backend == "tap":
            props.append(_delay(idx, exp, tcg))
        if backend == "vhost":
            props.append(_absolute(idx, exp, host_accel))
    return props


_TCG_NOTE = ", TCG cross-boot bound"


def all_passed(props: Iterable[Property]) -> bool:
    """True iff no property failed and at least one passed (n/a never fails, but all-n/a proves nothing)."""
    props = list(props)
    return not any(p.passed is False for p in props) and any(p.passed is True for p in props)


def failures(props: Iterable[Property]) -> list[Property]:
    """The failed properties, for an assertion message."""
    return [p for p in props if p.passed is False]
