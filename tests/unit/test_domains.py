"""lab.hosts.domains: the libvirt XML of lab hosts and guests, parsed back, never string-built.

libvirt's own parser sees the same XML in tests/integration/test_libvirt_define.py.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.hosts.domains import QEMU_NS, GuestDomain, LabHostDomain, SharedDir, guest_mac, guest_xml, labhost_xml

HOSTILE = "x</name><devices><emulator>/bin/sh</emulator></devices><name>&amp; \"'<!-- ]]> &#0; ${IFS}"


def labhost(**kw) -> LabHostDomain:
    base = dict(
        name="vhl-h1",
        vcpus=2,
        memory_mib=3072,
        kernel=Path("/work/kernels/stock-0123/root/boot/vmlinuz-6.12.117+deb12-amd64"),
        initrd=Path("/work/initramfs/labhost-0123-4567.cpio"),
        cmdline="console=ttyS0 panic=-1 lab.hostname=h1",
        console_log=Path("/work/vhl/hosts/h1/console.log"),
        ssh_port=42022,
        shares=(
            SharedDir(Path("/"), "labroot"),
            SharedDir(Path("/work/kernels/stock-0123/root/lib/modules"), "labkernel"),
            SharedDir(Path("/work/vhl/hosts/h1"), "labstate", readonly=False),
        ),
    )
    base.update(kw)
    return LabHostDomain(**base)


def guest(**kw) -> GuestDomain:
    base = dict(
        name="vhl-g1",
        vcpus=1,
        memory_mib=1024,
        kernel=Path("/var/lib/vhost-lab/guests/vmlinuz"),
        initrd=Path("/work/initramfs/guest-89ab.cpio"),
        cmdline="console=ttyS0 init=/sbin/lab-init lab.ip=10.77.1.2/24",
        disk=Path("/var/lib/vhost-lab/guests/g1.qcow2"),
        tap="vhl-g1",
        mac="52:54:00:12:34:56",
        backend="vhost",
        console_log=Path("/var/lib/vhost-lab/state/guests/g1.console.log"),
    )
    base.update(kw)
    return GuestDomain(**base)


def parse(xml: str) -> ET.Element:
    root = ET.fromstring(xml)
    assert root.tag == "domain"
    return root


def one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path)
    assert len(found) == 1, f"{path}: {len(found)} elements"
    return found[0]


# --------------------------------------------------------------------------
# Common to both kinds
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: labhost_xml(labhost()), lambda: guest_xml(guest())], ids=["labhost", "guest"])
def test_common_parts(make) -> None:
    root = parse(make())
    os_el = one(root, "os")
    assert one(os_el, "type").text == "hvm"
    assert one(os_el, "type").attrib == {"arch": "x86_64", "machine": "q35"}
    assert one(os_el, "kernel").text and one(os_el, "initrd").text and one(os_el, "cmdline").text
    assert one(root, "on_poweroff").text == "destroy"
    assert one(root, "on_reboot").text == "destroy"
    assert one(root, "on_crash").text == "destroy"
    sec = one(root, "seclabel")
    assert sec.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert one(sec, "label").text == "+0:+0"
    assert one(root, "memory").attrib == {"unit": "MiB"}
    assert one(root, "devices/memballoon").get("model") == "none"
    # no bootloader, no graphics: the kernel boots directly onto the serial log
    assert root.find("os/loader") is None and root.find("devices/graphics") is None


@pytest.mark.parametrize("make", [lambda d: labhost_xml(labhost(console_log=d)), lambda d: guest_xml(guest(console_log=d))],
                         ids=["labhost", "guest"])
def test_serial_and_console_to_the_log_file(make) -> None:
    log = Path("/srv/lab state/h1/console.log")
    root = parse(make(log))
    serial = one(root, "devices/serial")
    assert serial.get("type") == "file"
    assert one(serial, "source").attrib == {"path": str(log), "append": "off"}
    assert one(serial, "target").get("port") == "0"
    console = one(root, "devices/console")
    assert console.get("type") == "file"
    assert one(console, "source").get("path") == str(log)
    assert one(console, "target").attrib == {"type": "serial", "port": "0"}


# --------------------------------------------------------------------------
# Lab host
# --------------------------------------------------------------------------


def test_labhost_tcg_uses_qemu_and_cpu_maximum() -> None:
    root = parse(labhost_xml(labhost()))
    assert root.get("type") == "qemu"
    cpu = one(root, "cpu")
    assert cpu.attrib == {"mode": "maximum", "check": "none"}
    # libvirt's schema wants <cpu> before <os>: it sits right after name/memory/vcpu
    assert [c.tag for c in root][:4] == ["name", "memory", "vcpu", "cpu"]
    assert one(root, "name").text == "vhl-h1"
    assert one(root, "memory").text == "3072"
    assert one(root, "vcpu").text == "2"
    assert one(root, "devices/emulator").text == "/usr/bin/qemu-system-x86_64"


def test_labhost_kvm_uses_host_passthrough() -> None:
    root = parse(labhost_xml(labhost(accel="kvm")))
    assert root.get("type") == "kvm"
    assert one(root, "cpu").get("mode") == "host-passthrough"


def test_labhost_9p_shares() -> None:
    d = labhost()
    root = parse(labhost_xml(d))
    fss = root.findall("devices/filesystem")
    assert len(fss) == len(d.shares)
    for fs, share in zip(fss, d.shares, strict=False):
        assert fs.attrib == {"type": "mount", "accessmode": "passthrough", "multidevs": "remap"}
        assert one(fs, "source").attrib == {"dir": str(share.source)}
        assert one(fs, "target").attrib == {"dir": share.tag}
        assert (fs.find("readonly") is not None) == share.readonly
    assert [fs.find("readonly") is not None for fs in fss] == [True, True, False]


def test_labhost_no_shares() -> None:
    root = parse(labhost_xml(labhost(shares=())))
    assert root.findall("devices/filesystem") == []


def test_labhost_hostfwd_loopback_only_restricted() -> None:
    root = parse(labhost_xml(labhost(ssh_port=42022)))
    cmd = one(root, f"{{{QEMU_NS}}}commandline")
    args = [a.get("value") for a in cmd.findall(f"{{{QEMU_NS}}}arg")]
    assert args[0] == "-netdev"
    netdev = args[1].split(",")
    assert netdev[0] == "user"
    assert "restrict=on" in netdev
    fwds = [o for o in netdev if o.startswith("hostfwd=")]
    assert fwds == ["hostfwd=tcp:127.0.0.1:42022-:22"]
    assert args[2] == "-device" and "netdev=labnet" in args[3] and args[3].startswith("virtio-net-pci")
    # no libvirt-managed NIC: the only network is the restricted slirp forward
    assert root.findall("devices/interface") == []
    # the namespace is declared so libvirt recognises <qemu:commandline>
    assert 'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in labhost_xml(labhost())


def test_labhost_ssh_port_must_be_an_integer() -> None:
    with pytest.raises((TypeError, ValueError)):
        labhost_xml(labhost(ssh_port="22,hostfwd=tcp:0.0.0.0:2222-:22"))


def test_labhost_rng_from_urandom() -> None:
    root = parse(labhost_xml(labhost()))
    assert one(root, "devices/rng").get("model") == "virtio"
    assert one(root, "devices/rng/backend").text == "/dev/urandom"


# --------------------------------------------------------------------------
# Guest
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "driver"), [("vhost", "vhost"), ("tap", "qemu")])
def test_guest_interface(backend: str, driver: str) -> None:
    root = parse(guest_xml(guest(backend=backend, tap="vhl-g7", mac="52:54:aa:bb:00:07")))
    iface = one(root, "devices/interface")
    assert iface.get("type") == "ethernet"
    assert one(iface, "target").attrib == {"dev": "vhl-g7", "managed": "no"}
    assert one(iface, "mac").get("address") == "52:54:aa:bb:00:07"
    assert one(iface, "model").get("type") == "virtio"
    assert one(iface, "driver").attrib == {"name": driver}


def test_guest_multiqueue() -> None:
    root = parse(guest_xml(guest(queues=4)))
    assert one(root, "devices/interface/driver").attrib == {"name": "vhost", "queues": "4"}


@pytest.mark.parametrize("backend", ["macvtap", "", "VHOST", "vhost ", "user"])
def test_guest_other_backends_are_refused(backend: str) -> None:
    with pytest.raises(ValueError, match="backend"):
        guest_xml(guest(backend=backend))


def test_guest_disk_and_accel() -> None:
    root = parse(guest_xml(guest()))
    assert root.get("type") == "kvm"
    assert one(root, "cpu").get("mode") == "host-passthrough"
    disk = one(root, "devices/disk")
    assert disk.attrib == {"type": "file", "device": "disk"}
    assert one(disk, "driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "unsafe"}
    assert one(disk, "source").get("file") == "/var/lib/vhost-lab/guests/g1.qcow2"
    assert one(disk, "target").attrib == {"dev": "vda", "bus": "virtio"}
    tcg = parse(guest_xml(guest(accel="tcg")))
    assert tcg.get("type") == "qemu"
    assert tcg.find("cpu") is None


# --------------------------------------------------------------------------
# No injection: hostile values come back as the same text
# --------------------------------------------------------------------------


def test_hostile_values_stay_text_labhost() -> None:
    d = labhost(
        name=HOSTILE,
        cmdline=HOSTILE + " console=ttyS0",
        kernel=Path("/k/" + HOSTILE.replace("/", "_")),
        console_log=Path("/log/\"quoted\" & <tagged>.log"),
        shares=(SharedDir(Path("/share/<x>&y\"z'"), "tag\"><readonly/>"),),
    )
    xml = labhost_xml(d)
    root = parse(xml)
    assert one(root, "name").text == d.name
    assert one(root, "os/cmdline").text == d.cmdline
    assert one(root, "os/kernel").text == str(d.kernel)
    assert one(root, "devices/serial/source").get("path") == str(d.console_log)
    fs = one(root, "devices/filesystem")
    assert one(fs, "source").get("dir") == "/share/<x>&y\"z'"
    assert one(fs, "target").get("dir") == "tag\"><readonly/>"
    # exactly the elements the lab asked for, nothing smuggled in
    assert len(root.findall(".//emulator")) == 1
    assert len(root.findall("devices/filesystem/readonly")) == 1


def test_hostile_values_stay_text_guest() -> None:
    d = guest(name=HOSTILE, cmdline=HOSTILE, tap="t'\"><x", mac="52:54:00:00:00:01\"/><y z=\"", disk=Path("/d/<a>.qcow2"))
    root = parse(guest_xml(d))
    assert one(root, "name").text == HOSTILE
    assert one(root, "os/cmdline").text == HOSTILE
    assert one(root, "devices/interface/target").get("dev") == d.tap
    assert one(root, "devices/interface/mac").get("address") == d.mac
    assert one(root, "devices/disk/source").get("file") == "/d/<a>.qcow2"
    assert len(root.findall(".//interface")) == 1 and root.find(".//y") is None and root.find(".//x") is None


# XML 1.0 cannot carry most control characters at all; everything else must round-trip.
_xml_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r")
    .filter(lambda c: c in "\t\n" or ord(c) >= 0x20)
    .filter(lambda c: c not in "\ufffe\uffff"),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(name=_xml_text, cmdline=_xml_text, tap=_xml_text)
def test_any_text_round_trips(name: str, cmdline: str, tap: str) -> None:
    root = parse(guest_xml(guest(name=name, cmdline=cmdline, tap=tap)))
    assert (one(root, "name").text or "") == name
    assert (one(root, "os/cmdline").text or "") == cmdline
    # attribute values: XML normalises literal tab/newline in attributes unless escaped;
    # ElementTree escapes them, so they survive too
    assert one(root, "devices/interface/target").get("dev") == tap


_any_text = st.text(alphabet=st.characters(), max_size=30)
_XML_UNSAFE = {chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, 0x0D, *range(0x0E, 0x20), 0xFFFE, 0xFFFF]}


def _xml_unsafe(s: str) -> bool:
    return any(c in _XML_UNSAFE or 0xD800 <= ord(c) <= 0xDFFF for c in s)


@settings(max_examples=300, deadline=None)
@given(name=_any_text, cmdline=_any_text, log=_any_text)
def test_any_text_round_trips_or_is_refused(name: str, cmdline: str, log: str) -> None:
    """What XML 1.0 cannot carry (and \r, which parsers turn into \n) is refused, never mangled."""
    d = labhost(name=name, cmdline=cmdline, console_log=Path("/l") / log)
    if _xml_unsafe(name + cmdline + log):
        with pytest.raises(ValueError, match="XML cannot carry"):
            labhost_xml(d)
        return
    root = parse(labhost_xml(d))
    assert (one(root, "name").text or "") == name
    assert (one(root, "os/cmdline").text or "") == cmdline
    assert one(root, "devices/serial/source").get("path") == str(d.console_log)


@pytest.mark.parametrize("bad", ["a\rb", "a\x00b", "a\x1bb", "a\ufffeb", "\x0c"])
@pytest.mark.parametrize("field", ["name", "cmdline", "tap", "mac", "kernel"])
def test_guest_refuses_what_xml_cannot_carry(field: str, bad: str) -> None:
    value = Path("/k") / bad if field == "kernel" else bad
    with pytest.raises(ValueError, match="XML cannot carry"):
        guest_xml(guest(**{field: value}))


# --------------------------------------------------------------------------
# guest_mac
# --------------------------------------------------------------------------

MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def test_guest_mac_stable_and_locally_administered() -> None:
    mac = guest_mac("vhl", 1)
    assert mac == guest_mac("vhl", 1)
    assert MAC_RE.match(mac)
    first = int(mac.split(":")[0], 16)
    assert first & 0x02, "locally administered bit"
    assert not first & 0x01, "unicast"


def test_guest_mac_distinct_per_guest_and_lab() -> None:
    macs = {guest_mac("vhl", i) for i in range(1, 300)}
    assert len(macs) == 299
    assert guest_mac("vhl", 1) != guest_mac("vhm", 1)
    # the index is in the low bytes: guests are easy to recognise in a capture
    assert guest_mac("vhl", 0x0102).endswith(":01:02")


@given(lab=st.text(min_size=1, max_size=6), index=st.integers(min_value=1, max_value=0xFFFF))
def test_guest_mac_always_valid(lab: str, index: int) -> None:
    mac = guest_mac(lab, index)
    assert MAC_RE.match(mac)
    assert int(mac[:2], 16) & 0x03 == 0x02
    assert guest_xml(guest(mac=mac))  # usable as is


def test_dataclasses_are_frozen() -> None:
    d = guest()
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        d.name = "other"  # type: ignore[misc]
    assert replace(d, name="other").name == "other"
