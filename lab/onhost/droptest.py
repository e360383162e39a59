"""Does a full tap ring drop packets, or hold them back? A drop test without a guest.

Run as root on a lab host (or on this machine):

    python3 -m lab.onhost.droptest --tap dt0 --txqueuelen 1 --frames 20000 --json

It creates a tap (IFF_TAP | IFF_NO_PI; this process keeps the fd and is its
reader) inside a network namespace of its own, gives it an address in a
private /30 with a static neighbour, and then:

- a sender thread pushes numbered UDP datagrams, routed out of the tap, as
  fast as it can. With IP_RECVERR it learns of local drops (a full qdisc,
  ENOBUFS) and sends the same number again, like a congestion-aware sender;
- the reader reads the tap fd slowly (a short sleep every K frames), so the
  tap's ring (txqueuelen slots) fills up;
- every lost sequence number (`gaps`) is a datagram dropped where the sender
  could not see it. With the default root qdisc of the test, pfifo_fast (a
  plain FIFO, whose overflow the sender sees as ENOBUFS), that can only be
  the tap's ring: the tail drop the "nodrop" patch removes. (With an AQM
  qdisc such as fq_codel, its silent dequeue drops count as gaps too; they
  show in `qdisc_drops`.)

A stock kernel with txqueuelen 1 shows gaps > 0 and tap tx_dropped > 0; with
the nodrop patch the tap stops its queue instead, the qdisc holds the
backlog (or drops it, visibly to the sender), and gaps and tx_dropped stay 0.
`stall` reports the failure mode of a wrong patch: the reader got nothing for
over 2 s while frames were still outstanding (sender active or qdisc backlog
non-zero), or a blocking reader could not be woken at the end.

The tap and the namespace are always removed (also on SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import platform
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from lab.errors import LabError
from lab.onhost import net

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# The nodrop-optin series' TUNSETIFF flag; kernels without it ignore the bit.
IFF_BACKPRESSURE = 0x0080
CLONE_NEWNET = 0x40000000
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # <linux/in.h>; not exported by every Python

MAGIC = 0x6E6F6472  # "nodr": tells our datagrams from anything else on the tap
SENTINEL = 2**64 - 1  # wakes a blocking reader at the end; never counted
PAYLOAD_HEADER = struct.Struct("!QI")  # sequence number, magic
ETH_P_IP = 0x0800
IPPROTO_UDP = 17

DEFAULT_PORT = 9  # discard
STALL_SECONDS = 2.0
NETNS_DIR = Path("/run/netns")
PEER_MAC = "02:00:5e:00:53:02"  # the static neighbour's: nobody answers ARP behind a test tap


class DropTestError(Exception):
    """The test could not run (not root, no /dev/net/tun, a command failed)."""


# --------------------------------------------------------------------------
# Pure logic: frames, sequence accounting (unit-tested)
# --------------------------------------------------------------------------


def build_payload(seq: int, size: int) -> bytes:
    """A datagram payload of `size` bytes (at least the header) carrying `seq`."""
    head = PAYLOAD_HEADER.pack(seq, MAGIC)
    return head + bytes(max(0, size - len(head)))


def udp_payload_offset(frame: bytes, port: int) -> int | None:
    """Where the UDP payload starts in an Ethernet frame read from a tap: IPv4, unfragmented, UDP to `port`; else None."""
    if len(frame) < 14 + 20 + 8 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ip = 14
    version_ihl = frame[ip]
    if version_ihl >> 4 != 4 or frame[ip + 9] != IPPROTO_UDP:
        return None
    if struct.unpack_from("!H", frame, ip + 6)[0] & 0x3FFF:  # a fragment: no UDP header of its own
        return None
    udp = ip + (version_ihl & 0x0F) * 4
    if len(frame) < udp + 8 or struct.unpack_from("!H", frame, udp + 2)[0] != port:
        return None
    return udp + 8


def parse_frame(frame: bytes, port: int = DEFAULT_PORT) -> int | None:
    """The sequence number in an Ethernet frame read from the tap, or None if it is not ours.

    Ours: IPv4, UDP to `port`, payload starting with (seq, MAGIC).
    """
    at = udp_payload_offset(frame, port)
    if at is None or len(frame) < at + PAYLOAD_HEADER.size:
        return None
    seq, magic = PAYLOAD_HEADER.unpack_from(frame, at)
    return seq if magic == MAGIC else None


@dataclass
class SeqCounter:
    """Accounts for received sequence numbers: what arrived, what went missing.

    Sequence numbers are sent in order 0, 1, 2, ...; each is counted once.
    """

    received: int = 0
    duplicates: int = 0
    reordered: int = 0  # arrived after a higher number had
    highest: int = -1
    gap_events: int = 0  # times the next number was not highest + 1
    _seen: set[int] = field(default_factory=set, repr=False)

    def add(self, seq: int) -> None:
        """Record one received sequence number."""
        if seq in self._seen:
            self.duplicates += 1
            return
        self._seen.add(seq)
        self.received += 1
        if seq < self.highest:
            self.reordered += 1
            return
        if seq != self.highest + 1:
            self.gap_events += 1
        self.highest = seq

    def missing(self, seqs: Sequence[int]) -> list[int]:
        """Those of `seqs` that never arrived."""
        return [s for s in seqs if s not in self._seen]

    def lost(self, sent: int) -> int:
        """How many of the `sent` numbers (0 .. sent-1) never arrived."""
        return sent - sum(1 for s in self._seen if s < sent)


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DropTestOptions:
    """What to run: see `python3 -m lab.onhost.droptest --help`."""

    tap: str = "vhldt0"
    txqueuelen: int = 1
    frames: int = 20000
    payload: int = 64
    read_every: int = 16  # the reader sleeps after every K frames ...
    read_sleep: float = 0.001  # ... for this long
    netns: str | None = None  # None: a namespace of our own; "current": stay; else an existing named one
    # `tc qdisc replace dev TAP root <this>`; "default" keeps the kernel's default (fq_codel on Debian).
    qdisc: str = "pfifo_fast"
    recverr: bool = True  # learn of local drops (ENOBUFS) and resend
    # How the tap is read: "poll" (poll + read), "blocking" (read() sleeping in
    # tun_ring_recv) or "vhost" (vhost-net consumes the ring into a virtqueue we drive).
    reader: str = "poll"
    iff_backpressure: bool = False  # OR IFF_BACKPRESSURE into the tap's TUNSETIFF flags
    timeout: float = 60.0  # bound on the whole send + drain
    drain_idle: float = 1.0  # the reader stops after this long without frames once the sender is done
    address: str = "10.213.0.1"  # tap side of the /30
    peer: str = "10.213.0.2"  # the static neighbour the datagrams are routed to
    port: int = DEFAULT_PORT


@dataclass
class DropTestResult:
    """What a run saw; `gaps` > 0 means packets vanished where the sender could not see it."""

    kernel_release: str
    tap: str
    netns: str
    txqueuelen: int
    qdisc: str
    frames: int
    sent: int
    send_enobufs: int
    send_enetdown: int  # sends that failed with ENETDOWN (a stopped queue under noqueue), then resent
    send_timeouts: int
    received: int
    gaps: int
    gap_events: int
    duplicates: int
    reordered: int
    other_frames: int
    tap_tx_dropped: int
    tap_tx_packets: int
    qdisc_drops: int
    qdisc_requeues: int
    qdisc_overlimits: int
    qdisc_backlog_peak: int
    stall: bool
    max_reader_idle_s: float
    sender_done: bool
    duration_s: float
    read_every: int
    read_sleep_s: float
    reader: str
    iff_backpressure: bool  # the tap has IFF_BACKPRESSURE, as TUNGETIFF reports it


def run_droptest(opts: DropTestOptions) -> DropTestResult:
    """Run one drop test (root needed); the tap and any namespace it made are removed after."""
    if os.geteuid() != 0:
        raise DropTestError("the drop test needs root (it creates a tap and a network namespace)")
    if not Path("/dev/net/tun").exists():
        raise DropTestError("/dev/net/tun is missing (modprobe tun)")
    extra = IFF_BACKPRESSURE if opts.iff_backpressure else 0
    with in_netns(opts.netns) as netns, open_tap(opts.tap, extra) as fd:
        setup_link(opts)
        return _Run(opts, fd, netns).go()


class _Run:
    """One test run inside the namespace: sender and reader threads; the main thread watches.

    The main thread samples the qdisc (backlog peak; frames still outstanding),
    declares a stall, and decides when the run is over: the sender is done, the
    qdisc is empty and the reader has seen nothing for `drain_idle` seconds, or
    the deadline passed.
    """

    def __init__(self, opts: DropTestOptions, fd: int, netns: str) -> None:
        self.opts = opts
        self.fd = fd
        self.netns = netns
        self.seqs = SeqCounter()
        self.other = 0
        self.sent = 0
        self.enobufs = 0
        self.enetdown = 0
        self.timeouts = 0
        self.sender_done = threading.Event()
        self.reader_ready = threading.Event()  # the sender starts once the reader can read
        self.stop = threading.Event()
        self.last_rx = time.monotonic()
        self.max_idle = 0.0
        self.stall = False
        self.backlog_peak = 0
        self._since_pause = 0
        self.errors: list[BaseException] = []

    def go(self) -> DropTestResult:
        o = self.opts
        before = net.read_counters(o.tap)
        started = time.monotonic()
        self.deadline = started + o.timeout
        reader = threading.Thread(target=self._guard, args=(self._read,), name="reader", daemon=True)
        sender = threading.Thread(target=self._guard, args=(self._send,), name="sender", daemon=True)
        reader.start()
        sender.start()
        try:
            self._watch()
        finally:
            self.stop.set()
            sender.join(5)
            self._release_reader(reader)
        duration = time.monotonic() - started
        if self.errors:
            raise DropTestError(f"drop test failed: {self.errors[0]!r}")
        change = net.delta(before, net.read_counters(o.tap))
        return DropTestResult(
            kernel_release=platform.release(),
            tap=o.tap,
            netns=self.netns,
            txqueuelen=o.txqueuelen,
            qdisc=change.qdisc.kind,
            frames=o.frames,
            sent=self.sent,
            send_enobufs=self.enobufs,
            send_enetdown=self.enetdown,
            send_timeouts=self.timeouts,
            received=self.seqs.received,
            gaps=self.seqs.lost(self.sent),
            gap_events=self.seqs.gap_events,
            duplicates=self.seqs.duplicates,
            reordered=self.seqs.reordered,
            other_frames=self.other,
            tap_tx_dropped=change.tap.tx_dropped,
            tap_tx_packets=change.tap.tx_packets,
            qdisc_drops=change.qdisc.drops,
            qdisc_requeues=change.qdisc.requeues,
            qdisc_overlimits=change.qdisc.overlimits,
            qdisc_backlog_peak=self.backlog_peak,
            stall=self.stall,
            max_reader_idle_s=round(self.max_idle, 3),
            sender_done=self.sender_done.is_set(),
            duration_s=round(duration, 3),
            read_every=o.read_every,
            read_sleep_s=o.read_sleep,
            reader=o.reader,
            iff_backpressure=bool(_tap_flags(self.fd) & IFF_BACKPRESSURE),
        )

    def _watch(self) -> None:
        o = self.opts
        while not self.reader_ready.is_set() and not self.stop.is_set():
            if time.monotonic() >= self.deadline:
                return
            self.reader_ready.wait(0.05)
        with net.root_qdisc_reader(o.tap) as read_qdisc:
            self._watch_backlog(read_qdisc)

    def _watch_backlog(self, read_qdisc: Callable[[], net.QdiscCounters]) -> None:
        o = self.opts
        while not self.stop.is_set():
            # The qdisc is where a stopped queue keeps the frames it holds back.
            backlog = read_qdisc().backlog_packets
            self.backlog_peak = max(self.backlog_peak, backlog)
            now = time.monotonic()
            idle = now - self.last_rx
            self.max_idle = max(self.max_idle, idle)
            if idle > STALL_SECONDS and (not self.sender_done.is_set() or backlog > 0):
                self.stall = True
            if now >= self.deadline:
                return
            if self.sender_done.is_set() and backlog == 0 and idle > o.drain_idle:
                return
            self.stop.wait(0.05)

    def _release_reader(self, reader: threading.Thread) -> None:
        """End the reader; a blocking one sleeps in read() until a frame comes: send it some."""
        reader.join(0.3)
        if not reader.is_alive() or self.opts.reader != "blocking":
            reader.join(5)
            return
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            give_up = time.monotonic() + 3
            while reader.is_alive() and time.monotonic() < give_up:
                with contextlib.suppress(OSError):
                    s.sendto(build_payload(SENTINEL, 0), (self.opts.peer, self.opts.port))
                reader.join(0.05)
        if reader.is_alive():
            # Nothing reaches the reader any more: the queue is stuck for good.
            self.stall = True

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as e:
            self.errors.append(e)
            self.stop.set()

    def _send(self) -> None:
        o = self.opts
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if o.recverr:
                # Without it a local drop (full qdisc) is silent; with it sendto() says ENOBUFS.
                s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            s.settimeout(0.5)  # a stuck queue must not block us past the deadline
            dest = (o.peer, o.port)
            while not self.reader_ready.wait(0.1):
                if self.stop.is_set() or time.monotonic() >= self.deadline:
                    return
            seq = 0
            while seq < o.frames and not self.stop.is_set() and time.monotonic() < self.deadline:
                try:
                    s.sendto(build_payload(seq, o.payload), dest)
                except TimeoutError:
                    self.timeouts += 1
                    continue
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        self.enobufs += 1
                        time.sleep(0.0002)  # let the reader make room, then resend this number
                        continue
                    if e.errno == errno.ENETDOWN:
                        # A stopped queue under noqueue: the core refuses the packet
                        # ("asks to queue packet"). Visible to us, so not a gap: resend.
                        self.enetdown += 1
                        time.sleep(0.0002)
                        continue
                    if e.errno == errno.EAGAIN:
                        continue
                    raise
                seq += 1
                self.sent = seq
        finally:
            s.close()
            self.sender_done.set()

    def _ready(self) -> None:
        # The idle clock (and so stall detection) starts when reading can start.
        self.last_rx = time.monotonic()
        self.reader_ready.set()

    def _read(self) -> None:
        if self.opts.reader == "vhost":
            self._read_vhost()
            return
        blocking = self.opts.reader == "blocking"
        if blocking:
            # Sleep in the kernel's read path (tun_ring_recv() waits there), not in poll.
            os.set_blocking(self.fd, True)
        self._ready()
        while not self.stop.is_set():
            if not blocking:
                ready, _, _ = select.select([self.fd], [], [], 0.1)
                if not ready:
                    continue
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            self._take(frame)

    def _read_vhost(self) -> None:
        # vhost-net takes the frames off the tap's ring (vhost_net_buf_produce()) into
        # a virtqueue; we play the guest that hands it buffers, slowly.
        with VhostRx(self.fd) as rx:
            self._ready()
            while not self.stop.is_set():
                for desc, frame in rx.wait(0.1):
                    self._take(frame)
                    rx.recycle(desc)
                    if self._since_pause == 0:  # we just paused: hand back what we have read
                        rx.kick()
                rx.kick()

    def _take(self, frame: bytes) -> None:
        """Account for one frame; pause every `read_every` of ours, as a slow reader."""
        o = self.opts
        self.last_rx = time.monotonic()
        seq = parse_frame(frame, o.port)
        if seq is None:
            self.other += 1
            return
        if seq == SENTINEL:
            return
        self.seqs.add(seq)
        self._since_pause += 1
        if o.read_every > 0 and self._since_pause >= o.read_every:
            self._since_pause = 0
            time.sleep(o.read_sleep)


# --------------------------------------------------------------------------
# A guest-less vhost-net RX queue
# --------------------------------------------------------------------------


def _vhost_iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (0xAF << 8) | nr  # _IOW(VHOST_VIRTIO, nr, size)


VHOST_SET_FEATURES = _vhost_iow(0x00, 8)
VHOST_SET_OWNER = (0xAF << 8) | 0x01
VHOST_SET_MEM_TABLE = _vhost_iow(0x03, 8)
VHOST_SET_VRING_NUM = _vhost_iow(0x10, 8)
VHOST_SET_VRING_ADDR = _vhost_iow(0x11, 40)
VHOST_SET_VRING_BASE = _vhost_iow(0x12, 8)
VHOST_SET_VRING_KICK = _vhost_iow(0x20, 8)
VHOST_SET_VRING_CALL = _vhost_iow(0x21, 8)
VHOST_NET_SET_BACKEND = _vhost_iow(0x30, 8)
VHOST_NET_F_VIRTIO_NET_HDR = 27  # vhost writes the virtio-net header, the tap does not
VIRTIO_NET_HDR_LEN = 10  # struct virtio_net_hdr (no mergeable buffers)
VRING_DESC_F_WRITE = 2
VHOST_RX_VQ = 0


class VhostRx:
    """vhost-net's RX virtqueue for a tap, with this process as the "guest".

    A split virtqueue of NUM buffers lives in an anonymous mapping that is
    also the guest memory (guest physical == user address). vhost-net moves
    frames from the tap's ring into the buffers we post; `wait` returns the
    filled ones and `recycle` + `kick` hand them back. A reader that recycles
    slowly is a slow guest: vhost stops taking from the tap's ring, which
    fills up.
    """

    NUM = 256
    BUF = 2048
    DESC, AVAIL, USED, BUFS = 0, 4096, 8192, 16384
    SIZE = 1 << 20

    def __init__(self, tap_fd: int) -> None:
        import mmap

        if not Path("/dev/vhost-net").exists():
            raise DropTestError("/dev/vhost-net is missing (modprobe vhost_net)")
        self.mem = mmap.mmap(-1, self.SIZE)
        self._anchor = ctypes.c_char.from_buffer(self.mem)
        self.base = ctypes.addressof(self._anchor)
        self.fd = os.open("/dev/vhost-net", os.O_RDWR)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.used_idx = 0
        try:
            fcntl.ioctl(self.fd, VHOST_SET_OWNER, 0)
            fcntl.ioctl(self.fd, VHOST_SET_FEATURES, struct.pack("<Q", 1 << VHOST_NET_F_VIRTIO_NET_HDR))
            fcntl.ioctl(self.fd, VHOST_SET_MEM_TABLE, struct.pack("<II4Q", 1, 0, self.base, self.SIZE, self.base, 0))
            fcntl.ioctl(self.fd, VHOST_SET_VRING_NUM, struct.pack("<II", VHOST_RX_VQ, self.NUM))
            fcntl.ioctl(self.fd, VHOST_SET_VRING_BASE, struct.pack("<II", VHOST_RX_VQ, 0))
            addrs = (self.base + self.DESC, self.base + self.USED, self.base + self.AVAIL, 0)
            fcntl.ioctl(self.fd, VHOST_SET_VRING_ADDR, struct.pack("<II4Q", VHOST_RX_VQ, 0, *addrs))
            fcntl.ioctl(self.fd, VHOST_SET_VRING_KICK, struct.pack("<Ii", VHOST_RX_VQ, self.kick_fd))
            fcntl.ioctl(self.fd, VHOST_SET_VRING_CALL, struct.pack("<Ii", VHOST_RX_VQ, self.call_fd))
            for i in range(self.NUM):
                struct.pack_into("<QIHH", self.mem, self.DESC + 16 * i, self.base + self.BUFS + i * self.BUF, self.BUF, VRING_DESC_F_WRITE, 0)
                self.recycle(i)
            self.set_backend(tap_fd)
        except (OSError, DropTestError) as e:
            self.close()
            raise DropTestError(f"vhost-net setup: {getattr(e, 'strerror', None) or e}") from e
        self.kick()

    def recycle(self, desc: int) -> None:
        """Post buffer `desc` to the avail ring (visible to vhost at the next kick)."""
        struct.pack_into("<H", self.mem, self.AVAIL + 4 + 2 * (self.avail_idx % self.NUM), desc)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        # x86 keeps stores in order: the entry is visible before the index.
        struct.pack_into("<H", self.mem, self.AVAIL + 2, self.avail_idx)

    def set_backend(self, tap_fd: int) -> None:
        """Attach vhost-net to the tap behind `tap_fd`, or detach it (-1), as QEMU does on a vhost stop/start."""
        try:
            fcntl.ioctl(self.fd, VHOST_NET_SET_BACKEND, struct.pack("<Ii", VHOST_RX_VQ, tap_fd))
        except OSError as e:
            raise DropTestError(f"VHOST_NET_SET_BACKEND {tap_fd}: {e.strerror}") from e

    def kick(self) -> None:
        """Tell vhost there are buffers."""
        os.eventfd_write(self.kick_fd, 1)

    def wait(self, timeout: float) -> list[tuple[int, bytes]]:
        """The buffers vhost filled since the last call: (descriptor, Ethernet frame)."""
        select.select([self.call_fd], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call_fd)
        out = []
        used = struct.unpack_from("<H", self.mem, self.USED + 2)[0]
        while self.used_idx != used:
            desc, length = struct.unpack_from("<II", self.mem, self.USED + 4 + 8 * (self.used_idx % self.NUM))
            start = self.BUFS + desc * self.BUF
            out.append((desc, bytes(self.mem[start + VIRTIO_NET_HDR_LEN : start + length])))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
        return out

    def close(self) -> None:
        """Release vhost (it lets go of the tap) and the memory."""
        for fd in (self.fd, self.kick_fd, self.call_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        del self._anchor
        self.mem.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Namespaces, the tap, iproute2
# --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns() arrived in Python 3.12. Namespaces are per thread: this must run
    # before any thread is started, which then inherits it (so do children).
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise DropTestError(f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[str]:
    """Move this process into the test's network namespace for the duration (None: a new one, removed after)."""
    if netns == "current":
        yield "current"
        return
    name = netns or f"vhldt-{os.getpid()}"
    created = False
    if netns is None:
        net.create_netns(name)
        created = True
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield name
        finally:
            _setns(home)
    finally:
        os.close(home)
        if created:
            net.delete_netns(name)


@contextlib.contextmanager
def open_tap(name: str, extra_flags: int = 0) -> Iterator[int]:
    """A non-persistent tap: it goes away when its last fd is closed.

    With IFF_MULTI_QUEUE in `extra_flags`, opening the same name again
    attaches one more queue (one more fd, one more ring).
    """
    if len(name.encode()) > 15:
        raise DropTestError(f"tap name {name!r} is longer than 15 bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | extra_flags)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            raise DropTestError(f"TUNSETIFF {name}: {e.strerror}") from e
        yield fd
    finally:
        os.close(fd)


def _tap_flags(fd: int) -> int:
    """The tap's TUNSETIFF flags as the kernel kept them (TUNGETIFF)."""
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return struct.unpack_from("16sH", ifr)[1]


def setup_link(o: DropTestOptions) -> None:
    """The test tap up in its /30 with txqueuelen, the static neighbour, and the root qdisc of `o`."""
    # No IPv6 on the tap: router solicitations and MLD would take ring slots.
    disable_v6 = Path(f"/proc/sys/net/ipv6/conf/{o.tap}/disable_ipv6")
    if disable_v6.exists():
        disable_v6.write_text("1")
    net.configure_link(o.tap, f"{o.address}/30", txqueuelen=o.txqueuelen, neighbour=(o.peer, PEER_MAC))
    if o.qdisc and o.qdisc != "default":
        kind, params = net.parse_qdisc_spec(o.qdisc)
        if params:
            net.set_root_qdisc(o.tap, kind, **params)
        else:
            net.set_qdisc(o.tap, kind)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python3 -m lab.onhost.droptest`."""
    d = DropTestOptions()
    p = argparse.ArgumentParser(prog="python3 -m lab.onhost.droptest", description=__doc__.split("\n\n")[0])
    p.add_argument("--tap", default=d.tap, help=f"tap name (default {d.tap})")
    p.add_argument("--txqueuelen", type=int, default=d.txqueuelen, help="tap txqueuelen = ring slots (default 1)")
    p.add_argument("--frames", type=int, default=d.frames, help=f"datagrams to send (default {d.frames})")
    p.add_argument("--payload", type=int, default=d.payload, help=f"UDP payload bytes (default {d.payload})")
    p.add_argument("--read-every", type=int, default=d.read_every, help="reader sleeps after every K frames (0: never)")
    p.add_argument("--read-sleep", type=float, default=d.read_sleep, help="reader sleep in seconds (default 0.001)")
    p.add_argument(
        "--netns",
        default=None,
        help='an existing named namespace to run in, or "current" for this one (default: a new one, removed after)',
    )
    p.add_argument(
        "--qdisc",
        default=d.qdisc,
        help=f'root qdisc for the tap, e.g. "pfifo limit 1000", or "noqueue" (none: what libvirt gives its taps); '
        f'"default" keeps the kernel\'s (default {d.qdisc})',
    )
    p.add_argument("--no-recverr", action="store_true", help="do not learn of local drops (ENOBUFS) nor resend")
    p.add_argument(
        "--reader",
        choices=("poll", "blocking", "vhost"),
        default=d.reader,
        help="poll + read the tap; read() sleeping in it; or vhost-net taking from it (default poll)",
    )
    p.add_argument(
        "--iff-backpressure",
        action="store_true",
        help="create the tap with IFF_BACKPRESSURE (0x0080, the nodrop-optin series; other kernels ignore it)",
    )
    p.add_argument("--timeout", type=float, default=d.timeout, help="bound on send + drain, seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the test, print the result; exit 0 on a run, 1 on an error."""
    args = build_parser().parse_args(argv)
    opts = DropTestOptions(
        tap=args.tap,
        txqueuelen=args.txqueuelen,
        frames=args.frames,
        payload=args.payload,
        read_every=args.read_every,
        read_sleep=args.read_sleep,
        netns=args.netns,
        qdisc=args.qdisc,
        recverr=not args.no_recverr,
        reader=args.reader,
        iff_backpressure=args.iff_backpressure,
        timeout=args.timeout,
    )

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks: tap and netns go

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = run_droptest(opts)
    except (DropTestError, LabError, ValueError) as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        else:
            print(f"droptest: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result), sort_keys=True))
    else:
        r = result
        print(
            f"{r.kernel_release}: tap {r.tap} txqueuelen {r.txqueuelen} qdisc {r.qdisc}: "
            f"sent {r.sent} received {r.received} gaps {r.gaps} ({r.gap_events} events); "
            f"tap tx_dropped {r.tap_tx_dropped} tx_packets {r.tap_tx_packets}; "
            f"qdisc drops {r.qdisc_drops} requeues {r.qdisc_requeues} backlog peak {r.qdisc_backlog_peak}; "
            f"ENOBUFS {r.send_enobufs} ENETDOWN {r.send_enetdown}; stall {r.stall} (max idle {r.max_reader_idle_s}s)"
            f"; reader {r.reader}" + ("; IFF_BACKPRESSURE" if r.iff_backpressure else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
