"""What the running kernel offers the lab: runs on the host being probed.

Used by `python -m lab.onhost.agent probe` (on lab hosts) and by `lab doctor`.
"""

from __future__ import annotations

import lzma
import os
import platform
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.artifacts.kernel import LAB_MODULES

# Exported by tun for vhost_net by one of the nodrop series (v1:
# tun_get_tx_queue; v2 and opt-in: tun_wake_queue); absent on stock.
NODROP_SYMBOLS = ("tun_get_tx_queue", "tun_wake_queue")


@dataclass(frozen=True)
class KernelFacts:
    """One host's kernel, as the lab sees it."""

    release: str
    accel: str  # "tcg" when this kernel itself runs under QEMU's emulator, else "kvm"/"metal"
    cpu_model: str
    kvm: bool
    vhost_net: bool
    tun: bool
    netem: bool
    modules: dict[str, str]  # loaded lab module -> GNU build-id (hex)
    nodrop: bool | None

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return asdict(self)


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def build_id_from_notes(data: bytes) -> str | None:
    """The GNU build-id in a raw ELF note section (sysfs notes file or .ko section)."""
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off : off + namesz]
        off += (namesz + 3) & ~3
        desc = data[off : off + descsz]
        off += (descsz + 3) & ~3
        if ntype == 3 and name.rstrip(b"\0") == b"GNU":
            return desc.hex()
    return None


def module_file_build_id(path: Path) -> str | None:
    """GNU build-id of a module file (.ko, .ko.xz), from its ELF note sections."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        base = shoff + i * shentsize
        sh_type = struct.unpack_from("<I", data, base + 4)[0]
        if sh_type != 7:  # SHT_NOTE
            continue
        off, size = struct.unpack_from("<QQ", data, base + 0x18)
        bid = build_id_from_notes(data[off : off + size])
        if bid:
            return bid
    return None


def loaded_module_build_id(name: str) -> str | None:
    """GNU build-id of a loaded module, from /sys/module/NAME/notes."""
    note = Path("/sys/module") / name / "notes" / ".note.gnu.build-id"
    try:
        return build_id_from_notes(note.read_bytes())
    except OSError:
        return None


def _netem_available(release: str) -> bool:
    if Path("/sys/module/sch_netem").exists():
        return True
    moddir = Path("/lib/modules") / release
    try:
        return "sch_netem.ko" in (moddir / "modules.dep").read_text()
    except OSError:
        return False


def _nodrop_loaded() -> bool | None:
    if not Path("/sys/module/tun").exists():
        return None
    try:
        with open("/proc/kallsyms") as f:
            return any(line.split()[2] in NODROP_SYMBOLS for line in f if "_queue" in line)
    except OSError:
        return None


def probe_kernel() -> KernelFacts:
    """Facts about the kernel this process runs on."""
    model, flags = _cpuinfo()
    release = platform.release()
    if "QEMU TCG" in model:
        accel = "tcg"
    elif "hypervisor" in flags:
        accel = "kvm"
    else:
        accel = "metal"
    # /dev/kvm alone is not enough: a PVM-only KVM (this machine kind) cannot
    # boot an ordinary guest kernel. Hardware virtualisation must be visible.
    kvm = Path("/dev/kvm").exists() and bool(flags & {"vmx", "svm"}) and os.access("/dev/kvm", os.R_OK | os.W_OK)
    return KernelFacts(
        release=release,
        accel=accel,
        cpu_model=model,
        kvm=kvm,
        vhost_net=Path("/dev/vhost-net").exists(),
        tun=Path("/dev/net/tun").exists(),
        netem=_netem_available(release),
        modules={m: bid for m in LAB_MODULES if (bid := loaded_module_build_id(m))},
        nodrop=_nodrop_loaded(),
    )


def main() -> int:
    """`python -m lab.onhost.probe`: this kernel's facts as one JSON object."""
    import json

    print(json.dumps(probe_kernel().to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
