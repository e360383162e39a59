"""The nested provider's lifecycle: boot, find and destroy lab host VMs.

A lab host is a transient libvirt domain on this machine (nothing is left in
/etc/libvirt), named "<lab>-<host>", booted directly on a kernel artifact
with the lab's own initramfs. Readiness is announced through the host's state
share (a `ready` file), then confirmed over SSH.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lab import proc
from lab.artifacts.initramfs import InitramfsSpec, cached_initramfs
from lab.errors import LabError
from lab.events import Progress, Step, quiet
from lab.hosts.domains import LabHostDomain, SharedDir, labhost_xml
from lab.hosts.host import LABHOST_INIT, LABHOST_INITRAMFS, HostRuntime, NestedHost, outer_accel, outer_libvirt
from lab.hosts.remote import free_loopback_port
from lab.paths import LabPaths

# What the lab host's initramfs must load before it can reach its root.
LABHOST_MODULES = ("9p", "9pnet_virtio", "overlay")


@dataclass(frozen=True)
class KernelBoot:
    """The parts of a kernel artifact a lab host boots from."""

    recipe: str
    key: str
    vmlinuz: Path
    modules_root: Path  # holds lib/modules/<release>
    release: str
    module_build_ids: dict[str, str]
    cmdline: tuple[str, ...] = ()  # the recipe's extra kernel command line

    @classmethod
    def from_artifact(cls, art, cmdline: tuple[str, ...] = ()) -> KernelBoot:
        """From lab.artifacts.kernel.KernelArtifact (duck-typed to keep this module light)."""
        root = Path(art.modules_root)
        ids = artifact_build_ids(root / "lib" / "modules" / art.release)
        return cls(art.recipe, art.key, Path(art.vmlinuz), root, art.release, ids, tuple(cmdline))


def artifact_build_ids(modules_dir: Path) -> dict[str, str]:
    """GNU build-ids of the lab's modules in an artifact, to compare with what a host loaded."""
    from lab.artifacts.kernel import LAB_MODULES
    from lab.onhost.probe import module_file_build_id

    out: dict[str, str] = {}
    try:
        lines = (modules_dir / "modules.dep").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        rel = line.split(":", 1)[0]
        name = Path(rel).name.split(".ko")[0]
        if name in LAB_MODULES:
            bid = module_file_build_id(modules_dir / rel)
            if bid:
                out[name] = bid
    return out



def libvirt_caps_dir(paths: LabPaths, kernel: KernelBoot) -> Path:
    """Where lab hosts keep libvirt's QEMU capability probe: one directory per (kernel release, QEMU,
    libvirtd) on this machine, shared by every lab name and host, so a new lab does not probe again
    (about a minute under TCG). libvirt checks a cached probe against the binaries itself."""
    import hashlib

    ident = [kernel.release]
    for exe in ("/usr/bin/qemu-system-x86_64", "/usr/sbin/libvirtd"):
        try:
            st = os.stat(exe)
            ident.append(f"{exe}:{st.st_size}:{int(st.st_mtime)}")
        except OSError:
            ident.append(f"{exe}:absent")
    d = paths.workdir / "libvirt-caps" / f"{kernel.release}-{hashlib.sha256('|'.join(ident).encode()).hexdigest()[:12]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def labhost_initrd(paths: LabPaths, kernel: KernelBoot) -> Path:
    """The lab host initramfs for `kernel` (cached by content): what boots a lab host, and what a lab host kexecs with."""
    modules_dir = kernel.modules_root / "lib" / "modules" / kernel.release
    return cached_initramfs(
        InitramfsSpec(modules_dir, LABHOST_MODULES, LABHOST_INITRAMFS.read_text()), paths.initrd_dir, f"labhost-{kernel.key[:12]}"
    )


def find_host(paths: LabPaths, name: str, key: Path, command_timeout: float = 120.0) -> NestedHost | None:
    """The running lab host `name`, or None when it is not up."""
    rt = HostRuntime.load(paths.host_runtime(name))
    if rt is None or rt.domain is None:
        return None
    conn = outer_libvirt()
    try:
        dom = conn.lookupByName(rt.domain)
        if not dom.isActive():
            return None
    except Exception:
        return None
    finally:
        conn.close()
    return NestedHost(name=name, runtime=rt, key=key, state_dir=paths.host_dir(name), command_timeout=command_timeout)


def boot_host(
    paths: LabPaths,
    name: str,
    kernel: KernelBoot,
    vcpus: int,
    memory_mib: int,
    key_private: Path,
    key_public_text: str,
    ssh_port: int = 0,
    boot_timeout: float = 300.0,
    command_timeout: float = 120.0,
    progress: Progress = quiet,
) -> NestedHost:
    """Boot lab host `name` on `kernel` and return it once SSH answers.

    A host already running on the same kernel artifact is reused; one on
    another kernel is destroyed first. On failure the VM is destroyed and the
    console log's tail is in the error.
    """
    existing = find_host(paths, name, key_private, command_timeout)
    if existing is not None:
        if existing.runtime.kernel_key == kernel.key:
            return existing
        destroy_host(paths, name)

    state = paths.host_dir(name)
    (state / "guests").mkdir(parents=True, exist_ok=True)
    for stale in ("ready", "ready.tmp"):
        (state / stale).unlink(missing_ok=True)
    (state / "authorized_keys").write_text(key_public_text.strip() + "\n")
    os.chmod(state / "authorized_keys", 0o600)

    progress(Step(name, "initramfs"))
    initrd = labhost_initrd(paths, kernel)
    port = ssh_port or free_loopback_port()
    accel = outer_accel()
    domain = paths.domain_name(name)
    console = paths.host_console(name)
    console.write_text("")
    cmdline = " ".join(
        [
            "console=ttyS0",
            "panic=-1",
            "quiet",
            "loglevel=4",
            # TCG has no reliable TSC; this saves seconds of calibration noise.
            "tsc=unstable",
            f"lab.hostname={name}",
            f"lab.init={LABHOST_INIT}",
            f"lab.overlay_size={max(512, memory_mib // 2)}M",
            *kernel.cmdline,
        ]
    )
    xml = labhost_xml(
        LabHostDomain(
            name=domain,
            vcpus=vcpus,
            memory_mib=memory_mib,
            kernel=kernel.vmlinuz,
            initrd=initrd,
            cmdline=cmdline,
            console_log=console,
            ssh_port=port,
            shares=(
                SharedDir(Path("/"), "labroot"),
                SharedDir(kernel.modules_root / "lib" / "modules", "labkernel"),
                SharedDir(state, "labstate", readonly=False),
                SharedDir(libvirt_caps_dir(paths, kernel), "labcaps", readonly=False),
            ),
            accel=accel,
        )
    )
    rt = HostRuntime(
        name=name,
        provider="nested",
        domain=domain,
        ssh_port=port,
        kernel_recipe=kernel.recipe,
        kernel_key=kernel.key,
        kernel_release=kernel.release,
        accel=accel,
        started_at=time.time(),
        module_build_ids=kernel.module_build_ids,
    )
    rt.save(paths.host_runtime(name))
    conn = outer_libvirt()
    try:
        progress(Step(name, f"booting {kernel.recipe} ({kernel.release}, {accel})"))
        try:
            conn.createXML(xml, 0)
        except Exception as e:
            raise LabError(f"lab host {name}: libvirt refused to start it: {e}") from None
    finally:
        conn.close()

    host = NestedHost(name=name, runtime=rt, key=key_private, state_dir=state, command_timeout=command_timeout)
    try:
        _wait_ready(paths, host, boot_timeout, progress)
    except BaseException:
        destroy_host(paths, name)
        raise
    return host


def _console_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console log)"


def _wait_ready(paths: LabPaths, host: NestedHost, timeout: float, progress: Progress) -> None:
    """Until the host's init announced itself (the `ready` file) and SSH answers.

    One libvirt connection serves the whole wait (a poll is a file check and
    an isActive() call, not new processes): the 2 cores are busy booting.
    """
    t0 = time.monotonic()
    ready = paths.host_dir(host.name) / "ready"
    console = paths.host_console(host.name)
    conn = outer_libvirt()
    try:
        dom = conn.lookupByName(host.runtime.domain)

        def booted() -> bool:
            if ready.exists():
                return True
            text = console.read_text(errors="replace") if console.exists() else ""
            if "LAB-HOST-FAILED" in text or "Kernel panic" in text:
                raise LabError(f"lab host {host.name} failed to boot; console:\n{_console_tail(console)}")
            if not dom.isActive():
                raise LabError(f"lab host {host.name} stopped while booting; console:\n{_console_tail(console)}")
            return False

        try:
            proc.wait_for(booted, timeout=timeout, interval=0.5, max_interval=2.0, what=f"lab host {host.name} to boot",
                          on_wait=lambda s: progress(Step(host.name, "booting", elapsed_s=s)))
        except proc.WaitTimeout:
            raise LabError(f"lab host {host.name} did not come up in {timeout:.0f}s; console:\n{_console_tail(console)}") from None
    finally:
        conn.close()
    progress(Step(host.name, "waiting for SSH"))
    last = {"err": ""}

    def answers() -> bool:
        res = host.run(["true"], timeout=60, check=False)
        last["err"] = res.stderr.strip()
        return res.rc == 0

    try:
        proc.wait_for(answers, timeout=max(10.0, timeout - (time.monotonic() - t0)), interval=1.0, what="SSH")
    except proc.WaitTimeout:
        raise LabError(f"lab host {host.name}: SSH on 127.0.0.1:{host.runtime.ssh_port} does not answer: {last['err']}") from None


def destroy_host(paths: LabPaths, name: str) -> bool:
    """Destroy lab host `name` (idempotent); True when a VM was stopped."""
    import libvirt

    conn = outer_libvirt()
    stopped = False
    try:
        try:
            dom = conn.lookupByName(paths.domain_name(name))
            if dom.isActive():
                dom.destroy()
                stopped = True
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError:
            pass
    finally:
        conn.close()
    paths.host_runtime(name).unlink(missing_ok=True)
    (paths.host_dir(name) / "ready").unlink(missing_ok=True)
    # libvirtd socket forwards (NestedHost._forward_socket): their ssh ends with
    # the VM, but a lab process killed with -9 never removed its socket file.
    for sock in paths.host_dir(name).glob("libvirt-*.sock"):
        sock.unlink(missing_ok=True)
    return stopped


def lab_domains(prefix: str) -> list[str]:
    """Names of this machine's libvirt domains that belong to lab `prefix`."""
    conn = outer_libvirt()
    try:
        return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(prefix + "-"))
    finally:
        conn.close()
