"""Swapping the lab's modules (tun, tap, vhost, vhost_net) on a running kernel.

Two "modules" recipes on the same Debian base differ only in these four
modules, so one lab host boot can measure both: unload the set in use, load
the other from its artifact's module tree (a lab host sees this machine's
root, so the artifact's path is the same inside), and check by GNU build-id
that what the kernel now runs is what that artifact holds. Nothing may hold
the modules while this runs: no guest (QEMU holds /dev/net/tun and
/dev/vhost-net), no tap of the lab's (lab.session tears both down first).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab import proc
from lab.artifacts.kernel import LAB_MODULES
from lab.errors import LabError
from lab.onhost.probe import loaded_module_build_id, module_file_build_id

# vhost_net needs tun, tap and vhost: load in this order, unload in reverse.
LOAD_ORDER = ("tun", "tap", "vhost", "vhost_net")
assert set(LOAD_ORDER) == set(LAB_MODULES)


@dataclass(frozen=True)
class ModulesLoaded:
    """Which build of each lab module the kernel runs now, and how long the swap took."""

    build_ids: dict[str, str]
    seconds: float = 0.0
    params: dict[str, list[str]] = field(default_factory=dict)


def module_files(moddir: Path) -> dict[str, Path]:
    """The lab's module files in a lib/modules/<release> tree, from its modules.dep."""
    out: dict[str, Path] = {}
    try:
        lines = (moddir / "modules.dep").read_text().splitlines()
    except OSError as e:
        raise LabError(f"{moddir}/modules.dep is not readable: {e.strerror or e}") from None
    for line in lines:
        rel = line.split(":", 1)[0]
        name = Path(rel).name.split(".ko")[0]
        if name in LOAD_ORDER:
            out[name] = moddir / rel
    missing = [m for m in LOAD_ORDER if m not in out]
    if missing:
        raise LabError(f"{moddir} has no {', '.join(missing)} module")
    return out


def outside_deps(moddir: Path) -> list[str]:
    """Modules the lab's depend on that are not among them (vhost needs vhost_iotlb), from `moddir`'s modules.dep.

    A pushed tree holds only the lab's four files: these come from the running kernel's own tree (modprobe).
    """
    out: list[str] = []
    try:
        lines = (moddir / "modules.dep").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        rel, _, deps = line.partition(":")
        if Path(rel).name.split(".ko")[0] not in LOAD_ORDER:
            continue
        for d in deps.split():
            name = Path(d).name.split(".ko")[0]
            if name not in LOAD_ORDER and name not in out:
                out.append(name)
    return out


def params_from_cmdline(cmdline: Sequence[str]) -> dict[str, list[str]]:
    """Kernel command line words "<module>.<param>=<value>" of the lab's modules -> insmod arguments."""
    out: dict[str, list[str]] = {}
    for word in cmdline:
        head, sep, value = word.partition("=")
        module, dot, param = head.partition(".")
        if dot and sep and module in LOAD_ORDER and param:
            out.setdefault(module, []).append(f"{param}={value}")
    return out


def loaded() -> dict[str, str]:
    """Build-ids of the lab modules loaded now."""
    return {m: bid for m in LOAD_ORDER if (bid := loaded_module_build_id(m))}


def swap(moddir: Path, params: Mapping[str, Sequence[str]] | None = None, timeout: float = 120.0) -> ModulesLoaded:
    """Unload the lab's modules and load the ones under `moddir`; verified by build-id."""
    import time

    t0 = time.monotonic()
    files = module_files(moddir)
    want = {m: module_file_build_id(p) for m, p in files.items()}
    params = {m: list(v) for m, v in (params or {}).items()}
    for m in reversed(LOAD_ORDER):
        if Path(f"/sys/module/{m}").exists():
            res = proc.run(["rmmod", m], timeout=timeout)
            if res.rc != 0:
                raise LabError(f"cannot unload {m}: {res.stderr.strip() or res.stdout.strip()} (is a guest or tap still holding it?)")
    for dep in outside_deps(moddir):
        if not Path(f"/sys/module/{dep}").exists():
            res = proc.run(["modprobe", dep], timeout=timeout)
            if res.rc != 0:
                raise LabError(f"cannot load {dep} (needed by the lab's modules) from this kernel's own tree: "
                               f"{res.stderr.strip() or res.stdout.strip()}")
    for m in LOAD_ORDER:
        res = proc.run(["insmod", str(files[m]), *params.get(m, [])], timeout=timeout)
        if res.rc != 0:
            raise LabError(f"cannot load {files[m]}: {res.stderr.strip() or res.stdout.strip()}")
    # no udev: give the new device nodes the modes labhost-init gave the first ones
    for node, mode in (("/dev/net/tun", 0o666), ("/dev/vhost-net", 0o660)):
        with contextlib.suppress(OSError):
            os.chmod(node, mode)
    got = loaded()
    wrong = [m for m in LOAD_ORDER if got.get(m) != want[m]]
    if wrong:
        raise LabError(f"after loading {moddir}: {', '.join(wrong)} do not have the artifact's build-id")
    return ModulesLoaded(build_ids=got, seconds=round(time.monotonic() - t0, 2), params=params)
