"""A tx queue stopped by a full ring, then its reader goes away and comes back: does traffic resume?

Run as root on a lab host (no guest):

    python3 -m lab.onhost.stoppedqueue detach-while-stopped --json
    python3 -m lab.onhost.stoppedqueue backend-reset-while-stopped --json

A backpressuring tap stops its tx queue when the ring fills and relies on
whoever drains the ring to wake it. Two ways a reader legitimately goes away
and comes back leave no read to do that wake:

- detach-while-stopped: a multiqueue tap (four queues, this process holds
  every file) with nobody reading: the rings fill, the queues stop. File 0 is
  detached (TUNSETQUEUE IFF_DETACH_QUEUE: its ring is purged and the last file
  takes over its queue index) and attached again (it gets the last index, an
  empty ring, a queue stopped by the file that owned it before). QEMU does this when a guest
  changes its number of queues (ethtool -L).
- backend-reset-while-stopped: vhost-net reads the tap into a virtqueue whose
  buffers this process (the "guest") never hands back: the ring fills and
  the queue stops. The backend is reset (VHOST_NET_SET_BACKEND -1, then the
  tap again), as QEMU does on a vhost stop/start (migration, a device reset).

Then both read as fast as they can, and a paced second burst goes out over
16 flows (so every queue of the multiqueue tap gets some). PASS: every
datagram of that burst the sender had no error for arrives, every queue
delivers some of it, nothing is left in the qdisc, and the tap drops nothing
at its ring meanwhile (by drop reason, FULL_RING, where the kernel has hist
triggers; else tap tx_dropped). On stock the queue never stops (the ring tail-drops),
so this passes there by construction; it is the patched kernels it tests.

The numbers: the first burst's fate (sent, send errors, ring drops, qdisc
backlog: a backlog with no ring drops is a stopped queue), then the second's.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lab.errors import LabError
from lab.onhost import net
from lab.onhost.drops import RING_REASON, DropCounter
from lab.onhost.droptest import (
    IP_RECVERR,
    DropTestError,
    DropTestOptions,
    SeqCounter,
    VhostRx,
    build_payload,
    in_netns,
    open_tap,
    parse_frame,
    setup_link,
)

SCENARIOS = ("detach-while-stopped", "backend-reset-while-stopped")
PASS, FAIL = "PASS", "FAIL"
TUNSETQUEUE = 0x400454D9  # _IOW('T', 217, int)
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
FLOWS = 16
QUEUES = 4
FIRST_BURST = 600  # far more than ring + qdisc hold: both fill
SECOND_BURST = 400
PACE_S = 0.002  # second burst: one datagram every 2 ms, well within what a reader drains
DRAIN_S = 10.0  # after the second burst, how long the backlog may take to drain


@dataclass(frozen=True)
class StoppedQueueOptions:
    """One run: which scenario, the tap, its ring size."""

    scenario: str
    tap: str = "vhlsq0"
    txqueuelen: int = 32
    first_burst: int = FIRST_BURST
    second_burst: int = SECOND_BURST
    flows: int = FLOWS
    pace_s: float = PACE_S
    drain_s: float = DRAIN_S


@dataclass(frozen=True)
class Burst:
    """What a burst's sender saw: datagrams handed to the kernel, and those refused (ENOBUFS, EAGAIN, ENETDOWN)."""

    first_seq: int
    sent: tuple[int, ...] = ()
    refused: int = 0


@dataclass(frozen=True)
class StoppedQueueResult:
    """A verdict with the numbers behind it; `numbers` is flat so a report can tabulate it."""

    verdict: str
    detail: str
    numbers: dict[str, Any]


def judge(
    first: Burst,
    first_change: net.CountersDelta,
    backlog_stopped: int,
    second: Burst,
    per_queue: Sequence[int],
    counter: SeqCounter,
    second_change: net.CountersDelta,
    backlog_end: int,
    second_reasons: dict[str, int] | None = None,
) -> StoppedQueueResult:
    """The verdict from what the two bursts saw (pure: unit-tested).

    `second_reasons`: drops by reason during the second burst (None: not
    countable here, then tap tx_dropped stands in for FULL_RING).
    """
    lost = counter.missing(second.sent)
    silent = [i for i, n in enumerate(per_queue) if n == 0]
    stopped = backlog_stopped > 0 and first_change.tap.tx_dropped == 0
    problems = []
    if second.refused:
        problems.append(f"{second.refused} sends of the second burst refused")
    if lost:
        problems.append(f"{len(lost)} of its {len(second.sent)} datagrams never arrived")
    if silent:
        problems.append("queue " + ", ".join(map(str, silent)) + " delivered nothing")
    if backlog_end:
        problems.append(f"{backlog_end} left in the qdisc")
    ring_drops = second_change.tap.tx_dropped if second_reasons is None else second_reasons.get(RING_REASON, 0)
    if ring_drops:
        problems.append(f"{ring_drops} ring drops while the reader drained")
    before = (
        f"first burst: queue stopped ({backlog_stopped} held in the qdisc, no ring drop)"
        if stopped
        else f"first burst: the queue did not stop ({first_change.tap.tx_dropped} ring drops, {backlog_stopped} in the qdisc)"
    )
    after = f"second burst: {len(second.sent) - len(lost)}/{len(second.sent)} delivered, per queue {list(per_queue)}"
    numbers = {
        "first_sent": len(first.sent),
        "first_refused": first.refused,
        "first_ring_drops": first_change.tap.tx_dropped,
        "first_qdisc_drops": first_change.qdisc.drops,
        "backlog_when_stopped": backlog_stopped,
        "stopped": stopped,
        "second_sent": len(second.sent),
        "second_refused": second.refused,
        "second_lost": len(lost),
        "second_per_queue": list(per_queue),
        "second_ring_drops": ring_drops,
        "second_drop_reasons": second_reasons,
        "backlog_end": backlog_end,
    }
    if problems:
        return StoppedQueueResult(FAIL, f"{before}; {after}: " + "; ".join(problems), numbers)
    return StoppedQueueResult(PASS, f"{before}; {after}", numbers)


class _Senders:
    """FLOWS UDP sockets (one source port each) to the tap's static neighbour; non-blocking, IP_RECVERR."""

    def __init__(self, opts: DropTestOptions, flows: int) -> None:
        self.peer = (opts.peer, opts.port)
        self.socks = []
        for _ in range(flows):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            s.setblocking(False)
            s.bind((opts.address, 0))
            self.socks.append(s)

    def burst(self, first_seq: int, count: int, pace_s: float = 0.0) -> Burst:
        """Send `count` numbered datagrams round robin over the flows; a refused one is not resent."""
        sent: list[int] = []
        refused = 0
        for i in range(count):
            seq = first_seq + i
            s = self.socks[i % len(self.socks)]
            try:
                s.sendto(build_payload(seq, 64), self.peer)
                sent.append(seq)
            except OSError as e:
                if e.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ENETDOWN):
                    raise
                refused += 1
                with contextlib.suppress(OSError):
                    s.recv(64, socket.MSG_ERRQUEUE)  # the queued error of the drop
            if pace_s:
                time.sleep(pace_s)
        return Burst(first_seq, tuple(sent), refused)

    def close(self) -> None:
        for s in self.socks:
            s.close()


def _backlog(tap: str) -> int:
    return net.read_qdisc(tap).backlog_packets


def _wait_backlog_settles(tap: str, bound: float = 3.0) -> int:
    """The qdisc backlog once it stopped changing (a stopped queue holds it; a running one drains it)."""
    last, stable_since, until = -1, time.monotonic(), time.monotonic() + bound
    while time.monotonic() < until:
        now = _backlog(tap)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 0.3:
            break
        time.sleep(0.05)
    return last


class _Drain:
    """A reader thread over several sources (tap fds or a vhost queue), counting our frames per source."""

    def __init__(self, sources: int, read: Callable[[threading.Event, Callable[[int, bytes], None]], None], port: int, from_seq: int) -> None:
        self.counter = SeqCounter()
        self.per_source = [0] * sources
        self.from_seq = from_seq  # frames below this are the first burst's, left over: not counted
        self.last_rx = time.monotonic()
        self.port = port
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._guard, args=(read,), daemon=True)

    def _take(self, source: int, frame: bytes) -> None:
        seq = parse_frame(frame, self.port)
        if seq is None:
            return
        self.last_rx = time.monotonic()
        if seq >= self.from_seq:
            self.counter.add(seq)
            self.per_source[source] += 1

    def _guard(self, read: Callable[[threading.Event, Callable[[int, bytes], None]], None]) -> None:
        try:
            read(self.stop, self._take)
        except BaseException as e:  # reported by the main thread
            self.error = e

    def __enter__(self) -> _Drain:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(5)


def _read_fds(fds: Sequence[int]) -> Callable[[threading.Event, Callable[[int, bytes], None]], None]:
    def read(stop: threading.Event, take: Callable[[int, bytes], None]) -> None:
        while not stop.is_set():
            ready, _, _ = select.select(list(fds), [], [], 0.05)
            for fd in ready:
                with contextlib.suppress(BlockingIOError):
                    take(fds.index(fd), os.read(fd, 65536))

    return read


def _read_vhost(rx: VhostRx) -> Callable[[threading.Event, Callable[[int, bytes], None]], None]:
    def read(stop: threading.Event, take: Callable[[int, bytes], None]) -> None:
        rx.kick()
        while not stop.is_set():
            for desc, frame in rx.wait(0.05):
                take(0, frame)
                rx.recycle(desc)
            rx.kick()

    return read


def _second_burst(opts: StoppedQueueOptions, link: DropTestOptions, senders: _Senders, drain: _Drain) -> tuple[Burst, int]:
    """The paced burst once the returned reader took what its ring held, then the drain; returns it and the backlog left.

    The leftovers go first: a second-burst datagram racing them into a ring
    that is still full would be a stock tail drop, not a finding.
    """
    settle = time.monotonic() + 2.0
    while time.monotonic() < settle and not (time.monotonic() - drain.last_rx > 0.3 and _backlog(link.tap) == 0):
        time.sleep(0.05)
    second = senders.burst(drain.from_seq, opts.second_burst, opts.pace_s)
    until = time.monotonic() + opts.drain_s
    backlog = _backlog(link.tap)
    while time.monotonic() < until:
        backlog = _backlog(link.tap)
        got = not drain.counter.missing(second.sent[-8:])
        if backlog == 0 and got and time.monotonic() - drain.last_rx > 0.5:
            break
        time.sleep(0.05)
    if drain.error is not None:
        raise DropTestError(f"reader failed: {drain.error!r}")
    return second, backlog


def _set_queue(fd: int, flags: int) -> None:
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", flags))
    except OSError as e:
        raise DropTestError(f"TUNSETQUEUE {flags:#x}: {e.strerror}") from e


def detach_while_stopped(opts: StoppedQueueOptions) -> StoppedQueueResult:
    """Every queue of a four-queue tap stopped, file 0 detached and attached again, then read."""
    link = DropTestOptions(tap=opts.tap, txqueuelen=opts.txqueuelen, qdisc="default")
    with contextlib.ExitStack() as stack:
        fds = [stack.enter_context(open_tap(opts.tap, IFF_MULTI_QUEUE)) for _ in range(QUEUES)]
        setup_link(link)
        senders = _Senders(link, opts.flows)
        stack.callback(senders.close)
        before = net.read_counters(opts.tap)
        first = senders.burst(0, opts.first_burst)
        stopped = _wait_backlog_settles(opts.tap)
        mid = net.read_counters(opts.tap)
        _set_queue(fds[0], IFF_DETACH_QUEUE)
        time.sleep(0.1)
        _set_queue(fds[0], IFF_ATTACH_QUEUE)
        with DropCounter() as drops, _Drain(QUEUES, _read_fds(fds), link.port, opts.first_burst) as drain:
            second, backlog_end = _second_burst(opts, link, senders, drain)
        after = net.read_counters(opts.tap)
    return judge(first, net.delta(before, mid), stopped, second, drain.per_source, drain.counter, net.delta(mid, after), backlog_end,
                 drops.counts)


def backend_reset_while_stopped(opts: StoppedQueueOptions) -> StoppedQueueResult:
    """vhost-net's queue left full until the tap's queue stops, its backend reset, then read."""
    link = DropTestOptions(tap=opts.tap, txqueuelen=opts.txqueuelen, qdisc="pfifo_fast")
    with open_tap(opts.tap) as fd, VhostRx(fd) as rx:
        setup_link(link)
        senders = _Senders(link, opts.flows)
        try:
            before = net.read_counters(opts.tap)
            first = senders.burst(0, opts.first_burst)
            stopped = _wait_backlog_settles(opts.tap)
            mid = net.read_counters(opts.tap)
            rx.set_backend(-1)
            time.sleep(0.1)
            rx.set_backend(fd)
            with DropCounter() as drops, _Drain(1, _read_vhost(rx), link.port, opts.first_burst) as drain:
                second, backlog_end = _second_burst(opts, link, senders, drain)
            after = net.read_counters(opts.tap)
        finally:
            senders.close()
    return judge(first, net.delta(before, mid), stopped, second, drain.per_source, drain.counter, net.delta(mid, after), backlog_end,
                 drops.counts)


RUNS: dict[str, Callable[[StoppedQueueOptions], StoppedQueueResult]] = {
    "detach-while-stopped": detach_while_stopped,
    "backend-reset-while-stopped": backend_reset_while_stopped,
}


def run(opts: StoppedQueueOptions) -> StoppedQueueResult:
    """One scenario in a network namespace of its own (root needed); tap and namespace removed after."""
    if opts.scenario not in RUNS:
        raise ValueError(f"unknown scenario {opts.scenario!r}; known: {', '.join(SCENARIOS)}")
    if os.geteuid() != 0:
        raise DropTestError("the stopped-queue scenarios need root (a tap and a network namespace)")
    with in_netns(None):
        return RUNS[opts.scenario](opts)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the verdict (one JSON object with --json); exit 0 on a verdict, 1 on an error."""
    p = argparse.ArgumentParser(prog="python3 -m lab.onhost.stoppedqueue", description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--tap", default=StoppedQueueOptions.tap)
    p.add_argument("--txqueuelen", type=int, default=StoppedQueueOptions.txqueuelen)
    p.add_argument("--json", action="store_true", help='print {"verdict", "detail", "numbers"}')
    args = p.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks: tap and netns go

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = run(StoppedQueueOptions(args.scenario, tap=args.tap, txqueuelen=args.txqueuelen))
    except (DropTestError, LabError, ValueError) as e:
        print(json.dumps({"error": str(e)}) if args.json else f"stoppedqueue: {e}", file=sys.stdout if args.json else sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"verdict": result.verdict, "detail": result.detail, "numbers": result.numbers}, sort_keys=True))
    else:
        print(f"{args.scenario}: {result.verdict}: {result.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
