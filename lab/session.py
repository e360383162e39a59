"""A lab session: one host of a lab and the guests on it, kept in the state a run asks for.

    ctx = LabContext.open(cfg)
    session = LabSession(ctx, cfg.hosts["lab1"], emit)
    host = session.kernel("nodrop")          # boot, reuse, or swap modules in the running boot
    guest = session.guest(plan)              # boot (or reuse) a guest with this NIC
    ...
    session.close()                          # destroy what this session started

The matrix runner (lab.measure.matrix) and `lab up` (lab.lifecycle) share it,
so hosts, guests and module swaps have one owner, and the runner only plans,
measures and records.

Same boot, other kernel: two "modules" recipes on the same Debian base differ
only in tun, tap, vhost and vhost_net, so `kernel()` moves a running lab host
from one to the other without a reboot: the guest (whose QEMU holds the
modules) and the lab's taps go, the modules are swapped and checked by GNU
build-id (lab.onhost.modules), and the next `guest()` boots a fresh guest.
That removes lab-host-boot-to-boot noise from stock-vs-patched comparisons.
Recipes that cannot share a boot (another base, "full") get a boot of their
own, and `boot_key` tells the runner which is which.

A host that dies (an oops under TCG, sysrq c in a test) is seen through its
console: `crash()` gives the report, `forget_host()` drops every handle on
it, and the next `kernel()` boots a new one. A session destroys only what it
started (`close`): a `lab up` that fails leaves the hosts and guests that were
running before it.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.config import GuestSpec, HostSpec, LabConfig
from lab.errors import ConfigError, HostCrashed, HostGone, LabError
from lab.events import Emit, GuestBooted, HostBooted, ModulesSwapped, Progress, Step, quiet
from lab.guests import GuestPlan, RunningGuest, boot_guest, destroy_guest, guest_tap, list_lab_guests, plug_nic, unplug_nic
from lab.hosts.console import find_oops, find_stall
from lab.hosts.deploy import KexecOutcome, KexecTarget, install_full, kexec_cmdline, kexec_deploy, push_modules, running_kernel
from lab.hosts.host import Host, LocalHost, SshHost
from lab.hosts.nested import KernelBoot, artifact_build_ids, boot_host, destroy_host, find_host, labhost_initrd
from lab.hosts.sshkeys import SshKeyPair, ensure_keypair
from lab.onhost.modules import params_from_cmdline
from lab.paths import LabPaths


@dataclass
class LabContext:
    """A loaded lab with its paths and key: what every command starts from."""

    cfg: LabConfig
    paths: LabPaths
    key: SshKeyPair
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: LabConfig) -> LabContext:
        """Prepare the workdir and the lab's key pair."""
        paths = LabPaths(cfg.workdir, cfg.name)
        paths.lab_dir.mkdir(parents=True, exist_ok=True)
        return cls(cfg, paths, ensure_keypair(cfg.workdir, cfg.name))

    def close(self) -> None:
        """Release every host connection."""
        for h in self.hosts.values():
            h.close()
        self.hosts.clear()


# --------------------------------------------------------------------------- artifacts


def kernel_boot(ctx: LabContext, recipe_name: str, progress: Progress = quiet) -> KernelBoot:
    """The kernel artifact for a recipe, built if missing."""
    from lab.artifacts.kernel import build_kernel

    recipe = ctx.cfg.kernels[recipe_name]
    art = build_kernel(recipe, ctx.cfg.workdir, progress=progress, timeout=ctx.cfg.timeouts.build)
    return KernelBoot.from_artifact(art, cmdline=recipe.cmdline)


def guest_kernel(ctx: LabContext, progress: Progress = quiet) -> KernelBoot:
    """The kernel guests boot: the stock recipe's (guests are not under test)."""
    return kernel_boot(ctx, ctx.cfg.expectations.stock_kernel, progress)


def guest_image(ctx: LabContext, image_name: str, progress: Progress = quiet) -> Path:
    """The base disk of an image recipe, built if missing."""
    from lab.artifacts.image import build_image

    ref = ctx.cfg.images[image_name]
    img = build_image(ref.recipe, ctx.cfg.workdir, ctx.key.public_key_text(), progress=progress, timeout=ctx.cfg.timeouts.build)
    return img.path


def guest_plan(
    ctx: LabContext,
    spec: GuestSpec,
    backend: str | None = None,
    txqueuelen: int | None = None,
    queues: int | None = None,
    progress: Progress = quiet,
) -> GuestPlan:
    """Resolve a guest's config into a bootable plan (building artifacts)."""
    kb = guest_kernel(ctx, progress)
    return GuestPlan(
        name=spec.name,
        index=spec.index,
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        backend=backend or spec.net.backend,
        txqueuelen=txqueuelen or spec.net.txqueuelen,
        tap=spec.net.tap,
        image=guest_image(ctx, spec.image, progress),
        kernel=kb.vmlinuz,
        modules_dir=kb.modules_root / "lib" / "modules" / kb.release,
        queues=queues or spec.net.queues,
    )


def deploy_full(ctx: LabContext, host: Host, kb: KernelBoot, boot_timeout: float, progress: Progress = quiet,
                fallback_kb: KernelBoot | None = None) -> KexecOutcome:
    """Install kernel `kb` on an ssh host and kexec into it, verified (lab.hosts.deploy.kexec_deploy).

    A host that is itself a lab host (its command line has lab.init=) boots
    with the lab host initramfs of `kb`, sent along; any other host gets an
    initrd made on it by mkinitramfs. `fallback_kb`: the kernel to return to
    on a failed check (default: the host's running kernel from its /boot).
    """
    current = running_kernel(host)
    labhost = "lab.init=" in current.cmdline
    moddir = kb.modules_root / "lib" / "modules" / kb.release
    target = install_full(host, kb.vmlinuz, moddir, kb.key[:12], labhost_initrd(ctx.paths, kb) if labhost else None, kb.release,
                          kexec_cmdline(current.cmdline, kb.cmdline), timeout=ctx.cfg.timeouts.build)
    fallback = None
    if fallback_kb is not None:
        fkb = fallback_kb
        fmod = fkb.modules_root / "lib" / "modules" / fkb.release

        def reinstall() -> KexecTarget:  # installed when needed, on the boot that failed its checks
            return install_full(host, fkb.vmlinuz, fmod, fkb.key[:12], labhost_initrd(ctx.paths, fkb) if labhost else None,
                                fkb.release, kexec_cmdline(current.cmdline), timeout=ctx.cfg.timeouts.build)

        fallback = reinstall
    return kexec_deploy(host, target, kb.module_build_ids, boot_timeout, progress, fallback=fallback)


def boot_key(cfg: LabConfig, recipe: str) -> str:
    """Recipes with the same key can share one lab host boot (module swap); others cannot."""
    r = cfg.kernels[recipe]
    if r.strategy == "modules" and r.debian_version:
        return f"debian:{r.debian_version}"
    return f"{r.strategy}:{r.name}"


# --------------------------------------------------------------------------- hosts


def connect_host(ctx: LabContext, spec: HostSpec) -> Host | None:
    """The running host for `spec` (None when a nested host is not up)."""
    if spec.name in ctx.hosts:
        return ctx.hosts[spec.name]
    host: Host | None
    timeout = ctx.cfg.timeouts.command
    if spec.provider == "nested":
        host = find_host(ctx.paths, spec.name, ctx.key.private, timeout)
    elif spec.provider == "local":
        host = LocalHost(name=spec.name, command_timeout=timeout)
    else:
        host = SshHost(name=spec.name, uri=spec.uri, address=spec.address, user=spec.user or "root", key=ctx.key.private,
                       port=spec.ssh_port or 22, command_timeout=timeout, remote_python=spec.python, lab_path=spec.lab_path)
    if host is not None:
        ctx.hosts[spec.name] = host
    return host


def up_host(ctx: LabContext, spec: HostSpec, kernel: str | None = None, progress: Progress = quiet) -> Host:
    """Make host `spec` run (on `kernel`, default its own); reuse it when it already does."""
    if spec.provider == "local":
        host = LocalHost(name=spec.name, command_timeout=ctx.cfg.timeouts.command)
        host.require_usable()
        ctx.hosts[spec.name] = host
        return host
    if spec.provider == "ssh":
        host = connect_host(ctx, spec)
        assert host is not None
        problems = host.probe().problems()
        if problems:
            raise LabError(f"host {spec.name} ({spec.address}) cannot run guests: " + "; ".join(problems))
        return host
    recipe = kernel or spec.kernel
    if recipe is None:
        raise ConfigError(f"hosts.{spec.name}.kernel", "a nested host needs a kernel recipe")
    kb = kernel_boot(ctx, recipe, progress)
    old = ctx.hosts.pop(spec.name, None)
    if old is not None:
        old.close()
    host = boot_host(
        ctx.paths,
        spec.name,
        kb,
        spec.vcpus,
        spec.memory_mib,
        ctx.key.private,
        ctx.key.public_key_text(),
        ssh_port=spec.ssh_port,
        boot_timeout=ctx.cfg.timeouts.host_boot,
        command_timeout=ctx.cfg.timeouts.command,
        progress=progress,
    )
    ctx.hosts[spec.name] = host
    return host


# --------------------------------------------------------------------------- the session


def console_crash(host: str, console: Path, keep_dir: Path | None = None) -> HostCrashed:
    """What killed lab host `host`, read from its console log: the oops, or else the stall it printed.

    The console is copied to `keep_dir` when given (the next boot overwrites it).
    """
    try:
        text = console.read_text(errors="replace")
    except OSError:
        text = ""
    oops = find_oops(text)
    kept: str | None = None
    if keep_dir is not None and console.exists():
        keep_dir.mkdir(parents=True, exist_ok=True)
        dest = keep_dir / f"{host}-console-{time.strftime('%Y%m%dT%H%M%S')}.log"
        try:
            shutil.copyfile(console, dest)
            kept = str(dest)
        except OSError:
            kept = str(console)
    if oops is None:
        return HostCrashed(host, None, "", kept, stall=find_stall(text))
    return HostCrashed(host, oops.first, oops.head, kept)


@dataclass
class HostState:
    """The running host as the session knows it."""

    host: Host
    booted_recipe: str  # the kernel artifact the host booted (or the label of a local/ssh host)
    modules_recipe: str  # whose tun/tap/vhost/vhost_net run now (a swap changes this, not booted_recipe)
    arm: str  # the arm (lab.measure.cells.Arm name) those modules serve; an A/A control has two per recipe
    boot_id: str  # "<host>@<started>": cells measured in one boot share it
    facts: dict[str, Any]
    started_here: bool


class LabSession:
    """One host and its guests (see the module doc). `emit` gets Steps and session events."""

    def __init__(self, ctx: LabContext, host_spec: HostSpec, emit: Emit = quiet, swap: str = "reboot-guest") -> None:
        self.ctx = ctx
        self.spec = host_spec
        self.emit = emit
        self.swap_policy = swap
        self.state: HostState | None = None
        self.guests: dict[str, RunningGuest] = {}
        self.started_guests: set[str] = set()
        self.boots: list[dict[str, Any]] = []  # one entry per lab host boot this session made
        self.swaps: list[dict[str, Any]] = []
        self._hosts_started: set[str] = set()  # boot ids this session booted

    # ---- the kernel ----------------------------------------------------------------
    def kernel(self, recipe: str, arm: str | None = None) -> Host:
        """The host, running `recipe`'s lab modules for `arm` (default: the recipe's name).

        Reused when it already does; else the modules are swapped in the
        running boot when they can be (same base, see `can_swap`), else a lab
        host is booted on `recipe`. Moving to another arm of the same recipe
        (an A/A control) swaps too, so both arms go through the same steps.
        """
        arm = arm or recipe
        st = self.state
        if st is not None and st.arm == arm and st.modules_recipe == recipe:
            return st.host
        if st is not None and self.can_swap(st.booted_recipe, recipe):
            self._swap(recipe, arm)
            return st.host
        host = self._boot(recipe)
        assert self.state is not None
        self.state.arm = arm
        return host

    def adopt_or_boot(self, recipe: str | None) -> Host:
        """`lab up`: the host as it runs (on the spec's kernel), or booted when it does not."""
        return self.kernel(recipe or self.spec.kernel or "")

    def can_swap(self, booted: str, recipe: str) -> bool:
        """Whether a host booted on `booted` can run `recipe` by swapping modules.

        Nested hosts and ssh hosts can (an ssh host gets the modules pushed,
        lab.hosts.deploy); a local host runs what this machine booted. On an
        ssh host the release is checked again when the swap happens.
        """
        if self.swap_policy == "reboot-host" or self.spec.provider not in ("nested", "ssh"):
            return False
        cfg = self.ctx.cfg
        if booted not in cfg.kernels or recipe not in cfg.kernels:
            return False
        return boot_key(cfg, booted) == boot_key(cfg, recipe)

    def _boot(self, recipe: str) -> Host:
        self.drop_guests(destroy=self.spec.provider != "nested")  # a nested reboot takes its guests with it
        before = self._running_started_at()
        t0 = time.monotonic()
        self.emit(Step(self.spec.name, f"lab host on kernel {recipe}"))
        host = up_host(self.ctx, self.spec, kernel=recipe, progress=self.emit)
        rt = getattr(host, "runtime", None)
        started = getattr(rt, "started_at", None)
        booted_here = self.spec.provider == "nested" and (before is None or started != before)
        if self.spec.provider == "ssh" and recipe in self.ctx.cfg.kernels:
            self.state = None
            booted_here = self._deploy(host, recipe) or booted_here
        facts = self._probe(host, recipe)
        seconds = round(time.monotonic() - t0, 1)
        if started:
            boot_id = f"{self.spec.name}@{started:.0f}"
        elif self.spec.provider in ("ssh", "local"):
            boot_id = f"{self.spec.name}@{running_kernel(host).boot_id[:8]}"  # the kernel's own boot id: a kexec changes it
        else:
            boot_id = f"{self.spec.name}@{uuid.uuid4().hex[:8]}"
        if booted_here:
            self._hosts_started.add(boot_id)
            facts["boot_s"] = seconds
            self.boots.append({"boot_id": boot_id, "recipe": recipe, "seconds": seconds})
            self.emit(HostBooted(self.spec.name, recipe, seconds, boot_id))
        self.state = HostState(host, recipe, recipe, recipe, boot_id, facts, booted_here)
        return host

    def _deploy(self, host: Host, recipe: str) -> bool:
        """Make an ssh host run `recipe`: push and swap a `modules` recipe's modules, kexec into a `full` one.

        Nothing happens when the host already runs the recipe's modules
        (same build-ids). True when the host was rebooted (kexec).
        """
        kb = kernel_boot(self.ctx, recipe, self.emit)
        loaded = dict(host.agent.probe().modules)
        r = self.ctx.cfg.kernels[recipe]
        release = running_kernel(host).release
        if release == kb.release and kb.module_build_ids and all(loaded.get(m) == b for m, b in kb.module_build_ids.items()):
            self.emit(Step(self.spec.name, f"already runs {recipe}'s modules"))
            return False
        if r.strategy == "modules":
            # a lab tap left behind holds tun, so it goes first (guests went in _boot)
            for tap in host.agent.tap_list(f"{self.ctx.cfg.name}-"):
                host.agent.tap_delete(tap.name)
            self._swap_in(host, recipe, kb)
            return False
        deploy_full(self.ctx, host, kb, self.ctx.cfg.timeouts.host_boot, self.emit)
        return True

    def _swap_in(self, host: Host, recipe: str, kb: KernelBoot) -> dict[str, Any]:
        """Put `recipe`'s modules in place of the loaded ones (pushed to a remote first); checked by build-id."""
        moddir = kb.modules_root / "lib" / "modules" / kb.release
        if not host.sees_local_files:
            release = running_kernel(host).release
            if release != kb.release:
                raise LabError(
                    f"{self.spec.name} runs {release}, but recipe {recipe}'s modules are built for {kb.release}: "
                    "they cannot be loaded into another release",
                    hint=f'boot {self.spec.name} on {kb.release}, or use a strategy = "full" recipe (installed and kexec\'ed)',
                )
        where = str(moddir) if host.sees_local_files else push_modules(host, moddir, kb.key[:12])
        params = [f"{m}.{p}" for m, ps in params_from_cmdline(kb.cmdline).items() for p in ps]
        loaded = host.agent.swap_modules(Path(where), params, timeout=self.ctx.cfg.timeouts.command)
        want = artifact_build_ids(moddir)
        if loaded.build_ids != want:
            raise LabError(f"{self.spec.name}: after the swap to {recipe} the loaded modules are not the artifact's: {loaded.build_ids}")
        return {"build_ids": dict(loaded.build_ids), "seconds": loaded.seconds}

    def _running_started_at(self) -> float | None:
        if self.spec.provider != "nested":
            return None
        try:
            h = find_host(self.ctx.paths, self.spec.name, self.ctx.key.private, self.ctx.cfg.timeouts.command)
        except Exception:
            return None
        return None if h is None else h.runtime.started_at

    def _probe(self, host: Host, recipe: str) -> dict[str, Any]:
        p = host.probe()
        facts: dict[str, Any] = {
            "host": self.spec.name,
            "provider": self.spec.provider,
            "kernel_recipe": recipe,
            "kernel_release": p.release,
            "accel": p.accel,
            "guest_accel": "kvm",
            "cpu_model": p.cpu_model,
            "modules": dict(p.modules),
            "modules_match": p.modules_match,
        }
        if p.modules_match is False:
            self.emit(Step(f"{self.spec.name}/{recipe}", "loaded tun/tap/vhost modules are not the artifact's", warning=True))
        self.emit(Step(f"{self.spec.name}/{recipe}", f"{p.release}, accel {p.accel}"))
        return facts

    def _swap(self, recipe: str, arm: str) -> None:
        st = self.state
        assert st is not None
        old = st.arm
        self.emit(Step(self.spec.name, f"swapping modules {old} -> {recipe}"))
        kb = kernel_boot(self.ctx, recipe, self.emit)
        t0 = time.monotonic()
        unplugged = self._release_modules()
        release_s = time.monotonic() - t0
        try:
            loaded = self._swap_in(st.host, recipe, kb)
        except BaseException:
            for name in unplugged:  # no NIC to measure through: boot them again
                self.drop_guest(name, destroy=True)
            raise
        st.modules_recipe, st.arm = recipe, arm
        st.facts = {**st.facts, "modules": dict(loaded["build_ids"]), "modules_recipe": recipe}
        t1 = time.monotonic()
        self._plug_back(unplugged)
        record = {"from": old, "to": arm, "recipe": recipe, "seconds": loaded["seconds"], "boot_id": st.boot_id,
                  "release": self.swap_policy, "release_s": round(release_s, 2)}
        if unplugged:
            record["replug_s"] = round(time.monotonic() - t1, 2)  # NIC back and SSH answering (a guest boot otherwise)
        self.swaps.append(record)
        self.emit(ModulesSwapped(self.spec.name, old, arm, loaded["seconds"], dict(loaded["build_ids"])))

    def _release_modules(self) -> dict[str, str]:
        """Let go of tun/tap/vhost/vhost_net: guests destroyed, or (hot-unplug) their NICs unplugged; then the lab's taps.

        Returns the unplugged NICs' XML by guest. A guest that does not give
        its NIC up is destroyed instead (booted again for its next cell).
        """
        st = self.state
        assert st is not None
        unplugged: dict[str, str] = {}
        if self.swap_policy == "hot-unplug":
            for name, guest in list(self.guests.items()):
                try:
                    unplugged[name] = unplug_nic(guest, self.ctx.cfg.timeouts.command)
                except (LabError, HostGone) as exc:
                    self.emit(Step(name, f"hot-unplug failed, destroying the guest: {exc}", warning=True))
                    self.drop_guest(name, destroy=True)
            self._destroy_lab_guests(keep=frozenset(unplugged))  # a lab guest this session did not boot holds the modules too
        else:
            self.drop_guests(destroy=True)
        for tap in st.host.agent.tap_list(f"{self.ctx.cfg.name}-"):
            st.host.agent.tap_delete(tap.name)
        return unplugged

    def _plug_back(self, unplugged: dict[str, str]) -> None:
        """Re-create the taps of unplugged NICs and plug them back; a guest that does not answer again is destroyed."""
        st = self.state
        assert st is not None
        for name, xml in unplugged.items():
            guest = self.guests[name]
            try:
                st.host.agent.tap_create(guest_tap(guest.plan))
                plug_nic(guest, xml, self.ctx.cfg.timeouts.guest_boot)
            except (LabError, HostGone) as exc:
                self.emit(Step(name, f"NIC not back after the swap, destroying the guest: {exc}", warning=True))
                self.drop_guest(name, destroy=True)

    def modules_loaded(self) -> dict[str, Any] | None:
        """What cells record as `modules_loaded`: whose modules run now, and their build-ids."""
        st = self.state
        if st is None:
            return None
        return {"recipe": st.modules_recipe, "arm": st.arm, "build_ids": dict(st.facts.get("modules") or {})}

    # ---- guests ----------------------------------------------------------------------
    def guest(self, plan: GuestPlan) -> RunningGuest:
        """`plan`'s guest on the host, booted fresh unless one with the same NIC already runs."""
        st = self.state
        if st is None:
            raise LabError("no lab host: call kernel() first")
        running = self.guests.get(plan.name)
        if running is not None and (running.plan.backend, running.plan.queues) == (plan.backend, plan.queues):
            return running
        self.drop_guest(plan.name, destroy=False)  # boot_guest destroys the old domain, overlay and tap first
        t0 = time.monotonic()
        guest = boot_guest(self.ctx.paths, st.host, plan, self.ctx.key.private, self.ctx.cfg.timeouts.guest_boot, self.emit)
        self.guests[plan.name] = guest
        self.started_guests.add(plan.name)
        self.emit(GuestBooted(plan.name, self.spec.name, plan.backend, plan.queues, round(time.monotonic() - t0, 1)))
        return guest

    def adopt_guest(self, plan: GuestPlan) -> RunningGuest | None:
        """A guest of `plan` that already runs and answers SSH (not started by this session), or None."""
        st = self.state
        if st is None:
            return None
        try:
            active = dict(list_lab_guests(st.host, self.ctx.cfg.name))
        except (HostGone, LabError):
            return None
        domain = self.ctx.paths.domain_name("", plan.name)
        if not active.get(domain):
            return None
        guest = RunningGuest(plan=plan, host=st.host, domain=domain, key=self.ctx.key.private, console=st.host.guest_log(plan.name))
        runner = guest.runner(timeout=20)
        try:
            if runner.run(["true"], timeout=20, check=False).rc != 0:
                return None
        finally:
            runner.close()
        self.guests[plan.name] = guest
        return guest

    def drop_guest(self, name: str, destroy: bool) -> None:
        """Forget guest `name`; destroy it (domain, overlay, tap) when `destroy`."""
        guest = self.guests.pop(name, None)
        if guest is not None and destroy and self.state is not None:
            try:
                destroy_guest(self.ctx.paths, guest.host, guest.plan.name, guest.plan.tap)
            except (HostGone, LabError) as exc:
                self.emit(Step(name, f"destroy failed: {exc}", warning=True))

    def drop_guests(self, destroy: bool) -> None:
        """Forget (and destroy) every guest of the session; also lab guests a run did not boot."""
        for name in list(self.guests):
            self.drop_guest(name, destroy)
        if destroy:
            self._destroy_lab_guests()

    def _destroy_lab_guests(self, keep: frozenset[str] = frozenset()) -> None:
        """Destroy the lab's guests on the host but those named in `keep`, also ones this session did not boot."""
        st = self.state
        if st is None:
            return
        try:
            for dom, _active in list_lab_guests(st.host, self.ctx.cfg.name):
                name = dom[len(self.ctx.cfg.name) + 1 :]
                if name not in keep:
                    tap = self.ctx.cfg.guests[name].net.tap if name in self.ctx.cfg.guests else None
                    destroy_guest(self.ctx.paths, st.host, name, tap)
        except (HostGone, LabError) as exc:
            self.emit(Step(self.spec.name, f"cleaning guests: {exc}", warning=True))

    # ---- faults ---------------------------------------------------------------------
    def crash(self, keep_dir: Path | None = None) -> HostCrashed:
        """What killed the host, from its console; the console is copied to `keep_dir` when given."""
        return console_crash(self.spec.name, self.ctx.paths.host_console(self.spec.name), keep_dir)

    def host_alive(self) -> bool:
        """Whether the host still answers (a nested host: its VM runs and SSH answers)."""
        st = self.state
        if st is None:
            return False
        if self.spec.provider == "nested":
            try:
                if find_host(self.ctx.paths, self.spec.name, self.ctx.key.private) is None:
                    return False
            except Exception:
                pass
        try:
            return st.host.run(["true"], timeout=20, check=False).rc == 0
        except Exception:
            return False

    def forget_host(self) -> None:
        """Drop every handle on a lost host without talking to it (the next kernel() boots a new one)."""
        self.guests.clear()
        st, self.state = self.state, None
        if st is not None:
            self.ctx.hosts.pop(self.spec.name, None)
            try:
                st.host.close()
            except Exception:
                pass
        if self.spec.provider == "nested":
            try:
                destroy_host(self.ctx.paths, self.spec.name)  # a panicked VM may linger until libvirt sees it
            except Exception:
                pass

    # ---- the end ----------------------------------------------------------------------
    def close(self, keep: bool = False) -> None:
        """Destroy what this session started (guests, then a lab host it booted) unless `keep`. Idempotent."""
        if keep:
            return
        st = self.state
        host_goes = st is not None and st.started_here and self.spec.provider == "nested"
        for name in list(self.guests):
            self.drop_guest(name, destroy=name in self.started_guests and not host_goes)
        if host_goes:
            assert st is not None
            self.emit(Step(self.ctx.paths.domain_name(self.spec.name), "destroying lab host"))
            self.forget_host()
        self.state = None

    def describe(self) -> dict[str, Any]:
        """The session's boots and swaps, for meta.json."""
        return {"host": self.spec.name, "boots": list(self.boots), "swaps": list(self.swaps)}

