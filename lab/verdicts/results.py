"""Run results on disk: one directory per run, one JSON line per cell attempt.

Layout (docs/CONTRACTS.md): <workdir>/runs/<run-id>/{meta.json, results.jsonl, logs/}.

results.jsonl is append-only: every attempt of a cell (a first try, a re-run
after --resume) is a new line, and "the result" of a cell is its latest line.
Each line is flushed and fsync'ed as soon as the cell ends, so a crash or a
power cut loses at most the line being written; the loader recognises that
torn last line and ignores it with a warning instead of refusing the file.
A report is always rendered from these files, never from live state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lab.errors import LabError

META_NAME = "meta.json"
RESULTS_NAME = "results.jsonl"
LOCK_NAME = ".lock"  # flock'ed while results.jsonl or meta.json change (several processes share a run)
LOGS_NAME = "logs"
RUNS_DIR = "runs"

STATUS_OK = "ok"
STATUS_ERROR = "error"


def now_iso() -> str:
    """The current time as an ISO 8601 UTC timestamp (seconds), for started_at/finished_at."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _norm_rtt(value: Any) -> Any:
    # 60 and 60.0 must group and print the same; JSON writers differ on this.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# --------------------------------------------------------------------------- cell results


@dataclass(frozen=True, order=True)
class Point:
    """What a cell measures, whatever its kernel and repeat: stock and nodrop are compared per point.

    kind "iperf3" (TCP host -> guest, `streams` flows) or "pktgen" (`threads`
    senders through the qdisc); `queues` the guest NIC's queue pairs; `qdisc`
    the tap's root qdisc ("default": the kernel's own).
    """

    kind: str
    backend: str
    txqueuelen: int
    rtt_ms: float
    streams: int = 1
    queues: int = 1
    qdisc: str = "default"
    threads: int = 0

    def label(self) -> str:
        """Short and stable: "qlen1000", "rtt60", "qlen1000 P8 Q4", "pktgen qlen1000 noqueue T4"."""
        head = f"rtt{self.rtt_ms:g}" if self.rtt_ms else f"qlen{self.txqueuelen}"
        if self.rtt_ms and self.txqueuelen != 1000:
            head += f" q{self.txqueuelen}"
        parts = (["pktgen"] if self.kind == "pktgen" else []) + [head]
        if self.streams != 1:
            parts.append(f"P{self.streams}")
        if self.queues != 1:
            parts.append(f"Q{self.queues}")
        if self.qdisc != "default":
            parts.append(self.qdisc)
        if self.threads:
            parts.append(f"T{self.threads}")
        return " ".join(parts)


@dataclass
class CellResult:
    """One attempt of one matrix cell: exactly the stable keys of results.jsonl.

    Counters are None when they were not measured (not 0: 0 is a measurement).
    Keys a file has that this version does not know are kept in `extra` and
    written back by `to_dict`, so older and newer files load and round-trip.
    """

    cell: str
    kernel: str
    backend: str
    txqueuelen: int
    rtt_ms: float
    repeat: int = 1
    kind: str = "iperf3"
    streams: int = 1
    queues: int = 1
    qdisc: str = "default"
    threads: int = 0
    status: str = STATUS_OK
    error: str | None = None
    throughput_mbps: float | None = None
    retransmits: int | None = None
    host_retrans_segs: int | None = None
    tcp_out_segs: int | None = None
    tap_tx_dropped: int | None = None
    tap_tx_packets: int | None = None
    qdisc_drops: int | None = None
    qdisc_requeues: int | None = None
    qdisc_overlimits: int | None = None
    qdisc_backlog_peak: int | None = None
    measured_rtt_ms: float | None = None
    cpu_sender_pct: float | None = None
    cpu_receiver_pct: float | None = None
    # drops by reason (skb:kfree_skb); ring_drops = FULL_RING, the tap's ptr_ring tail drop
    ring_drops: int | None = None
    drop_reasons: dict[str, int] | None = None
    # per tx queue of a multiqueue tap: the mq root's children (parent, drops, requeues, sent)
    queue_stats: list[dict[str, Any]] | None = None
    # pktgen cells: what the senders sent, what the guest's NIC received
    pktgen_sent: int | None = None
    pktgen_errors: int | None = None
    pktgen_pps: float | None = None
    guest_rx_packets: int | None = None
    guest_rx_pps: float | None = None
    pktgen_lost: int | None = None
    accel: str | None = None
    host_accel: str | None = None
    kernel_recipe: str | None = None
    kernel_release: str | None = None
    duration_s: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    # where and how: the host, its boot (cells of one boot compare without boot-to-boot noise),
    # whose modules ran, the cell's place in run order, attempts and the host crashes they met
    host: str | None = None
    boot_id: str | None = None
    modules_loaded: dict[str, Any] | None = None
    order: int | None = None
    attempts: int = 1
    host_crashes: list[dict[str, Any]] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    console_log: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def point(self) -> Point:
        """The comparison point this cell measured."""
        return Point(self.kind, self.backend, self.txqueuelen, _norm_rtt(self.rtt_ms), self.streams, self.queues, self.qdisc,
                     self.threads)

    @property
    def value(self) -> float | None:
        """The number comparisons use: Mbit/s for iperf3, packets/s the guest received for pktgen.

        Not pktgen's own rate: it counts what the stack took, so a stock ring
        that tail-drops looks fast and a nodrop queue that holds back looks slow.
        """
        return self.guest_rx_pps if self.kind == "pktgen" else self.throughput_mbps

    @property
    def ok(self) -> bool:
        """True when this attempt completed and its numbers can be used."""
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of one results.jsonl line: stable keys first, then unknown keys."""
        out = {k: getattr(self, k) for k in STABLE_KEYS}
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellResult:
        """Build from one parsed line; missing optional keys become None, unknown ones go to `extra`.

        Raises ValueError when an identifying key (cell, kernel, backend,
        txqueuelen, rtt_ms) is missing: such a line cannot be placed in a report.
        """
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED_KEYS if data.get(k) is None]
        if missing:
            raise ValueError(f"missing key(s) {', '.join(missing)}")
        known = {k: data[k] for k in STABLE_KEYS if k in data}
        if known.get("status") is None:
            # An old writer without status: an error text means it failed.
            known["status"] = STATUS_ERROR if data.get("error") else STATUS_OK
        if known.get("repeat") is None:
            known["repeat"] = 1
        for key, default in (("commands", []), ("host_crashes", []), ("attempts", 1), ("kind", "iperf3"), ("streams", 1),
                             ("queues", 1), ("qdisc", "default"), ("threads", 0)):
            if known.get(key) is None:
                known[key] = default
        known["rtt_ms"] = _norm_rtt(known["rtt_ms"])
        extra = {k: v for k, v in data.items() if k not in _STABLE_SET}
        return cls(**known, extra=extra)


STABLE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(CellResult) if f.name != "extra")
_STABLE_SET = frozenset(STABLE_KEYS)
_REQUIRED_KEYS = ("cell", "kernel", "backend", "txqueuelen", "rtt_ms")


# --------------------------------------------------------------------------- run metadata


@dataclass
class RunMeta:
    """What a run was: written once at its start (meta.json), updated when it finishes.

    `hosts` maps a host label (the matrix runner uses "<host>/<kernel recipe>",
    one per lab host it booted) to facts probed on it: kernel_recipe,
    kernel_release, accel ("kvm"|"tcg", the lab host's), guest_accel, cpu_model.
    `duration_s` is the traffic time of one cell (iperf3 -t), `planned` the cell
    ids in plan order: reports and --resume list cells in that order.
    """

    run_id: str
    matrix: str
    profile: str | None = None
    lab_name: str | None = None
    config_path: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    argv: list[str] = field(default_factory=list)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    duration_s: float | None = None
    planned: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The meta.json object; unknown keys read earlier are written back."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunMeta:
        """Build from a parsed meta.json; unknown keys go to `extra`."""
        if not isinstance(data, dict) or not data.get("run_id") or not data.get("matrix"):
            raise ValueError("meta.json needs at least run_id and matrix")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        if "duration_s" not in known and data.get("duration") is not None:
            known["duration_s"] = data["duration"]  # accept the short spelling
        extra = {k: v for k, v in data.items() if k not in names and k != "duration"}
        return cls(**known, extra=extra)

    def wall_time_s(self) -> float | None:
        """Seconds from started_at to finished_at, or None while unfinished/unknown."""
        try:
            a = datetime.fromisoformat(str(self.started_at))
            b = datetime.fromisoformat(str(self.finished_at))
        except (TypeError, ValueError):
            return None
        return (b - a).total_seconds()


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Stat:
    """Summary of one measured quantity over the ok repeats of a cell group (values in run order)."""

    n: int
    median: float
    min: float
    max: float
    sum: float
    values: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: Iterable[float | int | None]) -> Stat | None:
        """Stat over the non-None values, or None when nothing was measured."""
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None
        return cls(n=len(vals), median=statistics.median(vals), min=min(vals), max=max(vals), sum=sum(vals), values=tuple(vals))

    @property
    def cv(self) -> float | None:
        """Coefficient of variation (sample stdev / mean): the noise a reader should see; None below 2 values."""
        if self.n < 2:
            return None
        mean = self.sum / self.n
        return statistics.stdev(self.values) / mean if mean else None


@dataclass(frozen=True)
class CellSummary:
    """All repeats of one (kernel, point), aggregated.

    Statistics are over the ok repeats only (an errored attempt's counters are
    partial); `errors` keeps "<cell id>: <error>" of the errored ones. `boots`
    and `hosts` say where the repeats were measured.
    """

    kernel: str
    point: Point
    cell_ids: tuple[str, ...]
    n_ok: int
    n_error: int
    errors: tuple[str, ...]
    stats: dict[str, Stat]
    accel: tuple[str, ...]
    host_accel: tuple[str, ...]
    boots: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    attempts: int = 0  # over all repeats: > n_ok + n_error when cells were retried
    crashes: int = 0

    def __getattr__(self, name: str) -> Stat | None:
        # s.throughput_mbps, s.tap_tx_dropped, ...: the Stat of that quantity (None: not measured)
        if name in STAT_FIELDS:
            return self.stats.get(name)
        raise AttributeError(name)

    @property
    def backend(self) -> str:
        """The point's backend."""
        return self.point.backend

    @property
    def txqueuelen(self) -> int:
        """The point's txqueuelen."""
        return self.point.txqueuelen

    @property
    def rtt_ms(self) -> float:
        """The point's netem RTT."""
        return self.point.rtt_ms

    @property
    def key(self) -> tuple[str, Point]:
        """(kernel, point)."""
        return (self.kernel, self.point)

    @property
    def value(self) -> Stat | None:
        """What comparisons use: throughput (iperf3) or packets/s the guest received (pktgen; see CellResult.value)."""
        return self.stats.get("guest_rx_pps" if self.point.kind == "pktgen" else "throughput_mbps")

    @property
    def label(self) -> str:
        """Short human name, e.g. "nodrop qlen1", "stock rtt60"."""
        return f"{self.kernel} {self.point.label()}"


STAT_FIELDS = (
    "throughput_mbps",
    "retransmits",
    "host_retrans_segs",
    "tcp_out_segs",
    "tap_tx_dropped",
    "tap_tx_packets",
    "qdisc_drops",
    "qdisc_requeues",
    "qdisc_overlimits",
    "qdisc_backlog_peak",
    "measured_rtt_ms",
    "cpu_sender_pct",
    "cpu_receiver_pct",
    "ring_drops",
    "pktgen_sent",
    "pktgen_errors",
    "pktgen_pps",
    "guest_rx_packets",
    "guest_rx_pps",
    "pktgen_lost",
)


def _latest_by_id(results: Iterable[CellResult]) -> dict[str, CellResult]:
    latest: dict[str, CellResult] = {}
    for r in results:
        latest.pop(r.cell, None)  # re-insert: dict order becomes "order of latest attempt"
        latest[r.cell] = r
    return latest


def aggregate(results: Iterable[CellResult]) -> list[CellSummary]:
    """Group cell results per (kernel, point) and summarise repeats.

    Only the latest attempt of each cell id counts (an error followed by a
    successful --resume re-run is one ok cell, not one ok and one error).
    Groups come out in the order their first cell appears in `results`; the
    values of a Stat are in run order (the `order` field when cells have one).
    """
    results = list(results)
    first_seen: dict[str, int] = {}
    for i, r in enumerate(results):
        first_seen.setdefault(r.cell, i)
    latest = sorted(_latest_by_id(results).values(), key=lambda r: first_seen[r.cell])

    groups: dict[tuple[Any, ...], list[CellResult]] = {}
    for r in latest:
        groups.setdefault((r.kernel, r.point), []).append(r)

    out: list[CellSummary] = []
    for (kernel, point), rs in groups.items():
        ok = sorted((r for r in rs if r.ok), key=lambda r: (r.order is None, r.order or 0))
        bad = [r for r in rs if not r.ok]
        stats = {name: st for name in STAT_FIELDS if (st := Stat.of(getattr(r, name) for r in ok)) is not None}
        out.append(
            CellSummary(
                kernel=kernel,
                point=point,
                cell_ids=tuple(r.cell for r in rs),
                n_ok=len(ok),
                n_error=len(bad),
                errors=tuple(f"{r.cell}: {r.error or r.status}" for r in bad),
                stats=stats,
                accel=tuple(sorted({r.accel for r in ok if r.accel})),
                host_accel=tuple(sorted({r.host_accel for r in ok if r.host_accel})),
                boots=tuple(dict.fromkeys(r.boot_id for r in ok if r.boot_id)),
                hosts=tuple(dict.fromkeys(r.host for r in ok if r.host)),
                attempts=sum(r.attempts for r in rs),
                crashes=sum(len(r.host_crashes) for r in rs),
            )
        )
    return out


# --------------------------------------------------------------------------- loaded runs


@dataclass
class RunData:
    """A run as read from disk: its meta, every attempt in file order, loader warnings."""

    meta: RunMeta
    results: list[CellResult]
    warnings: list[str] = field(default_factory=list)
    run_dir: Path | None = None

    def latest(self) -> list[CellResult]:
        """The latest attempt of each cell, in plan order (unplanned cells last, as first seen)."""
        latest = _latest_by_id(self.results)
        rank = {cid: i for i, cid in enumerate(self.meta.planned)}
        first_seen: dict[str, int] = {}
        for i, r in enumerate(self.results):
            first_seen.setdefault(r.cell, i)
        return sorted(
            latest.values(),
            key=lambda r: (0, rank[r.cell]) if r.cell in rank else (1, first_seen[r.cell]),
        )

    def completed_ids(self) -> set[str]:
        """Cells whose latest attempt is ok: --resume skips these and re-runs the rest."""
        return {r.cell for r in self.latest() if r.ok}

    def missing_ids(self) -> list[str]:
        """Planned cells with no attempt at all, in plan order."""
        seen = {r.cell for r in self.results}
        return [c for c in self.meta.planned if c not in seen]

    def summaries(self) -> list[CellSummary]:
        """aggregate() over the latest attempts, in plan order."""
        return aggregate(self.latest())

    def host_accel(self) -> str | None:
        """The lab hosts' accelerator: "tcg" if any was emulated, else "kvm", None if unknown.

        Any TCG host makes absolute throughput meaningless for the whole run.
        """
        seen = {r.host_accel for r in self.results if r.host_accel}
        seen |= {str(h["accel"]) for h in self.meta.hosts.values() if isinstance(h, dict) and h.get("accel")}
        if "tcg" in seen:
            return "tcg"
        return "kvm" if "kvm" in seen else (min(seen) if seen else None)


# --------------------------------------------------------------------------- the store


def _atomic_write_text(path: Path, text: str) -> None:
    # tmp + fsync + os.replace: a reader never sees a half-written meta.json.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class RunStore:
    """Reads and writes one run directory (meta.json, results.jsonl, logs/)."""

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        # Cells on several hosts finish at once: threads of one process (this lock)
        # and processes sharing the run directory (pytest-xdist workers, one per
        # host: flock on <run>/.lock, see `locked`) must not interleave the
        # torn-line check and the write, or a read-modify-write of meta.json.
        self._append_lock = threading.RLock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock: this process's threads and every other process using the run directory.

        flock(2) on <run>/.lock; re-entrant within one thread of one process
        (an update_meta inside an append block does not deadlock).
        """
        with self._append_lock:
            depth = getattr(self, "_lock_depth", 0)
            if depth:
                self._lock_depth = depth + 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def update_meta(self, change: Callable[[RunMeta], None]) -> RunMeta:
        """Read meta.json, apply `change` to it, write it back, all under the run's lock; returns the new meta.

        What several processes of one run write into meta.json goes through
        here, so no process overwrites another's keys with its stale copy.
        """
        with self.locked():
            meta = self.read_meta()
            change(meta)
            self.write_meta(meta)
            return meta

    @property
    def meta_path(self) -> Path:
        """<run>/meta.json"""
        return self.run_dir / META_NAME

    @property
    def results_path(self) -> Path:
        """<run>/results.jsonl"""
        return self.run_dir / RESULTS_NAME

    @property
    def logs_dir(self) -> Path:
        """<run>/logs/ (console logs, command transcripts)."""
        return self.run_dir / LOGS_NAME

    def create(self, meta: RunMeta) -> None:
        """Make the run directory and write meta.json; refuses to overwrite an existing run."""
        if self.meta_path.exists():
            raise LabError(f"run directory {self.run_dir} already holds a run", hint="choose a new run id")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.write_meta(meta)
        self.results_path.touch()  # an empty run is a valid run: load() need not warn

    def write_meta(self, meta: RunMeta) -> None:
        """Replace meta.json atomically (e.g. to set finished_at at the end of a run)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.meta_path, json.dumps(meta.to_dict(), indent=2, sort_keys=False) + "\n")

    def read_meta(self) -> RunMeta:
        """Parse meta.json; LabError naming the file when absent or unreadable."""
        try:
            data = json.loads(self.meta_path.read_text(encoding="utf-8"))
            return RunMeta.from_dict(data)
        except FileNotFoundError:
            raise LabError(f"{self.meta_path}: no such file: not a run directory") from None
        except (ValueError, TypeError) as e:
            raise LabError(f"{self.meta_path}: unreadable: {e}") from None

    def append(self, result: CellResult) -> None:
        """Append one attempt as one JSON line, flushed and fsync'ed before returning.

        If an earlier crash left a torn last line (no trailing newline), a
        newline is written first so the new line stays whole and parseable; the
        torn fragment is then skipped by load() with a warning.
        """
        line = (json.dumps(result.to_dict(), separators=(",", ":"), default=str) + "\n").encode("utf-8")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.locked(), open(self.results_path, "ab", buffering=0) as f:
            if f.seek(0, os.SEEK_END) > 0:
                with open(self.results_path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        line = b"\n" + line
            view = memoryview(line)
            while view:  # unbuffered: a short write is possible in principle, so loop
                view = view[f.write(view) :]
            os.fsync(f.fileno())

    def load(self) -> RunData:
        """Read meta.json and every parseable line of results.jsonl.

        A torn last line is ignored and a corrupt line elsewhere skipped, each
        with a warning "<file>:<line>: ..."; neither makes the run unreadable.
        """
        meta = self.read_meta()
        warnings: list[str] = []
        results: list[CellResult] = []
        try:
            raw = self.results_path.read_bytes()
        except FileNotFoundError:
            raw = b""
            warnings.append(f"{self.results_path}: no results file (the run recorded no cell yet)")
        lines = raw.split(b"\n")
        # split() leaves "" after a final newline; anything else there is a line with no newline.
        torn_candidate = len(lines) if lines[-1].strip() else None
        for n, bline in enumerate(lines, start=1):
            if not bline.strip():
                continue
            text = bline.decode("utf-8", errors="replace")
            try:
                results.append(CellResult.from_dict(json.loads(text)))
            except (ValueError, TypeError) as e:
                if n == torn_candidate:
                    warnings.append(f"{self.results_path}:{n}: torn last line ignored (interrupted while writing?)")
                else:
                    warnings.append(f"{self.results_path}:{n}: corrupt line skipped ({_short(e)})")
        return RunData(meta=meta, results=results, warnings=warnings, run_dir=self.run_dir)

    def completed_ids(self) -> set[str]:
        """Shortcut for load().completed_ids() (what --resume skips)."""
        return self.load().completed_ids()


def _short(e: Exception, limit: int = 80) -> str:
    s = str(e)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------- naming runs


def new_run_id(matrix: str, when: datetime | None = None) -> str:
    """A run id "YYYYmmdd-HHMMSS-<matrix>" (local time); ids sort by start time."""
    when = when or datetime.now()
    return f"{when:%Y%m%d-%H%M%S}-{matrix}"


def runs_dir(workdir: Path | str) -> Path:
    """<workdir>/runs"""
    return Path(workdir).expanduser() / RUNS_DIR


def list_runs(workdir: Path | str) -> list[str]:
    """Run ids under <workdir>/runs, oldest first (a run is a directory with meta.json)."""
    d = runs_dir(workdir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / META_NAME).is_file())


def resolve_run(workdir: Path | str, name_or_path: str | Path) -> Path:
    """The run directory meant by a run id, a unique id prefix, "latest", or a path.

    A path may be the run directory or a file in it (meta.json, results.jsonl).
    Raises LabError listing the available runs when nothing matches.
    """
    name = str(name_or_path)
    available = list_runs(workdir)
    if name == "latest":
        if available:
            return runs_dir(workdir) / available[-1]
        raise LabError(f"no runs in {runs_dir(workdir)} yet", hint="lab run <matrix>")
    p = Path(name).expanduser()
    if p.name in (META_NAME, RESULTS_NAME) and (p.parent / META_NAME).is_file():
        p = p.parent
    if (p / META_NAME).is_file():
        return p
    if name in available:
        return runs_dir(workdir) / name
    prefixed = [r for r in available if r.startswith(name)]
    if len(prefixed) == 1:
        return runs_dir(workdir) / prefixed[0]
    shown = available[-10:]
    listing = ", ".join(shown) if shown else "none"
    more = f" (and {len(available) - len(shown)} older)" if len(available) > len(shown) else ""
    what = "ambiguous run" if len(prefixed) > 1 else "no run"
    raise LabError(
        f"{what} {name!r} in {runs_dir(workdir)}; available: {listing}{more}",
        hint="pass a run id from that list, `latest`, or a run directory path",
    )


def load_run(workdir: Path | str, name_or_path: str | Path) -> RunData:
    """resolve_run() then RunStore.load(): what `lab report` starts with."""
    return RunStore(resolve_run(workdir, name_or_path)).load()
