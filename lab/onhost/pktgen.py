"""The kernel's packet generator (pktgen) driving a tap: what netdev reviewers ask for.

    run = PktgenRun(dev="vhl-guest1", dst_ip="10.99.1.2", dst_mac="52:54:..", threads=4, count=200000)
    result = run_pktgen(run)          # PktgenResult: sent, errors, pps per thread and in all

pktgen sends from kernel threads (kpktgend_<cpu>), one per CPU. `threads`
senders are spread over them round-robin as "<dev>@<i>" (pktgen's own way of
putting one device on several senders), so 4 senders on a 2-vCPU lab host are
4 pktgen devices over 2 kernel threads. `xmit_mode queue_xmit` sends through
dev_queue_xmit(), i.e. through the tap's root qdisc: that is the path the
nodrop patch changes (pktgen's default mode would call the driver directly).
UDP to port 9 (discard) of the guest, fixed size; what the guest received is
counted in the guest (its NIC's rx_packets), not here.

Without a guest, as root on a lab host (or any kernel with CONFIG_NET_PKTGEN):

    python3 -m lab.onhost.pktgen --tap vhlpg0 --threads 2 --count 20000 --txqueuelen 1 --json

creates a tap in a network namespace of its own (this process holds the fd
and reads it, so the tap has a carrier and a consumer), points pktgen at it
and counts what arrived against what pktgen sent and what the tap, the qdisc
and the kernel's drop reasons say was lost. The tap and namespace go after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab import proc
from lab.errors import LabError, MissingPiece
from lab.onhost.droptest import PEER_MAC, DropTestOptions, in_netns, open_tap, setup_link, udp_payload_offset
from lab.onhost.net import CountersDelta, delta, read_counters, validate_ifname

PKTGEN = Path("/proc/net/pktgen")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IP = re.compile(r"(\d{1,3}\.){3}\d{1,3}")
_RESULT = re.compile(r"Result:\s*(\S+):\s*(\d+)\(c(\d+)\+d(\d+)\)\s*usec,\s*(\d+)\s*\(")
_PPS = re.compile(r"(\d+)pps\s+(\d+)Mb/sec\s+\((\d+)bps\)\s+errors:\s*(\d+)")
_SOFAR = re.compile(r"pkts-sofar:\s*(\d+)\s+errors:\s*(\d+)")


@dataclass(frozen=True)
class PktgenRun:
    """One pktgen run: `threads` senders of `count` UDP packets of `size` bytes each to the guest."""

    dev: str
    dst_ip: str
    dst_mac: str
    threads: int = 1
    count: int = 200_000
    size: int = 64
    udp_port: int = 9
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        validate_ifname(self.dev, "dev")
        if not _MAC.fullmatch(self.dst_mac):
            raise ValueError(f"dst_mac: {self.dst_mac!r} is not a MAC address")
        if not _IP.fullmatch(self.dst_ip):
            raise ValueError(f"dst_ip: {self.dst_ip!r} is not an IPv4 address")
        for name, lo, hi in (("threads", 1, 64), ("count", 1, 10**9), ("size", 60, 9000), ("udp_port", 1, 65535)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}: must be an integer in [{lo}, {hi}], got {v!r}")


@dataclass(frozen=True)
class SenderResult:
    """What one pktgen device ("<dev>@<i>") reported."""

    name: str
    sent: int
    errors: int
    usec: int
    pps: int
    ok: bool


@dataclass(frozen=True)
class PktgenResult:
    """All senders of a run. `pps` is packets sent per second over the whole run's wall time."""

    threads: int
    kernel_threads: int
    sent: int
    errors: int
    seconds: float
    pps: float
    senders: list[SenderResult] = field(default_factory=list)
    stopped: bool = False  # hit the timeout and was stopped


def parse_device_file(name: str, text: str) -> SenderResult:
    """/proc/net/pktgen/<dev>@<i> after a run -> SenderResult."""
    m = _RESULT.search(text)
    p = _PPS.search(text)
    s = _SOFAR.search(text)
    sent = int(s.group(1)) if s else 0
    errors = int(p.group(4)) if p else (int(s.group(2)) if s else 0)
    return SenderResult(
        name=name,
        sent=sent,
        errors=errors,
        usec=int(m.group(2)) if m else 0,
        pps=int(p.group(1)) if p else 0,
        ok=bool(m and m.group(1) == "OK"),
    )


def sender_names(dev: str, threads: int) -> list[str]:
    """pktgen device names for `threads` senders on one device: "tap0@0", "tap0@1", ..."""
    return [f"{dev}@{i}" for i in range(threads)]


def _write(path: Path, command: str) -> None:
    try:
        path.write_text(command + "\n")
    except OSError as e:
        raise LabError(f"pktgen: `{command}` into {path} failed: {e.strerror or e}") from None


def _kernel_threads(root: Path) -> list[Path]:
    return sorted(root.glob("kpktgend_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))


def run_pktgen(run: PktgenRun, root: Path = PKTGEN) -> PktgenResult:
    """Configure, start and read back one pktgen run (see the module doc); always cleans up."""
    if not root.is_dir():
        with contextlib.suppress(Exception):
            proc.run(["modprobe", "pktgen"], timeout=60)
    if not root.is_dir():
        raise MissingPiece("pktgen is not available (/proc/net/pktgen)", hint="modprobe pktgen (CONFIG_NET_PKTGEN)")
    kthreads = _kernel_threads(root)
    if not kthreads:
        raise MissingPiece("pktgen has no kernel threads (/proc/net/pktgen/kpktgend_*)")
    names = sender_names(run.dev, run.threads)
    for kt in kthreads:
        _write(kt, "rem_device_all")
    try:
        for i, name in enumerate(names):
            _write(kthreads[i % len(kthreads)], f"add_device {name}")
            dev = root / name
            for cmd in (
                f"count {run.count}",
                f"pkt_size {run.size}",
                "delay 0",
                "clone_skb 0",  # queue_xmit mode needs a fresh skb per packet
                "burst 1",
                "xmit_mode queue_xmit",  # through the root qdisc, like a socket's packets
                f"dst {run.dst_ip}",
                f"dst_mac {run.dst_mac}",
                f"udp_dst_min {run.udp_port}",
                f"udp_dst_max {run.udp_port}",
            ):
                _write(dev, cmd)
        done = threading.Event()
        failure: list[str] = []

        def start() -> None:
            try:
                (root / "pgctrl").write_text("start\n")  # returns when every sender is done (or stopped)
            except OSError as e:
                failure.append(str(e))
            finally:
                done.set()

        t0 = time.monotonic()
        threading.Thread(target=start, daemon=True).start()
        stopped = not done.wait(run.timeout_s)
        if stopped:
            with contextlib.suppress(OSError):
                (root / "pgctrl").write_text("stop\n")
            done.wait(30)
        seconds = time.monotonic() - t0
        if failure and not stopped:
            raise LabError(f"pktgen start failed: {failure[0]}")
        senders = [parse_device_file(name, (root / name).read_text()) for name in names]
    finally:
        for kt in kthreads:
            with contextlib.suppress(LabError):
                _write(kt, "rem_device_all")
    sent = sum(s.sent for s in senders)
    return PktgenResult(
        threads=run.threads,
        kernel_threads=min(len(kthreads), run.threads),
        sent=sent,
        errors=sum(s.errors for s in senders),
        seconds=round(seconds, 3),
        pps=round(sent / seconds, 1) if seconds > 0 else 0.0,
        senders=senders,
        stopped=stopped,
    )


@dataclass(frozen=True)
class PktgenMeasurement:
    """A pktgen run with the tap's counters and the kernel's drops by reason around it."""

    result: PktgenResult
    delta: CountersDelta
    drops: dict[str, int] | None
    drops_error: str | None = None


def measure_pktgen(run: PktgenRun, root: Path = PKTGEN) -> PktgenMeasurement:
    """run_pktgen with the device's counter deltas and drop reasons (lab.onhost.drops)."""
    from lab.onhost.drops import DropCounter

    before = read_counters(run.dev)
    with DropCounter() as counter:
        result = run_pktgen(run, root)
    return PktgenMeasurement(result, delta(before, read_counters(run.dev)), counter.counts, counter.error)


# pktgen's own header right after the UDP header (struct pktgen_hdr: magic,
# seq_num, tv_sec, tv_usec), which tells its frames from anything else on a tap.
PKTGEN_MAGIC = 0xBE9BE955


def is_pktgen_frame(frame: bytes, port: int = 9) -> bool:
    """True for an Ethernet frame pktgen sent: IPv4, UDP to `port`, pktgen's magic first in the payload."""
    at = udp_payload_offset(frame, port)
    return at is not None and len(frame) >= at + 4 and struct.unpack_from("!I", frame, at)[0] == PKTGEN_MAGIC


@dataclass(frozen=True)
class TapSinkResult:
    """pktgen into a tap this process reads: what was sent, what arrived, and where the rest went."""

    kernel_release: str
    tap: str
    txqueuelen: int
    qdisc: str
    threads: int
    count: int
    sent: int  # pktgen's pkts-sofar over all senders
    errors: int  # pktgen's errors (a qdisc that refused the packet, for one)
    received: int  # pktgen frames the reader took off the tap
    other_frames: int
    pps: float
    senders_ok: bool  # every sender reported "Result: OK"
    stopped: bool
    tap_tx_dropped: int  # the tap's ring: the tail drop nodrop removes
    qdisc_drops: int
    qdisc_requeues: int
    drops: dict[str, int] | None  # the kernel's drops by reason during the run (None: not countable)
    drops_error: str | None


def _drain(fd: int, stop: threading.Event, counts: list[int], port: int) -> None:
    # counts = [pktgen frames, other frames]; reads until told to stop and the fd is empty
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            if stop.is_set():
                return
            continue
        try:
            frame = os.read(fd, 65536)
        except BlockingIOError:
            continue
        counts[0 if is_pktgen_frame(frame, port) else 1] += 1


def pktgen_into_tap(
    tap: str = "vhlpg0", *, threads: int = 1, count: int = 20000, txqueuelen: int = 1000, qdisc: str = "pfifo_fast",
    timeout_s: float = 120.0, netns: str | None = None,
) -> TapSinkResult:
    """Run pktgen (queue_xmit, UDP) into a tap this process reads, in a namespace of its own; clean up after."""
    if os.geteuid() != 0:
        raise LabError("pktgen into a tap needs root (it creates a tap, a namespace and pktgen devices)")
    opts = DropTestOptions(tap=tap, txqueuelen=txqueuelen, qdisc=qdisc, netns=netns)
    run = PktgenRun(dev=tap, dst_ip=opts.peer, dst_mac=PEER_MAC, threads=threads, count=count, timeout_s=timeout_s)
    # pktgen is per network namespace (/proc/net/pktgen follows this thread's), so
    # the namespace is entered before pktgen or any reader thread is touched.
    with in_netns(netns), open_tap(tap) as fd:
        setup_link(opts)
        stop = threading.Event()
        counts = [0, 0]
        reader = threading.Thread(target=_drain, args=(fd, stop, counts, run.udp_port), daemon=True)
        reader.start()
        try:
            m = measure_pktgen(run)
        finally:
            time.sleep(0.5)  # what is still in the ring or the qdisc reaches the reader
            stop.set()
            reader.join(10)
    r = m.result
    return TapSinkResult(
        kernel_release=platform.release(), tap=tap, txqueuelen=txqueuelen, qdisc=m.delta.qdisc.kind, threads=threads, count=count,
        sent=r.sent, errors=r.errors, received=counts[0], other_frames=counts[1], pps=r.pps,
        senders_ok=bool(r.senders) and all(s.ok for s in r.senders), stopped=r.stopped,
        tap_tx_dropped=m.delta.tap.tx_dropped, qdisc_drops=m.delta.qdisc.drops, qdisc_requeues=m.delta.qdisc.requeues,
        drops=m.drops, drops_error=m.drops_error,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python3 -m lab.onhost.pktgen`: pktgen into a tap of its own; exit 0 on a run, 1 on an error."""
    p = argparse.ArgumentParser(prog="python3 -m lab.onhost.pktgen", description="pktgen into a tap this process reads")
    p.add_argument("--tap", default="vhlpg0")
    p.add_argument("--threads", type=int, default=1, help="pktgen senders (spread over its kernel threads)")
    p.add_argument("--count", type=int, default=20000, help="packets per sender")
    p.add_argument("--txqueuelen", type=int, default=1000, help="tap txqueuelen = ring slots")
    p.add_argument("--qdisc", default="pfifo_fast", help='root qdisc, e.g. "pfifo_fast", "fq_codel", "noqueue"')
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        r = pktgen_into_tap(a.tap, threads=a.threads, count=a.count, txqueuelen=a.txqueuelen, qdisc=a.qdisc,
                            timeout_s=a.timeout)  # fmt: skip
    except (LabError, ValueError, OSError) as e:
        print(json.dumps({"error": str(e)}) if a.json else f"pktgen: {e}", file=sys.stdout if a.json else sys.stderr)
        return 1
    if a.json:
        print(json.dumps(asdict(r), sort_keys=True))
    else:
        print(f"{r.kernel_release}: {r.threads} sender(s) x {r.count} into {r.tap} (txqueuelen {r.txqueuelen}, {r.qdisc}): "
              f"sent {r.sent} errors {r.errors} received {r.received} ({r.pps:.0f} pps); tap tx_dropped {r.tap_tx_dropped}, "
              f"qdisc drops {r.qdisc_drops} requeues {r.qdisc_requeues}; drops by reason {r.drops}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
