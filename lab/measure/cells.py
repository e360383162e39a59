"""Matrix cells, and the order they run in. Pure logic, no I/O.

A cell is one measurement: an arm (the kernel under test, by the name its
results carry) with a backend, a guest NIC (queues), a root qdisc on the tap,
a txqueuelen, a netem RTT, a number of iperf3 streams, or a pktgen run with N
senders, and its repeat number. Its `id` is what results.jsonl records and
what a resumed run matches against, so its spelling is part of the result
format; axes at their defaults are not spelled, so the ids of a plain run stay
what they always were:

    [pktgen-]<backend>-qlen<q>-rtt<ms>[-P<streams>][-Q<queues>][-D<qdisc>][-T<senders>]-<kernel>[-r<n>]

e.g. "vhost-qlen1-rtt0-nodrop", "tap-qlen1000-rtt60-stock-r2",
"vhost-qlen1000-rtt0-P8-Q4-nodrop-optin-r3", "pktgen-vhost-qlen1000-rtt0-Dnoqueue-T4-stock".
Markers are upper case and kernel names start lower case, so an id always
parses back. The "-r<n>" suffix appears only when the matrix repeats cells.

`schedule` puts cells in run order: arms that share a lab host boot alternate
in blocks (ABBA... by default, or a seeded shuffle) so that drift in the
machine's load falls on every arm alike, and each block's cells run in a
seeded random order.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from lab.config import AMBIGUOUS_KERNEL, BACKENDS, MatrixSpec
from lab.verdicts.results import Point

KINDS = ("iperf3", "pktgen")
_KERNEL_NAME = re.compile(r"[a-z][a-z0-9_.-]*\Z")

_CELL_ID = re.compile(
    r"(?:(?P<kind>pktgen)-)?"
    r"(?P<backend>tap|vhost)"
    r"-qlen(?P<txqueuelen>[0-9]+)"
    r"-rtt(?P<rtt>[0-9]+(?:\.[0-9]+)?)"
    r"(?:-P(?P<streams>[1-9][0-9]*))?"
    r"(?:-Q(?P<queues>[1-9][0-9]*))?"
    r"(?:-D(?P<qdisc>[a-z_]+))?"
    r"(?:-T(?P<threads>[1-9][0-9]*))?"
    # non-greedy, so a trailing "-r<n>" goes to the repeat group, not the kernel
    r"-(?P<kernel>[a-z][a-z0-9_.-]*?)"
    r"(?:-r(?P<repeat>[1-9][0-9]*))?"
    r"\Z"
)


def format_rtt(rtt_ms: float) -> str:
    """Spell an RTT for a cell id: 60.0 -> "60", 0.5 -> "0.5", never "1e-05"."""
    if not math.isfinite(rtt_ms) or rtt_ms < 0:
        raise ValueError(f"rtt_ms must be finite and >= 0, got {rtt_ms!r}")
    if rtt_ms == int(rtt_ms):
        return str(int(rtt_ms))
    # repr() is the shortest string that round-trips; Decimal drops the exponent
    return format(Decimal(repr(float(rtt_ms))), "f")


@dataclass(frozen=True)
class Arm:
    """A kernel under comparison: `name` is what cells and results call it, `recipe` the lab.toml recipe.

    They differ only in an A/A control, where two arms run the same recipe.
    """

    name: str
    recipe: str


@dataclass(frozen=True)
class Cell:
    """One measurement (see the module doc)."""

    matrix: str
    kernel: str  # the arm's name
    backend: str
    txqueuelen: int
    rtt_ms: float
    repeat: int
    repeats: int
    duration_s: int
    recipe: str = ""  # the arm's recipe; "" = the same as `kernel`
    streams: int = 1
    queues: int = 1
    qdisc: str = "default"
    kind: str = "iperf3"
    threads: int = 0  # pktgen senders (pktgen cells only)

    def __post_init__(self) -> None:
        # Cells come from a validated MatrixSpec; these catch programming errors
        # (a hand-built Cell whose id would not parse back).
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not _KERNEL_NAME.match(self.kernel) or AMBIGUOUS_KERNEL.fullmatch(self.kernel):
            raise ValueError(f"kernel name {self.kernel!r} cannot be spelled in a cell id")
        for name in ("txqueuelen", "streams", "queues", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if (self.kind == "pktgen") != (self.threads > 0):
            raise ValueError("pktgen cells, and only they, have threads > 0")
        if not re.fullmatch(r"[a-z_]+", self.qdisc):
            raise ValueError(f"qdisc {self.qdisc!r} cannot be spelled in a cell id")
        format_rtt(self.rtt_ms)  # raises on negative / non-finite
        if not 1 <= self.repeat <= self.repeats:
            raise ValueError(f"repeat must be in 1..{self.repeats}, got {self.repeat}")

    @property
    def recipe_name(self) -> str:
        """The lab.toml kernel recipe this cell's lab host runs."""
        return self.recipe or self.kernel

    @property
    def id(self) -> str:
        """The stable cell id (see the module doc)."""
        parts = ["pktgen"] if self.kind == "pktgen" else []
        parts += [self.backend, f"qlen{self.txqueuelen}", f"rtt{format_rtt(self.rtt_ms)}"]
        if self.streams != 1:
            parts.append(f"P{self.streams}")
        if self.queues != 1:
            parts.append(f"Q{self.queues}")
        if self.qdisc != "default":
            parts.append(f"D{self.qdisc}")
        if self.threads:
            parts.append(f"T{self.threads}")
        parts.append(self.kernel)
        base = "-".join(parts)
        return f"{base}-r{self.repeat}" if self.repeats > 1 else base

    @property
    def point(self) -> Point:
        """What this cell measures, whatever the kernel and repeat: comparisons are made per point."""
        return Point(self.kind, self.backend, self.txqueuelen, self.rtt_ms, self.streams, self.queues, self.qdisc, self.threads)

    @property
    def guest_config(self) -> tuple[str, int]:
        """(backend, queues): cells sharing it can share one guest boot."""
        return (self.backend, self.queues)


def parse_cell_id(cell_id: str) -> dict[str, object]:
    """Split a cell id back into its parts (the inverse of `Cell.id`).

    Returns kind, backend, txqueuelen, rtt_ms, streams, queues, qdisc, threads,
    kernel and repeat (1 when the id has no "-r<n>"). ValueError on a malformed id.
    """
    m = _CELL_ID.match(cell_id)
    # "-r0"/"-r01" are not repeat suffixes, and no kernel may end like one
    if m is None or AMBIGUOUS_KERNEL.fullmatch(m["kernel"]):
        raise ValueError(
            f"not a cell id: {cell_id!r} "
            "(expected [pktgen-]<tap|vhost>-qlen<n>-rtt<ms>[-P<n>][-Q<n>][-D<qdisc>][-T<n>]-<kernel>[-r<n>])"
        )
    return {
        "kind": m["kind"] or "iperf3",
        "backend": m["backend"],
        "txqueuelen": int(m["txqueuelen"]),
        "rtt_ms": float(m["rtt"]),
        "streams": int(m["streams"] or 1),
        "queues": int(m["queues"] or 1),
        "qdisc": m["qdisc"] or "default",
        "threads": int(m["threads"] or 0),
        "kernel": m["kernel"],
        "repeat": int(m["repeat"]) if m["repeat"] else 1,
    }


def arms_of(spec: MatrixSpec, aa: bool = False) -> list[Arm]:
    """The matrix's arms: one per kernel; with `aa` (or the matrix's own `aa`), the first kernel against a copy of itself."""
    kernels = list(dict.fromkeys(spec.kernels))
    if aa or spec.aa:
        base = kernels[0]
        return [Arm(base, base), Arm(f"{base}-aa", base)]
    return [Arm(k, k) for k in kernels]


def _points(spec: MatrixSpec) -> list[tuple[int, float]]:
    """(txqueuelen, rtt_ms) of one group, in order, without duplicates: txqueuelens at RTT 0, then the RTTs."""
    points = [(q, 0.0) for q in spec.txqueuelens]
    points += [(spec.rtt_txqueuelen, float(r)) for r in spec.rtts_ms]
    return list(dict.fromkeys(points))  # dict keeps first-seen order


def expand(spec: MatrixSpec, arms: Sequence[Arm] | None = None) -> list[Cell]:
    """Every cell of the matrix, in canonical order (the plan's ids; `schedule` gives the run order).

    For each arm, backend and queue count: the iperf3 points (qdiscs and
    streams apply at RTT 0; an RTT cell's root qdisc is netem itself), then the
    pktgen cells (one per qdisc and sender count, at each RTT-0 txqueuelen),
    each repeated `repeats` times.
    """
    arms = list(arms) if arms is not None else arms_of(spec)
    cells: list[Cell] = []
    for arm in arms:
        for backend in dict.fromkeys(spec.backends):
            for queues in dict.fromkeys(spec.queues):
                variants: list[dict[str, object]] = []
                for txqueuelen, rtt_ms in _points(spec):
                    qdiscs = spec.qdiscs if rtt_ms == 0 else ("default",)
                    for qdisc in dict.fromkeys(qdiscs):
                        for streams in dict.fromkeys(spec.streams):
                            variants.append({"txqueuelen": txqueuelen, "rtt_ms": rtt_ms, "qdisc": qdisc, "streams": streams})
                for threads in dict.fromkeys(spec.pktgen_threads):
                    for txqueuelen in dict.fromkeys(spec.txqueuelens):
                        for qdisc in dict.fromkeys(spec.qdiscs):
                            variants.append({"txqueuelen": txqueuelen, "rtt_ms": 0.0, "qdisc": qdisc, "streams": 1,
                                             "kind": "pktgen", "threads": threads})
                for v in variants:
                    for repeat in range(1, spec.repeats + 1):
                        cells.append(
                            Cell(matrix=spec.name, kernel=arm.name, recipe="" if arm.recipe == arm.name else arm.recipe,
                                 backend=backend, queues=queues, repeat=repeat, repeats=spec.repeats,
                                 duration_s=spec.duration_s, **v)  # type: ignore[arg-type]
                        )
    return cells


def schedule(
    cells: Iterable[Cell],
    boot_key: Callable[[str], str],
    order: str = "abba",
    seed: int = 1,
) -> list[Cell]:
    """`cells` in run order (see the module doc).

    `boot_key(recipe)` says which recipes can share one lab host boot
    (lab.session.boot_key). Per boot group and guest config (backend, queues),
    round r runs repeat r of every arm, one block per arm; under "abba" the arm
    order flips every round (A B, B A, A B, ...: adjacent blocks of one arm
    need no module swap between them; the flipping runs on into the next guest
    config), under "shuffle" it is a seeded shuffle.
    Inside a block the cells run in a seeded random order.
    """
    rng = random.Random(seed)
    cells = list(cells)
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(boot_key(c.recipe_name), []).append(c)
    out: list[Cell] = []
    for members in groups.values():
        arms = list(dict.fromkeys(c.kernel for c in members))
        configs = list(dict.fromkeys(c.guest_config for c in members))
        repeats = max(c.repeats for c in members)
        phase = 0  # the ABBA phase runs on across guest configs, so the next config starts with the arm loaded now
        for config in configs:
            for r in range(1, repeats + 1):
                phase += 1
                if order == "shuffle":
                    arm_order = list(arms)
                    rng.shuffle(arm_order)
                else:
                    arm_order = arms if phase % 2 == 1 else list(reversed(arms))
                for arm in arm_order:
                    block = [c for c in members if c.kernel == arm and c.guest_config == config and c.repeat == r]
                    rng.shuffle(block)
                    out.extend(block)
    assert len(out) == len(cells), "schedule lost or duplicated cells"
    return out


def swaps_and_boots(cells: Sequence[Cell], boot_key: Callable[[str], str]) -> dict[str, int]:
    """How many lab host boots, module swaps and guest boots running `cells` in order needs (nothing running before).

    A change of arm inside one boot is a swap even when both arms run one recipe
    (an A/A control goes through the same machinery as a real comparison).
    """
    boots = swaps = guests = 0
    key = arm = config = None
    for c in cells:
        k = boot_key(c.recipe_name)
        new_guest = False
        if k != key:
            boots += 1
            key, arm, new_guest = k, c.kernel, True
        elif c.kernel != arm:
            swaps += 1
            arm, new_guest = c.kernel, True
        if new_guest or c.guest_config != config:
            guests += 1
            config = c.guest_config
    return {"host_boots": boots, "module_swaps": swaps, "guest_boots": guests}


def assign_hosts(cells: Sequence[Cell], hosts: Sequence[str]) -> dict[str, str]:
    """Which host measures each cell (cell id -> host), for a run spread over `hosts`.

    Every arm and repeat of one point go to one host, so each comparison
    (same point, other arm) is made between cells of one host, never across
    hosts (lab.verdicts.stats refuses those). The unit handed out is a guest
    config (backend, queues) with all its points, so the within-kernel
    properties (txqueuelen 1 against 1000 of one backend) stay on one host too
    and a host boots as few guest configs as it can; only when there are fewer
    guest configs than hosts are configs split, point by point. Units are cut
    into contiguous runs of about equal cell counts, one run per host, in run
    order. Deterministic: the same plan and hosts always give the same map.
    """
    hosts = list(dict.fromkeys(hosts))
    if not hosts:
        raise ValueError("assign_hosts needs at least one host")
    units: dict[object, list[Cell]] = {}
    for c in cells:
        units.setdefault(c.guest_config, []).append(c)
    if len(units) < len(hosts):
        configs = list(units)
        units = {}
        for c in sorted(cells, key=lambda c: configs.index(c.guest_config)):  # sorted() is stable: run order inside
            units.setdefault(c.point, []).append(c)
    total = sum(len(v) for v in units.values())
    out: dict[str, str] = {}
    done = 0
    h = 0
    for members in units.values():
        # the next host once this one has its share (the last takes the rest); never skip a host
        if h < len(hosts) - 1 and done >= total * (h + 1) / len(hosts):
            h += 1
        for c in members:
            out[c.id] = hosts[h]
        done += len(members)
    return out
