"""`lab config`: the resolved lab as tables, or as JSON (`lab config --json`).

Presentation only; lab.config validates, this shows. Matrices carry their cell
counts, so a profile's size is visible before it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab.config import LabConfig
from lab.measure.cells import expand
from lab.tomlcheck import num


def _jsonable(value: Any) -> Any:
    """Dataclasses, Paths and tuples as plain JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def config_to_dict(cfg: LabConfig) -> dict[str, Any]:
    """The resolved lab as JSON-safe data; matrices and profiles carry their cell counts."""
    out: dict[str, Any] = _jsonable(cfg)
    for name, matrix in cfg.matrices.items():
        m = out["matrices"][name]
        m["cells"] = len(expand(matrix))
        m["profiles"] = {
            pname: {**_jsonable(profile.overrides()), "cells": len(expand(matrix.with_profile(pname)))}
            for pname, profile in matrix.profiles.items()
        }
    return out


def render_config(cfg: LabConfig) -> Any:
    """A rich renderable of the resolved lab for `lab config`."""
    from rich.console import Group
    from rich.table import Table

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold")
        for c in columns:
            t.add_column(c)
        return t

    def shown(v: Any) -> str:
        # paths under lab.toml's dir read better as they were written
        if isinstance(v, Path):
            return str(v.relative_to(cfg.root)) if v.is_relative_to(cfg.root) else str(v)
        return num(v) if isinstance(v, float) else str(v)

    def seq(values: Sequence[Any]) -> str:
        return ", ".join(shown(v) for v in values) or "-"

    lab = Table.grid(padding=(0, 2))
    lab.add_column(style="bold")
    lab.add_column()
    lab.add_row("lab", cfg.name)
    lab.add_row("config", str(cfg.source))
    lab.add_row("workdir", str(cfg.workdir))
    lab.add_row(
        "timeouts",
        ", ".join(f"{f.name} {num(getattr(cfg.timeouts, f.name))}s" for f in dataclasses.fields(cfg.timeouts)),
    )

    kernels = table("kernels", "name", "source", "strategy", "patches", "configs")
    for k in cfg.kernels.values():
        kernels.add_row(k.name, shown(k.source), k.strategy, seq(k.patches), seq(k.configs))

    images = table("images", "name", "recipe")
    for i in cfg.images.values():
        images.add_row(i.name, shown(i.recipe))

    hosts = table("hosts", "name", "provider", "kernel", "vcpus", "memory", "ssh")
    for h in cfg.hosts.values():
        port = str(h.ssh_port) if h.ssh_port else "auto"
        ssh = (
            f"{h.user}@{h.address}:{port}"
            if h.provider == "ssh"
            else (f"{h.user}@localhost:{port}" if h.provider == "nested" else "-")
        )
        hosts.add_row(h.name, h.provider, h.kernel or "-", str(h.vcpus), f"{h.memory_mib} MiB", ssh)

    guests = table("guests", "#", "name", "host", "image", "vcpus", "memory", "backend", "txqueuelen", "tap")
    for g in cfg.guests.values():
        guests.add_row(
            str(g.index),
            g.name,
            g.host,
            g.image,
            str(g.vcpus),
            f"{g.memory_mib} MiB",
            g.net.backend,
            str(g.net.txqueuelen),
            g.net.tap,
        )

    matrices = table(
        "matrices",
        "name",
        "host/guest",
        "kernels",
        "backends",
        "txqueuelens",
        "rtts_ms",
        "repeats",
        "duration",
        "cells",
    )
    for m in cfg.matrices.values():
        for variant in [m, *(m.with_profile(p) for p in m.profiles)]:
            label = m.name if variant.profile is None else f"  profile {variant.profile}"
            matrices.add_row(
                label,
                f"{m.host}/{m.guest}",
                seq(variant.kernels),
                seq(variant.backends),
                seq(variant.txqueuelens),
                f"{seq(variant.rtts_ms)} @qlen {variant.rtt_txqueuelen}" if variant.rtts_ms else "-",
                str(variant.repeats),
                f"{variant.duration_s}s",
                str(len(expand(variant))),
            )

    expectations = table("expectations", "property", "value")
    for f in dataclasses.fields(cfg.expectations):
        value = getattr(cfg.expectations, f.name)
        expectations.add_row(f.name, num(value) if isinstance(value, float) else str(value))

    return Group(lab, kernels, images, hosts, guests, matrices, expectations)
