"""`lab doctor`: is this machine ready to run the lab? Each problem with its fix."""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lab import proc
from lab.errors import LabError

# tool -> Debian package that provides it
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "virsh": "libvirt-clients",
    "iperf3": "iperf3",
    "ssh": "openssh-client",
    "sshd": "openssh-server",
    "ssh-keygen": "openssh-client",
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "busybox": "busybox-static",
    "tc": "iproute2",
    "ip": "iproute2",
    "dpkg-deb": "dpkg",
    "make": "make",
    "gcc": "gcc",
    "xz": "xz-utils",
}
PY_MODULES = {"libvirt": "libvirt-python", "fabric": "fabric", "rich": "rich", "pyroute2": "pyroute2"}
KERNEL_PACKAGES = ("/usr/src/linux-source-6.12.tar.xz", "/usr/src/linux-headers-6.12.117+deb12-amd64")


@dataclass(frozen=True)
class Check:
    """One readiness check."""

    name: str
    state: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str | None = None


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if Path(p).exists()), None)


def run_checks(config: str | None = None) -> list[Check]:
    """Every check, in the order a new user meets the problems."""
    out: list[Check] = []
    out.append(Check("root", "ok" if os.geteuid() == 0 else "fail", f"euid {os.geteuid()}",
                     None if os.geteuid() == 0 else "run as root (taps, libvirt system domains, image builds)"))
    try:
        from lab.config import load_config

        cfg = load_config(config)
        out.append(Check("lab.toml", "ok", f"{cfg.source} (lab {cfg.name}, workdir {cfg.workdir})"))
    except LabError as e:
        cfg = None
        out.append(Check("lab.toml", "fail", str(e), "fix the key named in the message"))
    for mod, pkg in PY_MODULES.items():
        try:
            importlib.import_module(mod)
            out.append(Check(f"python: {mod}", "ok", "importable"))
        except ImportError as e:
            out.append(Check(f"python: {mod}", "fail", str(e), f"pip install {pkg}"))
    missing = sorted({pkg for tool, pkg in TOOLS.items() if _which(tool) is None})
    present = [t for t in TOOLS if _which(t)]
    out.append(Check("tools", "fail" if missing else "ok", f"{len(present)}/{len(TOOLS)} present",
                     f"apt-get install {' '.join(missing)}" if missing else None))
    absent = [p for p in KERNEL_PACKAGES if not Path(p).exists()]
    out.append(Check("kernel sources", "fail" if absent else "ok", "missing: " + ", ".join(absent) if absent else "linux-source-6.12 + headers",
                     "apt-get install linux-source-6.12 linux-headers-6.12.117+deb12-amd64" if absent else None))
    for daemon in ("virtlogd", "libvirtd"):
        running = bool(proc.pids_named(daemon))
        out.append(Check(f"daemon: {daemon}", "ok" if running else "warn", "running" if running else "not running (the lab starts it when root)",
                         None if running else f"{daemon} -d"))
    out.append(Check("/dev/net/tun", "ok" if Path("/dev/net/tun").exists() else "fail", "taps",
                     None if Path("/dev/net/tun").exists() else "modprobe tun"))
    from lab.hosts.host import outer_accel
    from lab.onhost.probe import probe_kernel

    facts = probe_kernel()
    accel = outer_accel()
    how = "KVM" if accel == "kvm" else "QEMU TCG with -cpu max (emulated SVM for nested KVM)"
    out.append(Check("lab host accel", "ok", f"{accel}: lab hosts run under {how}"))
    out.append(Check("provider local", "ok" if facts.kvm and facts.vhost_net else "warn",
                     f"{facts.release}: " + ("usable" if facts.kvm and facts.vhost_net else
                                             "no usable /dev/kvm (PVM-only or absent)" if not facts.kvm else "no /dev/vhost-net"),
                     None if facts.kvm and facts.vhost_net else "use provider \"nested\" (the default)"))
    if cfg is not None:
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        free_gib = shutil.disk_usage(cfg.workdir).free / 2**30
        out.append(Check("workdir space", "ok" if free_gib > 10 else "warn", f"{free_gib:.0f} GiB free in {cfg.workdir}",
                         None if free_gib > 10 else "free space: kernels + images need ~5 GiB"))
    return out
