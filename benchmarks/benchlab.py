"""What every benchmark here starts from: the lab of a lab.toml, its first host and that host's guest.

Imported by the benchmark scripts, which put the repository on sys.path first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BenchLab:
    """The loaded config, an open lab context, the host the benchmark boots and its guest."""

    cfg: Any  # lab.config.LabConfig
    ctx: Any  # lab.session.LabContext
    host_spec: Any  # lab.config.HostSpec
    guest_spec: Any  # lab.config.GuestSpec


def open_bench_lab(config: str | None) -> BenchLab:
    """lab.toml (`config`, or the default lookup) opened: its first host and the first guest on that host."""
    from lab.config import load_config
    from lab.session import LabContext

    cfg = load_config(config)
    host_spec = next(iter(cfg.hosts.values()))
    guest_spec = next(g for g in cfg.guests.values() if g.host == host_spec.name)
    return BenchLab(cfg, LabContext.open(cfg), host_spec, guest_spec)
