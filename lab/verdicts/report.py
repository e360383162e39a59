"""Reports over a run: rich terminal tables, and exports (plain text, markdown, JSON, SVG, a plot).

Everything here renders from a results file as loaded by lab.verdicts.results
(a RunData) plus the properties lab.verdicts.expect evaluated over it; nothing
reads live state, so any past run can be re-rendered. Also the live view of a
running matrix (MatrixProgress), which renders the runner's events.

Rows follow the patch's cover letter: txqueuelen 1000, 100, 10, 1 at RTT 0,
then the netem RTTs at txqueuelen 1000, then the review's variants (flows,
queues, qdiscs); columns put the kernels side by side, then each other arm's
ratio to the baseline with its 95 % CI and verdict (lab.verdicts.stats), and
the noise (coefficient of variation) a reader should weigh it by.
"""

from __future__ import annotations

import io
import statistics
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text

from lab.verdicts.expect import FAIL, INCONCLUSIVE, PASS, Property, backends_in_order, fmt_mbps, fmt_ratio, overall
from lab.verdicts.results import CellSummary, Point, RunData, Stat
from lab.verdicts.stats import Comparison, comparisons, judge, refused, seed_of

BACKEND_TITLES = {"tap": "TAP (QEMU virtio-net, no vhost)", "vhost": "vhost_net (tap + vhost_net)"}
TEXT_WIDTH = 78  # a netdev mail's line
VERDICT_STYLE = {PASS: "bold green", FAIL: "bold red", INCONCLUSIVE: "bold yellow", "n/a": "dim"}
WORD_STYLE = {"faster": "green", "slower": "red", "same": "", "inconclusive": "yellow"}


@dataclass(frozen=True)
class ReportContext:
    """What a report needs besides the run: baseline kernel, tolerance and confidence of the comparisons."""

    baseline: str | None = None
    tolerance: float = 0.10
    confidence: float = 0.95

    def baseline_of(self, run: RunData) -> str | None:
        """The run's baseline arm: the one given, else the run's own, else "stock" when present."""
        if self.baseline:
            return self.baseline
        b = run.meta.extra.get("baseline")
        if isinstance(b, str):
            return b
        ks = _kernels(run, None)
        return ks[0] if ks else None


# --------------------------------------------------------------------------- the table model
# One neutral model of a table, rendered three ways (rich, markdown, ASCII), so the
# numbers can never differ between the terminal and the mail.


@dataclass
class _Cell:
    text: str
    error: bool = False
    style: str = ""


@dataclass
class _Column:
    key: str
    header: str  # rich and markdown
    short: str  # plain text, where width is scarce
    priority: int  # plain text drops the highest numbers first when over 78 columns
    left: bool = False


@dataclass
class _Table:
    backend: str
    kind: str
    title: str
    columns: list[_Column]
    rows: list[list[_Cell]]
    errors: list[str] = field(default_factory=list)
    legend: str = ""


def _kernels(run: RunData, kernels: Sequence[str] | None) -> list[str]:
    """Baseline first: the caller's order, else the run's arms, else stock/nodrop when present, else plan order."""
    seen = list(dict.fromkeys(r.kernel for r in run.latest()))
    arms = [a.get("name") for a in run.meta.extra.get("arms") or [] if isinstance(a, dict)]
    order = list(kernels or []) + [a for a in arms if isinstance(a, str)]
    if order:
        return [k for k in dict.fromkeys(order) if k in seen] + [k for k in seen if k not in order]
    pref = {"stock": 0, "nodrop": 1}
    return sorted(seen, key=lambda k: (pref.get(k, 2), seen.index(k)))


def _row_key(p: Point) -> tuple[Any, ...]:
    # cover letter first (default qdisc, 1 flow, 1 queue; RTT 0 by qlen descending, then RTTs), then the variants
    return (p.qdisc != "default", p.qdisc, p.queues, p.streams, p.threads, p.rtt_ms != 0, p.rtt_ms, -p.txqueuelen)


def _row_label(p: Point) -> str:
    head = f"qlen {p.txqueuelen}" if p.rtt_ms == 0 else f"RTT {p.rtt_ms:g} ms" + ("" if p.txqueuelen == 1000 else f" q{p.txqueuelen}")
    bits = [head]
    if p.qdisc != "default":
        bits.append(p.qdisc)
    if p.streams != 1:
        bits.append(f"{p.streams} flows")
    if p.queues != 1:
        bits.append(f"{p.queues}q")
    if p.threads:
        bits.append(f"{p.threads} thr")
    return " ".join(bits)


def _spread(stat: Stat | None, fmt: Callable[[float], str], dash: str) -> str:
    """median, or "median [min-max]" over repeats."""
    if stat is None:
        return "-"
    if stat.n > 1:
        return f"{fmt(stat.median)} [{fmt(stat.min)}{dash}{fmt(stat.max)}]"
    return fmt(stat.median)


def _count(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _med(stat: Stat | None) -> float | None:
    return None if stat is None else stat.median


def _cv(stat: Stat | None) -> str:
    cv = stat.cv if stat is not None else None
    return "-" if cv is None else f"{cv * 100:.0f}%"


def _kpps(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:.1f}"


def _joined(per_k: dict[str, CellSummary | None], ks: Sequence[str], attr: str, fmt: Callable[[float | None], str] = _count) -> str:
    """One counter's medians for every kernel, "stock/nodrop" style; "-" where a cell is absent."""
    out = []
    for k in ks:
        s = per_k[k]
        out.append(fmt(_med(getattr(s, attr))) if s is not None else "-")
    return "/".join(out)


def _ring(s: CellSummary | None) -> str:
    if s is None:
        return "-"
    if s.ring_drops is not None:
        return f"{s.ring_drops.median:g}"
    return f"{s.tap_tx_dropped.median:g}*" if s.tap_tx_dropped is not None else "-"


def _cmp_text(c: Comparison | None, dash: str) -> str:
    if c is None:
        return "-"
    j = c.judgement
    ci = f" [{fmt_ratio(j.ci_low)}{dash}{fmt_ratio(j.ci_high)}]" if j.ci_low is not None else ""
    boot = "" if c.same_boot is not False else "~"  # measured across boots
    return f"{fmt_ratio(j.ratio)}{ci} {j.verdict}{boot}"


def run_comparisons(run: RunData, rc: ReportContext) -> list[Comparison]:
    """Every arm against the baseline at every point of the run (lab.verdicts.stats)."""
    base = rc.baseline_of(run)
    if base is None:
        return []
    return comparisons(run.summaries(), base, tolerance=rc.tolerance, confidence=rc.confidence, salt=run.meta.run_id)


def _build_tables(run: RunData, kernels: Sequence[str] | None, compare: RunData | None, ascii_only: bool,
                  rc: ReportContext) -> list[_Table]:
    summaries = run.summaries()
    ks = _kernels(run, kernels)
    base = rc.baseline_of(run) if rc.baseline_of(run) in ks else (ks[0] if ks else "")
    ks = [base] + [k for k in ks if k != base] if base else ks
    others = [k for k in ks if k != base]
    dash = "-" if ascii_only else "\u2013"
    sep = ", " if ascii_only else " \u00b7 "
    slash_k = "/".join(ks)
    cmps = {(c.point, c.b): c for c in run_comparisons(run, ReportContext(base, rc.tolerance, rc.confidence))}
    other_idx: dict[tuple[str, Point], CellSummary] = {}
    if compare is not None:
        other_idx = {s.key: s for s in compare.summaries()}

    several_hosts = len({h for s in summaries for h in s.hosts}) > 1
    tables: list[_Table] = []
    for backend in backends_in_order(summaries):
        for kind in ("iperf3", "pktgen"):
            points = sorted({s.point for s in summaries if s.backend == backend and s.point.kind == kind}, key=_row_key)
            if not points:
                continue
            idx = {s.key: s for s in summaries if s.backend == backend}
            unit = "Mbit/s" if kind == "iperf3" else "rx kpps"
            cols = [_Column("point", "cell", "cell", 0, left=True)]
            if several_hosts:
                cols.append(_Column("host", "host", "host", 0, left=True))
            cols += [_Column(f"v:{k}", f"{k}\n{unit}", k, 1) for k in ks]
            cols += [_Column(f"r:{k}", f"{k}/{base}\nratio [95% CI] verdict", f"{k}/{base}", 2) for k in others]
            if compare is not None:
                cols.append(_Column("delta", "vs other run\nratio [CI] verdict", "vs other", 3))
            cols.append(_Column("cv", "noise\nCV", "cv", 8))
            if kind == "iperf3":
                cols += [_Column("retrans", "retrans-\nmits", "retrans", 4), _Column("ring", "ring\ndrops", "ring drops", 5),
                         _Column("qdisc", "qdisc\ndrops/requeues", "qdisc d/r", 7), _Column("rtt", "measured\nRTT ms", "rtt ms", 6)]
            else:
                cols += [_Column("lost", "lost\nkpkt", "lost kpkt", 4), _Column("ring", "ring\ndrops", "ring drops", 5),
                         _Column("qdisc", "qdisc\ndrops/requeues", "qdisc d/r", 7), _Column("err", "pktgen\nerrors", "errors", 6)]
            title = BACKEND_TITLES.get(backend, backend) + ("" if kind == "iperf3" else ": pktgen (UDP, queue_xmit)")
            t = _Table(backend, kind, title, cols, [])
            t.legend = (f"counters, CV: {slash_k}; ratio = median {'/'.join(others) or '-'} / {base} with a 95 % bootstrap CI; "
                        f"verdict at +-{rc.tolerance:.0%}; ~ = across lab host boots; * = tap tx_dropped (no drop reasons)")
            for p in points:
                per_k = {k: idx.get((k, p)) for k in ks}
                row: list[_Cell] = [_Cell(_row_label(p))]
                if several_hosts:
                    # which host measured this point's cells (every arm's: a ratio never mixes hosts)
                    hosts_here = list(dict.fromkeys(h for k in ks if per_k[k] is not None for h in per_k[k].hosts))
                    row.append(_Cell(",".join(hosts_here) or "-", error=len(hosts_here) > 1))
                for k in ks:
                    s = per_k[k]
                    if s is None:
                        row.append(_Cell("-"))
                    elif s.n_ok == 0:
                        row.append(_Cell("ERROR", error=True))
                    else:
                        text = _spread(s.value, fmt_mbps if kind == "iperf3" else _kpps, dash)
                        if s.n_error:
                            text += f" ({s.n_error} err)"
                        if s.attempts > s.n_ok + s.n_error:
                            text += f" ({s.attempts - s.n_ok - s.n_error} retried)"
                        row.append(_Cell(text, error=bool(s.n_error)))
                    if s is not None and s.n_error:
                        t.errors.extend(s.errors)
                for k in others:
                    c = cmps.get((p, k))
                    row.append(_Cell(_cmp_text(c, dash), style=WORD_STYLE.get(c.judgement.verdict, "") if c else ""))
                if compare is not None:
                    texts = []
                    for k in ks:
                        a, b = other_idx.get((k, p)), per_k[k]
                        if a is None or b is None or not a.value or not b.value:
                            texts.append("-")
                            continue
                        j = judge(list(a.value.values), list(b.value.values), tolerance=rc.tolerance, confidence=rc.confidence,
                                  seed=seed_of(run.meta.run_id, "compare", k, p))
                        ci = f" [{fmt_ratio(j.ci_low)}{dash}{fmt_ratio(j.ci_high)}]" if j.ci_low is not None else ""
                        texts.append(f"{fmt_ratio(j.ratio)}{ci} {j.verdict}")
                    row.append(_Cell(sep.join(texts)))
                row.append(_Cell("/".join(_cv(per_k[k].value if per_k[k] else None) for k in ks)))
                if kind == "iperf3":
                    row.append(_Cell(_joined(per_k, ks, "retransmits")))
                    row.append(_Cell("/".join(_ring(per_k[k]) for k in ks)))
                else:
                    row.append(_Cell(_joined(per_k, ks, "pktgen_lost", lambda v: "-" if v is None else f"{v / 1000:.1f}")))
                    row.append(_Cell("/".join(_ring(per_k[k]) for k in ks)))
                qd = []
                for k in ks:
                    s = per_k[k]
                    qd.append(f"{_count(_med(s.qdisc_drops))}/{_count(_med(s.qdisc_requeues))}" if s else "-")
                row.append(_Cell(sep.join(qd)))
                if kind == "iperf3":
                    row.append(_Cell(_joined(per_k, ks, "measured_rtt_ms", lambda v: "-" if v is None else f"{v:.3g}")))
                else:
                    row.append(_Cell(_joined(per_k, ks, "pktgen_errors")))
                t.rows.append(row)
            tables.append(t)
    return tables


# --------------------------------------------------------------------------- environment


def _fmt_secs(s: float | None) -> str:
    if s is None:
        return "-"
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _cell_wall_times(run: RunData) -> list[float]:
    out = []
    for r in run.results:
        try:
            out.append((datetime.fromisoformat(str(r.finished_at)) - datetime.fromisoformat(str(r.started_at))).total_seconds())
        except (TypeError, ValueError):
            continue
    return out


def _environment(run: RunData) -> list[tuple[str, str]]:
    """(key, value) lines about where and how the run happened: hosts, boots, swaps, crashes, warnings."""
    m = run.meta
    x = m.extra
    env: list[tuple[str, str]] = [("run", f"{m.run_id} (matrix {m.matrix}" + (f", profile {m.profile})" if m.profile else ")"))]
    if m.config_path:
        env.append(("config", m.config_path + (f" (lab {m.lab_name})" if m.lab_name else "")))
    arms = [a for a in x.get("arms") or [] if isinstance(a, dict)]
    if arms:
        what = ", ".join(a["name"] if a.get("name") == a.get("recipe") else f"{a.get('name')} (recipe {a.get('recipe')})" for a in arms)
        env.append(("arms", what + (" - an A/A control" if x.get("aa") else "") + f"; baseline {x.get('baseline', '?')}"))
    if x.get("order"):
        env.append(("order", f"{x['order']} (seed {x.get('seed')}), {x.get('repeats', '?')} repeats, "
                              f"warm-up {x.get('warmup', 0):g}s after each guest boot, swap: {x.get('swap', '?')}"))
    for label, facts in m.hosts.items():
        f = facts if isinstance(facts, dict) else {}
        bits = [f"recipe {f.get('kernel_recipe', '?')}", f"release {f.get('kernel_release', '?')}"]
        for k, name in (("accel", "accel"), ("guest_accel", "guest accel"), ("cpu_model", "cpu")):
            if f.get(k):
                bits.append(f"{name} {f[k]}")
        if f.get("boot_s"):
            bits.append(f"boot {f['boot_s']:g}s")
        env.append((f"host {label}", ", ".join(bits)))
    sess = x.get("lab_session") if isinstance(x.get("lab_session"), dict) else {}
    boots = sess.get("boots") or []
    swaps = sess.get("swaps") or []
    if boots or swaps:
        secs = [float(s.get("seconds") or 0) for s in swaps]
        sw = f", {len(swaps)} module swaps (median {statistics.median(secs):.1f}s)" if swaps else ", no module swaps"
        env.append(("boots", f"{len(boots)} lab host boot(s){sw}"))
    # only where one point's arms come from different boots (several hosts each with its own boot are fine)
    per_point: dict[Point, set[frozenset[str]]] = {}
    for s in run.summaries():
        if s.boots:
            per_point.setdefault(s.point, set()).add(frozenset(s.boots))
    if any(len(sets) > 1 for sets in per_point.values()):
        env.append(("note", "some comparisons span different lab host boots (marked ~): boot-to-boot noise is included there"))
    crashes = [c for c in x.get("host_crashes") or [] if isinstance(c, dict)]
    retried = sum(max(0, r.attempts - 1) for r in run.latest())
    if crashes or retried:
        env.append(("crashes", f"{len(crashes)} lab host crash(es), {retried} cell attempt(s) retried"))
        for c in crashes:
            said = c.get("oops") or (f"no oops; stalled: {c['stall']}" if c.get("stall") else "no crash report on the console")
            env.append(("crash", f"{c.get('at')}: {said} (during {c.get('cell')}, "
                                 f"{c.get('stage')}; console {c.get('console_log')})"))
    seen = dict.fromkeys((r.kernel, r.kernel_recipe, r.kernel_release) for r in run.results if r.kernel_release)
    if seen and not m.hosts:
        env.append(("kernels", "; ".join(f"{k}: recipe {rec or '?'}, release {rel}" for k, rec, rel in seen)))
    host_acc = sorted({r.host_accel for r in run.results if r.host_accel})
    guest_acc = sorted({r.accel for r in run.results if r.accel})
    env.append(("accel", f"host {'/'.join(host_acc) or run.host_accel() or '?'}, guest {'/'.join(guest_acc) or '?'}"))
    walls = _cell_wall_times(run)
    dur = f"run {_fmt_secs(m.wall_time_s())}" if m.wall_time_s() is not None else "run unfinished"
    if m.duration_s:
        dur += f", traffic {m.duration_s:g}s per cell"
    if walls:
        dur += f", cell wall time mean {_fmt_secs(statistics.mean(walls))} (total {_fmt_secs(sum(walls))})"
    env.append(("durations", dur))
    latest = run.latest()
    n_ok = sum(1 for r in latest if r.ok)
    counts = f"{len(m.planned)} planned, {len(latest)} run ({len(run.results)} attempts), {n_ok} ok, {len(latest) - n_ok} error"
    missing = run.missing_ids()
    if missing:
        counts += f", {len(missing)} not run"
    env.append(("cells", counts))
    # a point whose arms ran on different hosts gets no ratio: say which, and why
    base = ReportContext().baseline_of(run)
    if base:
        for line in refused(run.summaries(), base):
            env.append(("refused", line))
    if x.get("stopped"):
        env.append(("stopped", str(x["stopped"])))
    for w in run.warnings:
        env.append(("warning", w))
    return env


# --------------------------------------------------------------------------- rich


def _overall_text(props: Sequence[Property]) -> Text:
    failed = [p.name for p in props if p.verdict == FAIL]
    undecided = [p.name for p in props if p.verdict == INCONCLUSIVE]
    n_pass = sum(1 for p in props if p.verdict == PASS)
    n_na = sum(1 for p in props if p.verdict == "n/a")
    v = overall(props)
    if v == PASS:
        return Text(f"PASS: {n_pass} properties hold, {n_na} n/a", style="bold green")
    if v == FAIL:
        return Text(f"FAIL: {len(failed)} failed ({', '.join(failed)}), {n_pass} passed, {len(undecided)} inconclusive, "
                    f"{n_na} n/a", style="bold red")
    if undecided:
        return Text(f"INCONCLUSIVE: {len(undecided)} undecided ({', '.join(undecided)}), {n_pass} passed, {n_na} n/a",
                    style="bold yellow")
    return Text(f"INCONCLUSIVE: no property could be evaluated ({n_na} n/a)", style="bold yellow")


def render(
    run_data: RunData,
    props: Sequence[Property],
    console: Console,
    compare: RunData | None = None,
    kernels: Sequence[str] | None = None,
    rc: ReportContext | None = None,
) -> None:
    """Print the full report: tables, the properties, the environment.

    `compare`: another run; adds its ratio to this one's, per kernel, with the same statistics.
    `kernels`: baseline first (default: the run's own arms).
    """
    rc = rc or ReportContext()
    m = run_data.meta
    console.rule(f"[bold]vhost-lab run {m.run_id}[/]")
    console.print(f"host \u2192 guest; matrix [bold]{m.matrix}[/]" + (f", profile {m.profile}" if m.profile else ""))
    tables = _build_tables(run_data, kernels, compare, ascii_only=False, rc=rc)
    if not tables:
        console.print("[yellow]no cell results in this run[/]")
    for bt in tables:
        t = Table(title=bt.title, title_style="bold", header_style="bold cyan", caption=bt.legend, caption_justify="left")
        for c in bt.columns:
            # Numbers must never be folded or cut; the header may wrap instead.
            t.add_column(c.header, justify="left" if c.left else "right", no_wrap=True)
        for row in bt.rows:
            t.add_row(*[Text(c.text, style="bold red" if c.error else c.style) for c in row])
        console.print(t)
        for e in bt.errors:
            console.print(Text(f"  error {e}", style="red"))
    if props:
        pt = Table(title="Properties", title_style="bold", header_style="bold cyan", expand=True)
        pt.add_column("verdict", justify="center", no_wrap=True)
        pt.add_column("property", ratio=2)
        pt.add_column("detail", ratio=3)
        for p in props:
            name = Text(p.name)
            if p.description:
                name.append("\n" + p.description, style="dim")
            pt.add_row(Text(p.verdict, style=VERDICT_STYLE.get(p.verdict, "")), name, Text(p.detail, style="dim" if p.verdict == "n/a" else ""))
        console.print(pt)
        console.print(_overall_text(props))
    else:
        console.print("[dim]no properties evaluated[/]")
    env = Table.grid(padding=(0, 2))
    env.add_column(style="bold")
    env.add_column()
    for k, v in _environment(run_data):
        env.add_row(k, Text(v, style="yellow" if k in ("warning", "crash", "stopped", "refused") else ""))
    console.print(Text("Environment", style="bold"))
    console.print(env)


# --------------------------------------------------------------------------- plain text


def _ascii_table(bt: _Table, width: int) -> tuple[list[str], list[str]]:
    """Lay out a table within `width`, dropping low-priority columns if needed; returns (lines, dropped)."""
    cols = list(range(len(bt.columns)))
    dropped: list[str] = []

    def widths(ix: list[int]) -> list[int]:
        return [max([len(bt.columns[i].short)] + [len(r[i].text) for r in bt.rows]) for i in ix]

    while True:
        w = widths(cols)
        total = 2 + sum(w) + 2 * (len(w) - 1)
        if total <= width or len(cols) <= 2:
            break
        worst = max(cols, key=lambda i: bt.columns[i].priority)
        dropped.append(bt.columns[worst].short)
        cols.remove(worst)

    def fmt_row(cells: list[str]) -> str:
        parts = []
        for i, c, wd in zip(cols, cells, w, strict=True):
            parts.append(c.ljust(wd) if bt.columns[i].left else c.rjust(wd))
        return "  " + "  ".join(parts)

    lines = [fmt_row([bt.columns[i].short for i in cols]), fmt_row(["-" * x for x in w])]
    for r in bt.rows:
        lines.append(fmt_row([r[i].text for i in cols]))
    return [ln.rstrip() for ln in lines], dropped


_KEEP_TOGETHER = ("(<= ", "(>= ", " Mbit/s", " Gbit/s", " x ")


def _wrap(text: str, width: int, indent: str = "", first: str | None = None) -> list[str]:
    # textwrap breaks only at ASCII whitespace: a no-break space keeps "(<= 0.05)" and
    # "2194 Mbit/s" on one line, and is turned back into a space afterwards.
    for t in _KEEP_TOGETHER:
        text = text.replace(t, t.replace(" ", "\u00a0"))
    lines = textwrap.wrap(text, width=width, initial_indent=indent if first is None else first, subsequent_indent=indent,
                          break_long_words=True, break_on_hyphens=False) or [first or indent]
    return [ln.replace("\u00a0", " ") for ln in lines]


def _comparison_lines(run: RunData, rc: ReportContext, width: int) -> list[str]:
    """Comparisons as lines a mail can carry whatever the table had to drop."""
    out: list[str] = []
    for c in run_comparisons(run, rc):
        j = c.judgement
        ci = f" [{fmt_ratio(j.ci_low)}-{fmt_ratio(j.ci_high)}]" if j.ci_low is not None else ""
        p = "" if j.p_value is None else f", p={j.p_value:.2g}"
        more = f", ~{j.needed} repeats/arm would decide" if j.verdict == "inconclusive" and j.needed else ""
        across = ", across boots" if c.same_boot is False else ""
        out += _wrap(f"{c.point.backend} {c.point.label()}: {c.b}/{c.a} {fmt_ratio(j.ratio)}{ci} {j.verdict} "
                     f"(n={j.n_b}/{j.n_a}{p}{across}{more})", width, "    ", first="  ")
    return out


def to_text(
    run_data: RunData,
    props: Sequence[Property],
    compare: RunData | None = None,
    kernels: Sequence[str] | None = None,
    width: int = TEXT_WIDTH,
    rc: ReportContext | None = None,
) -> str:
    """Plain ASCII report for a netdev mail: every line <= `width` (78) columns."""
    rc = rc or ReportContext()
    m = run_data.meta
    ks = _kernels(run_data, kernels)
    out: list[str] = []
    out += _wrap(f"vhost-lab run {m.run_id} (matrix {m.matrix}" + (f", profile {m.profile})" if m.profile else ")"), width)
    out += _wrap(f"host -> guest, {' / '.join(ks)}; iperf3 TCP in Mbit/s, pktgen UDP in kpps the guest received", width)
    for bt in _build_tables(run_data, kernels, compare, ascii_only=True, rc=rc):
        out.append("")
        out += _wrap(bt.title, width)
        lines, dropped = _ascii_table(bt, width)
        out += [ln if len(ln) <= width else ln[:width] for ln in lines]
        out += _wrap(bt.legend, width, "  ")
        if dropped:
            out += _wrap(f"(omitted for width: {', '.join(dropped)}; see below and the JSON export)", width, "  ")
        for e in bt.errors:
            out += _wrap(f"error {e}", width, "    ", first="  ")
    cmp_lines = _comparison_lines(run_data, rc, width)
    if cmp_lines:
        out += ["", "Comparisons (ratio of medians [95% bootstrap CI], Mann-Whitney p)"] + cmp_lines
    if props:
        out += ["", "Properties"]
        for p in props:
            out += _wrap(p.name, width, "        ", first=f"  {p.verdict:<5} ")
            out += _wrap(p.detail, width, "        ")
        out += _wrap(_overall_text(props).plain, width, "  ")
    out += ["", "Environment"]
    for k, v in _environment(run_data):
        out += _wrap(v, width, "    ", first=f"  {k}: ")
    text = "\n".join(out) + "\n"
    # A mail must stay 7-bit: host facts (cpu model strings) may not be.
    return text.encode("ascii", "replace").decode("ascii")


# --------------------------------------------------------------------------- markdown


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(
    run_data: RunData,
    props: Sequence[Property],
    compare: RunData | None = None,
    kernels: Sequence[str] | None = None,
    rc: ReportContext | None = None,
) -> str:
    """The report as GitHub-flavoured markdown (tables, properties, environment)."""
    rc = rc or ReportContext()
    m = run_data.meta
    out = [f"# vhost-lab run `{m.run_id}`", "", f"Matrix `{m.matrix}`" + (f", profile `{m.profile}`" if m.profile else "")
           + ". Host \u2192 guest: iperf3 TCP in Mbit/s, pktgen UDP in kpps the guest received.", ""]
    for bt in _build_tables(run_data, kernels, compare, ascii_only=False, rc=rc):
        out += [f"## {bt.title}", ""]
        out.append("| " + " | ".join(_md_escape(c.header) for c in bt.columns) + " |")
        out.append("|" + "|".join(":---" if c.left else "---:" for c in bt.columns) + "|")
        for r in bt.rows:
            out.append("| " + " | ".join(f"**{_md_escape(c.text)}**" if c.error else _md_escape(c.text) for c in r) + " |")
        out += ["", f"_{_md_escape(bt.legend)}_"]
        if bt.errors:
            out.append("")
            out += [f"- error `{_md_escape(e)}`" for e in bt.errors]
        out.append("")
    if props:
        out += ["## Properties", "", "| verdict | property | detail |", "|:---:|:---|:---|"]
        for p in props:
            out.append(f"| **{p.verdict}** | `{p.name}` | {_md_escape(p.detail)} |")
        out += ["", _overall_text(props).plain, ""]
    out += ["## Environment", ""]
    out += [f"- **{k}**: {_md_escape(v)}" for k, v in _environment(run_data)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- JSON, SVG, plot


def to_json(run_data: RunData, props: Sequence[Property], rc: ReportContext | None = None) -> dict[str, Any]:
    """A JSON-ready dict: {"run": meta, "cells": latest attempts, "comparisons": [...], "properties": [...], ...}."""
    rc = rc or ReportContext()
    return {
        "run": run_data.meta.to_dict(),
        "cells": [r.to_dict() for r in run_data.latest()],
        "comparisons": [c.to_dict() for c in run_comparisons(run_data, rc)],
        "properties": [p.to_dict() for p in props],
        "verdict": overall(props),
        "all_passed": overall(props) == PASS,
        "warnings": list(run_data.warnings),
    }


def to_svg(
    path: Path | str,
    run_data: RunData,
    props: Sequence[Property],
    compare: RunData | None = None,
    kernels: Sequence[str] | None = None,
    width: int = 160,
    rc: ReportContext | None = None,
) -> Path:
    """Render the rich report into an SVG file (for a web page or a PR); returns the path."""
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    render(run_data, props, console, compare=compare, kernels=kernels, rc=rc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(path), title=f"vhost-lab {run_data.meta.run_id}")
    return path


def _median_ci(values: Sequence[float], confidence: float, seed: int) -> tuple[float, float, float]:
    """(median, CI low, CI high) of one sample; the CI is a bootstrap of the median (zero-width for n < 2)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    med = float(np.median(x))
    if len(x) < 2 or float(x.min()) == float(x.max()):
        return med, med, med
    res = stats.bootstrap((x,), np.median, n_resamples=2999, confidence_level=confidence, method="percentile",
                          random_state=np.random.default_rng(seed))
    return med, float(res.confidence_interval.low), float(res.confidence_interval.high)


def to_plot(path: Path | str, run_data: RunData, rc: ReportContext | None = None) -> Path:
    """Throughput against txqueuelen (RTT 0) and against RTT (txqueuelen 1000), one line per kernel and backend.

    Medians with their 95 % CI as error bars; log scales where the collapse at
    txqueuelen 1 needs them. PNG or SVG by the file's suffix (matplotlib).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc = rc or ReportContext()
    path = Path(path)
    summaries = [s for s in run_data.summaries() if s.point.kind == "iperf3" and s.point.streams == 1 and s.point.queues == 1
                 and s.point.qdisc == "default" and s.value is not None]
    fig, (ax_q, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"tap": "--", "vhost": "-"}
    for (kernel, backend) in dict.fromkeys((s.kernel, s.backend) for s in summaries):
        label = f"{kernel} {'vhost_net' if backend == 'vhost' else 'TAP'}"
        for ax, pick, xval in ((ax_q, lambda p: p.rtt_ms == 0, lambda p: p.txqueuelen),
                               (ax_r, lambda p: p.rtt_ms > 0 or p.txqueuelen == 1000, lambda p: p.rtt_ms)):
            pts = sorted((s for s in summaries if s.kernel == kernel and s.backend == backend and pick(s.point)),
                         key=lambda s: xval(s.point))
            if not pts:
                continue
            xs, ys, lo, hi = [], [], [], []
            for s in pts:
                med, a, b = _median_ci(list(s.value.values), rc.confidence, seed=seed_of(run_data.meta.run_id, kernel, s.point))
                xs.append(xval(s.point))
                ys.append(med)
                lo.append(med - a)
                hi.append(b - med)
            ax.errorbar(xs, ys, yerr=[lo, hi], linestyle=styles.get(backend, "-"), marker="o", capsize=3, label=label)
    ax_q.set_xscale("log")
    ax_q.set_yscale("log")
    ax_q.invert_xaxis()
    ax_q.set_xlabel("txqueuelen (tap ptr_ring size), RTT 0")
    ax_q.set_ylabel("TCP throughput host \u2192 guest, Mbit/s")
    ax_q.set_title("throughput vs txqueuelen")
    ax_r.set_xlabel("netem RTT on the tap, ms (txqueuelen 1000)")
    ax_r.set_title("throughput vs RTT")
    for ax in (ax_q, ax_r):
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"vhost-lab {run_data.meta.run_id}: medians with 95% CI", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- live progress


class MatrixProgress:
    """Live view of a matrix run, fed with the runner's events (lab.events): cells done / running / left, an ETA,
    and one line per boot, swap, crash and new step.

    The ETA is the mean wall time of the cells finished so far times the cells
    left. On a terminal it is a rich Live display; elsewhere (CI logs) one plain
    line per event, no animation.

        with MatrixProgress(console) as p:
            p.start(len(cells), [c.id for c in cells])
            runner = MatrixRunner(..., emit=p)
    """

    def __init__(self, console: Console | None = None, title: str = "matrix", clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console or Console()
        self.title = title
        self._clock = clock
        self._live_mode = self.console.is_terminal and not self.console.is_dumb_terminal
        self.total = 0
        self.planned: list[str] = []
        self.done: list[str] = []
        self.failed: list[str] = []
        self.running: dict[str, float] = {}
        self.crashes = 0
        self._walls: list[float] = []
        self._progress: Progress | None = None
        self._live: Live | None = None
        self._task: Any = None
        self._last_step: tuple[str, str] | None = None

    # context manager ---------------------------------------------------------
    def __enter__(self) -> Self:
        if self._live_mode:
            self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), console=self.console, auto_refresh=False)
            self._task = self._progress.add_task(self.title, total=None, info="")
            self._live = Live(Group(self._progress), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._refresh()
            self._live.__exit__(None, None, None)
            self._live = None

    # events ------------------------------------------------------------------
    def __call__(self, event: object) -> None:
        """Render one event of lab.events (unknown ones are ignored)."""
        from lab.events import CellFinished, CellStarted, GuestBooted, HostBooted, HostCrash, ModulesSwapped, Step

        if isinstance(event, CellStarted):
            self.cell_started(event.cell, event.attempt)
        elif isinstance(event, CellFinished):
            self.cell_finished(event.cell, event.status, event.value, event.unit)
        elif isinstance(event, HostBooted):
            self._emit(f"{event.host}: lab host up on {event.recipe} in {event.seconds:.0f}s", style="dim")
        elif isinstance(event, GuestBooted):
            self._emit(f"{event.guest}: guest up ({event.backend}, {event.queues} queue(s)) in {event.seconds:.0f}s", style="dim")
        elif isinstance(event, ModulesSwapped):
            self._emit(f"{event.host}: modules {event.from_recipe} -> {event.to_recipe} in {event.seconds:.1f}s", style="dim")
        elif isinstance(event, HostCrash):
            self.crashes += 1
            self._emit(f"{event.host}: LAB HOST CRASHED: {event.oops or 'no crash report'} (console {event.console_log})",
                       style="bold red")
        elif isinstance(event, Step) and (event.key != self._last_step or event.warning):
            self._last_step = event.key
            self._emit(f"{time.strftime('%H:%M:%S')} {event.text()}", style="yellow" if event.warning else "dim",
                       plain_only=not event.warning)

    def start(self, total_cells: int, planned_ids: Iterable[str], completed: Iterable[str] = ()) -> None:
        """Begin: `total_cells` planned; `completed` ids (from --resume) count as done already."""
        self.total = total_cells
        self.planned = list(planned_ids)
        self.done = list(completed)
        if self._progress is not None:
            self._progress.update(self._task, total=total_cells, completed=len(self.done))
        self._emit(f"{self.title}: {total_cells} cells" + (f", {len(self.done)} already done" if self.done else ""))

    def cell_started(self, cell_id: str, attempt: int = 1) -> None:
        """A cell began running (again, on a later attempt)."""
        self.running[cell_id] = self._clock()
        again = f" (attempt {attempt})" if attempt > 1 else ""
        self._emit(f"[{len(self.done)}/{self.total}] start {cell_id}{again}", plain_only=True)

    def cell_finished(self, cell_id: str, status: str, value: float | None = None, unit: str = "Mbit/s") -> None:
        """A cell ended with status "ok"|"error" and its value (Mbit/s, or pps for pktgen)."""
        t0 = self.running.pop(cell_id, None)
        if t0 is not None:
            self._walls.append(self._clock() - t0)
        self.done.append(cell_id)
        if status != "ok":
            self.failed.append(cell_id)
        shown = ""
        if value is not None:
            shown = f" {fmt_mbps(value)} Mbit/s" if unit == "Mbit/s" else f" {value / 1000:.1f} kpps"
        self._emit(f"[{len(self.done)}/{self.total}] {cell_id} {status}{shown} ({self.status_line()})",
                   style="red" if status != "ok" else None)

    # state -------------------------------------------------------------------
    @property
    def left(self) -> int:
        """Cells neither finished nor running."""
        return max(0, self.total - len(self.done) - len(self.running))

    def eta_s(self) -> float | None:
        """Seconds until the last cell ends, from the mean cell wall time; None before any cell ended."""
        if not self._walls:
            return None
        mean = statistics.mean(self._walls)
        now = self._clock()
        # Running cells are partly done; they count for what remains of a mean cell.
        running_rest = sum(max(0.0, mean - (now - t0)) for t0 in self.running.values())
        parallel = max(1, len(self.running))
        return (self.left * mean + running_rest) / parallel

    def status_line(self) -> str:
        """ "3 done, 1 running, 12 left, 1 error, ETA 4m10s" """
        s = f"{len(self.done)} done, {len(self.running)} running, {self.left} left"
        if self.failed:
            s += f", {len(self.failed)} error"
        if self.crashes:
            s += f", {self.crashes} host crash(es)"
        eta = self.eta_s()
        return s + (f", ETA {_fmt_secs(eta)}" if eta is not None else "")

    # output ------------------------------------------------------------------
    def _refresh(self) -> None:
        if self._progress is not None:
            running = ", ".join(self.running) or "-"
            self._progress.update(self._task, completed=len(self.done), info=f"{self.status_line()} | running: {running}")
            self._progress.refresh()

    def _emit(self, line: str, style: str | None = None, plain_only: bool = False) -> None:
        if self._live_mode:
            if not plain_only:
                self.console.print(Text(line, style=style or ""))
            self._refresh()
        else:
            # No markup or highlighting: CI logs should read as plain text.
            self.console.print(line, markup=False, highlight=False, style=style)



# --------------------------------------------------------------------------- scenarios


def _scenario_grid(results: Sequence[Any]) -> tuple[list[str], list[str], dict[tuple[str, str], Any]]:
    kernels = list(dict.fromkeys(r.kernel for r in results))
    names = list(dict.fromkeys(r.scenario for r in results))
    return kernels, names, {(r.scenario, r.kernel): r for r in results}


def render_scenarios(results: Sequence[Any], console: Console, title: str = "Failure scenarios") -> None:
    """A verdict per scenario (rows) and kernel (columns), then every detail with its numbers."""
    kernels, names, by = _scenario_grid(results)
    t = Table(title=title, title_style="bold", header_style="bold cyan")
    # Fold, never truncate: five recipe names do not fit an 80-column terminal side by side.
    t.add_column("scenario", overflow="fold", min_width=12)
    for k in kernels:
        t.add_column(k.replace("-", "-\n"), justify="center", overflow="fold", min_width=4)
    for n in names:
        cells = []
        for k in kernels:
            r = by.get((n, k))
            cells.append(Text(r.verdict if r else "-", style=VERDICT_STYLE.get(r.verdict, "") if r else "dim"))
        t.add_row(n, *cells)
    console.print(t)
    for r in results:
        console.print(Text(f"  {r.verdict:<4} {r.kernel}/{r.scenario}: ", style=VERDICT_STYLE.get(r.verdict, "")), Text(r.detail), sep="")


def scenarios_text(results: Sequence[Any], width: int = TEXT_WIDTH) -> str:
    """The scenario table and details as plain ASCII for a mail."""
    kernels, names, by = _scenario_grid(results)
    w0 = max([len("scenario")] + [len(n) for n in names])
    ws = [max(len(k), 5) for k in kernels]
    head = "  " + "scenario".ljust(w0) + "".join("  " + k.center(w) for k, w in zip(kernels, ws, strict=True))
    lines = [head, "  " + "-" * (len(head) - 2)]
    for n in names:
        row = "  " + n.ljust(w0)
        for k, w in zip(kernels, ws, strict=True):
            r = by.get((n, k))
            row += "  " + (r.verdict if r else "-").center(w)
        lines.append(row)
    lines.append("")
    for r in results:
        lines += _wrap(r.detail, width, "        ", first=f"  {r.verdict:<4}  {r.kernel}/{r.scenario}: ")
    return "\n".join(lines).encode("ascii", "replace").decode("ascii") + "\n"
