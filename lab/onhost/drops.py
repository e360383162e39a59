"""Packet drops by reason, counted in the kernel: a hist trigger on the skb:kfree_skb tracepoint.

tx_dropped says that a tap dropped; the drop reason says why. Every freed skb
that was dropped passes skb:kfree_skb with an `enum skb_drop_reason`; a hist
trigger keyed by that reason makes the kernel keep one counter per reason, with
no per-packet trace output to read (cheap enough under TCG). tun_net_xmit's
tail drop at a full ptr_ring is SKB_DROP_REASON_FULL_RING; a qdisc's own drop
is QDISC_DROP (and QDISC_OVERLIMIT/CONGESTED/...); the names come from the
tracepoint's own format file, so they always match the running kernel.

    with DropCounter() as drops:
        ... traffic ...
    drops.counts  -> {"FULL_RING": 405, "NOT_SPECIFIED": 3}

Needs tracefs and CONFIG_HIST_TRIGGERS (Debian's kernels have both); where
they are missing, `available` is False and `counts` stays None.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from lab import proc

TRACEFS = Path("/sys/kernel/tracing")
EVENT = ("skb", "kfree_skb")
TRIGGER = "hist:keys=reason:vals=hitcount:size=256"
RING_REASON = "FULL_RING"  # tun/tap: the tx ptr_ring had no room

_SYMBOL = re.compile(r"\{\s*(\d+),\s*\"([A-Z0-9_]+)\"\s*\}")
_HIST_LINE = re.compile(r"\{\s*reason:\s*(\S+)\s*\}\s*hitcount:\s*(\d+)")


def reason_names(format_text: str) -> dict[int, str]:
    """The enum skb_drop_reason value -> name map from the tracepoint's format file."""
    fmt = format_text.split("print fmt:", 1)[-1]
    return {int(v): name for v, name in _SYMBOL.findall(fmt)}


def parse_hist(text: str, names: dict[int, str]) -> dict[str, int]:
    """A hist file keyed by reason -> {reason name: count} (unknown numbers stay numeric)."""
    out: dict[str, int] = {}
    for key, count in _HIST_LINE.findall(text):
        name = names.get(int(key), key) if key.isdigit() else key
        out[name] = out.get(name, 0) + int(count)
    return out


def ensure_tracefs(root: Path = TRACEFS) -> bool:
    """Mount tracefs when it is not (a lab host's init does not); True when usable."""
    if (root / "events").is_dir():
        return True
    with contextlib.suppress(Exception):
        proc.run(["mount", "-t", "tracefs", "nodev", str(root)], timeout=30)
    return (root / "events").is_dir()


@dataclass
class DropCounter:
    """Counts dropped skbs by reason between __enter__ and __exit__ (see the module doc)."""

    root: Path = TRACEFS
    counts: dict[str, int] | None = field(default=None, init=False)
    available: bool = field(default=False, init=False)
    error: str | None = field(default=None, init=False)
    _names: dict[int, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def _event(self) -> Path:
        return self.root / "events" / EVENT[0] / EVENT[1]

    def __enter__(self) -> Self:
        try:
            if not ensure_tracefs(self.root):
                raise OSError("tracefs is not available")
            self._names = reason_names((self._event / "format").read_text())
            # a trigger left by a killed run would refuse a second identical one
            with contextlib.suppress(OSError):
                (self._event / "trigger").write_text("!" + TRIGGER)
            (self._event / "trigger").write_text(TRIGGER)
            self.available = True
        except OSError as e:
            self.error = f"drop reasons not counted: {e.strerror or e}"
        return self

    def read(self) -> dict[str, int] | None:
        """The counts so far (None when not available)."""
        if not self.available:
            return None
        return parse_hist((self._event / "hist").read_text(), self._names)

    def __exit__(self, *exc: object) -> None:
        if not self.available:
            return
        try:
            self.counts = self.read()
        finally:
            with contextlib.suppress(OSError):
                (self._event / "trigger").write_text("!" + TRIGGER)
