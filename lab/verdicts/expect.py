"""The properties asserted over a matrix run; one module for the CLI and pytest alike.

Properties are evaluated per backend present in the run and named
"<backend>/<property>", e.g. "vhost/stock-collapses-qlen1". Each has one of
four verdicts:

- PASS / FAIL on the numbers;
- INCONCLUSIVE when a comparison's confidence interval straddles the
  threshold: the data cannot decide, and that is not a pass;
- n/a when its cells are absent (a profile without RTT cells) or errored, or
  under TCG for the absolute-throughput check, with a detail saying why.

Within-kernel properties (stock collapses at txqueuelen 1, nodrop holds)
compare medians of one arm at two points: effects of 20x and more. The
stock-vs-patched properties (no regression at txqueuelen 1000, delay) use the
comparison statistics of lab.verdicts.stats: PASS only when the CI's lower
bound clears the threshold, FAIL when its upper bound is below it. Ring drops
are counted by drop reason (FULL_RING) where the kernel reports reasons, and
by the tap's tx_dropped otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lab.verdicts.results import CellSummary, Point
from lab.verdicts.stats import Comparison, compare_summaries

# Stable property names (the part after "<backend>/") with their one-line descriptions.
DESCRIPTIONS: dict[str, str] = {
    "nodrop-no-ring-drops": "the patched kernel never tail-drops at the tap's ptr_ring (FULL_RING drops == 0)",
    "stock-collapses-qlen1": "the stock kernel collapses at txqueuelen 1 (the bug the patch fixes is reproduced)",
    "nodrop-holds-qlen1": "the patched kernel keeps most of its throughput at txqueuelen 1",
    "nodrop-no-regression": "the patched kernel is not slower than stock at txqueuelen 1000 (CI lower bound >= threshold)",
    "nodrop-retrans-low": "the patched kernel causes (almost) no TCP retransmits at RTT 0",
    "delay-nodrop-vs-stock": "with netem delay on the tap, the patched kernel is at least as fast as stock (CI)",
    "vhost-absolute-throughput": "vhost_net reaches the expected absolute throughput (hardware KVM only)",
}

PASS, FAIL, INCONCLUSIVE, NA = "PASS", "FAIL", "INCONCLUSIVE", "n/a"


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
    @property
    def same_tolerance(self) -> float: ...
    @property
    def confidence(self) -> float: ...


@dataclass(frozen=True)
class Property:
    """The verdict of one property: PASS, FAIL, INCONCLUSIVE or n/a, with the numbers behind it."""

    name: str
    verdict: str
    detail: str
    cells: tuple[str, ...] = ()
    description: str = ""

    @property
    def passed(self) -> bool | None:
        """True on PASS, False on FAIL, None otherwise (INCONCLUSIVE, n/a)."""
        return {PASS: True, FAIL: False}.get(self.verdict)

    def to_dict(self) -> dict[str, object]:
        """JSON form: name, verdict, passed, detail, cells, description."""
        return {
            "name": self.name,
            "verdict": self.verdict,
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


def fmt_ci(c: Comparison) -> str:
    """ "1.02 [0.95-1.09] same" """
    j = c.judgement
    ci = f" [{fmt_ratio(j.ci_low)}-{fmt_ratio(j.ci_high)}]" if j.ci_low is not None else ""
    return f"{fmt_ratio(j.ratio)}{ci} {j.verdict}"


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


def base_point(backend: str, txqueuelen: int, rtt_ms: float = 0.0) -> Point:
    """The cover letter's points: one iperf3 stream, one queue, the default qdisc."""
    return Point("iperf3", backend, txqueuelen, float(rtt_ms) if rtt_ms % 1 else int(rtt_ms))


@dataclass
class _Index:
    """The summaries of one backend, looked up by (kernel, point)."""

    backend: str
    by_key: dict[tuple[str, Point], CellSummary] = field(default_factory=dict)

    def find(self, kernel: str, point: Point) -> tuple[CellSummary | None, str]:
        """The summary with a usable value, or None and why it is unusable."""
        what = f"{kernel} {point.label()}"
        s = self.by_key.get((kernel, point))
        if s is None:
            return None, f"{self.backend}: no {what} cell in this run"
        if s.n_ok == 0:
            why = s.errors[0] if s.errors else "no ok attempt"
            return None, f"{self.backend}: {what} errored ({why})"
        if s.value is None:
            return None, f"{self.backend}: {what} has no measurement"
        return s, ""

    def kernel_cells(self, kernel: str) -> list[CellSummary]:
        return [s for (k, _), s in self.by_key.items() if k == kernel]


def _med(s: CellSummary) -> float:
    assert s.value is not None  # _Index.find guarantees it
    return float(s.value.median)


def _partial(*ss: CellSummary) -> str:
    # Say when a median rests on fewer repeats than planned, so a reader can weigh it.
    notes = [f"{s.label}: {s.n_error} of {s.n_ok + s.n_error} repeats errored" for s in ss if s.n_error]
    return f" [{'; '.join(notes)}]" if notes else ""


def _ids(*ss: CellSummary | None) -> tuple[str, ...]:
    return tuple(c for s in ss if s is not None for c in s.cell_ids)


# --------------------------------------------------------------------------- the properties


def _ratio_property(name: str, idx: _Index, a_key: tuple[str, Point], b_key: tuple[str, Point], threshold: float,
                    at_most: bool) -> Property:
    """a <= threshold x b (at_most) or a >= threshold x b, on medians (within one kernel)."""
    full = f"{idx.backend}/{name}"
    desc = DESCRIPTIONS[name]
    a, why_a = idx.find(*a_key)
    b, why_b = idx.find(*b_key)
    if a is None or b is None:
        return Property(full, NA, "; ".join(w for w in (why_a, why_b) if w), _ids(a, b), desc)
    va, vb = _med(a), _med(b)
    # Compare by multiplication: no division by a zero baseline, same verdict otherwise.
    passed = va <= threshold * vb if at_most else va >= threshold * vb
    op = "<=" if at_most else ">="
    detail = (
        f"{idx.backend}: {a.label} {fmt_mbps(va)} Mbit/s = {fmt_ratio(ratio(va, vb))} x "
        f"{b.label} {fmt_mbps(vb)} Mbit/s ({op} {_num(threshold)})"
    )
    return Property(full, PASS if passed else FAIL, detail + _partial(a, b), _ids(a, b), desc)


def _ci_verdict(c: Comparison, threshold: float) -> str:
    j = c.judgement
    if j.ci_low is None or j.ci_high is None:
        return INCONCLUSIVE
    if j.ci_low >= threshold:
        return PASS
    if j.ci_high < threshold:
        return FAIL
    return INCONCLUSIVE


def _combine(verdicts: Sequence[str]) -> str:
    if FAIL in verdicts:
        return FAIL
    if INCONCLUSIVE in verdicts:
        return INCONCLUSIVE
    return PASS if verdicts else NA


def _ci_property(name: str, idx: _Index, exp: ExpectationsLike, points: Sequence[Point], threshold: float, salt: str) -> Property:
    """nodrop / stock at each point, judged on the CI of the ratio of medians against `threshold`."""
    full, desc = f"{idx.backend}/{name}", DESCRIPTIONS[name]
    if not points:
        return Property(full, NA, f"{idx.backend}: no cells for this property in this run", (), desc)
    parts, skipped, used, verdicts = [], [], [], []
    for point in points:
        st, why_s = idx.find(exp.stock_kernel, point)
        nd, why_n = idx.find(exp.nodrop_kernel, point)
        if st is None or nd is None:
            skipped.append("; ".join(w for w in (why_s, why_n) if w))
            continue
        c = compare_summaries(st, nd, tolerance=exp.same_tolerance, confidence=exp.confidence, salt=salt)
        v = _ci_verdict(c, threshold)
        verdicts.append(v)
        used += [st, nd]
        j = c.judgement
        more = f", {j.needed} repeats per arm would decide" if v == INCONCLUSIVE and j.needed else ""
        boots = "" if c.same_boot is not False else ", across boots"
        parts.append(f"{point.label()} {fmt_mbps(j.median_b)}/{fmt_mbps(j.median_a)} = {fmt_ci(c)} (n={j.n_b}/{j.n_a}{boots}"
                     f"{more}){' FAIL' if v == FAIL else ''}")
    if not verdicts:
        return Property(full, NA, "; ".join(skipped), (), desc)
    detail = f"{idx.backend}: {exp.nodrop_kernel}/{exp.stock_kernel} {'; '.join(parts)} (CI >= {_num(threshold)})"
    if skipped:
        detail += f"; skipped: {'; '.join(skipped)}"
    return Property(full, _combine(verdicts), detail + _partial(*used), _ids(*used), desc)


def _no_ring_drops(idx: _Index, exp: ExpectationsLike) -> Property:
    name = "nodrop-no-ring-drops"
    full, desc = f"{idx.backend}/{name}", DESCRIPTIONS[name]
    every = idx.kernel_cells(exp.nodrop_kernel)
    # Under noqueue there is no qdisc to hold a backlog: the patch stops
    # nothing there and tail-drops by design (v2's contract). Those cells are
    # reported beside the verdict, not in it.
    cells = [s for s in every if s.point.qdisc != "noqueue"]
    bare = [s for s in every if s.point.qdisc == "noqueue" and s.n_ok > 0]
    ok = [s for s in cells if s.n_ok > 0]
    by_reason = [s for s in ok if s.ring_drops is not None]
    by_counter = [s for s in ok if s.ring_drops is None and s.tap_tx_dropped is not None]
    if not by_reason and not by_counter:
        why = "no" if not cells else ("no ok" if not ok else "no drop counter measured in any")
        return Property(full, NA, f"{idx.backend}: {why} {exp.nodrop_kernel} cell", _ids(*cells), desc)

    def dropped(s: CellSummary) -> int:
        st = s.ring_drops if s.ring_drops is not None else s.tap_tx_dropped
        return int(st.sum) if st else 0

    dropping = [s for s in by_reason + by_counter if dropped(s) > 0]
    # pktgen cells' ring drops are the tap's tx_dropped (pktgen's own skb reference hides FULL_RING)
    pktgen = [s for s in by_reason if s.point.kind == "pktgen"]
    how = f"FULL_RING drops by reason in {len(by_reason) - len(pktgen)} cell(s)"
    how += (f", tap tx_dropped in {len(pktgen)} pktgen cell(s)" if pktgen else "") + (f", tap tx_dropped in {len(by_counter)}" if by_counter else "")
    unmeasured = len(ok) - len(by_reason) - len(by_counter)
    tail = f"; {unmeasured} cell(s) without a counter" if unmeasured else ""
    if bare:
        tail += (f"; under noqueue (not judged: nothing to hold a backlog) {sum(dropped(s) for s in bare)} ring drops "
                 f"in {len(bare)} cell(s)")
    if dropping:
        worst = ", ".join(f"{s.label} {dropped(s)} ({', '.join(s.cell_ids)})" for s in dropping)
        return Property(full, FAIL, f"{idx.backend}: ring drops > 0 in {worst} ({how}){tail}", _ids(*dropping), desc)
    return Property(full, PASS, f"{idx.backend}: 0 ring drops in all {len(by_reason) + len(by_counter)} {exp.nodrop_kernel} "
                                f"cell(s) ({how}){tail}", _ids(*by_reason, *by_counter), desc)


def _retrans_low(idx: _Index, exp: ExpectationsLike) -> Property:
    name = "nodrop-retrans-low"
    full, desc = f"{idx.backend}/{name}", DESCRIPTIONS[name]
    cells = [s for s in idx.kernel_cells(exp.nodrop_kernel) if s.point.rtt_ms == 0 and s.point.kind == "iperf3"]
    ok = [s for s in cells if s.n_ok > 0]
    if not ok:
        why = "no" if not cells else "no ok"
        return Property(full, NA, f"{idx.backend}: {why} {exp.nodrop_kernel} cell at rtt 0", _ids(*cells), desc)
    no_segs = [s for s in ok if s.tcp_out_segs is None or not s.tcp_out_segs.sum]
    if no_segs:
        return Property(full, NA, f"{idx.backend}: tcp_out_segs not measured in {', '.join(s.label for s in no_segs)}", _ids(*ok), desc)
    parts: list[str] = []
    bad: list[CellSummary] = []
    f = exp.nodrop_retrans_max_fraction
    for s in ok:
        # iperf3's sender retransmits; the host's TCP counters when iperf3 did not report any.
        stat = s.retransmits if s.retransmits is not None else s.host_retrans_segs
        if stat is None:
            return Property(full, NA, f"{idx.backend}: no retransmit count in {s.label}", _ids(*ok), desc)
        segs = s.tcp_out_segs.sum  # type: ignore[union-attr]
        parts.append(f"{s.point.label()} {int(stat.sum)}/{int(segs)} = {fmt_ratio(stat.sum / segs)}")
        if stat.sum > f * segs:
            bad.append(s)
    limit = f"(<= {_num(f)} expected)" if bad else f"(all <= {_num(f)})"
    detail = f"{idx.backend}: {exp.nodrop_kernel} retransmits/segments {'; '.join(parts)} {limit}"
    if bad:
        detail += f"; over in {', '.join(c for s in bad for c in s.cell_ids)}"
    return Property(full, FAIL if bad else PASS, detail, _ids(*(bad or ok)), desc)


def _absolute(idx: _Index, exp: ExpectationsLike, host_accel: str | None) -> Property:
    name = "vhost-absolute-throughput"
    full, desc = f"{idx.backend}/{name}", DESCRIPTIONS[name]
    if host_accel == "tcg":
        return Property(full, NA, f"{idx.backend}: not applicable under TCG (absolute numbers mean nothing under emulation)", (), desc)
    s, why = idx.find(exp.nodrop_kernel, base_point(idx.backend, 1000))
    if s is None:
        return Property(full, NA, why, (), desc)
    gbps = _med(s) / 1000.0
    detail = f"{idx.backend}: {s.label} {fmt_mbps(_med(s))} Mbit/s = {gbps:.1f} Gbit/s (>= {_num(exp.vhost_min_gbps)} Gbit/s)"
    return Property(full, PASS if gbps >= exp.vhost_min_gbps else FAIL, detail + _partial(s), s.cell_ids, desc)


def backends_in_order(summaries: Iterable[CellSummary]) -> list[str]:
    """The backends present, in the cover letter's order (TAP, then vhost_net), then others as they appear."""
    seen = list(dict.fromkeys(s.backend for s in summaries))
    return sorted(seen, key=lambda b: ({"tap": 0, "vhost": 1}.get(b, 2), seen.index(b)))


def evaluate(
    summaries: Iterable[CellSummary], expectations: ExpectationsLike, host_accel: str | None, salt: str = "", aa: bool = False
) -> list[Property]:
    """Evaluate every property for every backend present in `summaries`.

    `aa`: an A/A control (the other arm is a copy of the baseline): what only a
    patched kernel can show (no ring drops, holding at txqueuelen 1, few
    retransmits) is n/a; the comparisons are what an A/A run is for.

    `host_accel` is the lab host's accelerator ("kvm" | "tcg" | None = unknown);
    under TCG the absolute-throughput property is not applicable. `salt` seeds
    the bootstrap (the run id, so a re-rendered report gives the same CIs).
    """
    summaries = list(summaries)
    exp = expectations
    stock, nodrop = exp.stock_kernel, exp.nodrop_kernel
    props: list[Property] = []
    for backend in backends_in_order(summaries):
        idx = _Index(backend)
        for s in summaries:
            if s.backend == backend:
                idx.by_key[(s.kernel, s.point)] = s
        points = {p for (_, p) in idx.by_key}
        q1000 = sorted(p for p in points if p.kind == "iperf3" and p.txqueuelen == 1000 and p.rtt_ms == 0 and p.qdisc == "default")
        delayed = sorted(p for p in points if p.kind == "iperf3" and p.rtt_ms > 0)
        props.append(_no_ring_drops(idx, exp))
        props.append(_ratio_property("stock-collapses-qlen1", idx, (stock, base_point(backend, 1)), (stock, base_point(backend, 1000)),
                                     exp.collapse_max_ratio, True))
        props.append(_ratio_property("nodrop-holds-qlen1", idx, (nodrop, base_point(backend, 1)), (nodrop, base_point(backend, 1000)),
                                     exp.nodrop_hold_min_ratio, False))
        props.append(_ci_property("nodrop-no-regression", idx, exp, q1000, exp.no_regression_min_ratio, salt))
        props.append(_retrans_low(idx, exp))
        props.append(_ci_property("delay-nodrop-vs-stock", idx, exp, delayed, exp.delay_min_ratio, salt))
        if backend == "vhost":
            props.append(_absolute(idx, exp, host_accel))
    if aa:
        patched_only = {"nodrop-no-ring-drops", "nodrop-holds-qlen1", "nodrop-retrans-low"}
        why = f"an A/A control: {nodrop} is a copy of {stock}, not a patched kernel"
        props = [dataclasses.replace(p, verdict=NA, detail=why) if p.name.split("/", 1)[-1] in patched_only else p
                 for p in props]
    return props


def overall(props: Iterable[Property]) -> str:
    """PASS (nothing failed or undecided, something passed), FAIL, or INCONCLUSIVE."""
    verdicts = [p.verdict for p in props]
    if FAIL in verdicts:
        return FAIL
    if INCONCLUSIVE in verdicts or PASS not in verdicts:
        return INCONCLUSIVE
    return PASS


def all_passed(props: Iterable[Property]) -> bool:
    """True iff no property failed or was inconclusive and at least one passed (n/a never fails)."""
    return overall(props) == PASS


def failures(props: Iterable[Property]) -> list[Property]:
    """The failed properties, for an assertion message."""
    return [p for p in props if p.verdict == FAIL]
