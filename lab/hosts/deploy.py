"""Kernels onto real hosts: push a `modules` recipe's modules, or kexec into a `full` recipe.

A nested lab host boots the artifact it is given; a real machine (provider
"ssh") already runs a kernel, so the lab brings the recipe to it:

- `modules` (Debian's image + rebuilt tun/tap/vhost/vhost_net): only when the
  remote runs exactly the release the modules were built for (they are built
  against that release's headers, with its module versions). The four module
  files and a modules.dep naming only them are uploaded (`module_push_plan`),
  then swapped in place by the agent (lab.onhost.modules.swap), and the
  loaded modules' GNU build-ids are checked against the artifact's.
- `full` (a bzImage and its modules): installed under
  <HOST_VAR>/kernels/<key>/ and /lib/modules/<release>/, then booted with
  kexec (no firmware, no boot loader change: a power cycle brings back the
  machine's own default kernel). After SSH answers again the lab checks
  `uname -r`, that the boot id changed, and the loaded modules' build-ids; if
  any check fails it kexecs back into the kernel that ran before (its
  /boot/vmlinuz-<release> and initrd) and says so.

Nothing here assumes the remote sees this machine's files: everything goes
over SSH (Host.stage uploads, Host.run runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab import proc
from lab.artifacts.kernel import LAB_MODULES
from lab.errors import HostGone, LabError
from lab.events import Progress, Step, quiet
from lab.hosts.host import HOST_VAR, Host
from lab.onhost.probe import module_file_build_id


@dataclass(frozen=True)
class ModulePush:
    """What goes onto a remote for a module swap: the lab's module files (relative paths) and their modules.dep.

    `needs` are modules the lab's depend on that are not among them (vhost
    needs vhost_iotlb): the remote's own kernel provides those.
    """

    release: str
    files: tuple[tuple[Path, str], ...]  # (file on this machine, path relative to the pushed lib/modules/<release>)
    modules_dep: str
    build_ids: Mapping[str, str]
    needs: tuple[str, ...] = ()


def _module_name(rel: str) -> str:
    return Path(rel).name.split(".ko")[0]


def module_push_plan(moddir: Path) -> ModulePush:
    """The push of the lab's modules from an artifact's lib/modules/<release> tree (pure: reads, never writes).

    Only tun, tap, vhost and vhost_net files go, and a modules.dep holding
    only their lines (dependencies outside the set are kept on the line, so
    the swap knows to load them from the remote's own tree first).
    LabError when the tree lacks one of them.
    """
    try:
        lines = (moddir / "modules.dep").read_text().splitlines()
    except OSError as e:
        raise LabError(f"{moddir}/modules.dep is not readable: {e.strerror or e}") from None
    files: list[tuple[Path, str]] = []
    dep_lines: list[str] = []
    ids: dict[str, str] = {}
    needs: list[str] = []
    for line in lines:
        rel, _, deps = line.partition(":")
        name = _module_name(rel)
        if name not in LAB_MODULES:
            continue
        files.append((moddir / rel, rel))
        dep_lines.append(line.strip())
        bid = module_file_build_id(moddir / rel)
        if bid:
            ids[name] = bid
        for d in deps.split():
            dn = _module_name(d)
            if dn not in LAB_MODULES and dn not in needs:
                needs.append(dn)
    missing = [m for m in LAB_MODULES if m not in {_module_name(r) for _, r in files}]
    if missing:
        raise LabError(f"{moddir} has no {', '.join(missing)} module (not a lab kernel artifact?)")
    return ModulePush(moddir.name, tuple(files), "\n".join(dep_lines) + "\n", ids, tuple(needs))


def push_modules(host: Host, moddir: Path, key: str) -> str:
    """The lab's modules of `moddir` on `host`, ready for the agent's `modules` verb: the directory's path there.

    A host that sees this machine's files uses the artifact's tree as it is;
    a remote gets <HOST_VAR>/modules/<key>/<release>/ with the push plan's
    files (uploaded only when their SHA-256 differs) and modules.dep.
    """
    if host.sees_local_files:
        return str(moddir)
    plan = module_push_plan(moddir)
    remote = f"{HOST_VAR}/modules/{key}/{plan.release}"
    for local, rel in plan.files:
        staged = host.stage(local, f"modules-{key}")
        dest = f"{remote}/{rel}"
        host.run(["mkdir", "-p", str(Path(dest).parent)])
        host.run(["cp", "-f", staged, dest])
    host.run(["tee", f"{remote}/modules.dep"], stdin=plan.modules_dep)
    return remote


# --------------------------------------------------------------------------- kexec


@dataclass(frozen=True)
class BootedKernel:
    """What runs on a host: its release, boot id (changes with every boot, kexec included) and command line."""

    release: str
    boot_id: str
    cmdline: str


def running_kernel(host: Host, timeout: float = 60.0) -> BootedKernel:
    """The host's running kernel."""
    res = host.run(["cat", "/proc/sys/kernel/osrelease", "/proc/sys/kernel/random/boot_id", "/proc/cmdline"], timeout=timeout)
    lines = res.stdout.splitlines()
    if len(lines) < 3:
        raise LabError(f"{host.name}: unexpected answer reading the running kernel: {res.stdout!r}")
    return BootedKernel(lines[0].strip(), lines[1].strip(), lines[2].strip())


def kexec_cmdline(current: str, extra: Sequence[str] = ()) -> str:
    """The command line to give a kexec'ed kernel: the running one's, without what the boot loader added, plus `extra`.

    BOOT_IMAGE= and initrd= name the old boot's files; a word of `extra`
    replaces a word of the same key ("name=" part).
    """
    words = [w for w in current.split() if not w.startswith(("BOOT_IMAGE=", "initrd="))]
    keys = {w.split("=", 1)[0] for w in extra}
    words = [w for w in words if w.split("=", 1)[0] not in keys]
    return " ".join([*words, *extra])


@dataclass(frozen=True)
class KexecTarget:
    """A kernel to kexec into, as files on the host."""

    release: str
    vmlinuz: str
    initrd: str
    cmdline: str


def kexec_argv(target: KexecTarget) -> list[str]:
    """`kexec -l`: load the target (the jump is a separate step)."""
    return ["kexec", "-l", target.vmlinuz, f"--initrd={target.initrd}", f"--command-line={target.cmdline}"]


# The jump, detached from the SSH session that asks for it (the connection dies
# with the old kernel): systemd shuts down cleanly first where it runs.
JUMP_SCRIPT = "sleep 1; if [ -d /run/systemd/system ]; then exec systemctl kexec; else exec kexec -e; fi"


def kexec_into(host: Host, target: KexecTarget, boot_timeout: float, progress: Progress = quiet) -> BootedKernel:
    """Load `target`, jump, and wait until the host answers SSH on a new boot; returns what runs then."""
    before = running_kernel(host)
    res = host.run(kexec_argv(target), check=False, timeout=120)
    if res.rc != 0:
        raise LabError(f"{host.name}: kexec -l {target.vmlinuz} failed: {(res.stderr or res.stdout).strip()}",
                       hint="apt-get install kexec-tools on the host; a kernel locked down by Secure Boot refuses unsigned images")
    progress(Step(host.name, f"kexec into {target.release}"))
    host.run(["setsid", "-f", "sh", "-c", JUMP_SCRIPT], check=False, timeout=30)
    host.close()  # the agent, libvirt and SSH connections die with the old kernel
    t0 = time.monotonic()
    seen: dict[str, BootedKernel | str] = {"last": ""}

    def back() -> bool:
        try:
            now = running_kernel(host, timeout=30)
        except (LabError, HostGone) as e:
            seen["last"] = str(e).splitlines()[0]
            host.close()
            return False
        seen["now"] = now
        return now.boot_id != before.boot_id

    try:
        proc.wait_for(back, timeout=boot_timeout, interval=3.0, max_interval=5.0, what=f"{host.name} after kexec",
                      on_wait=lambda s: progress(Step(host.name, "kexec: waiting for SSH", elapsed_s=s)))
    except proc.WaitTimeout:
        raise HostGone(f"{host.name}: no SSH answer {boot_timeout:.0f}s after kexec into {target.release} ({seen['last']}); "
                       "a power cycle boots the machine's default kernel") from None
    now = seen["now"]
    assert isinstance(now, BootedKernel)
    progress(Step(host.name, f"kexec: {now.release} answers after {time.monotonic() - t0:.0f}s"))
    return now


@dataclass(frozen=True)
class KexecOutcome:
    """What a kexec deploy did: the boot before, the boot after, and whether it fell back."""

    before: BootedKernel
    after: BootedKernel
    build_ids: dict[str, str]
    fell_back: bool = False
    seconds: float = 0.0


def previous_target(host: Host, before: BootedKernel) -> KexecTarget | None:
    """The kernel that runs now as a kexec target (to fall back to): /boot/vmlinuz-<release> and its initrd, if the host has them."""
    vmlinuz, initrd = f"/boot/vmlinuz-{before.release}", f"/boot/initrd.img-{before.release}"
    res = host.run(["test", "-r", vmlinuz, "-a", "-r", initrd], check=False, timeout=30)
    if res.rc != 0:
        return None
    return KexecTarget(before.release, vmlinuz, initrd, kexec_cmdline(before.cmdline))


def verify_boot(before: BootedKernel, after: BootedKernel, release: str, loaded: Mapping[str, str],
                want: Mapping[str, str]) -> list[str]:
    """What is wrong with a kexec'ed boot (empty: nothing): a new boot, the release asked for, the artifact's modules."""
    out = []
    if after.boot_id == before.boot_id:
        out.append("the host did not reboot (same boot id)")
    if after.release != release:
        out.append(f"uname -r is {after.release}, not {release}")
    wrong = sorted(m for m in want if loaded.get(m) != want[m])
    if wrong:
        out.append(f"{', '.join(wrong)} loaded with other build-ids than the artifact's ({dict(loaded)} vs {dict(want)})")
    return out


def kexec_deploy(
    host: Host,
    target: KexecTarget,
    want_build_ids: Mapping[str, str],
    boot_timeout: float,
    progress: Progress = quiet,
    fallback: KexecTarget | Callable[[], KexecTarget] | None = None,
    loaded_build_ids: Callable[[Host], Mapping[str, str]] | None = None,
) -> KexecOutcome:
    """kexec into `target` and verify it (uname -r, new boot id, module build-ids); on a failed check kexec back.

    `fallback`: the kernel to return to (default: `previous_target`, the
    running kernel's /boot files), or a function that puts it in place on the
    booted host and returns it (what the lab staged may not survive a boot:
    a lab host standing in for a remote keeps it in tmpfs). Raises LabError
    naming every failed check, after falling back when it could; HostGone
    when the host does not come back at all.
    """
    t0 = time.monotonic()
    before = running_kernel(host)
    back_to = fallback if fallback is not None else previous_target(host, before)
    after = kexec_into(host, target, boot_timeout, progress)
    probe = loaded_build_ids or (lambda h: dict(h.agent.probe().modules))
    loaded = dict(probe(host))
    problems = verify_boot(before, after, target.release, loaded, want_build_ids)
    if not problems:
        return KexecOutcome(before, after, loaded, False, round(time.monotonic() - t0, 1))
    why = "; ".join(problems)
    if back_to is None:
        raise LabError(f"{host.name}: after kexec into {target.release}: {why}; no previous kernel to fall back to "
                       f"(no /boot/vmlinuz-{before.release} with an initrd)")
    back = back_to() if callable(back_to) else back_to
    progress(Step(host.name, f"kexec check failed ({why}); back to {back.release}", warning=True))
    again = kexec_into(host, back, boot_timeout, progress)
    raise LabError(f"{host.name}: after kexec into {target.release}: {why}; fell back to {again.release} "
                   f"(boot {again.boot_id[:8]})")


def install_full(host: Host, vmlinuz: Path, modules_dir: Path, key: str, initrd: Path | None, release: str,
                 cmdline: str, timeout: float = 600.0) -> KexecTarget:
    """Put a full kernel artifact on the host: vmlinuz (and `initrd` when given) under <HOST_VAR>/kernels/<key>/,
    its modules under /lib/modules/<release>/ (never over the running kernel's own tree), and an initrd made
    there by mkinitramfs when none is given. Returns the kexec target.
    """
    running = running_kernel(host).release
    kdir = f"{HOST_VAR}/kernels/{key}"
    host.run(["mkdir", "-p", kdir])
    staged = host.stage(vmlinuz, f"kernel-{key}")
    host.run(["cp", "-f", staged, f"{kdir}/vmlinuz"])
    if release != running:
        tar = _modules_tarball(modules_dir)
        remote_tar = host.stage(tar, f"kernel-{key}")
        host.run(["tar", "-x", "-f", remote_tar, "-C", "/lib/modules"], timeout=timeout)
        host.run(["depmod", "-a", release], timeout=timeout)
    if initrd is not None:
        remote_initrd = host.stage(initrd, f"kernel-{key}")
    else:
        remote_initrd = f"{kdir}/initrd.img"
        res = host.run(["mkinitramfs", "-o", remote_initrd, release], check=False, timeout=timeout)
        if res.rc != 0:
            raise LabError(f"{host.name}: mkinitramfs for {release} failed: {(res.stderr or res.stdout).strip()[-300:]}",
                           hint="apt-get install initramfs-tools on the host")
    return KexecTarget(release, f"{kdir}/vmlinuz", remote_initrd, cmdline)


def _modules_tarball(modules_dir: Path) -> Path:
    """lib/modules/<release> of an artifact as one tar file beside it (made once: the artifact never changes)."""
    # beside the artifact's root/ (not inside lib/modules, which lab hosts mount as their module tree)
    tar = modules_dir.parents[3] / f"modules-{modules_dir.name}.tar"
    if not tar.exists():
        tmp = tar.with_suffix(".tmp")
        proc.run(["tar", "-c", "-f", str(tmp), "-C", str(modules_dir.parent), modules_dir.name], timeout=600).check("tar")
        tmp.replace(tar)
    return tar
