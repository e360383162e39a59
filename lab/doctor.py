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


def _module_param(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def kvm_host_checks(facts, required: bool) -> list[Check]:
    """What a real KVM machine (provider "local", or the remote of an "ssh" host) needs, one check each.

    `required`: this lab runs guests on this machine's kernel (a "local"
    host), so a missing piece is a failure; otherwise a warning, since only
    nested lab hosts are used. `facts`: lab.onhost.probe.KernelFacts of this kernel.
    """
    bad = "fail" if required else "warn"
    why = "" if required else " (only provider local needs it here)"
    out: list[Check] = []
    _model, flags = _cpu_flags()
    virt = sorted(flags & {"vmx", "svm"})
    out.append(Check("hardware virt", "ok" if virt else bad, f"cpu flags: {', '.join(virt) or 'no vmx/svm'}" + ("" if virt else why),
                     None if virt else "enable VT-x/AMD-V in the firmware setup (a VM needs its hypervisor's nested virt)"))
    kvm_mod = next((m for m in ("kvm_intel", "kvm_amd") if Path(f"/sys/module/{m}").exists()), None)
    out.append(Check("kvm", "ok" if facts.kvm else bad,
                     (f"/dev/kvm usable, {kvm_mod} loaded" if facts.kvm else
                      f"/dev/kvm {'present but not usable by a stock guest (PVM-only, or no vmx/svm)' if Path('/dev/kvm').exists() else 'absent'}"
                      + why),
                     None if facts.kvm else "modprobe kvm_intel (or kvm_amd); chmod 0666 /dev/kvm where no udev does it"))
    out.append(Check("vhost_net", "ok" if facts.vhost_net else bad, "/dev/vhost-net" + ("" if facts.vhost_net else " absent" + why),
                     None if facts.vhost_net else "modprobe vhost_net"))
    out.append(Check("tun", "ok" if facts.tun else "fail", "/dev/net/tun (the guests' taps)" + ("" if facts.tun else " absent"),
                     None if facts.tun else "modprobe tun"))
    out.append(Check("sch_netem", "ok" if facts.netem else bad, "netem qdisc for the RTT cells" + ("" if facts.netem else " not available" + why),
                     None if facts.netem else "modprobe sch_netem (Ubuntu: apt-get install linux-modules-extra-$(uname -r))"))
    running = bool(proc.pids_named("libvirtd"))
    out.append(Check("libvirtd", "ok" if running else "warn", "running (qemu:///system)" if running else "not running (the lab starts it when root)",
                     None if running else "libvirtd -d (or systemctl start libvirtd)"))
    for tool, pkg, what in (("qemu-system-x86_64", "qemu-system-x86", "runs the guests"), ("iperf3", "iperf3", "the TCP streams")):
        where = _which(tool)
        out.append(Check(tool.split("-")[0], "ok" if where else "fail", f"{where or tool + ' missing'}: {what}",
                         None if where else f"apt-get install {pkg}"))
    nested = next((v for m in ("kvm_intel", "kvm_amd") if (v := _module_param(f"/sys/module/{m}/parameters/nested"))), None)
    prefix = f"{kvm_mod}.nested={nested}: " if kvm_mod and nested else ""
    out.append(Check("nested", "ok", prefix + "not needed by local or ssh hosts (guests run directly on the kernel); "
                     "only provider nested on a KVM machine uses it (lab hosts whose guests use KVM)"))
    kexec = _which("kexec")
    out.append(Check("kexec", "ok" if kexec else "warn", kexec or "kexec-tools missing: needed on an ssh host to boot a strategy "
                     "\"full\" kernel", None if kexec else "apt-get install kexec-tools"))
    return out


def _cpu_flags() -> tuple[str, set[str]]:
    from lab.onhost.probe import _cpuinfo

    return _cpuinfo()


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
                     "apt-get install linux-source-6.12=6.12.117-1~deb12u1 linux-headers-6.12.117+deb12-amd64" if absent else None))
    for daemon in ("virtlogd",):
        running = bool(proc.pids_named(daemon))
        out.append(Check(f"daemon: {daemon}", "ok" if running else "warn", "running" if running else "not running (the lab starts it when root)",
                         None if running else f"{daemon} -d"))
    from lab.hosts.host import outer_accel
    from lab.onhost.probe import probe_kernel

    facts = probe_kernel()
    accel = outer_accel()
    how = "KVM" if accel == "kvm" else "QEMU TCG with -cpu max (emulated SVM for nested KVM)"
    out.append(Check("lab host accel", "ok", f"{accel}: lab hosts run under {how}"))
    local = cfg is not None and any(h.provider == "local" for h in cfg.hosts.values())
    out += kvm_host_checks(facts, required=local)
    out.append(Check("provider local", "ok" if facts.kvm and facts.vhost_net else "fail" if local else "warn",
                     f"{facts.release}: " + ("usable" if facts.kvm and facts.vhost_net else
                                             "no usable /dev/kvm (PVM-only or absent)" if not facts.kvm else "no /dev/vhost-net"),
                     None if facts.kvm and facts.vhost_net else "use provider \"nested\" (the default)"))
    if cfg is not None:
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        free_gib = shutil.disk_usage(cfg.workdir).free / 2**30
        out.append(Check("workdir space", "ok" if free_gib > 10 else "warn", f"{free_gib:.0f} GiB free in {cfg.workdir}",
                         None if free_gib > 10 else "free space: kernels + images need ~5 GiB"))
    return out
