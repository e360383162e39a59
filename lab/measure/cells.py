"""Matrix cells: one (kernel, backend, txqueuelen, RTT, repeat) measurement point.

Pure logic, no I/O. A cell's `id` is what results.jsonl records and what a
resumed run matches against, so its spelling is part of the result format:

    <backend>-qlen<txqueuelen>-rtt<rtt_ms>-<kernel>[-r<repeat>]

e.g. "vhost-qlen1-rtt0-nodrop", "tap-qlen1000-rtt60-stock-r2". The "-r<n>"
suffix appears only when the matrix repeats cells, so a single-repeat run's
ids stay short and stable.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from lab.config import AMBIGUOUS_KERNEL, BACKENDS, MatrixSpec

_KERNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")

_CELL_ID = re.compile(
    r"(?P<backend>tap|vhost)"
    r"-qlen(?P<txqueuelen>[0-9]+)"
    r"-rtt(?P<rtt>[0-9]+(?:\.[0-9]+)?)"
    # non-greedy, so a trailing "-r<n>" goes to the repeat group, not the kernel
    r"-(?P<kernel>[A-Za-z0-9][A-Za-z0-9_.-]*?)"
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
class Cell:
    """One measurement: a guest on `kernel` with `backend`, its tap at
    `txqueuelen`, netem adding `rtt_ms`, the `repeat`-th of `repeats` runs."""

    matrix: str
    kernel: str
    backend: str
    txqueuelen: int
    rtt_ms: float
    repeat: int
    repeats: int
    duration_s: int

    def __post_init__(self) -> None:
        # Cells come from a validated MatrixSpec; these catch programming errors
        # (a hand-built Cell whose id would not parse back).
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not _KERNEL_NAME.match(self.kernel) or AMBIGUOUS_KERNEL.fullmatch(self.kernel):
            raise ValueError(f"kernel name {self.kernel!r} cannot be spelled in a cell id")
        if isinstance(self.txqueuelen, bool) or not isinstance(self.txqueuelen, int) or self.txqueuelen < 0:
            raise ValueError(f"txqueuelen must be an integer >= 0, got {self.txqueuelen!r}")
        format_rtt(self.rtt_ms)  # raises on negative / non-finite
        if not 1 <= self.repeat <= self.repeats:
            raise ValueError(f"repeat must be in 1..{self.repeats}, got {self.repeat}")

    @property
    def id(self) -> str:
        """The stable cell id, e.g. "vhost-qlen1-rtt0-nodrop" or "...-nodrop-r2"."""
        base = f"{self.backend}-qlen{self.txqueuelen}-rtt{format_rtt(self.rtt_ms)}-{self.kernel}"
        return f"{base}-r{self.repeat}" if self.repeats > 1 else base

    @property
    def group(self) -> tuple[str, str]:
        """(kernel, backend): cells sharing a group share one lab host and guest boot."""
        return (self.kernel, self.backend)


def parse_cell_id(cell_id: str) -> dict[str, object]:
    """Split a cell id back into its parts (the inverse of `Cell.id`).

    Returns {"backend", "txqueuelen", "rtt_ms", "kernel", "repeat"}; repeat is
    1 when the id has no "-r<n>" suffix. Raises ValueError on a malformed id.
    """
    m = _CELL_ID.match(cell_id)
    # "-r0"/"-r01" are not repeat suffixes, and no kernel may end like one
    if m is None or AMBIGUOUS_KERNEL.fullmatch(m["kernel"]):
        raise ValueError(f"not a cell id: {cell_id!r} (expected <tap|vhost>-qlen<n>-rtt<ms>-<kernel>[-r<n>])")
    return {
        "backend": m["backend"],
        "txqueuelen": int(m["txqueuelen"]),
        "rtt_ms": float(m["rtt"]),
        "kernel": m["kernel"],
        "repeat": int(m["repeat"]) if m["repeat"] else 1,
    }


def _points(matrix: MatrixSpec) -> list[tuple[int, float]]:
    """The (txqueuelen, rtt_ms) points of one group, in order, without duplicates.

    txqueuelens at RTT 0 first, then the RTTs at rtt_txqueuelen; an RTT of 0
    there is the same point as rtt_txqueuelen at RTT 0 and is kept only once.
    """
    points = [(q, 0.0) for q in matrix.txqueuelens]
    points += [(matrix.rtt_txqueuelen, float(r)) for r in matrix.rtts_ms]
    return list(dict.fromkeys(points))  # dict keeps first-seen order


def expand(matrix: MatrixSpec) -> list[Cell]:
    """Expand a matrix into its cells.

    Order: for each kernel, for each backend (one contiguous group, so one lab
    host boot and one guest boot serve it): the points of `_points`, each
    repeated `repeats` times in a row. Duplicate kernels/backends/points are
    dropped (a validated matrix has none; a hand-built one might).
    """
    cells: list[Cell] = []
    for kernel in dict.fromkeys(matrix.kernels):
        for backend in dict.fromkeys(matrix.backends):
            for txqueuelen, rtt_ms in _points(matrix):
                for repeat in range(1, matrix.repeats + 1):
                    cells.append(
                        Cell(
                            matrix=matrix.name,
                            kernel=kernel,
                            backend=backend,
                            txqueuelen=txqueuelen,
                            rtt_ms=rtt_ms,
                            repeat=repeat,
                            repeats=matrix.repeats,
                            duration_s=matrix.duration_s,
                        )
                    )
    return cells
