"""Running a matrix: cells in plan order on one lab host and one guest, results appended per cell.

    plan = expand(matrix)                      # grouped by kernel, then backend
    for cell in plan minus completed cells:    # --resume: only missing/errored cells run
        (re)boot the lab host when the kernel changes,
        (re)boot the guest when the backend changes (or the host was rebooted),
        set the tap's txqueuelen and netem, run iperf3 host -> guest,
        append one results.jsonl line

The transitions are lazy and follow the plan's grouping, so a matrix of K
kernels and B backends boots K lab hosts and K x B guests (`boot_counts`).

Faults stay inside their cell: an exception becomes a result with status
"error", the error message and a copy of the guest's console tail
(logs/<cell>.console.log); a guest that no longer answers SSH is destroyed
(the next cell boots a fresh one), one that does gets its iperf3 server
restarted. Only a lost lab host stops the run: HostGone leaves the loop after
the cell's error line is written, so everything recorded stays valid and
`--resume` continues where it stopped.

Pure parts (tested without VMs): `netem_delays`, `agent_netem_args`,
`guest_netem_argv`, `stream_args`, `cell_result_from_stream`,
`error_result`, `plan_transitions`, `boot_counts`, `property_names`,
`overhead`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab import guests, lifecycle
from lab.errors import HostGone, LabError
from lab.events import Progress, Step, quiet
from lab.hosts import nested
from lab.measure.cells import Cell, expand
from lab.onhost.traffic import iperf3_server_argv
from lab.verdicts import expect
from lab.verdicts.results import (
    STABLE_KEYS,
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
    from rich.console import Console

    from lab.config import LabConfig, MatrixSpec
    from lab.guests import GuestPlan, RunningGuest
    from lab.hosts.host import Host
    from lab.lifecycle import LabContext

log = logging.getLogger("lab.measure.matrix")


GUEST_ACCEL = "kvm"  # guests always run with -accel kvm inside the lab host (lab.guests)
GUEST_DEV = "eth0"  # the guest's NIC (images/guest-init.sh configures it)
AGENT_SLACK_S = 30.0  # an agent `stream` call may take this much beyond iperf3's own bound
HEALTH_TIMEOUT_S = 20.0  # "does the guest still answer SSH?"
CONSOLE_TAIL_LINES = 200  # lines of a console copied into logs/<cell>.console.log
MAX_BOOT_ATTEMPTS = 2  # per lab host kernel / per (kernel, backend) guest, within one session
OVERHEAD_FACTOR = 1.25  # target: wall <= 1.25 x traffic + boots (builds excluded)

# What a `stream` reply's "fields" may set on a CellResult: measurements only,
# never the keys that identify the cell or say how it went.
_IDENTITY_KEYS = frozenset(
    {"cell", "kernel", "backend", "txqueuelen", "rtt_ms", "repeat", "status", "error", "commands", "console_log"}
)
MEASURED_KEYS = tuple(k for k in STABLE_KEYS if k not in _IDENTITY_KEYS)



# =========================================================================== pure parts


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


def agent_netem_args(tap: str, delay_ms: float | None, limit: int) -> list[str]:
    """The agent's netem verb: delay on the tap's root, or --clear (the kernel's default root qdisc)."""
    if delay_ms is None:
        return ["netem", "--dev", tap, "--clear"]
    return ["netem", "--dev", tap, "--delay-ms", _ms(delay_ms), "--limit", str(limit)]


def guest_netem_argv(delay_ms: float | None, limit: int, dev: str = GUEST_DEV) -> list[str]:
    """The tc command run in the guest: netem delay on its NIC, or delete the root qdisc (back to default)."""
    if delay_ms is None:
        return ["tc", "qdisc", "del", "dev", dev, "root"]
    return ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{_ms(delay_ms)}ms", "limit", str(limit)]


def stream_args(cell: Cell, matrix: MatrixSpec, server: str, tap: str, cell_grace: float) -> list[str]:
    """The agent's stream verb for a cell: iperf3 host -> guest, counters sampled on the tap.

    iperf3 is bounded by duration + cell_grace (the agent kills it after that).
    """
    args = ["stream", "--server", server, "--duration", str(cell.duration_s), "--streams", str(matrix.iperf3.streams)]
    if matrix.iperf3.congestion:
        args += ["--congestion", matrix.iperf3.congestion]
    if matrix.iperf3.length:
        args += ["--length", matrix.iperf3.length]
    args += ["--sample-dev", tap, "--timeout", _ms(cell.duration_s + cell_grace)]
    return args


def stream_call_timeout(cell: Cell, cell_grace: float) -> float:
    """The bound on the whole agent `stream` call (SSH, Python start-up, iperf3, counters)."""
    return cell.duration_s + cell_grace + AGENT_SLACK_S


def _identity(cell: Cell) -> dict[str, Any]:
    return {
        "cell": cell.id,
        "kernel": cell.kernel,
        "backend": cell.backend,
        "txqueuelen": cell.txqueuelen,
        "rtt_ms": cell.rtt_ms,
        "repeat": cell.repeat,
    }


def _host_bits(host_facts: Mapping[str, Any] | None, cell: Cell) -> dict[str, Any]:
    f = host_facts or {}
    return {
        "accel": GUEST_ACCEL if f else None,
        "host_accel": f.get("accel"),
        "kernel_recipe": f.get("kernel_recipe") or cell.kernel,
        "kernel_release": f.get("kernel_release"),
    }


def cell_result_from_stream(
    cell: Cell,
    reply: Mapping[str, Any],
    *,
    host_facts: Mapping[str, Any] | None,
    started_at: str | None,
    finished_at: str | None,
    commands: Sequence[Sequence[str]] = (),
) -> CellResult:
    """A CellResult from the agent's `stream` reply (its "fields", "argv", "iperf3").

    The iperf3 argv the agent ran is appended to `commands`. A reply without a
    throughput is an error result: the cell measured nothing usable.
    """
    fields = reply.get("fields")
    if not isinstance(fields, Mapping):
        fields = {}
    measured = {k: fields[k] for k in MEASURED_KEYS if k in fields}
    extra = {k: v for k, v in fields.items() if k not in STABLE_KEYS}
    iperf3 = reply.get("iperf3") if isinstance(reply.get("iperf3"), Mapping) else {}
    seconds = iperf3.get("seconds") if isinstance(iperf3, Mapping) else None
    cmds = [list(c) for c in commands]
    if isinstance(reply.get("argv"), list):
        cmds.append([str(a) for a in reply["argv"]])
    status, error = STATUS_OK, None
    if measured.get("throughput_mbps") is None:
        status, error = STATUS_ERROR, "iperf3 reported no throughput"
    return CellResult(
        **_identity(cell),
        status=status,
        error=error,
        **measured,
        **_host_bits(host_facts, cell),
        duration_s=float(seconds) if isinstance(seconds, int | float) and seconds > 0 else float(cell.duration_s),
        started_at=started_at,
        finished_at=finished_at,
        commands=cmds,
        console_log=None,
        extra=extra,
    )


def error_result(
    cell: Cell,
    error: str,
    *,
    host_facts: Mapping[str, Any] | None,
    started_at: str | None,
    finished_at: str | None,
    commands: Sequence[Sequence[str]] = (),
    console_log: str | None = None,
) -> CellResult:
    """The result of a cell that failed: status "error", no measurements."""
    return CellResult(
        **_identity(cell),
        status=STATUS_ERROR,
        error=error,
        **_host_bits(host_facts, cell),
        duration_s=None,
        started_at=started_at,
        finished_at=finished_at,
        commands=[list(c) for c in commands],
        console_log=console_log,
    )


def describe_error(exc: BaseException, stage: str) -> str:
    """One line for results.jsonl: the stage and the error (the exception's type unless it is a LabError)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " | ".join(lines[:4]) or type(exc).__name__
    if not isinstance(exc, LabError):
        text = f"{type(exc).__name__}: {text}"
    return f"{stage}: {text}"


def needs_host_boot(kernel: str, running_kernel: str | None) -> bool:
    """A cell needs a lab host boot when no host runs its kernel recipe."""
    return running_kernel != kernel


def needs_guest_boot(backend: str, running_backend: str | None, host_booted: bool) -> bool:
    """A cell needs a guest boot when the host was (re)booted or the guest has another backend (or none)."""
    return host_booted or running_backend != backend


@dataclass(frozen=True)
class Transition:
    """What has to happen before a cell can run."""

    cell: str
    boot_host: bool
    boot_guest: bool


def plan_transitions(
    cells: Iterable[Cell], running_kernel: str | None = None, running_backend: str | None = None
) -> list[Transition]:
    """The host and guest boots a sequence of cells needs, assuming every cell keeps its guest healthy.

    `running_kernel`/`running_backend`: what runs before the first cell (None: nothing).
    """
    out: list[Transition] = []
    kernel = running_kernel
    backend = running_backend if running_kernel is not None else None  # no host, no guest
    for c in cells:
        boot_host = needs_host_boot(c.kernel, kernel)
        boot_guest = needs_guest_boot(c.backend, backend, boot_host)
        out.append(Transition(c.id, boot_host, boot_guest))
        kernel, backend = c.kernel, c.backend
    return out


def boot_counts(cells: Iterable[Cell], running_kernel: str | None = None, running_backend: str | None = None) -> tuple[int, int]:
    """(lab host boots, guest boots) for running `cells` in order."""
    ts = plan_transitions(cells, running_kernel, running_backend)
    return sum(t.boot_host for t in ts), sum(t.boot_guest for t in ts)


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
    """Where a session's time went, in seconds; boots and builds are counted separately."""

    traffic_s: float = 0.0  # sum of the cells' iperf3 durations
    boots_s: float = 0.0  # lab host and guest boots (power on -> SSH answers)
    builds_s: float = 0.0  # artifact look-ups/builds (kernels, image): minutes once, ~0 when cached
    host_boots: int = 0
    guest_boots: int = 0
    cells_run: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in d.items()}


class MatrixRunner:
    """Runs the cells of one (profile-applied) matrix into one run store.

    State is only what the transitions need: the running lab host and its
    kernel recipe, the running guest and its backend, what is on the guest's
    eth0, and the boots that failed (so a broken kernel fails its cells fast
    instead of timing out once per cell).
    """

    def __init__(self, ctx: LabContext, spec: MatrixSpec, store: RunStore, progress: Progress = quiet) -> None:
        cfg = ctx.cfg
        self.ctx = ctx
        self.spec = spec
        self.store = store
        self.progress = progress
        self.host_spec = cfg.hosts[spec.host]
        self.guest_spec = cfg.guests[spec.guest]
        if self.host_spec.provider != "nested" and len(set(spec.kernels)) > 1:
            raise LabError(
                f"matrix {spec.name}: host {spec.host} is a {self.host_spec.provider!r} host, which cannot switch "
                f"kernels, but the matrix compares {len(set(spec.kernels))} ({', '.join(spec.kernels)})",
                hint=f'use a nested host for matrices.{spec.name}.host, or a profile with one kernel',
            )
        self.meta: RunMeta = store.read_meta()
        self.timing = Timing()
        self.host: Host | None = None
        self.host_kernel: str | None = None
        self.host_facts: dict[str, Any] | None = None
        self.guest: RunningGuest | None = None
        self.guest_backend: str | None = None
        self.gone: str | None = None  # why the lab host is gone; set once, then every cell refuses
        self._made_host = False  # the runner booted the host (close() destroys only what it made)
        self._guest_netem = False  # a netem qdisc is on the guest's eth0 (netem_split)
        self._guest_runner: Any = None
        self._base_plan: GuestPlan | None = None
        self._failed_boots: dict[tuple[str, ...], list[str]] = {}
        self.session_id = uuid.uuid4().hex[:12]  # names this session's entry in meta.json

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[Cell]:
        """Every cell of the matrix, in run order."""
        return expand(self.spec)

    def pending(self) -> list[Cell]:
        """The plan minus the cells whose latest attempt in the store is ok (what --resume runs)."""
        done = self.store.completed_ids()
        return [c for c in self.plan() if c.id not in done]

    def cell(self, cell_id: str) -> Cell:
        """A planned cell by id (KeyError when the matrix has no such cell)."""
        for c in self.plan():
            if c.id == cell_id:
                return c
        raise KeyError(cell_id)

    # ------------------------------------------------------------------ one cell
    def run_cell(self, cell: Cell) -> CellResult:
        """Run one cell and append its result to the store; returns it.

        Raises HostGone (after recording the cell's error) when the lab host is lost.
        """
        if self.gone is not None:
            raise HostGone(f"not run: the lab host is gone ({self.gone})")
        started, t0 = now_iso(), time.monotonic()
        commands: list[list[str]] = []
        stage = "artifacts"
        try:
            self._ensure_artifacts(cell.kernel)
            stage = "lab host boot"
            host = self._ensure_host(cell.kernel)
            stage = "guest boot"
            guest = self._ensure_guest(cell.backend, cell.txqueuelen)
            stage = "cell"
            reply = self._measure(cell, host, guest, commands)
            result = cell_result_from_stream(
                cell, reply, host_facts=self.host_facts, started_at=started, finished_at=now_iso(), commands=commands
            )
        except Exception as exc:
            message = describe_error(exc, stage)
            console = self._save_console(cell, stage)
            result = error_result(
                cell,
                message,
                host_facts=self.host_facts,
                started_at=started,
                finished_at=now_iso(),
                commands=commands,
                console_log=console,
            )
            self.timing.cells_run += 1
            self.store.append(result)
            self.progress(Step(cell.id, f"error: {message}", warning=True))
            self._recover(exc, stage)
            return result
        self.timing.cells_run += 1
        self.timing.traffic_s += result.duration_s or 0.0
        self.store.append(result)
        if not result.ok:
            self._recover(LabError(result.error or "error"), "cell")
        log.info("%s: %s in %.0fs", cell.id, result.status, time.monotonic() - t0)
        return result

    def _measure(self, cell: Cell, host: Host, guest: RunningGuest, commands: list[list[str]]) -> dict[str, Any]:
        cfg = self.ctx.cfg
        tap = guest.plan.tap
        to = cfg.timeouts.command

        def agent(args: list[str], timeout: float) -> dict[str, Any]:
            commands.append([*host.python(), "-m", "lab.onhost.agent", *args])
            return host.agent(args, timeout=timeout)

        tap_delay, guest_delay = netem_delays(cell.rtt_ms, self.spec.netem_split)
        log.info("%s: txqueuelen %d, netem %s ms", cell.id, cell.txqueuelen, _ms(cell.rtt_ms))
        agent(["txqueuelen", "--name", tap, "--value", str(cell.txqueuelen)], to)
        agent(agent_netem_args(tap, tap_delay, self.spec.netem_limit), to)
        if guest_delay is not None or self._guest_netem:
            argv = guest_netem_argv(guest_delay, self.spec.netem_limit)
            commands.append(["ssh", f"root@{guest.plan.guest_ip}", "--", *argv])
            # deleting a netem that is not there fails harmlessly; adding one must work
            self._guest_shell().run(argv, timeout=to, check=guest_delay is not None)
            self._guest_netem = guest_delay is not None
        log.info("%s: iperf3 %ds", cell.id, cell.duration_s)
        args = stream_args(cell, self.spec, guest.plan.guest_ip, tap, cfg.timeouts.cell_grace)
        return agent(args, stream_call_timeout(cell, cfg.timeouts.cell_grace))

    # ------------------------------------------------------------------ transitions
    def _ensure_artifacts(self, kernel: str) -> None:
        """Build (or find in the cache) the kernel and the guest's image before any VM waits for them."""
        if self.host is not None and not needs_host_boot(kernel, self.host_kernel):
            return
        key = ("artifacts", kernel)
        self._refuse_if_failed(key, f"the artifacts for kernel {kernel}", "be built")
        t0 = time.monotonic()
        try:
            if self.host_spec.provider == "nested":
                lifecycle.kernel_boot(self.ctx, kernel, self.progress)
            self._guest_plan()
        except Exception as exc:
            self._note_failure(key, exc)
            raise
        finally:
            self.timing.builds_s += time.monotonic() - t0

    def _note_failure(self, key: tuple[str, ...], exc: BaseException) -> None:
        self._failed_boots.setdefault(key, []).append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _ensure_host(self, kernel: str) -> Host:
        if self.host is not None and not needs_host_boot(kernel, self.host_kernel):
            return self.host
        key = ("host", kernel)
        self._refuse_if_failed(key, f"lab host {self.host_spec.name} on kernel {kernel}")
        # a nested host's reboot takes its guest with it (boot_host destroys the old VM)
        self._drop_guest(destroy=self.host_spec.provider != "nested")
        self.host = self.host_kernel = self.host_facts = None
        try:
            before = self._running_host()
            t0 = time.monotonic()
            self.progress(Step(self.host_spec.name, f"lab host on kernel {kernel}"))
            host = lifecycle.up_host(self.ctx, self.host_spec, kernel=kernel, progress=self.progress)
            rt = getattr(host, "runtime", None)
            # only a nested host is booted by the lab; local and ssh hosts are just connected to
            booted = self.host_spec.provider == "nested" and (
                before is None or (rt is not None and rt.started_at != before)
            )
            self._made_host |= booted
            facts = self._probe_host(host, kernel)  # part of bringing the host up: which kernel really runs
            boot_s = time.monotonic() - t0
        except Exception as exc:
            self._note_failure(key, exc)
            raise
        if booted:
            self.timing.host_boots += 1
            self.timing.boots_s += boot_s
            facts["boot_s"] = round(boot_s, 1)
        self.host, self.host_kernel, self.host_facts = host, kernel, facts
        self.meta.hosts[f"{self.host_spec.name}/{kernel}"] = facts
        self.store.write_meta(self.meta)
        return host

    def _running_host(self) -> float | None:
        """started_at of the matrix host already running (None: none runs), to tell a boot from a reuse."""
        if self.host_spec.provider != "nested":
            return None
        try:
            h = nested.find_host(self.ctx.paths, self.host_spec.name, self.ctx.key.private, self.ctx.cfg.timeouts.command)
        except Exception:
            return None
        return None if h is None else h.runtime.started_at

    def _probe_host(self, host: Host, kernel: str) -> dict[str, Any]:
        """The facts meta.json records about a lab host (RunMeta.hosts["<host>/<kernel>"])."""
        p = host.probe()
        facts: dict[str, Any] = {
            "host": self.host_spec.name,
            "provider": self.host_spec.provider,
            "kernel_recipe": kernel,
            "kernel_release": p.release,
            "accel": p.accel,
            "guest_accel": GUEST_ACCEL,
            "cpu_model": p.cpu_model,
            "nodrop": p.nodrop,
            "modules_match": p.modules_match,
            "probed_at": now_iso(),
        }
        exp = self.ctx.cfg.expectations
        if p.modules_match is False:
            self.progress(Step(f"{self.host_spec.name}/{kernel}", "loaded tun/tap/vhost modules are not the artifact's", warning=True))
        if kernel == exp.nodrop_kernel and p.nodrop is False:
            self.progress(Step(f"{self.host_spec.name}/{kernel}", "the nodrop behaviour is not detected", warning=True))
        self.progress(Step(f"{self.host_spec.name}/{kernel}", f"{p.release}, accel {p.accel}, nodrop {p.nodrop}"))
        return facts

    def _ensure_guest(self, backend: str, txqueuelen: int) -> RunningGuest:
        if self.guest is not None and not needs_guest_boot(backend, self.guest_backend, False):
            return self.guest
        assert self.host is not None and self.host_kernel is not None
        key = ("guest", self.host_kernel, backend)
        self._refuse_if_failed(key, f"guest {self.guest_spec.name} ({backend}) on kernel {self.host_kernel}")
        self._drop_guest(destroy=False)  # boot_guest destroys the old domain, overlay and tap first
        try:
            plan = dataclasses.replace(self._guest_plan(), backend=backend, txqueuelen=txqueuelen or self.guest_spec.net.txqueuelen)
            t0 = time.monotonic()
            guest = guests.boot_guest(
                self.ctx.paths, self.host, plan, self.ctx.key.private, self.ctx.cfg.timeouts.guest_boot, self.progress
            )
        except HostGone:
            raise
        except Exception as exc:
            self._note_failure(key, exc)
            raise
        self.timing.boots_s += time.monotonic() - t0
        self.timing.guest_boots += 1
        self.guest, self.guest_backend = guest, backend
        self._guest_netem = False
        return guest

    def _guest_plan(self) -> GuestPlan:
        # built once per runner (in the artifacts step); backend and txqueuelen vary per boot
        if self._base_plan is None:
            self._base_plan = lifecycle.guest_plan(self.ctx, self.guest_spec, progress=self.progress)
        return self._base_plan

    def _refuse_if_failed(self, key: tuple[str, ...], what: str, verb: str = "boot") -> None:
        failures = self._failed_boots.get(key, [])
        if len(failures) >= MAX_BOOT_ATTEMPTS:
            raise LabError(f"not attempted: {what} failed to {verb} {len(failures)} times in this run ({failures[-1]})")

    def _guest_shell(self) -> Any:
        if self._guest_runner is None:
            assert self.guest is not None
            self._guest_runner = self.guest.runner(timeout=self.ctx.cfg.timeouts.command)
        return self._guest_runner

    # ------------------------------------------------------------------ faults
    def _save_console(self, cell: Cell, stage: str) -> str | None:
        """Copy the relevant console's tail to logs/<cell>.console.log; its path, or None."""
        text: str | None = None
        try:
            if stage == "lab host boot":
                path = self.ctx.paths.host_console(self.host_spec.name)
                if path.exists():
                    text = "\n".join(path.read_text(errors="replace").splitlines()[-CONSOLE_TAIL_LINES:])
            elif stage in ("guest boot", "cell") and self.host is not None:
                text = guests.console_tail(self.host, self.guest_spec.name, CONSOLE_TAIL_LINES)
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

    def _recover(self, exc: BaseException, stage: str) -> None:
        """After a failed cell: stop on a lost host, else leave a guest that works (or none)."""
        if isinstance(exc, HostGone) or self._host_gone():
            self.gone = str(exc).splitlines()[0] if isinstance(exc, HostGone) else f"{self.host_spec.name} stopped answering"
            self._forget_host()
            raise HostGone(f"lab host {self.host_spec.name} is gone: {self.gone}")
        if stage != "cell" or self.guest is None:
            return  # a failed boot cleaned up after itself (boot_guest/boot_host destroy what they started)
        shell = self._guest_shell()
        res = shell.run(["true"], timeout=HEALTH_TIMEOUT_S, check=False)
        if res.rc != 0:
            self.progress(Step(self.guest_spec.name, f"does not answer SSH ({res.stderr.strip()[:80]}); destroying it", warning=True))
            self._drop_guest(destroy=True)
            return
        # a killed or timed-out iperf3 client can leave the server wedged on a stale connection
        shell.run(["pkill", "-x", "iperf3"], timeout=HEALTH_TIMEOUT_S, check=False)
        restart = shell.run(iperf3_server_argv(daemon=True), timeout=HEALTH_TIMEOUT_S, check=False)
        if restart.rc != 0:
            self.progress(Step(self.guest_spec.name, "iperf3 server did not restart; destroying the guest", warning=True))
            self._drop_guest(destroy=True)

    def _host_gone(self) -> bool:
        if self.host is None:
            return False
        if self.host_spec.provider == "nested":
            try:
                if nested.find_host(self.ctx.paths, self.host_spec.name, self.ctx.key.private) is None:
                    return True
            except Exception:
                pass
        try:
            return self.host.run(["true"], timeout=HEALTH_TIMEOUT_S, check=False).rc == 255
        except Exception:
            return True

    def _forget_host(self) -> None:
        """Drop every handle on a lost host without trying to talk to it."""
        if self._guest_runner is not None:
            self._guest_runner.close()
        self._guest_runner = None
        self.guest = self.guest_backend = None
        if self.host is not None:
            self.ctx.hosts.pop(self.host_spec.name, None)
            try:
                self.host.close()
            except Exception:
                pass
        self.host = self.host_kernel = self.host_facts = None

    def _drop_guest(self, destroy: bool) -> None:
        if self._guest_runner is not None:
            self._guest_runner.close()
            self._guest_runner = None
        guest, self.guest, self.guest_backend = self.guest, None, None
        self._guest_netem = False
        if guest is not None and destroy:
            try:
                guests.destroy_guest(self.ctx.paths, guest.host, guest.plan.name, guest.plan.tap)
            except Exception as exc:
                self.progress(Step(guest.plan.name, f"destroy failed: {exc}", warning=True))

    # ------------------------------------------------------------------ the end
    def close(self, keep: bool = False) -> None:
        """Tear down what the runner made (guest, then lab host) unless `keep`. Idempotent."""
        if keep:
            if self._guest_runner is not None:
                self._guest_runner.close()
                self._guest_runner = None
            return
        host_goes = self.host_spec.provider == "nested" and self._made_host
        # destroying a nested host destroys its guests; a guest on a host that stays is destroyed here
        if self.guest is not None and self.gone is None and not host_goes:
            self.progress(Step(self.guest.domain, "destroying guest"))
        self._drop_guest(destroy=self.gone is None and not host_goes)
        if host_goes:
            self.progress(Step(self.ctx.paths.domain_name(self.host_spec.name), "destroying lab host"))
            self._forget_host()
            try:
                nested.destroy_host(self.ctx.paths, self.host_spec.name)
            except Exception as exc:
                self.progress(Step(self.host_spec.name, f"destroy failed: {exc} (fix: lab down)", warning=True))
            self._made_host = False
        self.host = self.host_kernel = self.host_facts = None


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
    stopped: str | None = None  # why the run stopped early (lab host gone, interrupted), None if it ran out
    builds_s: float = 0.0
    overhead: dict[str, Any] = field(default_factory=dict)


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
) -> tuple[MatrixSpec, RunStore]:
    """Create a new run directory for the matrix, or reopen `resume` (a run id, prefix, "latest" or path).

    A resumed run keeps its matrix and, unless `profile` is given, its profile;
    its planned ids become the current plan (a changed lab.toml is noted in meta).
    """
    cfg = ctx.cfg
    argv = list(sys.argv if argv is None else argv)
    if resume is None:
        spec = matrix_spec(cfg, matrix_name, profile)
        planned = [c.id for c in expand(spec)]
        store = RunStore(runs_dir(cfg.workdir) / new_run_id(spec.name))
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
                planned=planned,
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
        raise LabError(
            f"run {meta.run_id} ran profile {meta.profile!r}, not {profile!r}", hint="drop --profile when resuming"
        )
    spec = matrix_spec(cfg, meta.matrix, profile or meta.profile)
    planned = [c.id for c in expand(spec)]
    if planned != meta.planned:
        meta.extra.setdefault("plan_changes", []).append(
            {"at": now_iso(), "added": [c for c in planned if c not in meta.planned],
             "removed": [c for c in meta.planned if c not in planned]}
        )
        meta.planned = planned
    meta.extra.setdefault("resumed", []).append({"at": now_iso(), "argv": argv})
    store.write_meta(meta)
    return spec, store


def finish_run(
    runner: MatrixRunner,
    session_started: float,
    session_started_at: str,
    stopped: str | None = None,
) -> MatrixOutcome:
    """Load the run back from disk, evaluate its properties, and write the session into meta.json.

    meta.extra gets "sessions" (one entry per run_matrix/pytest session, with
    its wall/traffic/boot/build seconds) and their totals "wall_s",
    "traffic_s", "boots_s", "builds_s" plus "overhead" (the target check).
    """
    cfg = runner.ctx.cfg
    meta = runner.meta
    wall = time.monotonic() - session_started
    t = runner.timing
    if t.cells_run or stopped or not meta.extra.get("resumed"):
        meta.finished_at = now_iso()
        sessions = meta.extra.setdefault("sessions", [])
        entry = {"session": runner.session_id, "started_at": session_started_at, "finished_at": meta.finished_at, "argv": list(sys.argv),
                 "wall_s": round(wall, 1), **t.to_dict(), "stopped": stopped}
        # finishing the same session again (pytest: properties, then session end) updates its entry
        if sessions and isinstance(sessions[-1], dict) and sessions[-1].get("session") == runner.session_id:
            sessions[-1] = entry
        else:
            sessions.append(entry)
        totals = {k: round(sum(float(s.get(k) or 0) for s in sessions), 1) for k in ("wall_s", "traffic_s", "boots_s", "builds_s")}
        meta.extra.update(totals)
        meta.extra["overhead"] = overhead(totals["wall_s"], totals["traffic_s"], totals["boots_s"], totals["builds_s"])
        if stopped:
            meta.extra["stopped"] = stopped
        else:
            meta.extra.pop("stopped", None)
        runner.store.write_meta(meta)
    data = runner.store.load()
    props = expect.evaluate(data.summaries(), cfg.expectations, data.host_accel())
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


class _StepPrinter:
    """A sink for boot steps: one line per new step (Step.key), not one per tick ("booting (12s)")."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last: tuple[str, str] | None = None

    def __call__(self, step: Step) -> None:
        from rich.text import Text

        if step.key == self.last and not step.warning:
            return
        self.last = step.key
        log.info("%s", step.text())
        self.console.print(Text(f"{time.strftime('%H:%M:%S')} {step.text()}", style="yellow" if step.warning else "dim"))


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
    console: Console | None = None,
) -> MatrixOutcome:
    """Run (or resume) a matrix end to end: cells, live progress, properties, report, teardown.

    Teardown always happens (also on Ctrl-C): the guest is destroyed, and the
    lab host too unless `keep`. A lost lab host stops the run early; its
    outcome says why (`stopped`) and the report shows what was measured.
    """
    from rich.console import Console

    from lab.verdicts.report import MatrixProgress, render

    console = console or Console()
    session_t0, session_at = time.monotonic(), now_iso()
    spec, store = open_run(ctx, matrix_name, profile, resume)
    runner = MatrixRunner(ctx, spec, store, _StepPrinter(console))
    plan = runner.plan()
    pending = runner.pending()
    pending_ids = {c.id for c in pending}
    done = [c.id for c in plan if c.id not in pending_ids]
    hb, gb = boot_counts(pending)
    console.print(
        f"run [bold]{store.run_dir.name}[/] ({store.run_dir}): {len(pending)} of {len(plan)} cells to run, "
        f"{hb} lab host boot(s), {gb} guest boot(s)",
        highlight=False,
    )
    stopped: str | None = None
    try:
        with MatrixProgress(console, title=spec.name + (f" ({spec.profile})" if spec.profile else "")) as live:
            live.start(len(plan), [c.id for c in plan], completed=done)
            for cell in pending:
                live.cell_started(cell.id)
                try:
                    result = runner.run_cell(cell)
                except HostGone as exc:
                    live.cell_finished(cell.id, STATUS_ERROR)
                    stopped = str(exc)
                    break
                live.cell_finished(cell.id, result.status, result.throughput_mbps)
    except KeyboardInterrupt:
        stopped = "interrupted"
        raise
    finally:
        try:
            runner.close(keep=keep)
        finally:
            outcome = finish_run(runner, session_t0, session_at, stopped)
    render(outcome.run_data, outcome.properties, console, kernels=(ctx.cfg.expectations.stock_kernel, ctx.cfg.expectations.nodrop_kernel))
    console.print(summary_line(outcome), highlight=False)
    if stopped:
        console.print(f"[bold red]run stopped early: {stopped}[/]", highlight=False)
    if stopped or any(not r.ok for r in outcome.run_data.latest()):
        console.print(f"resume with: lab run {spec.name} --resume {store.run_dir.name}", highlight=False)
    if keep:
        console.print("lab host kept running (--keep): `lab down` removes it", highlight=False)
    return outcome
