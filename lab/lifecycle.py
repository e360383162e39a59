"""Bringing a lab up and down: config -> artifacts -> hosts -> guests.

`up` builds what is missing (kernel artifacts, the guest image), boots the
lab hosts the chosen guests need, then the guests; `down` destroys every
object carrying the lab's name prefix, whether or not this process made it
(so it also cleans up after a kill -9).
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.config import GuestSpec, LabConfig
from lab.errors import HostGone, LabError
from lab.events import Progress, Step, quiet
from lab.guests import RunningGuest, destroy_guest, guest_endpoint, guest_ip, list_lab_guests
from lab.hosts.host import Host, LocalHost
from lab.hosts.nested import destroy_host, lab_domains
from lab.session import LabContext, LabSession, connect_host, guest_plan


def select(cfg: LabConfig, names: list[str]) -> tuple[list[GuestSpec], list[str]]:
    """The guests and the guest-less hosts `names` mean (empty: every guest).

    LabError for a name lab.toml does not define; `lab up` calls this before
    it starts anything, so a typo never triggers its cleanup of the lab.
    """
    guests: list[GuestSpec] = []
    for n in names:
        if n in cfg.guests:
            guests.append(cfg.guests[n])
        elif n in cfg.hosts:
            guests += [g for g in cfg.guests.values() if g.host == n]
        else:
            known = ", ".join(sorted(set(cfg.guests) | set(cfg.hosts)))
            raise LabError(f"no guest or host named {n!r} in {cfg.source}", hint=f"one of: {known}")
    if not names:
        guests = list(cfg.guests.values())
    host_names = [n for n in names if n in cfg.hosts and not any(g.host == n for g in guests)]
    return guests, host_names


def preflight(ctx: LabContext, names: list[str]) -> None:
    """What `lab up` checks before it builds or starts anything: the names, and
    this machine's libvirtd for nested hosts (MissingPiece, e.g. for a non-root
    user, instead of minutes of kernel downloads first)."""
    guests, host_names = select(ctx.cfg, names)
    hosts = {g.host for g in guests} | set(host_names)
    if any(ctx.cfg.hosts[h].provider == "nested" for h in hosts):
        from lab.hosts.host import outer_libvirt

        outer_libvirt().close()


def up(ctx: LabContext, names: list[str], progress: Progress = quiet, keep_on_error: bool = False) -> list[RunningGuest]:
    """Bring up guests `names` (hosts or guests; empty: all guests) and their hosts.

    Hosts and guests that already run and answer are kept as they are. A
    failure (or Ctrl-C) destroys what this call started and nothing else
    (unless `keep_on_error`): what was running before it keeps running.
    """
    cfg = ctx.cfg
    guests, host_names = select(cfg, names)
    running: list[RunningGuest] = []
    sessions: list[LabSession] = []
    try:
        for hn in dict.fromkeys([g.host for g in guests] + host_names):
            spec = cfg.hosts[hn]
            session = LabSession(ctx, spec, progress)
            sessions.append(session)
            session.adopt_or_boot(spec.kernel)
            for g in (g for g in guests if g.host == hn):
                plan = guest_plan(ctx, g, progress=progress)
                running.append(session.adopt_guest(plan) or session.guest(plan))
    except BaseException:
        for session in reversed(sessions if not keep_on_error else []):
            progress(Step(session.spec.name, "cleaning up what this command started"))
            try:
                session.close()
            except Exception as e:
                progress(Step(session.spec.name, f"cleanup: {e}", warning=True))
        raise
    return running


def down(ctx: LabContext, progress: Progress = quiet) -> list[str]:
    """Destroy every lab object: guests, taps, lab hosts. Idempotent. Returns what went."""
    cfg = ctx.cfg
    gone: list[str] = []
    for spec in cfg.hosts.values():
        if spec.provider == "nested":
            continue  # destroying the lab host VM takes its guests and taps with it
        try:
            host = connect_host(ctx, spec)
            if host is None:
                continue
            for dom, _active in list_lab_guests(host, cfg.name):
                guest = dom[len(cfg.name) + 1 :]
                tap = cfg.guests[guest].net.tap if guest in cfg.guests else None
                destroy_guest(ctx.paths, host, guest, tap)
                gone.append(f"guest {dom} on {spec.name}")
            for tap in host.agent.tap_list(f"{cfg.name}-"):
                host.agent.tap_delete(tap.name)
                gone.append(f"tap {tap.name} on {spec.name}")
        except (HostGone, LabError) as e:
            progress(Step(spec.name, str(e), warning=True))
    ctx.close()
    # Every nested host of this lab, whether lab.toml still names it or not.
    hosts_dir = ctx.paths.lab_dir / "hosts"
    names = {p.name for p in hosts_dir.iterdir()} if hosts_dir.exists() else set()
    names |= {s.name for s in cfg.hosts.values() if s.provider == "nested"}
    for dom in lab_domains(cfg.name):
        names.add(dom[len(cfg.name) + 1 :])
    for n in sorted(names):
        progress(Step(n, "destroying"))
        if destroy_host(ctx.paths, n):
            gone.append(f"lab host {cfg.name}-{n}")
    return gone


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class GuestStatus:
    """One guest as `lab status` shows it."""

    name: str
    host: str
    state: str
    backend: str
    tap: str
    txqueuelen: int | None
    qdisc: str | None
    vhost: bool | None
    address: str


@dataclass(frozen=True)
class HostStatus:
    """One host as `lab status` shows it."""

    name: str
    provider: str
    state: str
    kernel_recipe: str | None
    release: str | None
    accel: str | None
    nodrop: bool | None
    modules_match: bool | None
    ssh: str | None


def status(ctx: LabContext) -> tuple[list[HostStatus], list[GuestStatus]]:
    """Live state of the lab's hosts and guests."""
    cfg = ctx.cfg
    hosts: list[HostStatus] = []
    guests: list[GuestStatus] = []
    for spec in cfg.hosts.values():
        host = None
        try:
            host = connect_host(ctx, spec) if spec.provider != "local" else LocalHost(name=spec.name)
        except LabError:
            host = None
        if host is None:
            hosts.append(HostStatus(spec.name, spec.provider, "down", spec.kernel, None, None, None, None, None))
            for g in (g for g in cfg.guests.values() if g.host == spec.name):
                guests.append(GuestStatus(g.name, spec.name, "down", g.net.backend, g.net.tap, None, None, None, ""))
            continue
        try:
            p = host.probe()
            ep = host.endpoint()
            hosts.append(
                HostStatus(spec.name, spec.provider, "up", p.kernel_recipe or spec.kernel, p.release, p.accel, p.nodrop, p.modules_match,
                           f"{ep.host}:{ep.port}" if ep else None)
            )
            active = dict(list_lab_guests(host, cfg.name))
        except (HostGone, LabError) as e:
            hosts.append(HostStatus(spec.name, spec.provider, f"unreachable: {e}", spec.kernel, None, None, None, None, None))
            continue
        for g in (g for g in cfg.guests.values() if g.host == spec.name):
            dom = ctx.paths.domain_name("", g.name)
            if not active.get(dom):
                guests.append(GuestStatus(g.name, spec.name, "down", g.net.backend, g.net.tap, None, None, None, ""))
                continue
            tap = _tap_facts(host, g.net.tap)
            guests.append(
                GuestStatus(g.name, spec.name, "running", g.net.backend, g.net.tap, tap.get("txqueuelen"), tap.get("qdisc"),
                            _uses_vhost(host, dom), guest_ip(g.index))
            )
    return hosts, guests


def _tap_facts(host: Host, tap: str) -> dict:
    try:
        taps = {t.name: t for t in host.agent.tap_list(tap)}
        qdisc = host.agent.counters(tap).qdisc.kind if tap in taps else None
    except LabError:
        return {}
    return {"txqueuelen": taps[tap].txqueuelen if tap in taps else None, "qdisc": qdisc}


def _uses_vhost(host: Host, domain: str) -> bool | None:
    """True when the domain's QEMU holds /dev/vhost-net (the vhost_net data path)."""
    res = host.run(["pgrep", "-f", f"guest={domain},"], check=False, timeout=30)
    pids = res.stdout.split()
    if not pids:
        return None
    fds = host.run(["find", f"/proc/{pids[0]}/fd", "-lname", "/dev/vhost-net"], check=False, timeout=30)
    return bool(fds.stdout.strip())


def guest_ssh_endpoint(ctx: LabContext, name: str):
    """The SSH endpoint of a running guest (for `lab shell`)."""
    cfg = ctx.cfg
    if name in cfg.hosts:
        host = connect_host(ctx, cfg.hosts[name])
        if host is None or host.endpoint() is None:
            raise LabError(f"lab host {name} is not up", hint="lab up")
        return host.endpoint()
    if name not in cfg.guests:
        raise LabError(f"no guest named {name!r}", hint="one of: " + ", ".join(cfg.guests))
    g = cfg.guests[name]
    host = connect_host(ctx, cfg.hosts[g.host])
    if host is None:
        raise LabError(f"guest {name}'s lab host {g.host} is not up", hint=f"lab up {name}")
    return guest_endpoint(host, guest_ip(g.index), ctx.key.private)

