"""libvirt domain XML for lab hosts (on this machine) and guests (on a lab host).

Built with ElementTree, never by string formatting, so config values cannot
inject XML. Both kinds boot a kernel directly (no bootloader) and run QEMU as
root (a static DAC label): the lab host reads this machine's root over 9p, and
guests open taps the lab made.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)


@dataclass(frozen=True)
class SharedDir:
    """A host directory shown to the VM over virtio-9p."""

    source: Path
    tag: str
    readonly: bool = True


@dataclass(frozen=True)
class LabHostDomain:
    """A nested lab host VM on this machine."""

    name: str
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    console_log: Path
    ssh_port: int
    shares: tuple[SharedDir, ...]
    accel: str = "tcg"  # "tcg" here: this machine's /dev/kvm is PVM-only
    emulator: str = "/usr/bin/qemu-system-x86_64"


@dataclass(frozen=True)
class GuestDomain:
    """A guest VM on a lab host, its NIC on an existing tap."""

    name: str
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path
    tap: str
    mac: str
    backend: str  # "vhost" | "tap"
    console_log: Path
    accel: str = "kvm"
    queues: int = 1
    extra: dict[str, str] = field(default_factory=dict)


# Characters XML 1.0 cannot carry (and \r, which XML parsers turn into \n):
# refused rather than silently mangled into a different path or command line.
_XML_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0d\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_value(value: str, what: str) -> str:
    if _XML_UNSAFE.search(value):
        raise ValueError(f"{what}: {value!r} holds a character libvirt's XML cannot carry")
    return value


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    attrs = {k.rstrip("_"): _xml_value(v, f"<{tag} {k.rstrip('_')}>") for k, v in attrs.items()}
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        text = _xml_value(text, f"<{tag}>")
        el.text = text
    return el


def _common(root: ET.Element, name: str, vcpus: int, memory_mib: int, kernel: Path, initrd: Path, cmdline: str) -> ET.Element:
    _sub(root, "name", name)
    _sub(root, "memory", str(memory_mib), unit="MiB")
    _sub(root, "vcpu", str(vcpus))
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    _sub(os_el, "kernel", str(kernel))
    _sub(os_el, "initrd", str(initrd))
    _sub(os_el, "cmdline", cmdline)
    feats = _sub(root, "features")
    _sub(feats, "acpi")
    _sub(feats, "apic")
    _sub(root, "clock", offset="utc")
    # A lab VM that stops is finished: libvirt must never restart it behind our back.
    for ev in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(root, ev, "destroy")
    sec = _sub(root, "seclabel", type="static", model="dac", relabel="no")
    _sub(sec, "label", "+0:+0")
    return root


def _serial(devices: ET.Element, log: Path) -> None:
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(log), append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=str(log), append="off")
    _sub(console, "target", type="serial", port="0")


def labhost_xml(d: LabHostDomain) -> str:
    """Domain XML for a lab host: TCG with -cpu max (emulated SVM for nested KVM)."""
    root = ET.Element("domain", type="kvm" if d.accel == "kvm" else "qemu")
    _common(root, d.name, d.vcpus, d.memory_mib, d.kernel, d.initrd, d.cmdline)
    cpu = ET.Element("cpu", mode="host-passthrough" if d.accel == "kvm" else "maximum", check="none")
    root.insert(3, cpu)
    devices = _sub(root, "devices")
    _sub(devices, "emulator", d.emulator)
    for share in d.shares:
        # remap: the shared root spans several filesystems (/proc, /sys, ...);
        # without it their inode numbers collide in 9p's qid space.
        fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough", multidevs="remap")
        _sub(fs, "source", dir=str(share.source))
        _sub(fs, "target", dir=share.tag)
        if share.readonly:
            _sub(fs, "readonly")
    _serial(devices, d.console_log)
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")
    # libvirt 9.0's user-mode <interface> cannot forward ports without passt;
    # QEMU's own slirp can, and restrict=on keeps the lab host off every
    # network but this loopback forward.
    cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    netdev = f"user,id=labnet,restrict=on,hostfwd=tcp:127.0.0.1:{int(d.ssh_port)}-:22"
    for arg in ("-netdev", netdev, "-device", "virtio-net-pci,netdev=labnet,bus=pcie.0,addr=0x10"):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(root, encoding="unicode")


def guest_xml(d: GuestDomain) -> str:
    """Domain XML for a guest: virtio-net on an existing tap, vhost or QEMU backend."""
    if d.backend not in ("vhost", "tap"):
        raise ValueError(f"backend must be 'vhost' or 'tap', got {d.backend!r}")
    root = ET.Element("domain", type="kvm" if d.accel == "kvm" else "qemu")
    _common(root, d.name, d.vcpus, d.memory_mib, d.kernel, d.initrd, d.cmdline)
    if d.accel == "kvm":
        root.insert(3, ET.Element("cpu", mode="host-passthrough", check="none"))
    devices = _sub(root, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe")
    _sub(disk, "source", file=str(d.disk))
    _sub(disk, "target", dev="vda", bus="virtio")
    iface = _sub(devices, "interface", type="ethernet")
    _sub(iface, "mac", address=d.mac)
    # managed='no': libvirt opens the tap the lab created (name, txqueuelen,
    # vnet_hdr already set) instead of making its own.
    _sub(iface, "target", dev=d.tap, managed="no")
    _sub(iface, "model", type="virtio")
    drv = {"name": "vhost" if d.backend == "vhost" else "qemu"}
    if d.queues > 1:
        drv["queues"] = str(d.queues)
    _sub(iface, "driver", **drv)
    _serial(devices, d.console_log)
    _sub(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def guest_mac(lab_name: str, guest_index: int) -> str:
    """A stable locally administered MAC per (lab, guest)."""
    import hashlib

    h = hashlib.sha256(lab_name.encode()).digest()
    return f"52:54:{h[0]:02x}:{h[1]:02x}:{(guest_index >> 8) & 0xFF:02x}:{guest_index & 0xFF:02x}"
