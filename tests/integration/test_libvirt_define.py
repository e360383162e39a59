"""lab.hosts.domains against the real libvirtd on this machine: define (never start) a
lab host and guests, read the XML back through libvirt's parser, undefine.

Domains carry a unique "vhu-test-<hex>" prefix and are undefined in a
finalizer whatever happens; nothing is started, so no VM ever runs.
"""

from __future__ import annotations

import os
import secrets
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

try:
    import libvirt
except ImportError:  # pragma: no cover - depends on the machine
    libvirt = None

SOCK = Path("/run/libvirt/libvirt-sock")
if os.geteuid() != 0:
    pytest.skip("defining system libvirt domains needs root", allow_module_level=True)
if libvirt is None:
    pytest.skip("libvirt-python is not importable (pip install libvirt-python)", allow_module_level=True)
if not SOCK.exists():
    pytest.skip(f"{SOCK} is absent: libvirtd is not running (virtlogd -d; libvirtd -d)", allow_module_level=True)

from lab.hosts.domains import QEMU_NS, GuestDomain, LabHostDomain, SharedDir, guest_mac, guest_xml, labhost_xml  # noqa: E402
from lab.hosts.host import HostRuntime, outer_libvirt  # noqa: E402
from lab.hosts.nested import destroy_host, lab_domains  # noqa: E402
from lab.paths import LabPaths  # noqa: E402

CMDLINE = "console=ttyS0 lab.note=<a&b> \"quoted\" 'single'"


@pytest.fixture
def conn():
    c = outer_libvirt()
    yield c
    c.close()


@pytest.fixture
def prefix(conn):
    """A unique domain name prefix; every domain under it is undefined afterwards."""
    p = f"vhu-test-{secrets.token_hex(4)}"
    yield p
    for dom in conn.listAllDomains():
        if dom.name().startswith(p):
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
    left = [d.name() for d in conn.listAllDomains() if d.name().startswith("vhu-")]
    assert left == [], f"domains left behind: {left}"


def _files(tmp_path: Path) -> dict[str, Path]:
    f = {
        "kernel": tmp_path / "boot" / "vmlinuz",
        "initrd": tmp_path / "initramfs" / "x.cpio",
        "disk": tmp_path / "guests" / "g1.qcow2",
        "log": tmp_path / "state" / "console.log",
        "modules": tmp_path / "kernel" / "lib" / "modules",
        "state": tmp_path / "state",
    }
    for k in ("kernel", "initrd", "disk", "log"):
        f[k].parent.mkdir(parents=True, exist_ok=True)
        f[k].write_bytes(b"")
    f["modules"].mkdir(parents=True)
    return f


def _read_back(conn, name: str) -> ET.Element:
    dom = conn.lookupByName(name)
    assert not dom.isActive(), "defined only, never started"
    assert dom.isPersistent()
    return ET.fromstring(dom.XMLDesc(0))


def _one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path)
    assert len(found) == 1, f"{path}: {len(found)} in {ET.tostring(root, encoding='unicode')[:2000]}"
    return found[0]


@pytest.mark.parametrize(("backend", "accel", "driver"), [("vhost", "kvm", "vhost"), ("tap", "tcg", "qemu")])
def test_guest_definition_survives_libvirt(conn, prefix: str, tmp_path: Path, backend: str, accel: str, driver: str) -> None:
    f = _files(tmp_path)
    name = f"{prefix}-g1"
    mac = guest_mac(prefix, 1)
    d = GuestDomain(
        name=name, vcpus=1, memory_mib=512, kernel=f["kernel"], initrd=f["initrd"], cmdline=CMDLINE,
        disk=f["disk"], tap="vhutst0", mac=mac, backend=backend, console_log=f["log"], accel=accel, queues=2,
    )
    caps = conn.getDomainCapabilities(None, "x86_64", None, "kvm" if accel == "kvm" else "qemu")
    assert caps  # libvirt knows this domain type here
    dom = conn.defineXML(guest_xml(d))
    assert dom.name() == name
    root = _read_back(conn, name)

    assert root.get("type") == ("kvm" if accel == "kvm" else "qemu")
    assert _one(root, "os/cmdline").text == CMDLINE
    assert _one(root, "os/kernel").text == str(f["kernel"])
    assert _one(root, "os/initrd").text == str(f["initrd"])
    assert _one(root, "on_reboot").text == "destroy"
    assert _one(root, "on_poweroff").text == "destroy"
    assert _one(root, "on_crash").text == "destroy"

    iface = _one(root, "devices/interface")
    assert iface.get("type") == "ethernet"
    target = _one(iface, "target")
    assert target.get("dev") == "vhutst0" and target.get("managed") == "no"
    assert _one(iface, "mac").get("address") == mac
    assert _one(iface, "model").get("type") == "virtio"
    drv = _one(iface, "driver")
    assert drv.get("name") == driver and drv.get("queues") == "2"

    disk = _one(root, "devices/disk")
    assert _one(disk, "source").get("file") == str(f["disk"])
    assert _one(disk, "driver").get("type") == "qcow2"
    assert _one(disk, "target").get("dev") == "vda"

    serial = _one(root, "devices/serial")
    assert serial.get("type") == "file"
    assert _one(serial, "source").get("path") == str(f["log"])
    console = _one(root, "devices/console")
    assert console.get("type") == "file" and _one(console, "target").get("type") == "serial"

    sec = [s for s in root.findall("seclabel") if s.get("model") == "dac"]
    assert len(sec) == 1 and sec[0].get("type") == "static" and sec[0].get("relabel") == "no"
    assert _one(sec[0], "label").text == "+0:+0"
    if accel == "kvm":
        assert _one(root, "cpu").get("mode") == "host-passthrough"


def test_labhost_definition_survives_libvirt(conn, prefix: str, tmp_path: Path) -> None:
    f = _files(tmp_path)
    paths = LabPaths(workdir=tmp_path / "work", lab=prefix)
    name = paths.domain_name("h1")
    assert name == f"{prefix}-h1"
    shares = (
        SharedDir(Path("/"), "labroot"),
        SharedDir(f["modules"], "labkernel"),
        SharedDir(f["state"], "labstate", readonly=False),
    )
    d = LabHostDomain(
        name=name, vcpus=2, memory_mib=1024, kernel=f["kernel"], initrd=f["initrd"], cmdline=CMDLINE,
        console_log=f["log"], ssh_port=42999, shares=shares, accel="tcg",
    )
    conn.defineXML(labhost_xml(d))
    root = _read_back(conn, name)

    assert root.get("type") == "qemu"
    assert _one(root, "cpu").get("mode") == "maximum"
    assert _one(root, "os/cmdline").text == CMDLINE
    assert _one(root, "on_reboot").text == "destroy"

    fss = root.findall("devices/filesystem")
    assert len(fss) == 3
    for fs, share in zip(fss, shares, strict=False):
        assert fs.get("type") == "mount"
        assert fs.get("accessmode") == "passthrough"
        assert fs.get("multidevs") == "remap"
        assert _one(fs, "source").get("dir") == str(share.source)
        assert _one(fs, "target").get("dir") == share.tag
        assert (fs.find("readonly") is not None) == share.readonly

    serial = _one(root, "devices/serial")
    assert serial.get("type") == "file" and _one(serial, "source").get("path") == str(f["log"])
    assert _one(root, "devices/emulator").text == "/usr/bin/qemu-system-x86_64"
    assert root.findall("devices/interface") == []

    args = [a.get("value") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args[0] == "-netdev"
    assert "restrict=on" in args[1].split(",")
    assert "hostfwd=tcp:127.0.0.1:42999-:22" in args[1].split(",")
    assert args[2:4] == ["-device", "virtio-net-pci,netdev=labnet,bus=pcie.0,addr=0x10"]

    sec = [s for s in root.findall("seclabel") if s.get("model") == "dac"]
    assert len(sec) == 1 and _one(sec[0], "label").text == "+0:+0"

    # the lab's own lookups see it; destroy_host undefines a defined-but-stopped host
    assert lab_domains(prefix) == [name]
    paths.host_dir("h1").mkdir(parents=True)
    HostRuntime("h1", "nested", name, 42999, None, None, None, "tcg", 0.0, {}).save(paths.host_runtime("h1"))
    assert destroy_host(paths, "h1") is False  # nothing was running
    assert lab_domains(prefix) == []
    assert not paths.host_runtime("h1").exists()
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(name)
