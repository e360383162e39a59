"""A UDP sender that reports how it was treated: what a host application sees of a tap's backpressure.

    r = udp_send(UdpSend(dst="10.99.1.2", count=5000, blocking=True, send_timeout_s=5))
    r.sent, r.errors ({"ENETDOWN": 2992}), r.blocked (a blocking send did not return in time), r.seconds

A sender that stalls because a paused guest's tap holds its packets, or that
gets ENETDOWN because the tap stopped its queue under noqueue, is the failure
the lab's scenarios look for (lab.measure.scenarios). Multicast: `multicast_if`
is the address of the interface to send from (IP_MULTICAST_IF).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UdpSend:
    """One burst of `count` datagrams of `size` bytes to dst:port."""

    dst: str
    port: int = 9
    count: int = 5000
    size: int = 1400
    blocking: bool = True
    send_timeout_s: float = 5.0  # a blocking send that takes longer counts as blocked, and the burst ends
    total_timeout_s: float = 60.0
    multicast_if: str | None = None  # the source interface's IPv4 address, for a multicast dst
    ttl: int = 1

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.dst)
        if self.multicast_if is not None:
            ipaddress.ip_address(self.multicast_if)
        for name, lo, hi in (("port", 1, 65535), ("count", 1, 10**8), ("size", 1, 65000), ("ttl", 0, 255)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}: must be an integer in [{lo}, {hi}], got {v!r}")


@dataclass(frozen=True)
class SendReport:
    """How the burst went: datagrams the kernel took, errors by errno name, and whether a send blocked."""

    sent: int
    attempted: int
    errors: dict[str, int] = field(default_factory=dict)
    blocked: bool = False
    seconds: float = 0.0


def udp_send(spec: UdpSend) -> SendReport:
    """Send the burst; never hangs longer than send_timeout_s on one send or total_timeout_s overall."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if spec.multicast_if is not None:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(spec.multicast_if))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, spec.ttl)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        if spec.blocking:
            s.settimeout(spec.send_timeout_s)
        else:
            s.setblocking(False)
        payload = bytes(spec.size)
        errors: dict[str, int] = {}
        sent = attempted = 0
        blocked = False
        t0 = time.monotonic()
        for _ in range(spec.count):
            if time.monotonic() - t0 > spec.total_timeout_s:
                blocked = True
                break
            attempted += 1
            try:
                s.sendto(payload, (spec.dst, spec.port))
                sent += 1
            except TimeoutError:
                blocked = True
                break
            except OSError as e:
                name = errno.errorcode.get(e.errno or 0, str(e.errno))
                errors[name] = errors.get(name, 0) + 1
        return SendReport(sent, attempted, errors, blocked, round(time.monotonic() - t0, 3))
    finally:
        s.close()


def kernel_log_since(marker: str) -> list[str]:
    """The kernel log lines after the last line containing `marker` (dmesg)."""
    from lab import proc

    res = proc.run(["dmesg"], timeout=30)
    lines = res.stdout.splitlines()
    idx = max((i for i, ln in enumerate(lines) if marker in ln), default=-1)
    return lines[idx + 1 :]


def mark_kernel_log(marker: str) -> None:
    """Write `marker` into the kernel log (so later lines can be told apart)."""
    try:
        with open("/dev/kmsg", "w") as f:
            f.write(f"vhost-lab: {marker}\n")
    except OSError:
        pass
