"""Running a matrix: plan the cells, measure each, record one results.jsonl line per cell.

    plan     = expand(spec, arms)                  # lab.measure.cells: ids, canonical order
    run      = schedule(plan, boot_key, order)     # arms sharing a boot interleave (ABBA ...)
    for cell in run minus completed cells:         # --resume: only missing/errored cells run
        session.kernel(cell's recipe, arm)         # lab.session: reuse, swap modules, or boot
        session.guest(plan for backend, queues)    # a fresh guest after a boot or a swap
        warm-up iperf3 (discarded) after a fresh guest,
        set txqueuelen, qdisc or netem, run iperf3 (or pktgen) through the agent,
        append the cell's result

The runner plans, measures and records; the lab session owns hosts, guests and
module swaps, and the report renders what the runner emits (lab.events), so
nothing here prints.

Faults stay inside their cell. A lab host that dies (its console shows an
oops, or it just stops answering) is recorded in the cell's `host_crashes`;
the session boots a new one on the same kernel and the cell is tried again,
up to `retries` times per cell and `max_host_crashes` per run; past that the
cell is an error and, when the run's crash budget is spent, the run stops
(`--resume` continues). Any other fault is an error result with the guest's
console tail; a guest that no longer answers is destroyed (the next cell boots
a fresh one), one that does gets its iperf3 server restarted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.errors import AgentFailed, HostGone, LabError
from lab.events import CellFinished, CellStarted, Emit, HostCrash, Step, quiet
from lab.guests import RunningGuest, console_tail, guest_mac
from lab.measure.cells import Arm, Cell, arms_of, assign_hosts, expand, schedule, swaps_and_boots
from lab.onhost.drops import RING_REASON
from lab.onhost.net import NetemDelay
from lab.onhost.pktgen import PktgenMeasurement, PktgenRun
from lab.onhost.traffic import Iperf3Run, StreamMeasurement, iperf3_server_argv
from lab.session import LabContext, LabSession, boot_key, guest_plan
from lab.verdicts import expect
from lab.verdicts.results import (
    STATUS_ERROR,
    STATUS_OK,
    CellResult,
    RunData,
    RunMeta,
    RunStore,
    aggregate,
    new_run_id,
    now_iso,
    resolve_run,
    runs_dir,
)

if TYPE_CHECKING:
    from lab.config import LabConfig, MatrixSpec
    from lab.guests import GuestPlan

log = logging.getLogger("lab.measure.matrix")

GUEST_ACCEL = "kvm"  # guests always run with -accel kvm inside the lab host (lab.guests)
GUEST_DEV = "eth0"  # the guest's NIC (images/guest-init.sh configures it)
HEALTH_TIMEOUT_S = 20.0  # "does the guest still answer SSH?"
# Agent errors a cell is run again for (up to `retries`): an iperf3 that stalled
# on a live connection, and a verb that did not answer in time (a starved lab
# host; when it is dead instead, the retry's first call says so: HostGone).
RETRIED_AGENT_ERRORS = ("Iperf3Timeout", "AgentTimeout")
CONSOLE_TAIL_LINES = 200  # lines of a console copied into logs/<cell>.console.log
MAX_BOOT_ATTEMPTS = 2  # per lab host kernel / per guest config, within one session, outside crashes
OVERHEAD_FACTOR = 1.25  # target: wall <= 1.25 x traffic + boots (builds excluded)
# The agent samples the tap's qdisc backlog this often during a cell. One sample
# (a pyroute2 qdisc dump) costs ~50 ms of a TCG lab host's vCPU: every 10 ms it
# took 35 % of the tap path's throughput and 23 % of vhost's, every 100 ms
# 13-18 %, every 1000 ms nothing measurable (benchmarks/datapath_bench.py and
# README "The lab's own data path"). So the backlog peak is a 1 s sampled one.
SAMPLE_MS = 1000.0


class BootRefused(LabError):
    """Not attempted: this lab host kernel or guest config already failed MAX_BOOT_ATTEMPTS times in the run."""


# =========================================================================== pure parts


def retry_reason(exc: Exception, stage: str) -> str | None:
    """Why a cell's failed attempt (not a lost host) may be run again, or None when it may not.

    An iperf3 that stalled on a live connection, or an agent verb that did not
    answer in time: the host is fine, the cell runs again on a guest whose
    iperf3 server was restarted. A guest that did not come up (nested KVM under
    TCG now and then misses the boot bound) is booted again, within the run's
    MAX_BOOT_ATTEMPTS for that guest config.
    """
    if isinstance(exc, AgentFailed):
        return exc.kind if stage == "cell" and exc.kind in RETRIED_AGENT_ERRORS else None
    if stage == "guest boot" and not isinstance(exc, BootRefused):
        return "guest did not boot"
    return None


def netem_delays(rtt_ms: float, split: bool) -> tuple[float | None, float | None]:
    """(delay on the host's tap, delay on the guest's eth0) in ms for a cell's RTT; None = no netem.

    The tap's egress carries the data (host -> guest), the guest's eth0 egress
    the ACKs. Unsplit, the whole RTT is added on the tap (as the cover letter's
    lab did); split, half on each side so both directions see delay.
    """
    if rtt_ms < 0:
        raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms!r}")
    if rtt_ms == 0:
        return None, None
    if split:
        return rtt_ms / 2, rtt_ms / 2
    return float(rtt_ms), None


def _ms(value: float) -> str:
    """60.0 -> "60", 0.25 -> "0.25": how a delay is spelled on a command line."""
    return f"{value:g}"


def guest_netem_argv(delay_ms: float | None, limit: int, dev: str = GUEST_DEV) -> list[str]:
    """The tc command run in the guest: netem delay on its NIC, or delete the root qdisc (back to default)."""
    if delay_ms is None:
        return ["tc", "qdisc", "del", "dev", dev, "root"]
    return ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{_ms(delay_ms)}ms", "limit", str(limit)]


def guest_rx_argv(dev: str = GUEST_DEV) -> list[str]:
    """Read the guest NIC's received-packet counter (what pktgen cells count as delivered)."""
    return ["cat", f"/sys/class/net/{dev}/statistics/rx_packets"]


def iperf3_run(cell: Cell, spec: MatrixSpec, server: str, duration_s: int | None = None) -> Iperf3Run:
    """The iperf3 client run of a cell (host -> guest)."""
    return Iperf3Run(server=server, duration_s=duration_s or cell.duration_s, streams=cell.streams,
                     congestion=spec.iperf3.congestion, length=spec.iperf3.length)


def _identity(cell: Cell) -> dict[str, Any]:
    return {
        "cell": cell.id,
        "kernel": cell.kernel,
        "backend": cell.backend,
        "txqueuelen": cell.txqueuelen,
        "rtt_ms": cell.rtt_ms,
        "repeat": cell.repeat,
        "kind": cell.kind,
        "streams": cell.streams,
        "queues": cell.queues,
        "qdisc": cell.qdisc,
        "threads": cell.threads,
    }


@dataclass(frozen=True)
class Where:
    """Where and how a cell was measured: the host's facts and the cell's place in the run."""

    host: str | None = None
    boot_id: str | None = None
    host_accel: str | None = None
    kernel_recipe: str | None = None
    kernel_release: str | None = None
    modules_loaded: dict[str, Any] | None = None
    order: int | None = None
    attempts: int = 1
    host_crashes: tuple[dict[str, Any], ...] = ()

    def fields(self) -> dict[str, Any]:
        """The CellResult keys this sets."""
        return {
            "host": self.host,
            "boot_id": self.boot_id,
            "accel": GUEST_ACCEL if self.host else None,
            "host_accel": self.host_accel,
            "kernel_recipe": self.kernel_recipe,
            "kernel_release": self.kernel_release,
            "modules_loaded": self.modules_loaded,
            "order": self.order,
            "attempts": self.attempts,
            "host_crashes": [dict(c) for c in self.host_crashes],
        }


def cell_result_from_stream(
    cell: Cell, m: StreamMeasurement, where: Where, *, started_at: str | None, finished_at: str | None,
    commands: Sequence[Sequence[str]] = (),
) -> CellResult:
    """A CellResult from the agent's stream measurement. No throughput: an error result (it measured nothing usable)."""
    d = m.delta
    children = [q for q in m.qdiscs if q.parent != 0xFFFFFFFF]
    status, error = STATUS_OK, None
    if m.iperf3.throughput_mbps is None:
        status, error = STATUS_ERROR, "iperf3 reported no throughput"
    return CellResult(
        **_identity(cell),
        status=status,
        error=error,
        throughput_mbps=m.iperf3.throughput_mbps,
        retransmits=m.iperf3.retransmits,
        host_retrans_segs=m.tcp.retrans_segs,
        tcp_out_segs=m.tcp.out_segs,
        tap_tx_dropped=d.tap.tx_dropped if d else None,
        tap_tx_packets=d.tap.tx_packets if d else None,
        qdisc_drops=d.qdisc.drops if d else None,
        qdisc_requeues=d.qdisc.requeues if d else None,
        qdisc_overlimits=d.qdisc.overlimits if d else None,
        # packets: txqueuelen and qdisc limits are in packets too
        qdisc_backlog_peak=m.backlog_peak.backlog_packets if m.backlog_peak else None,
        measured_rtt_ms=m.iperf3.mean_rtt_ms,
        cpu_sender_pct=m.iperf3.cpu_sender_pct,
        cpu_receiver_pct=m.iperf3.cpu_receiver_pct,
        ring_drops=m.drops.get(RING_REASON, 0) if m.drops is not None else None,
        drop_reasons=m.drops,
        queue_stats=[{"parent": f"{q.parent:#x}", "kind": q.kind, "drops": q.drops, "requeues": q.requeues,
                      "sent_packets": q.sent_packets} for q in children] or None,
        duration_s=m.iperf3.seconds if m.iperf3.seconds else float(cell.duration_s),
        started_at=started_at,
        finished_at=finished_at,
        commands=[list(c) for c in commands] + [list(m.argv)],
        **where.fields(),
    )


def cell_result_from_pktgen(
    cell: Cell, m: PktgenMeasurement, rx_before: int | None, rx_after: int | None, where: Where, *,
    started_at: str | None, finished_at: str | None, commands: Sequence[Sequence[str]] = (),
) -> CellResult:
    """A CellResult from a pktgen measurement and the guest's rx counter around it."""
    r = m.result
    received = rx_after - rx_before if rx_before is not None and rx_after is not None else None
    status, error = STATUS_OK, None
    if r.sent == 0:
        status, error = STATUS_ERROR, "pktgen sent nothing"
    return CellResult(
        **_identity(cell),
        status=status,
        error=error,
        tap_tx_dropped=m.delta.tap.tx_dropped,
        tap_tx_packets=m.delta.tap.tx_packets,
        qdisc_drops=m.delta.qdisc.drops,
        qdisc_requeues=m.delta.qdisc.requeues,
        qdisc_overlimits=m.delta.qdisc.overlimits,
        # Not FULL_RING by reason: pktgen holds its own reference to each skb, so
        # the ring's kfree_skb_reason() is not the last and the drop is traced at
        # pktgen's own free as NOT_SPECIFIED (measured: stock txqueuelen 1, 19982
        # tap tx_dropped, 19982 NOT_SPECIFIED, 0 FULL_RING). The tap counts them.
        ring_drops=m.delta.tap.tx_dropped,
        drop_reasons=m.drops,
        pktgen_sent=r.sent,
        pktgen_errors=r.errors,
        pktgen_pps=r.pps,
        guest_rx_packets=received,
        guest_rx_pps=round(received / r.seconds, 1) if received is not None and r.seconds > 0 else None,
        pktgen_lost=max(0, r.sent - received) if received is not None else None,
        duration_s=r.seconds,
        started_at=started_at,
        finished_at=finished_at,
        commands=[list(c) for c in commands],
        **where.fields(),
    )


def error_result(
    cell: Cell, error: str, where: Where, *, started_at: str | None, finished_at: str | None,
    commands: Sequence[Sequence[str]] = (), console_log: str | None = None,
) -> CellResult:
    """The result of a cell that failed: status "error", no measurements."""
    return CellResult(
        **_identity(cell),
        status=STATUS_ERROR,
        error=error,
        duration_s=None,
        started_at=started_at,
        finished_at=finished_at,
        commands=[list(c) for c in commands],
        console_log=console_log,
        **where.fields(),
    )


def describe_error(exc: BaseException, stage: str) -> str:
    """One line for results.jsonl: the stage and the error (the exception's type unless it is a LabError)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " | ".join(lines[:4]) or type(exc).__name__
    if not isinstance(exc, LabError):
        text = f"{type(exc).__name__}: {text}"
    return f"{stage}: {text}"


def property_names(backends: Iterable[str], expectations: expect.ExpectationsLike) -> list[str]:
    """The names lab.verdicts.expect.evaluate gives its properties for a run over `backends`, in its order.

    Derived from evaluate itself (over one placeholder cell per backend), so
    the names can never drift from what the evaluation reports.
    """
    placeholders = [
        CellResult(cell=f"{b}-qlen1-rtt0-_", kernel="_", backend=b, txqueuelen=1, rtt_ms=0, status=STATUS_ERROR)
        for b in dict.fromkeys(backends)
    ]
    return [p.name for p in expect.evaluate(aggregate(placeholders), expectations, None)]


def overhead(wall_s: float, traffic_s: float, boots_s: float, builds_s: float = 0.0) -> dict[str, Any]:
    """The run-time target "wall <= 1.25 x traffic + boots" (artifact builds excluded from wall)."""
    limit = OVERHEAD_FACTOR * traffic_s + boots_s
    measured = max(0.0, wall_s - builds_s)
    return {
        "target": f"wall - builds <= {OVERHEAD_FACTOR:g} x traffic + boots",
        "limit_s": round(limit, 1),
        "measured_s": round(measured, 1),
        "met": measured <= limit,
    }


# =========================================================================== the runner


@dataclass
class Timing:
    """Where a session's time went, in seconds; boots, swaps and builds are counted separately."""

    traffic_s: float = 0.0  # sum of the cells' measured durations (warm-ups not included)
    warmup_s: float = 0.0
    boots_s: float = 0.0  # lab host and guest boots (power on -> SSH answers), module swaps
    builds_s: float = 0.0  # artifact look-ups/builds (kernels, image): minutes once, ~0 when cached
    host_boots: int = 0
    guest_boots: int = 0
    module_swaps: int = 0
    cells_run: int = 0
    host_crashes: int = 0
    retries: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in d.items()}


class MatrixRunner:
    """Runs the cells of one (profile-applied) matrix into one run store, through one lab session."""

    def __init__(
        self, ctx: LabContext, spec: MatrixSpec, store: RunStore, emit: Emit = quiet, arms: Sequence[Arm] | None = None,
        host: str | None = None,
    ) -> None:
        """`host`: which of the matrix's hosts this runner owns (default: matrices.<name>.host); with several
        hosts (matrices.<name>.hosts) each runner measures only the cells assigned to its host."""
        cfg = ctx.cfg
        self.ctx = ctx
        self.spec = spec
        self.store = store
        self.emit = emit
        host = host or spec.host
        if host not in spec.run_hosts:
            raise LabError(f"matrix {spec.name} does not run on host {host!r}", hint="one of: " + ", ".join(spec.run_hosts))
        self.host_spec = cfg.hosts[host]
        self.guest_spec = cfg.guests[spec.guest]
        self.meta: RunMeta = store.read_meta()
        self.arms = list(arms) if arms is not None else arms_from_meta(self.meta) or arms_of(spec)
        recipes = {a.recipe for a in self.arms}
        if self.host_spec.provider == "local" and len(recipes) > 1:
            raise LabError(
                f"matrix {spec.name}: host {host} is a 'local' host, which runs this machine's kernel and cannot switch "
                f"kernels, but the matrix compares {len(recipes)} ({', '.join(sorted(recipes))})",
                hint=f"use a nested or ssh host for matrices.{spec.name}.host, or a profile with one kernel",
            )
        self.session = LabSession(ctx, self.host_spec, self._on_event, swap=spec.swap)
        self.timing = Timing()
        self.gone: str | None = None  # why the run stopped (crash budget spent, host lost); then every cell refuses
        self.session_id = uuid.uuid4().hex[:12]  # names this session's entry in meta.json
        self._base_plan: GuestPlan | None = None
        self._guest_netem = False  # a netem qdisc is on the guest's eth0 (netem_split)
        self._guest_runner: Any = None
        self._warm: RunningGuest | None = None  # the guest the last warm-up ran against
        self._failed: dict[tuple[Any, ...], list[str]] = {}
        self._order = {c.id: i for i, c in enumerate(self.plan())}

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[Cell]:
        """Every cell of the matrix, in run order (interleaved; lab.measure.cells.schedule)."""
        return planned_cells(self.ctx.cfg, self.spec, self.arms)

    def mine(self) -> list[Cell]:
        """The planned cells this runner's host measures (all of them unless the matrix spreads over several hosts)."""
        hosts = self.spec.run_hosts
        if len(hosts) == 1:
            return self.plan()
        where = assign_hosts(self.plan(), hosts)
        return [c for c in self.plan() if where[c.id] == self.host_spec.name]

    def pending(self) -> list[Cell]:
        """This host's planned cells minus those whose latest attempt in the store is ok (what --resume runs)."""
        done = self.store.completed_ids()
        return [c for c in self.mine() if c.id not in done]

    def cell(self, cell_id: str) -> Cell:
        """A planned cell by id (KeyError when the matrix has no such cell)."""
        for c in self.plan():
            if c.id == cell_id:
                return c
        raise KeyError(cell_id)

    # ------------------------------------------------------------------ events
    def _on_event(self, event: Any) -> None:
        from lab.events import GuestBooted, HostBooted, ModulesSwapped

        if isinstance(event, HostBooted):
            self.timing.host_boots += 1
            self.timing.boots_s += event.seconds
        elif isinstance(event, GuestBooted):
            self.timing.guest_boots += 1
            self.timing.boots_s += event.seconds
        elif isinstance(event, ModulesSwapped):
            self.timing.module_swaps += 1
            self.timing.boots_s += event.seconds
            # a hot-unplug swap keeps the guest but not its NIC: no SSH session, netem or warm path survives it
            self._drop_guest_handles()
            self._warm = None
        self.emit(event)

    # ------------------------------------------------------------------ one cell
    def run_cell(self, cell: Cell) -> CellResult:
        """Run one cell (retrying it on a new lab host after a crash) and append its result; returns it.

        Raises HostGone (after recording the cell) when the run has to stop.
        """
        if self.gone is not None:
            raise HostGone(f"not run: {self.gone}")
        started, t0 = now_iso(), time.monotonic()
        crashes: list[dict[str, Any]] = []
        attempt = 1
        while True:
            self.emit(CellStarted(cell.id, self._order.get(cell.id, 0) + 1, len(self._order), attempt))
            commands: list[list[str]] = []
            stage = "artifacts"
            try:
                self._ensure_artifacts(cell)
                stage = "lab host boot"
                host = self._ensure_host(cell)
                stage = "guest boot"
                guest = self._ensure_guest(cell)
                stage = "cell"
                result = self._measure(cell, host, guest, commands, started, attempt, crashes)
                break
            except HostGone as exc:
                crash = self._record_crash(exc, cell, stage)
                crashes.append(crash)
                budget_spent = self.timing.host_crashes > self.spec.max_host_crashes
                if budget_spent or attempt > self.spec.retries:
                    why = "the run's host crash budget is spent" if budget_spent else f"{attempt} attempts"
                    result = self._failed_result(cell, exc, stage, started, commands, attempt, crashes, f" ({why})")
                    self._finish(cell, result, t0)
                    if budget_spent:
                        self.gone = f"{self.timing.host_crashes} lab host crashes (max_host_crashes {self.spec.max_host_crashes})"
                        raise HostGone(f"lab host {self.host_spec.name}: {self.gone}") from None
                    return result
                attempt = self._next_attempt(cell, attempt, "retrying on a new lab host")
            except Exception as exc:
                why = retry_reason(exc, stage)
                if why is None or attempt > self.spec.retries:
                    result = self._failed_result(cell, exc, stage, started, commands, attempt, crashes, "")
                    self._finish(cell, result, t0)
                    self._recover(stage)
                    return result
                self._recover(stage)
                attempt = self._next_attempt(cell, attempt, f"{why}: retrying")
        self._finish(cell, result, t0)
        if not result.ok:
            self._recover("cell")
        return result

    def _next_attempt(self, cell: Cell, attempt: int, what: str) -> int:
        self.timing.retries += 1
        self.emit(Step(cell.id, f"{what} (attempt {attempt + 1})", warning=True))
        return attempt + 1

    def _finish(self, cell: Cell, result: CellResult, t0: float) -> None:
        self.timing.cells_run += 1
        if result.ok:
            self.timing.traffic_s += result.duration_s or 0.0
        self.store.append(result)
        value, unit = (result.guest_rx_pps, "pps") if cell.kind == "pktgen" else (result.throughput_mbps, "Mbit/s")
        self.emit(CellFinished(cell.id, result.status, value, unit, result.attempts, round(time.monotonic() - t0, 1)))
        if not result.ok:
            self.emit(Step(cell.id, f"error: {result.error}", warning=True))

    def _where(self, cell: Cell, attempt: int, crashes: Sequence[dict[str, Any]]) -> Where:
        st = self.session.state
        facts = st.facts if st is not None else {}
        return Where(
            host=self.host_spec.name if st is not None else None,
            boot_id=st.boot_id if st is not None else None,
            host_accel=facts.get("accel"),
            kernel_recipe=cell.recipe_name,
            kernel_release=facts.get("kernel_release"),
            modules_loaded=self.session.modules_loaded(),
            order=self._order.get(cell.id),
            attempts=attempt,
            host_crashes=tuple(crashes),
        )

    def _failed_result(self, cell: Cell, exc: BaseException, stage: str, started: str, commands: list[list[str]], attempt: int,
                       crashes: Sequence[dict[str, Any]], suffix: str) -> CellResult:
        return error_result(cell, describe_error(exc, stage) + suffix, self._where(cell, attempt, crashes), started_at=started,
                            finished_at=now_iso(), commands=commands, console_log=self._save_console(cell, stage))

    def _record_crash(self, exc: HostGone, cell: Cell, stage: str) -> dict[str, Any]:
        """A lost host: what its console says, kept in the run's logs; the session forgets it."""
        crash = self.session.crash(keep_dir=self.store.logs_dir)
        self.session.forget_host()
        self._drop_guest_handles()
        self.timing.host_crashes += 1
        entry = {"at": now_iso(), "oops": crash.oops, "console_log": crash.console_log, "stage": stage, "cell": cell.id,
                 "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        if crash.oops is None:
            entry["stall"] = crash.stall  # no oops: a host starved under TCG (soft lockups, RCU stalls) says so instead
        self.meta = self.store.update_meta(lambda m: m.extra.setdefault("host_crashes", []).append({**entry, "head": crash.head}))
        self.emit(HostCrash(self.host_spec.name, entry["at"], crash.oops, crash.console_log))
        return entry

    def _measure(self, cell: Cell, host: Any, guest: RunningGuest, commands: list[list[str]], started: str, attempt: int,
                 crashes: Sequence[dict[str, Any]]) -> CellResult:
        tap = guest.plan.tap
        agent = host.agent
        tap_delay, guest_delay = netem_delays(cell.rtt_ms, self.spec.netem_split)
        log.info("%s: txqueuelen %d, qdisc %s, netem %s ms", cell.id, cell.txqueuelen, cell.qdisc, _ms(cell.rtt_ms))
        commands.append(["agent", "txqueuelen", "--name", tap, "--value", str(cell.txqueuelen)])
        agent.set_txqueuelen(tap, cell.txqueuelen)
        if tap_delay is not None:
            commands.append(["agent", "netem", "--dev", tap, "--delay-ms", _ms(tap_delay), "--limit", str(self.spec.netem_limit)])
            agent.set_netem(tap, NetemDelay(tap_delay, limit=self.spec.netem_limit))
        else:
            commands.append(["agent", "qdisc", "--dev", tap, "--kind", cell.qdisc])
            agent.set_qdisc(tap, cell.qdisc)
        if guest_delay is not None or self._guest_netem:
            argv = guest_netem_argv(guest_delay, self.spec.netem_limit)
            commands.append(["ssh", f"root@{guest.plan.guest_ip}", "--", *argv])
            # deleting a netem that is not there fails harmlessly; adding one must work
            self._guest_shell(guest).run(argv, timeout=self.ctx.cfg.timeouts.command, check=guest_delay is not None)
            self._guest_netem = guest_delay is not None
        if self._warm is not guest and self.spec.warmup_s > 0 and cell.kind == "iperf3":
            # the first stream after a boot or a swap runs slow: warm up, discard
            t0 = time.monotonic()
            agent.stream(iperf3_run(cell, self.spec, guest.plan.guest_ip, max(1, round(self.spec.warmup_s))), None,
                         sample_ms=0, count_drops=False)
            self.timing.warmup_s += time.monotonic() - t0
        self._warm = guest
        where = self._where(cell, attempt, crashes)
        if cell.kind == "pktgen":
            return self._measure_pktgen(cell, host, guest, commands, started, where)
        log.info("%s: iperf3 %ds, %d stream(s)", cell.id, cell.duration_s, cell.streams)
        m = agent.stream(iperf3_run(cell, self.spec, guest.plan.guest_ip), tap, grace_s=self.ctx.cfg.timeouts.cell_grace,
                         sample_ms=SAMPLE_MS)
        return cell_result_from_stream(cell, m, where, started_at=started, finished_at=now_iso(), commands=commands)

    def _measure_pktgen(self, cell: Cell, host: Any, guest: RunningGuest, commands: list[list[str]], started: str,
                        where: Where) -> CellResult:
        shell = self._guest_shell(guest)
        argv = guest_rx_argv()

        def rx() -> int | None:
            res = shell.run(argv, timeout=HEALTH_TIMEOUT_S, check=False)
            return int(res.stdout.strip()) if res.rc == 0 and res.stdout.strip().isdigit() else None

        run = PktgenRun(dev=guest.plan.tap, dst_ip=guest.plan.guest_ip, dst_mac=guest_mac(self.ctx.paths.lab, guest.plan.index),
                        threads=cell.threads, count=self.spec.pktgen_count, size=self.spec.pktgen_size,
                        timeout_s=max(60.0, float(cell.duration_s) * 6))
        before = rx()
        commands.append(["agent", "pktgen", "--dev", run.dev, "--threads", str(run.threads), "--count", str(run.count),
                         "--size", str(run.size)])
        m = host.agent.pktgen(run)
        time.sleep(0.5)  # what is still in flight reaches the guest's counter
        after = rx()
        return cell_result_from_pktgen(cell, m, before, after, where, started_at=started, finished_at=now_iso(), commands=commands)

    # ------------------------------------------------------------------ transitions
    def _ensure_artifacts(self, cell: Cell) -> None:
        """Build (or find in the cache) every arm's kernel and the guest's image before any VM waits for them.

        All arms at once: a lab host sees this machine's root through a 9p
        cache, so an artifact should exist before the host that loads it boots.
        """
        if self._base_plan is not None:
            return
        key = ("artifacts",)
        self._refuse_if_failed(key, "the artifacts", "be built")
        t0 = time.monotonic()
        try:
            from lab.session import kernel_boot

            if self.host_spec.provider in ("nested", "ssh"):
                for recipe in dict.fromkeys(a.recipe for a in self.arms):
                    kernel_boot(self.ctx, recipe, self.emit)
            self._base_plan = guest_plan(self.ctx, self.guest_spec, progress=self.emit)
        except Exception as exc:
            self._failed.setdefault(key, []).append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        finally:
            self.timing.builds_s += time.monotonic() - t0

    def _ensure_host(self, cell: Cell) -> Any:
        key = ("host", cell.recipe_name)
        self._refuse_if_failed(key, f"lab host {self.host_spec.name} on kernel {cell.recipe_name}")
        before = self.session.state.boot_id if self.session.state else None
        try:
            host = self.session.kernel(cell.recipe_name, cell.kernel)
        except HostGone:
            raise
        except Exception as exc:
            self._failed.setdefault(key, []).append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        st = self.session.state
        if st is not None and st.boot_id != before:
            self._drop_guest_handles()
            facts = dict(st.facts)
            self._write_session(lambda m: m.hosts.__setitem__(f"{self.host_spec.name}/{cell.recipe_name}", facts))
        elif st is not None and self.session.swaps and self._session_entry() != self.session.describe():
            self._write_session()
        return host

    def _session_entry(self) -> Any:
        return (self.meta.extra.get("lab_sessions") or {}).get(self.host_spec.name)

    def _write_session(self, change: Any = None) -> None:
        """Record this runner's lab session (boots, swaps) in meta.json, under the run's lock (other hosts' runners write too)."""
        mine = self.session.describe()
        name = self.host_spec.name

        def apply(m: RunMeta) -> None:
            if change is not None:
                change(m)
            record_lab_session(m, name, mine)

        self.meta = self.store.update_meta(apply)

    def _ensure_guest(self, cell: Cell) -> RunningGuest:
        assert self._base_plan is not None
        key = ("guest", cell.kernel, cell.backend, str(cell.queues))
        self._refuse_if_failed(key, f"guest {self.guest_spec.name} ({cell.backend}, {cell.queues} queue(s)) on {cell.kernel}")
        plan = dataclasses.replace(self._base_plan, backend=cell.backend, queues=cell.queues,
                                   txqueuelen=cell.txqueuelen or self.guest_spec.net.txqueuelen)
        current = self.session.guests.get(plan.name)
        try:
            guest = self.session.guest(plan)
        except HostGone:
            raise
        except Exception as exc:
            self._failed.setdefault(key, []).append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        if guest is not current:
            self._drop_guest_handles()
        return guest

    def _refuse_if_failed(self, key: tuple[str, ...], what: str, verb: str = "boot") -> None:
        failures = self._failed.get(key, [])
        if len(failures) >= MAX_BOOT_ATTEMPTS:
            raise BootRefused(f"not attempted: {what} failed to {verb} {len(failures)} times in this run ({failures[-1]})")

    def _guest_shell(self, guest: RunningGuest) -> Any:
        if self._guest_runner is None:
            self._guest_runner = guest.runner(timeout=self.ctx.cfg.timeouts.command)
        return self._guest_runner

    def _drop_guest_handles(self) -> None:
        if self._guest_runner is not None:
            self._guest_runner.close()
        self._guest_runner = None
        self._guest_netem = False

    # ------------------------------------------------------------------ faults
    def _save_console(self, cell: Cell, stage: str) -> str | None:
        """Copy the relevant console's tail to logs/<cell>.console.log; its path, or None."""
        text: str | None = None
        st = self.session.state
        try:
            if stage == "lab host boot" or st is None:
                path = self.ctx.paths.host_console(self.host_spec.name)
                if path.exists():
                    text = "\n".join(path.read_text(errors="replace").splitlines()[-CONSOLE_TAIL_LINES:])
            elif stage in ("guest boot", "cell"):
                text = console_tail(st.host, self.guest_spec.name, CONSOLE_TAIL_LINES)
        except Exception as exc:
            text = f"(console log unavailable: {exc})"
        if not text:
            return None
        out = self.store.logs_dir / f"{cell.id}.console.log"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text.rstrip("\n") + "\n")
        except OSError:
            return None
        return str(out)

    def _recover(self, stage: str) -> None:
        """After a failed cell: leave a guest that works (or none)."""
        guest = self.session.guests.get(self.guest_spec.name)
        if stage != "cell" or guest is None:
            return  # a failed boot cleaned up after itself
        shell = self._guest_shell(guest)
        res = shell.run(["true"], timeout=HEALTH_TIMEOUT_S, check=False)
        if res.rc != 0:
            self.emit(Step(self.guest_spec.name, f"does not answer SSH ({res.stderr.strip()[:80]}); destroying it", warning=True))
            self._drop_guest_handles()
            self.session.drop_guest(self.guest_spec.name, destroy=True)
            return
        # a killed or timed-out iperf3 client can leave the server wedged on a stale connection
        shell.run(["pkill", "-x", "iperf3"], timeout=HEALTH_TIMEOUT_S, check=False)
        restart = shell.run(iperf3_server_argv(daemon=True), timeout=HEALTH_TIMEOUT_S, check=False)
        if restart.rc != 0:
            self.emit(Step(self.guest_spec.name, "iperf3 server did not restart; destroying the guest", warning=True))
            self._drop_guest_handles()
            self.session.drop_guest(self.guest_spec.name, destroy=True)

    # ------------------------------------------------------------------ the end
    def close(self, keep: bool = False) -> None:
        """Tear down what the run made (guest, then lab host) unless `keep`. Idempotent."""
        self._drop_guest_handles()
        self.session.close(keep=keep)


def record_lab_session(meta: RunMeta, host: str, described: dict[str, Any]) -> None:
    """Put one host's lab session into meta: extra.lab_sessions[host], and extra.lab_session, all hosts' boots and swaps together."""
    sessions = meta.extra.setdefault("lab_sessions", {})
    sessions[host] = described
    merged: dict[str, Any] = {"host": ", ".join(sessions), "boots": [], "swaps": []}
    for d in sessions.values():
        merged["boots"] += list(d.get("boots") or [])
        merged["swaps"] += list(d.get("swaps") or [])
    meta.extra["lab_session"] = merged


def arms_from_meta(meta: RunMeta) -> list[Arm]:
    arms = meta.extra.get("arms")
    if not isinstance(arms, list):
        return []
    return [Arm(str(a["name"]), str(a["recipe"])) for a in arms if isinstance(a, dict) and "name" in a and "recipe" in a]


# =========================================================================== a whole run


@dataclass
class MatrixOutcome:
    """What run_matrix leaves: the run on disk, as loaded, its properties and timings."""

    run_dir: Path
    run_data: RunData
    properties: list[expect.Property]
    all_passed: bool
    wall_s: float
    traffic_s: float
    boots_s: float
    stopped: str | None = None  # why the run stopped early (host crashes, interrupted), None if it ran out
    builds_s: float = 0.0
    overhead: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """PASS, FAIL or INCONCLUSIVE over the properties (FAIL too when cells errored or the run stopped)."""
        if self.stopped or any(not r.ok for r in self.run_data.latest()) or self.run_data.missing_ids():
            return expect.FAIL
        return expect.overall(self.properties)


def matrix_spec(cfg: LabConfig, matrix_name: str, profile: str | None = None) -> MatrixSpec:
    """The named matrix with `profile` applied; LabError naming the known matrices otherwise."""
    spec = cfg.matrices.get(matrix_name)
    if spec is None:
        known = ", ".join(sorted(cfg.matrices)) or "none"
        raise LabError(f"no matrix named {matrix_name!r} in {cfg.source}", hint=f"one of: {known}")
    return spec.with_profile(profile) if profile else spec


def open_run(
    ctx: LabContext,
    matrix_name: str,
    profile: str | None = None,
    resume: str | Path | None = None,
    argv: Sequence[str] | None = None,
    aa: bool = False,
) -> tuple[MatrixSpec, RunStore]:
    """Create a new run directory for the matrix, or reopen `resume` (a run id, prefix, "latest" or path).

    `aa`: an A/A control, the baseline kernel against a copy of itself. A
    resumed run keeps its matrix, profile and arms; its planned ids become the
    current plan (a changed lab.toml is noted in meta).
    """
    cfg = ctx.cfg
    argv = list(sys.argv if argv is None else argv)
    if resume is None:
        spec = matrix_spec(cfg, matrix_name, profile)
        aa = aa or spec.aa
        arms = arms_of(spec, aa=aa)
        store = RunStore(runs_dir(cfg.workdir) / new_run_id(spec.name + ("-aa" if aa else "")))
        runner_plan = planned_cells(cfg, spec, arms)
        store.create(
            RunMeta(
                run_id=store.run_dir.name,
                matrix=spec.name,
                profile=spec.profile,
                lab_name=cfg.name,
                config_path=str(cfg.source),
                started_at=now_iso(),
                argv=argv,
                duration_s=spec.duration_s,
                planned=[c.id for c in runner_plan],
                extra={
                    "arms": [dataclasses.asdict(a) for a in arms],
                    "aa": aa,
                    "baseline": arms[0].name,
                    "order": spec.order,
                    "seed": spec.seed,
                    "swap": spec.swap,
                    "repeats": spec.repeats,
                    "warmup": spec.warmup_s,
                    "expected": swaps_and_boots(runner_plan, lambda r: _boot_key_for(cfg, spec, r)),
                },
            )
        )
        return spec, store
    store = RunStore(resolve_run(cfg.workdir, resume))
    meta = store.read_meta()
    if matrix_name and matrix_name != meta.matrix:
        raise LabError(
            f"run {meta.run_id} is a run of matrix {meta.matrix!r}, not {matrix_name!r}",
            hint=f"resume it as matrix {meta.matrix}",
        )
    if profile and meta.profile and profile != meta.profile:
        raise LabError(f"run {meta.run_id} ran profile {meta.profile!r}, not {profile!r}", hint="drop --profile when resuming")
    spec = matrix_spec(cfg, meta.matrix, profile or meta.profile)
    arms = arms_from_meta(meta) or arms_of(spec)
    planned = [c.id for c in planned_cells(cfg, spec, arms)]
    if planned != meta.planned:
        meta.extra.setdefault("plan_changes", []).append(
            {"at": now_iso(), "added": [c for c in planned if c not in meta.planned],
             "removed": [c for c in meta.planned if c not in planned]}
        )
        meta.planned = planned
    meta.extra.setdefault("resumed", []).append({"at": now_iso(), "argv": argv})
    store.write_meta(meta)
    return spec, store


def _boot_key_for(cfg: LabConfig, spec: MatrixSpec, recipe: str) -> str:
    return f"own:{recipe}" if spec.swap == "reboot-host" else boot_key(cfg, recipe)


def planned_cells(cfg: LabConfig, spec: MatrixSpec, arms: Sequence[Arm] | None = None) -> list[Cell]:
    """The matrix's cells in run order (what a run's meta.json plans and pytest parametrizes)."""
    arms = list(arms) if arms is not None else arms_of(spec)
    return schedule(expand(spec, arms), lambda r: _boot_key_for(cfg, spec, r), spec.order, spec.seed)


def evaluate_run(data: RunData, cfg: LabConfig) -> list[expect.Property]:
    """The properties over a loaded run (bootstrap seeded by the run id, so re-rendering is stable)."""
    from lab.verdicts.expect import evaluate

    exp = cfg.expectations
    baseline = str(data.meta.extra.get("baseline") or exp.stock_kernel)
    aa = bool(data.meta.extra.get("aa"))
    if aa:
        # an A/A control: the "patched" arm is the baseline's copy
        exp = dataclasses.replace(exp, stock_kernel=baseline, nodrop_kernel=f"{baseline}-aa")
    return evaluate(data.summaries(), exp, data.host_accel(), salt=data.meta.run_id, aa=aa)


def finish_run(runner: MatrixRunner, session_started: float, session_started_at: str, stopped: str | None = None) -> MatrixOutcome:
    """Load the run back from disk, evaluate its properties, and write the session into meta.json.

    meta.extra gets "sessions" (one entry per run_matrix/pytest session, with
    its wall/traffic/boot/build seconds, crashes and retries) and their totals
    "wall_s", "traffic_s", "boots_s", "builds_s" plus "overhead" (the target check).
    """
    cfg = runner.ctx.cfg
    wall = time.monotonic() - session_started
    t = runner.timing
    host = runner.host_spec.name

    def apply(meta: RunMeta) -> None:
        # Under the run's lock, on the meta as it is on disk now: the runners of
        # other hosts (pytest-xdist workers) finish into the same meta.json.
        meta.finished_at = now_iso()
        sessions = meta.extra.setdefault("sessions", [])
        entry = {"session": runner.session_id, "host": host, "pid": os.getpid(), "worker": os.environ.get("PYTEST_XDIST_WORKER"),
                 "started_at": session_started_at, "finished_at": meta.finished_at,
                 "argv": list(sys.argv), "wall_s": round(wall, 1), **t.to_dict(), "stopped": stopped}
        # finishing the same session again (pytest: properties, then session end) updates its entry
        mine = [i for i, e in enumerate(sessions) if isinstance(e, dict) and e.get("session") == runner.session_id]
        if mine:
            sessions[mine[-1]] = entry
        else:
            sessions.append(entry)
        keys = ("wall_s", "traffic_s", "boots_s", "builds_s", "warmup_s", "retries", "module_swaps")
        totals = {k: round(sum(float(s.get(k) or 0) for s in sessions), 1) for k in keys}
        meta.extra.update(totals)
        # meta's "host_crashes" is the list of crashes (at, oops, console_log):
        # the sessions' count goes beside it, never over it.
        meta.extra["host_crash_count"] = sum(int(s.get("host_crashes") or 0) for s in sessions)
        if not isinstance(meta.extra.get("host_crashes"), list):
            meta.extra["host_crashes"] = []
        meta.extra["overhead"] = overhead(totals["wall_s"], totals["traffic_s"], totals["boots_s"], totals["builds_s"])
        record_lab_session(meta, host, runner.session.describe())
        # the run stopped when the latest session of any host stopped
        latest: dict[str, Any] = {}
        for e in sessions:
            if isinstance(e, dict):
                latest[str(e.get("host") or "")] = e.get("stopped")
        why = [f"{h}: {v}" if h and len(latest) > 1 else str(v) for h, v in latest.items() if v]
        if why:
            meta.extra["stopped"] = "; ".join(why)
        else:
            meta.extra.pop("stopped", None)

    if t.cells_run or stopped or not runner.meta.extra.get("resumed"):
        runner.meta = runner.store.update_meta(apply)
    data = runner.store.load()
    props = evaluate_run(data, cfg)
    passed = expect.all_passed(props) and stopped is None and all(r.ok for r in data.latest()) and not data.missing_ids()
    return MatrixOutcome(
        run_dir=runner.store.run_dir,
        run_data=data,
        properties=props,
        all_passed=passed,
        wall_s=round(wall, 1),
        traffic_s=round(t.traffic_s, 1),
        boots_s=round(t.boots_s, 1),
        stopped=stopped,
        builds_s=round(t.builds_s, 1),
        overhead=overhead(wall, t.traffic_s, t.boots_s, t.builds_s),
    )


def summary_line(outcome: MatrixOutcome) -> str:
    """The run's time budget on one line, over all its sessions (a resumed run adds up):

    "wall 219s (builds 0s), traffic 40s, boots 170s: target wall - builds <= 1.25 x traffic + boots = 220s met (218s)"
    """
    extra = outcome.run_data.meta.extra
    sessions = len(extra.get("sessions") or [])
    if sessions:
        wall, builds = float(extra.get("wall_s") or 0), float(extra.get("builds_s") or 0)
        traffic, boots = float(extra.get("traffic_s") or 0), float(extra.get("boots_s") or 0)
    else:
        wall, builds, traffic, boots = outcome.wall_s, outcome.builds_s, outcome.traffic_s, outcome.boots_s
    if traffic == 0:
        return f"wall {wall:.0f}s: no traffic ran" + (" in this session" if not sessions else "")
    o = overhead(wall, traffic, boots, builds)
    where = f" over {sessions} sessions" if sessions > 1 else ""
    return (
        f"wall {wall:.0f}s (builds {builds:.0f}s), traffic {traffic:.0f}s, boots {boots:.0f}s{where}: "
        f"target wall - builds <= {OVERHEAD_FACTOR:g} x traffic + boots = {o['limit_s']:.0f}s "
        f"{'met' if o['met'] else 'missed'} ({o['measured_s']:.0f}s)"
    )


def run_matrix(
    ctx: LabContext,
    matrix_name: str,
    profile: str | None = None,
    resume: str | Path | None = None,
    keep: bool = False,
    emit: Emit = quiet,
    aa: bool = False,
    on_start: Any = None,
    raise_interrupt: bool = True,
) -> MatrixOutcome:
    """Run (or resume) a matrix end to end: cells, events, properties, teardown.

    Teardown always happens (also on Ctrl-C): the guest is destroyed, and the
    lab host too unless `keep`. A run that has to stop early (its host crash
    budget spent) says why in its outcome (`stopped`); what was measured stays.
    `on_start(runner, plan, pending)` is called before the first cell (the CLI
    shows the plan there). Ctrl-C (KeyboardInterrupt) propagates after the
    teardown, unless `raise_interrupt` is False: then the outcome says
    stopped="interrupted" and the caller can still show what was measured.
    """
    session_t0, session_at = time.monotonic(), now_iso()
    spec, store = open_run(ctx, matrix_name, profile, resume, aa=aa)
    # One runner per host; here the hosts take their turns (pytest -n N --dist
    # loadgroup runs them at once, one worker each: tests/matrix).
    runners = [MatrixRunner(ctx, spec, store, emit, host=h) for h in spec.run_hosts]
    if on_start is not None:
        on_start(runners[0], runners[0].plan(), [c for r in runners for c in r.pending()])
    stopped: str | None = None
    outcome: MatrixOutcome | None = None
    for runner in runners:
        host_t0, host_at = time.monotonic(), now_iso()
        host_stopped: str | None = None
        try:
            for cell in runner.pending():
                try:
                    runner.run_cell(cell)
                except HostGone as exc:
                    host_stopped = str(exc)
                    break
        except KeyboardInterrupt:
            host_stopped = stopped = "interrupted"
            if raise_interrupt:
                raise
        finally:
            try:
                runner.close(keep=keep)
            finally:
                t0, at = (session_t0, session_at) if runner is runners[0] else (host_t0, host_at)
                outcome = finish_run(runner, t0, at, host_stopped)
        stopped = stopped or host_stopped
        if stopped == "interrupted":
            break
    assert outcome is not None
    if stopped and not outcome.stopped:
        outcome = dataclasses.replace(outcome, stopped=stopped)
    return outcome
