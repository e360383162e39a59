"""nox sessions: tests, vhost-matrix, kernel-full, lint.

Each session installs what it needs itself (Debian packages as root, the lab
from this tree in the session's venv) and starts libvirt's daemons when they
are not running, so nothing depends on what an earlier session left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# Debian packages the lab uses on this machine (and, through the shared root,
# inside its nested lab hosts).
DEBIAN_PACKAGES = [
    # VMs
    "qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "libvirt-clients",
    # building libvirt-python
    "libvirt-dev", "pkg-config", "gcc",
    # traffic, access, networking
    "iperf3", "openssh-server", "openssh-client", "iproute2", "ethtool", "kmod",
    # guest images and initramfs
    "mmdebstrap", "e2fsprogs", "busybox-static", "xz-utils",
    # kernel artifacts: Debian's 6.12.117 and the module build (linux-source-6.12 at
    # the recipes' exact version: see debian_kernel_sources)
    "linux-headers-6.12.117+deb12-amd64", "make", "bc", "flex", "bison",
    "libelf-dev", "libssl-dev", "dwarves",
    # kernels onto real (ssh) hosts: kexec into a full recipe (lab hosts standing in for them see this machine's)
    "kexec-tools",
]  # fmt: skip


def debian_kernel_sources(config: Path = Path(__file__).with_name("lab.toml")) -> list[str]:
    """`linux-source-X.Y=VERSION` for every `debian:VERSION` kernel source in lab.toml.

    The module build patches this exact source against the matching headers;
    an unpinned install gets whatever Debian published last (6.12.118 on
    2026-12-02, which the 6.12.117 recipes refuse).
    """
    kernels = tomllib.loads(config.read_text()).get("kernels", {})
    versions = sorted({k["source"].removeprefix("debian:") for k in kernels.values() if str(k.get("source", "")).startswith("debian:")})
    return [f"linux-source-{'.'.join(v.split('.')[:2])}={v}" for v in versions]


def _missing_debian(packages: list[str]) -> list[str]:
    """The packages (`name` or `name=version`) not installed, or installed at another version."""
    wanted = [(p, *p.partition("=")[::2]) for p in packages]  # (as given, name, version or "")
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Status}\n", *(n for _, n, _ in wanted)],
        capture_output=True, text=True,
    )
    installed = dict(ln.split()[:2] for ln in out.stdout.splitlines() if ln.endswith(" installed"))
    return [p for p, name, version in wanted if name not in installed or (version and installed[name] != version)]


def install_debian(session: nox.Session, packages: list[str] | None = None) -> None:
    """apt-get install what is missing (root only; otherwise say what to run)."""
    missing = _missing_debian(packages if packages is not None else DEBIAN_PACKAGES + debian_kernel_sources())
    if not missing:
        return
    if os.geteuid() != 0:
        session.error(f"missing Debian packages: {' '.join(missing)}; run as root: apt-get install -y {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.log(f"apt-get install {' '.join(missing)}")
    # Package lists may be absent on a fresh machine; update once, then install.
    session.run("apt-get", "update", "-qq", external=True, env=env)
    # --allow-downgrades: a pinned version older than the one installed
    session.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "--allow-downgrades", *missing, external=True, env=env)


def start_daemons(session: nox.Session) -> None:
    """Start virtlogd and libvirtd when they are not running (no systemd here)."""
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
            session.log(f"starting {daemon}")
            session.run(shutil.which(daemon) or f"/usr/sbin/{daemon}", "-d", external=True)
    for _ in range(100):
        if os.path.exists("/run/libvirt/libvirt-sock"):
            return
        time.sleep(0.1)


def _unit_only(posargs: list[str]) -> bool:
    """True when the arguments select only tests/unit (pure logic: no root, no packages, no daemons)."""
    paths = [a for a in posargs if not a.startswith("-") and ("/" in a or a.startswith("tests"))]
    return bool(paths) and all(p.split("::")[0].rstrip("/").startswith("tests/unit") for p in paths)


def prepare(session: nox.Session, system: bool = True) -> None:
    """Debian packages, daemons (when `system`), the lab itself (editable: lab hosts run this tree)."""
    if system:
        install_debian(session)
        start_daemons(session)
    session.install("-e", ".[test]")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, integration and end-to-end tests, then the smoke matrix (what CI runs).

    `nox -s tests -- tests/unit` runs the pure-logic tests only: no root, no Debian packages, seconds.
    """
    unit = _unit_only(session.posargs)
    prepare(session, system=not unit)
    args = session.posargs or ["tests", "-m", "not matrix and not kernel_full and not kernel_series and not soak and not scenarios and not real_hosts"]
    session.run("pytest", "-p", "no:cacheprovider", *args)
    if not session.posargs:
        session.run("pytest", "tests/matrix", "--profile", "smoke", "-p", "no:cacheprovider")


@nox.session(name="vhost-matrix")
def vhost_matrix(session: nox.Session) -> None:
    """The stock-vs-nodrop matrix (default: all of it).

    Args: --profile smoke|aa, --aa, --matrix upstream-review, --keep, --resume RUN.
    """
    prepare(session)
    session.run("pytest", "tests/matrix", "-p", "no:cacheprovider", *session.posargs)


@nox.session(name="real-hosts")
def real_hosts(session: nox.Session) -> None:
    """The local and ssh providers end to end (lab hosts stand in for KVM machines), then one matrix over two hosts (pytest-xdist)."""
    prepare(session)
    session.run("pytest", "tests/e2e/test_real_hosts.py", "-m", "real_hosts", "-p", "no:cacheprovider", "-v", "-s", *session.posargs)


@nox.session(name="kernel-full")
def kernel_full(session: nox.Session) -> None:
    """Build the nodrop kernel as a full bzImage, boot it as a lab host, run the drop test."""
    prepare(session)
    session.run("pytest", "tests/e2e/test_kernel_full.py", "-m", "kernel_full", *session.posargs)


@nox.session(name="kernel-series")
def kernel_series(session: nox.Session) -> None:
    """Every drop-test case on every kernel recipe, one lab host boot (about 40 min); CI runs the core ones."""
    prepare(session)
    session.run("pytest", "tests/e2e/test_kernel_drop.py", "-p", "no:cacheprovider", "-s", *session.posargs)


@nox.session(name="labhost-soak")
def labhost_soak(session: nox.Session) -> None:
    """Lab host crash-rate benchmark: N boots, each with a guest and a stream. Args: --boots 20 --vcpus 1 --hog."""
    prepare(session)
    session.run("python", "benchmarks/labhost_soak.py", *session.posargs)


@nox.session(name="datapath-bench")
def datapath_bench(session: nox.Session) -> None:
    """The lab's data path against a plain QEMU command line on the same lab host, interleaved."""
    prepare(session)
    session.run("python", "benchmarks/datapath_bench.py", *session.posargs)


@nox.session(name="swap-bench")
def swap_bench(session: nox.Session) -> None:
    """What a same-boot module swap costs: guest reboot against NIC hot-unplug, each followed by a stream."""
    prepare(session)
    session.run("python", "benchmarks/swap_bench.py", *session.posargs)


@nox.session
def scenarios(session: nox.Session) -> None:
    """The failure scenarios (noqueue, paused guest, multicast, detach/reset while stopped) on every recipe."""
    prepare(session)
    session.run("pytest", "tests/scenarios", "-p", "no:cacheprovider", "-m", "scenarios", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the tree."""
    session.install("ruff")
    session.run("ruff", "check", "lab", "tests", "benchmarks", "noxfile.py")
