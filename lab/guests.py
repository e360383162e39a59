"""Guests on a lab host: tap, disk overlay, libvirt domain, boot, wait for SSH.

A guest's NIC is virtio-net on a tap the lab creates on the host (pyroute2,
through the lab agent) with the configured txqueuelen and vnet_hdr;
libvirt attaches it as an existing tap with the vhost or qemu backend. Each
guest gets a /24 of its own between the host's tap (.1) and the guest (.2);
that subnet exists only inside the lab host.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import proc
from lab.artifacts.initramfs import InitramfsSpec, cached_initramfs
from lab.errors import LabError
from lab.events import Progress, Step, quiet
from lab.hosts.domains import GuestDomain, guest_mac, guest_xml
from lab.hosts.host import Host
from lab.hosts.remote import SshEndpoint, SshRunner
from lab.onhost.net import TapDevice
from lab.paths import LabPaths

GUEST_INITRAMFS = Path(__file__).with_name("data") / "guest-initramfs.sh"
# ext4 asks the crypto API for crc32c at mount time: not a modules.dep dependency.
# The guest's root has no module tree: sch_netem is loaded here for
# netem_split (half the delay on the guest's egress).
GUEST_MODULES = ("virtio_blk", "virtio_net", "crc32c_generic", "ext4", "sch_netem")
READY_MARK = "LAB-GUEST-READY"


def host_ip(index: int) -> str:
    """The lab host's side of guest `index`'s private /24 (lives only inside the lab host)."""
    return f"10.99.{index}.1"


def guest_ip(index: int) -> str:
    """Guest `index`'s address on its tap's /24."""
    return f"10.99.{index}.2"


@dataclass(frozen=True)
class GuestPlan:
    """Everything needed to boot one guest: resolved from config and artifacts."""

    name: str
    index: int
    vcpus: int
    memory_mib: int
    backend: str  # "vhost" | "tap"
    txqueuelen: int
    tap: str
    image: Path  # base qcow2 (read-only, shared)
    kernel: Path  # guest kernel (vmlinuz)
    modules_dir: Path  # that kernel's lib/modules/<release>
    queues: int = 1  # virtio-net queue pairs (a multiqueue tap when > 1)

    @property
    def host_ip(self) -> str:
        """The lab host's address on the guest's tap."""
        return host_ip(self.index)

    @property
    def guest_ip(self) -> str:
        """The guest's address."""
        return guest_ip(self.index)


@dataclass
class RunningGuest:
    """A booted guest."""

    plan: GuestPlan
    host: Host
    domain: str
    key: Path
    console: str  # path on the host
    boot_seconds: float = 0.0

    def endpoint(self) -> SshEndpoint:
        """SSH to the guest, jumping through its host."""
        return guest_endpoint(self.host, self.plan.guest_ip, self.key)

    def runner(self, timeout: float = 120.0) -> SshRunner:
        """A command runner on the guest."""
        return SshRunner(self.endpoint(), timeout)


def guest_endpoint(host: Host, ip: str, key: Path) -> SshEndpoint:
    """How to reach a guest at `ip` on `host`."""
    return SshEndpoint(ip, 22, "root", key, jump=host.endpoint())



def guest_initrd(paths: LabPaths, modules_dir: Path) -> Path:
    """The guests' initramfs for a kernel (cached by content)."""
    spec = InitramfsSpec(modules_dir, GUEST_MODULES, GUEST_INITRAMFS.read_text())
    return cached_initramfs(spec, paths.initrd_dir, "guest")


@dataclass(frozen=True)
class StagedGuest:
    """What a guest boots from on its host: the tap exists, the disk overlay is made."""

    overlay: str  # path on the host
    console: str  # path on the host
    initrd: Path  # path on the host (a copy uploaded to a remote host; this machine's file on nested/local)
    cmdline: str
    kernel: Path | None = None  # the guest kernel's path on the host (None: the plan's own path)


def guest_tap(plan: GuestPlan) -> TapDevice:
    """The tap a guest's NIC opens: name, txqueuelen, vnet_hdr, queues, the host side's address."""
    return TapDevice(plan.tap, txqueuelen=plan.txqueuelen, vnet_hdr=True, multi_queue=plan.queues > 1,
                     address=f"{plan.host_ip}/24")


def stage_guest(paths: LabPaths, host: Host, plan: GuestPlan, progress: Progress = quiet) -> StagedGuest:
    """The tap (name, txqueuelen, vnet_hdr, queues, the host side's address) and the disk overlay of a guest.

    Shared by boot_guest (a libvirt domain) and the data-path benchmark (a
    plain QEMU command line), so both boot exactly the same guest.
    """
    destroy_guest(paths, host, plan.name, plan.tap)
    initrd = guest_initrd(paths, plan.modules_dir)
    gdir = host.guest_dir()
    overlay = f"{gdir}/{plan.name}.qcow2"
    console = host.guest_log(plan.name)
    progress(Step(plan.name, f"tap {plan.tap} (txqueuelen {plan.txqueuelen})"))
    host.agent.tap_create(guest_tap(plan))
    # What the guest boots from must be readable on the host: a remote host
    # (ssh) gets copies, named by the artifacts' content keys; nested and
    # local hosts read this machine's files where they are.
    image = host.stage(plan.image, plan.image.parent.name)
    kernel = host.stage(plan.kernel, plan.kernel.parents[2].name)  # <workdir>/kernels/<recipe>-<key>/root/boot/vmlinuz-*
    initrd_on_host = host.stage(initrd, "initramfs")
    # The base image is staged once per lab host boot into the host's own
    # memory: guest disk reads through 9p under TCG made boots 10x slower.
    staged = f"{host.guest_dir()}/base-{plan.image.parent.name}.qcow2"
    host.run(["mkdir", "-p", gdir, str(Path(console).parent)])
    host.run(["cp", "-n", image, staged])
    host.run(["rm", "-f", console])
    host.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", staged, overlay])
    cmdline = " ".join(
        [
            "console=ttyS0",
            "quiet",
            "loglevel=4",
            "panic=-1",
            "init=/sbin/lab-init",
            f"lab.hostname={plan.name}",
            f"lab.ip={plan.guest_ip}/24",
            f"lab.queues={plan.queues}",
        ]
    )
    return StagedGuest(overlay, console, Path(initrd_on_host), cmdline, Path(kernel))


def boot_guest(
    paths: LabPaths,
    host: Host,
    plan: GuestPlan,
    key: Path,
    boot_timeout: float = 240.0,
    progress: Progress = quiet,
) -> RunningGuest:
    """Create the tap, the disk overlay and the domain; wait until SSH answers.

    On failure the guest and its tap are removed again and the console log's
    tail is part of the error.
    """
    domain = paths.domain_name("", plan.name)
    staged = stage_guest(paths, host, plan, progress)
    initrd, overlay, console, cmdline = staged.initrd, staged.overlay, staged.console, staged.cmdline
    xml = guest_xml(
        GuestDomain(
            name=domain,
            vcpus=plan.vcpus,
            memory_mib=plan.memory_mib,
            kernel=staged.kernel or plan.kernel,
            initrd=initrd,
            cmdline=cmdline,
            disk=Path(overlay),
            tap=plan.tap,
            mac=guest_mac(paths.lab, plan.index),
            backend=plan.backend,
            console_log=Path(console),
            accel="kvm",
            queues=plan.queues,
        )
    )
    t0 = time.monotonic()
    progress(Step(plan.name, f"starting ({plan.backend})"))
    try:
        host.libvirt().createXML(xml, 0)
    except Exception as e:
        destroy_guest(paths, host, plan.name, plan.tap)
        raise LabError(f"guest {plan.name} on {host.name}: libvirt refused to start it: {e}") from None
    guest = RunningGuest(plan=plan, host=host, domain=domain, key=key, console=console)
    try:
        _wait_guest(guest, boot_timeout, progress, t0)
        # libvirt gives taps a noqueue root qdisc; the lab measures the
        # kernel's default qdisc (the one that holds a stopped queue's backlog).
        host.agent.set_qdisc(plan.tap, "default")
    except BaseException:
        destroy_guest(paths, host, plan.name, plan.tap)
        raise
    guest.boot_seconds = time.monotonic() - t0
    return guest


def console_tail(host: Host, guest: str, lines: int = 20) -> str:
    """The last lines of a guest's serial console (for errors)."""
    local = host.local_guest_log(guest)
    try:
        if local is not None:
            return "\n".join(local.read_text(errors="replace").splitlines()[-lines:])
        return host.run(["tail", "-n", str(lines), host.guest_log(guest)], check=False, timeout=20).stdout
    except Exception:
        return "(console log unavailable)"


def _console_text(guest: RunningGuest) -> str:
    local = guest.host.local_guest_log(guest.plan.name)
    if local is not None:
        try:
            return local.read_text(errors="replace")
        except OSError:
            return ""
    return guest.host.run(["cat", guest.console], check=False, timeout=20).stdout


def _wait_guest(guest: RunningGuest, timeout: float, progress: Progress, t0: float) -> None:
    name = guest.plan.name

    def booted() -> bool:
        text = _console_text(guest)
        if READY_MARK in text:
            return True
        if "LAB-GUEST-FAILED" in text or "Kernel panic" in text:
            raise LabError(f"guest {name} failed to boot; console:\n{console_tail(guest.host, name)}")
        return False

    try:
        proc.wait_for(booted, timeout=timeout, interval=1.0, max_interval=2.0, what=f"guest {name} to boot",
                      on_wait=lambda _s: progress(Step(name, "booting", elapsed_s=time.monotonic() - t0)))
    except proc.WaitTimeout:
        raise LabError(f"guest {name} did not come up in {timeout:.0f}s; console:\n{console_tail(guest.host, name)}") from None
    progress(Step(name, "waiting for SSH"))
    _wait_ssh(guest, max(10.0, timeout - (time.monotonic() - t0)))


def _wait_ssh(guest: RunningGuest, timeout: float) -> None:
    name = guest.plan.name
    runner = guest.runner(timeout=60)
    last = {"err": ""}

    def answers() -> bool:
        res = runner.run(["true"], timeout=60, check=False)
        last["err"] = res.stderr.strip()
        return res.rc == 0

    try:
        proc.wait_for(answers, timeout=timeout, interval=1.0, what="SSH")
    except proc.WaitTimeout:
        raise LabError(f"guest {name}: SSH at {guest.plan.guest_ip} does not answer: {last['err']}") from None
    finally:
        runner.close()


# Run detached in the guest before its NIC is unplugged (the guest has no udev):
# wait for the interface to go and to come back, then give it its address and
# queues again. It polls only for the seconds of a swap; $1 interface, $2
# address/prefix, $3 queue pairs.
NIC_REJOIN_SH = (
    "exec </dev/null >/dev/null 2>&1; ("
    ' n=0; while [ -e "/sys/class/net/$1" ] && [ "$n" -lt 600 ]; do sleep 0.1; n=$((n + 1)); done;'
    ' n=0; while [ ! -e "/sys/class/net/$1" ] && [ "$n" -lt 1800 ]; do sleep 0.1; n=$((n + 1)); done;'
    ' ip link set dev "$1" up && ip addr add "$2" dev "$1";'
    ' if [ "$3" -gt 1 ]; then ethtool -L "$1" combined "$3"; fi;'
    ' echo "lab-nic-rejoin: $1 $2" >/dev/console ) &'
)
GUEST_IFACE = "eth0"  # images/guest-init.sh's default lab.iface


def _live_interface(dom: Any) -> ET.Element | None:
    import libvirt

    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except libvirt.libvirtError:
        return None
    return root.find("./devices/interface")


def unplug_nic(guest: RunningGuest, timeout: float = 60.0) -> str:
    """Hot-unplug a guest's NIC (the virtio-net device and its netdev), so QEMU lets go of the tap and vhost-net.

    Before, a detached helper in the guest is told to re-address the NIC when
    it comes back (plug_nic). Returns the interface XML to plug back, with
    the same PCI address; LabError when the guest does not release it.
    """
    import libvirt

    runner = guest.runner(timeout=30)
    try:
        runner.run(["sh", "-c", NIC_REJOIN_SH, "lab-nic-rejoin", GUEST_IFACE, f"{guest.plan.guest_ip}/24", str(guest.plan.queues)],
                   timeout=30)
    finally:
        runner.close()
    dom = guest.host.libvirt().lookupByName(guest.domain)
    iface = _live_interface(dom)
    if iface is None:
        raise LabError(f"guest {guest.plan.name}: its domain has no NIC to unplug")
    for alias in iface.findall("alias"):
        iface.remove(alias)  # libvirt's own name for it; an attached device may not carry one that is not "ua-"
    xml = ET.tostring(iface, encoding="unicode")
    try:
        dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        proc.wait_for(lambda: _live_interface(dom) is None, timeout=timeout, interval=0.2, what="the NIC to go")
    except (libvirt.libvirtError, proc.WaitTimeout) as e:
        raise LabError(f"guest {guest.plan.name}: its NIC was not unplugged: {e}") from None
    return xml


def plug_nic(guest: RunningGuest, xml: str, timeout: float = 120.0) -> None:
    """Plug back what unplug_nic took (its tap re-created first), and wait until the guest answers SSH on it again."""
    import libvirt

    dom = guest.host.libvirt().lookupByName(guest.domain)
    try:
        dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise LabError(f"guest {guest.plan.name}: its NIC could not be plugged back: {e}") from None
    _wait_ssh(guest, timeout)
    # a tap libvirt opens gets noqueue, as at boot: the lab measures the kernel's default qdisc
    guest.host.agent.set_qdisc(guest.plan.tap, "default")


def destroy_guest(paths: LabPaths, host: Host, name: str, tap: str | None) -> None:
    """Destroy a guest's domain, disk overlay and tap (idempotent)."""
    import libvirt

    try:
        dom = host.libvirt().lookupByName(paths.domain_name("", name))
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
    except libvirt.libvirtError:
        pass
    host.run(["rm", "-f", f"{host.guest_dir()}/{name}.qcow2"], check=False)
    if tap:
        host.agent.tap_delete(tap)


def list_lab_guests(host: Host, lab: str) -> list[tuple[str, bool]]:
    """(domain name, active) of the lab's guests on `host`; HostGone when the host died."""
    import libvirt

    try:
        return sorted((d.name(), bool(d.isActive())) for d in host.libvirt().listAllDomains() if d.name().startswith(lab + "-"))
    except libvirt.libvirtError as e:
        raise host.libvirt_error(e, "listing domains") from None
