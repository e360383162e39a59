"""Network namespaces for integration tests: made here, always removed, nothing outside touched.

Setup uses the iproute2 CLI, not lab.onhost.net, so the code under test is checked
against an independent tool. Every namespace name is unique per test run;
every process a test starts inside one is killed (by pid) before the
namespace is deleted. Addresses are 10.x inside the namespaces only.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, taps)")
needs_iperf3 = pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")


def run(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell), bounded, capturing text output."""
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def ip(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip -n NETNS args...`."""
    return run(["ip", "-n", netns, *args], check=check)


def ip_json(netns: str, *args: str) -> Any:
    """`ip -n NETNS -j args...` parsed."""
    return json.loads(ip(netns, "-j", *args).stdout or "null")


def in_ns(netns: str, *argv: str) -> list[str]:
    """argv run inside netns."""
    return ["ip", "netns", "exec", netns, *argv]


def ns_pids(netns: str) -> list[int]:
    """pids of the processes inside netns (only ours: the namespace is the test's)."""
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split()]


def _kill_ns_processes(netns: str) -> None:
    for pid in ns_pids(netns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while ns_pids(netns) and time.monotonic() < deadline:
        time.sleep(0.05)


def unique_name(tag: str) -> str:
    """A namespace name no other run uses."""
    return f"vhltest-{tag}-{os.getpid()}-{secrets.token_hex(3)}"


@contextmanager
def netns(tag: str) -> Iterator[str]:
    """A fresh network namespace with lo up; deleted (its processes killed) on exit."""
    name = unique_name(tag)
    run(["ip", "netns", "add", name])
    try:
        ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        _kill_ns_processes(name)
        run(["ip", "netns", "del", name], check=False)


@dataclass(frozen=True)
class VethLink:
    """A veth pair joining two test namespaces."""

    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str


@contextmanager
def veth_link(subnet_octet: int | None = None) -> Iterator[VethLink]:
    """Two namespaces joined by a veth pair, 10.213.N.1/24 and 10.213.N.2/24, up."""
    n = subnet_octet if subnet_octet is not None else secrets.randbelow(250) + 1
    with netns("a") as ns_a, netns("b") as ns_b:
        # created directly inside ns_a with its peer inside ns_b: never in this machine's namespace
        ip(ns_a, "link", "add", "vetha", "type", "veth", "peer", "name", "vethb", "netns", ns_b)
        ip(ns_a, "addr", "add", f"10.213.{n}.1/24", "dev", "vetha")
        ip(ns_b, "addr", "add", f"10.213.{n}.2/24", "dev", "vethb")
        ip(ns_a, "link", "set", "vetha", "up")
        ip(ns_b, "link", "set", "vethb", "up")
        yield VethLink(ns_a, ns_b, "vetha", "vethb", f"10.213.{n}.1", f"10.213.{n}.2")


def wait_listening(netns: str, port: int, timeout: float = 10) -> None:
    """Wait until something listens on TCP `port` inside netns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run(in_ns(netns, "ss", "-Hltn", f"sport = :{port}"), check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} in {netns} after {timeout} s")


@contextmanager
def iperf3_server(netns: str, bind: str, port: int = 5201) -> Iterator[subprocess.Popen[bytes]]:
    """A one-off iperf3 server inside netns, stopped (by pid) on exit."""
    from lab.onhost.traffic import iperf3_server_argv

    proc = subprocess.Popen(
        in_ns(netns, *iperf3_server_argv(port, bind=bind, one_off=True)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_listening(netns, port)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextmanager
def tap_reader_holder(netns: str, tap: str) -> Iterator[subprocess.Popen[str]]:
    """Attach a queue to `tap` from inside netns and never read it (carrier up, ring fills)."""
    code = (
        "import fcntl, os, struct, sys\n"
        "fd = os.open('/dev/net/tun', os.O_RDWR)\n"
        # TUNSETIFF, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR: attaches to the persistent tap
        f"fcntl.ioctl(fd, 0x400454CA, struct.pack('16sH', {tap!r}.encode(), 0x0002 | 0x1000 | 0x4000))\n"
        "print('attached', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        in_ns(netns, sys.executable, "-c", code), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "attached", f"tap holder failed: {line!r}"
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def send_udp(netns: str, dst: str, count: int, size: int = 100) -> None:
    """Send `count` UDP datagrams to dst:9 from inside netns."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range({count}):\n"
        f"    s.sendto(b'x' * {size}, ({dst!r}, 9))\n"
    )
    run(in_ns(netns, sys.executable, "-c", code))


@functools.cache
def netem_available() -> bool:
    """Whether this kernel has sch_netem (probed once, in a throwaway namespace)."""
    with netns("probe") as ns:
        probe = ["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
        return run(probe, check=False).returncode == 0
