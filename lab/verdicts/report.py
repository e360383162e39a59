"""Reports over a run: rich terminal tables, and exports (plain text, markdown, JSON, SVG).

Everything here renders from a results file as loaded by lab.verdicts.results (a
RunData) plus the properties lab.verdicts.expect evaluated over it; nothing reads live
state, so any past run can be re-rendered. Also the live progress view the
matrix runner shows while cells run (MatrixProgress).

Rows follow the patch's cover letter: txqueuelen 1000, 100, 10, 1 at RTT 0,
then the netem RTTs at txqueuelen 1000; columns put stock and nodrop side by
side.
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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

from lab.verdicts.expect import (
    Property,
    all_passed,
    backends_in_order,
    fmt_mbps,
    fmt_ratio,
    ratio,
)
from lab.verdicts.results import CellSummary, RunData, Stat

BACKEND_TITLES = {"tap": "TAP (QEMU virtio-net, no vhost)", "vhost": "vhost_net (tap + vhost_net)"}
TEXT_WIDTH = 78  # a netdev mail's line

VERDICT_STYLE = {True: "bold green", False: "bold red", None: "dim"}


# --------------------------------------------------------------------------- the table model
# One neutral model of a backend's table, rendered three ways (rich, markdown, ASCII),
# so the numbers can never differ between the terminal and the mail.


@dataclass
class _Cell:
    text: str
    error: bool = False


@dataclass
class _Column:
    key: str
    header: str  # rich and markdown
    short: str  # plain text, where width is scarce
    priority: int  # plain text drops the highest numbers first when over 78 columns
    left: bool = False


@dataclass
class _BackendTable:
    backend: str
    title: str
    columns: list[_Column]
    rows: list[list[_Cell]]
    errors: list[str] = field(default_factory=list)
    legend: str = ""


def _kernels(run: RunData, kernels: Sequence[str] | None) -> list[str]:
    """Baseline first: the caller's order, else stock/nodrop when present, else plan order."""
    seen = list(dict.fromkeys(r.kernel for r in run.latest()))
    if kernels:
        return [k for k in kernels if k in seen] + [k for k in seen if k not in kernels]
    pref = {"stock": 0, "nodrop": 1}
    return sorted(seen, key=lambda k: (pref.get(k, 2), seen.index(k)))


def _points(summaries: Sequence[CellSummary], backend: str) -> list[tuple[int, float]]:
    """(txqueuelen, rtt) rows in the cover letter's order: RTT 0 by qlen descending, then RTTs."""
    pts = {(s.txqueuelen, s.rtt_ms) for s in summaries if s.backend == backend}
    return sorted(pts, key=lambda p: (p[1] != 0, p[1], -p[0]))


def _point_label(qlen: int, rtt: float) -> str:
    if rtt == 0:
        return f"qlen {qlen}"
    return f"RTT {rtt:g} ms" + ("" if qlen == 1000 else f" q{qlen}")


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


def _delta(this: CellSummary | None, other: CellSummary | None) -> str:
    a = _med(this.throughput_mbps) if this and this.n_ok else None
    b = _med(other.throughput_mbps) if other and other.n_ok else None
    if a is None or b is None or b == 0:
        return "-"
    return f"{(a - b) / b * 100:+.1f}%"


def _joined(
    per_k: dict[str, CellSummary | None],
    ks: Sequence[str],
    attr: str,
    fmt: Callable[[float | None], str] = _count,
) -> str:
    """One counter's medians for every kernel, "stock/nodrop" style; "-" where a cell is absent."""
    s_: CellSummary | None
    return "/".join(fmt(_med(getattr(s_, attr))) if (s_ := per_k[k]) else "-" for k in ks)


def _build_tables(
    run: RunData, kernels: Sequence[str] | None, compare: RunData | None, ascii_only: bool
) -> list[_BackendTable]:
    summaries = run.summaries()
    ks = _kernels(run, kernels)
    base, others = (ks[0], ks[1:]) if ks else ("", [])
    dash = "-" if ascii_only else "\u2013"
    sep = ", " if ascii_only else " \u00b7 "
    slash_k = "/".join(ks)
    other_idx: dict[tuple[Any, ...], CellSummary] = {}
    if compare is not None:
        other_idx = {s.key: s for s in compare.summaries()}
        other_id = compare.meta.run_id

    tables: list[_BackendTable] = []
    for backend in backends_in_order(summaries):
        idx = {s.key: s for s in summaries if s.backend == backend}
        cols = [_Column("point", "cell", "cell", 0, left=True)]
        cols += [_Column(f"tp:{k}", f"{k}\nMbit/s", k, 1) for k in ks]
        cols += [_Column(f"ratio:{k}", f"ratio\n{k}/{base}", f"{k}/{base}", 2) for k in others]
        if compare is not None:
            cols.append(_Column("delta", f"{'d' if ascii_only else chr(0x394)} vs\nother", "delta", 3))
        cols += [
            _Column("retrans", "retrans-\nmits", "retrans", 4),
            _Column("tapdrop", "tap\ndrops", "tap drops", 5),
            _Column("qdisc", "qdisc\ndrops/requeues", "qdisc d/r", 7),
            _Column("rtt", "measured\nRTT ms", "rtt ms", 6),
        ]
        table = _BackendTable(backend, BACKEND_TITLES.get(backend, backend), cols, [])
        table.legend = f"retransmits, tap drops, qdisc drops/requeues, measured RTT: {slash_k}" + (
            f"; {'d' if ascii_only else chr(0x394)} = throughput change vs run {other_id}" if compare else ""
        )
        for qlen, rtt in _points(summaries, backend):
            per_k = {k: idx.get((k, backend, qlen, rtt)) for k in ks}
            row: list[_Cell] = [_Cell(_point_label(qlen, rtt))]
            for k in ks:
                s = per_k[k]
                if s is None:
                    row.append(_Cell("-"))
                elif s.n_ok == 0:
                    row.append(_Cell("ERROR", error=True))
                else:
                    text = _spread(s.throughput_mbps, fmt_mbps, dash)
                    if s.n_error:
                        text += f" ({s.n_error} err)"
                    row.append(_Cell(text, error=bool(s.n_error)))
                if s is not None and s.n_error:
                    table.errors.extend(s.errors)
            for k in others:
                a, b = per_k[k], per_k[base]
                r = ratio(_med(a.throughput_mbps) if a else None, _med(b.throughput_mbps) if b else None)
                row.append(_Cell(fmt_ratio(r)))
            if compare is not None:
                deltas = [_delta(per_k[k], other_idx.get((k, backend, qlen, rtt))) for k in ks]
                row.append(_Cell("/".join(deltas) if any(d != "-" for d in deltas) else "-"))

            row.append(_Cell(_joined(per_k, ks, "retransmits")))
            row.append(_Cell(_joined(per_k, ks, "tap_tx_dropped")))
            qd = []
            for k in ks:
                s = per_k[k]
                qd.append(f"{_count(_med(s.qdisc_drops))}/{_count(_med(s.qdisc_requeues))}" if s else "-")
            row.append(_Cell(sep.join(qd)))
            row.append(_Cell(_joined(per_k, ks, "measured_rtt_ms", lambda v: "-" if v is None else f"{v:.3g}")))
            table.rows.append(row)
        tables.append(table)
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
            out.append(
                (datetime.fromisoformat(str(r.finished_at)) - datetime.fromisoformat(str(r.started_at))).total_seconds()
            )
        except (TypeError, ValueError):
            continue
    return out


def _environment(run: RunData) -> list[tuple[str, str]]:
    """(key, value) lines about where and how the run happened, including loader warnings."""
    m = run.meta
    env: list[tuple[str, str]] = [
        ("run", f"{m.run_id} (matrix {m.matrix}" + (f", profile {m.profile})" if m.profile else ")"))
    ]
    if m.config_path:
        env.append(("config", m.config_path + (f" (lab {m.lab_name})" if m.lab_name else "")))
    for label, facts in m.hosts.items():
        f = facts if isinstance(facts, dict) else {}
        bits = [f"recipe {f.get('kernel_recipe', '?')}", f"release {f.get('kernel_release', '?')}"]
        if f.get("accel"):
            bits.append(f"accel {f['accel']}")
        if f.get("guest_accel"):
            bits.append(f"guest accel {f['guest_accel']}")
        if f.get("cpu_model"):
            bits.append(f"cpu {f['cpu_model']}")
        env.append((f"host {label}", ", ".join(bits)))
    # Kernels as the cells saw them: covers runs whose meta lacks host facts.
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
    n_err = len(latest) - n_ok
    counts = f"{len(m.planned)} planned, {len(latest)} run ({len(run.results)} attempts), {n_ok} ok, {n_err} error"
    missing = run.missing_ids()
    if missing:
        counts += f", {len(missing)} not run"
    env.append(("cells", counts))
    for w in run.warnings:
        env.append(("warning", w))
    return env


# --------------------------------------------------------------------------- rich


def render(
    run_data: RunData,
    props: Sequence[Property],
    console: Console,
    compare: RunData | None = None,
    kernels: Sequence[str] | None = None,
) -> None:
    """Print the full report: per-backend tables, the properties, the environment.

    `compare`: another run; adds a throughput delta column (this vs other).
    `kernels`: baseline first (default: stock, nodrop when present).
    """
    m = run_data.meta
    console.rule(f"[bold]vhost-lab run {m.run_id}[/]")
    console.print(
        f"TCP host \u2192 guest (iperf3), Mbit/s; matrix [bold]{m.matrix}[/]"
        + (f", profile {m.profile}" if m.profile else "")
    )
    tables = _build_tables(run_data, kernels, compare, ascii_only=False)
    if not tables:
        console.print("[yellow]no cell results in this run[/]")
    for bt in tables:
        t = Table(
            title=bt.title, title_style="bold", header_style="bold cyan", caption=bt.legend, caption_justify="left"
        )
        for c in bt.columns:
            # Numbers must never be folded or cut; the header may wrap instead.
            t.add_column(c.header, justify="left" if c.left else "right", no_wrap=True)
        for row in bt.rows:
            t.add_row(*[Text(c.text, style="bold red" if c.error else "") for c in row])
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
            pt.add_row(
                Text(p.verdict, style=VERDICT_STYLE[p.passed]),
                name,
                Text(p.detail, style="dim" if p.passed is None else ""),
            )
        console.print(pt)
        console.print(_overall(props))
    else:
        console.print("[dim]no properties evaluated[/]")

    env = Table.grid(padding=(0, 2))
    env.add_column(style="bold")
    env.add_column()
    for k, v in _environment(run_data):
        env.add_row(k, Text(v, style="yellow" if k == "warning" else ""))
    console.print(Text("Environment", style="bold"))
    console.print(env)


def _overall(props: Sequence[Property]) -> Text:
    failed = [p.name for p in props if p.passed is False]
    n_pass = sum(1 for p in props if p.passed is True)
    n_na = sum(1 for p in props if p.passed is None)
    if all_passed(props):
        return Text(f"PASS: {n_pass} properties hold, {n_na} n/a", style="bold green")
    if failed:
        return Text(f"FAIL: {len(failed)} failed ({', '.join(failed)}), {n_pass} passed, {n_na} n/a", style="bold red")
    return Text(f"INCONCLUSIVE: no property could be evaluated ({n_na} n/a)", style="bold yellow")


# --------------------------------------------------------------------------- plain text


def _ascii_table(bt: _BackendTable, width: int) -> tuple[list[str], list[str]]:
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
        for i, (c, wd) in zip(cols, zip(cells, w, strict=False), strict=False):
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
    lines = textwrap.wrap(
        text,
        width=width,
        initial_indent=indent if first is None else first,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [first or indent]
    return [ln.replace("\u00a0", " ") for ln in lines]


def to_text(
    run_data: RunData,
    props: Sequence[Property],
    compare: RunData | None = None,
    kernels: Sequence[str] | None = None,
    width: int = TEXT_WIDTH,
) -> str:
    """Plain ASCII report for a netdev mail: every line <= `width` (78) columns."""
    m = run_data.meta
    ks = _kernels(run_data, kernels)
    out: list[str] = []
    out += _wrap(
        f"vhost-lab run {m.run_id} (matrix {m.matrix}" + (f", profile {m.profile})" if m.profile else ")"), width
    )
    out += _wrap(f"TCP host -> guest (iperf3), Mbit/s, {' / '.join(ks)}", width)
    for bt in _build_tables(run_data, kernels, compare, ascii_only=True):
        out.append("")
        out += _wrap(bt.title, width)
        lines, dropped = _ascii_table(bt, width)
        out += [ln if len(ln) <= width else ln[:width] for ln in lines]
        out += _wrap(bt.legend, width, "  ")
        if dropped:
            out += _wrap(f"(omitted for width: {', '.join(dropped)}; see the JSON export)", width, "  ")
        for e in bt.errors:
            out += _wrap(f"error {e}", width, "    ", first="  ")
    if props:
        out += ["", "Properties"]
        for p in props:
            out += _wrap(p.name, width, "        ", first=f"  {p.verdict:<4}  ")
            out += _wrap(p.detail, width, "        ")
        out += _wrap(_overall(props).plain, width, "  ")
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
) -> str:
    """The report as GitHub-flavoured markdown (tables per backend, properties, environment)."""
    m = run_data.meta
    out = [
        f"# vhost-lab run `{m.run_id}`",
        "",
        f"Matrix `{m.matrix}`"
        + (f", profile `{m.profile}`" if m.profile else "")
        + ". TCP host \u2192 guest (iperf3), Mbit/s.",
        "",
    ]
    for bt in _build_tables(run_data, kernels, compare, ascii_only=False):
        out += [f"## {bt.title}", ""]
        out.append("| " + " | ".join(_md_escape(c.header) for c in bt.columns) + " |")
        out.append("|" + "|".join(":---" if c.left else "---:" for c in bt.columns) + "|")
        for r in bt.rows:
            out.append(
                "| " + " | ".join(f"**{_md_escape(c.text)}**" if c.error else _md_escape(c.text) for c in r) + " |"
            )
        if bt.errors:
            out.append("")
            out += [f"- error `{_md_escape(e)}`" for e in bt.errors]
        out.append("")
    if props:
        out += ["## Properties", "", "| verdict | property | detail |", "|:---:|:---|:---|"]
        for p in props:
            v = {True: "**PASS**", False: "**FAIL**", None: "n/a"}[p.passed]
            out.append(f"| {v} | `{p.name}` | {_md_escape(p.detail)} |")
        out += ["", _overall(props).plain, ""]
    out += ["## Environment", ""]
    out += [f"- **{k}**: {_md_escape(v)}" for k, v in _environment(run_data)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- JSON, SVG


def to_json(run_data: RunData, props: Sequence[Property]) -> dict[str, Any]:
    """A JSON-ready dict: {"run": meta, "cells": latest attempts, "properties": [...], ...}."""
    return {
        "run": run_data.meta.to_dict(),
        "cells": [r.to_dict() for r in run_data.latest()],
        "properties": [p.to_dict() for p in props],
        "all_passed": all_passed(props),
        "warnings": list(run_data.warnings),
    }


def to_svg(
    path: Path | str,
    run_data: RunData,
    props: Sequence[Property],
    compare: RunData | None = None,
    kernels: Sequence[str] | None = None,
    width: int = 140,
) -> Path:
    """Render the rich report into an SVG file (for a web page or a PR); returns the path."""
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    render(run_data, props, console, compare=compare, kernels=kernels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(path), title=f"vhost-lab {run_data.meta.run_id}")
    return path


# --------------------------------------------------------------------------- live progress


class MatrixProgress:
    """Live view of a matrix run: cells done / running / left, and an ETA.

    The ETA is the mean wall time of the cells finished so far times the cells
    left, divided by how many run at once. On a terminal it is a rich Live
    display; elsewhere (CI logs) one plain line per event, no animation.

        with MatrixProgress(console) as p:
            p.start(len(cells), [c.id for c in cells])
            p.cell_started(cid); ...; p.cell_finished(cid, "ok", 2194.0)
    """

    def __init__(
        self, console: Console | None = None, title: str = "matrix", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console = console or Console()
        self.title = title
        self._clock = clock
        self._live_mode = self.console.is_terminal and not self.console.is_dumb_terminal
        self.total = 0
        self.planned: list[str] = []
        self.done: list[str] = []
        self.failed: list[str] = []
        self.running: dict[str, float] = {}
        self._walls: list[float] = []
        self._progress: Progress | None = None
        self._live: Live | None = None
        self._task: Any = None

    # context manager ---------------------------------------------------------
    def __enter__(self) -> Self:
        if self._live_mode:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                auto_refresh=False,
            )
            self._task = self._progress.add_task(self.title, total=None, info="")
            self._live = Live(Group(self._progress), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._refresh()
            self._live.__exit__(None, None, None)
            self._live = None

    # events --------------------------------------------------------------------
    def start(self, total_cells: int, planned_ids: Iterable[str], completed: Iterable[str] = ()) -> None:
        """Begin: `total_cells` planned; `completed` ids (from --resume) count as done already."""
        self.total = total_cells
        self.planned = list(planned_ids)
        self.done = [c for c in completed]
        if self._progress is not None:
            self._progress.update(self._task, total=total_cells, completed=len(self.done))
        self._emit(f"{self.title}: {total_cells} cells" + (f", {len(self.done)} already done" if self.done else ""))

    def cell_started(self, cell_id: str) -> None:
        """A cell began running."""
        self.running[cell_id] = self._clock()
        self._emit(f"[{len(self.done)}/{self.total}] start {cell_id}", plain_only=True)

    def cell_finished(self, cell_id: str, status: str, throughput: float | None = None) -> None:
        """A cell ended with status "ok"|"error" and its throughput in Mbit/s (None if none)."""
        t0 = self.running.pop(cell_id, None)
        if t0 is not None:
            self._walls.append(self._clock() - t0)
        self.done.append(cell_id)
        if status != "ok":
            self.failed.append(cell_id)
        tp = f" {fmt_mbps(throughput)} Mbit/s" if throughput is not None else ""
        self._emit(
            f"[{len(self.done)}/{self.total}] {cell_id} {status}{tp} ({self.status_line()})",
            style="red" if status != "ok" else None,
        )

    # state -----------------------------------------------------------------------
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
        eta = self.eta_s()
        return s + (f", ETA {_fmt_secs(eta)}" if eta is not None else "")

    # output ----------------------------------------------------------------------
    def _refresh(self) -> None:
        if self._progress is not None:
            running = ", ".join(self.running) or "-"
            self._progress.update(
                self._task, completed=len(self.done), info=f"{self.status_line()} | running: {running}"
            )
            self._progress.refresh()

    def _emit(self, line: str, style: str | None = None, plain_only: bool = False) -> None:
        if self._live_mode:
            if not plain_only:
                self.console.print(Text(line, style=style or ""))
            self._refresh()
        else:
            # No markup or highlighting: CI logs should read as plain text.
            self.console.print(line, markup=False, highlight=False, style=style)
