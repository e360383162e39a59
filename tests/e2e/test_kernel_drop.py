"""Proof at the kernel level: a full tap ring drops on stock, holds back on the nodrop recipes.

No guest: on a lab host booted on each kernel recipe, `lab.onhost.droptest` pushes
numbered UDP datagrams out of a tap faster than a reader drains the tap's fd
(or, with `--reader vhost`, a vhost-net virtqueue) and counts what went missing.

The recipes (kernel/README.md):

- stock: tail-drops at the ring; what went missing is what the tap dropped.
- nodrop (v2): holds back (the qdisc keeps the backlog): no gap, no tap
  tx_dropped, no stall.
- nodrop-v1: holds back too, but not always completely: its reader can wake
  the queue after the producer refilled the ring, and the next packet is
  then dropped at the ring (measured with vhost-net reading: 1 in 5000 once,
  and 5, 3, 0, 3 in 50000). So for it the
  test asserts that what went missing is what the ring dropped, that this
  stays under 1 %, and that the qdisc took the backlog.
- nodrop-optin: stock-like unless the tap has IFF_BACKPRESSURE, asked for
  with `--iff-backpressure` or forced by the lab-only module parameter
  tun.backpressure_all; then it holds back like nodrop.
- under noqueue (what libvirt gives its taps) only nodrop-v1 stops the queue:
  the core then logs "asks to queue packet" and fails sends with ENETDOWN;
  nodrop, nodrop-optin and stock tail-drop instead.
- a long run with vhost-net reading as fast as it can (50000 datagrams, no
  pauses) gives the consumer's wake many chances to race with the producer:
  nodrop and nodrop-optin must still drop nothing.

pktgen (queue_xmit, what the upstream-review matrix drives a guest's tap with)
goes into a tap `lab.onhost.pktgen` reads itself: every packet pktgen counts
as sent either arrives or is a tap tx_drop, and only stock tail-drops.

The recipe is a module-scoped parameter, so pytest groups the tests by it; one
lab host boot serves them all, each recipe's modules swapped in (lab.session,
build-ids checked). `nox -s tests` runs the CORE cases (one per behaviour
each recipe must show); the rest carry the `kernel_series` marker and run in
`nox -s kernel-series` (about 40 minutes). The lab is named "vhk", or
$LAB_E2E_KERNEL_LAB to keep clear of another lab on the same machine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import make_lab_toml

pytestmark = pytest.mark.slow

FRAMES = 5000
LONG_FRAMES = 50000
ASKS_TO_QUEUE = "asks to queue packet"
PARAM = "/sys/module/tun/parameters/backpressure_all"

# What each recipe's tun exports for vhost_net (kallsyms), and whether it has
# the lab-only module parameter: together they tell the recipes apart.
# lab/onhost/probe.py's `nodrop` is true for any of the three series.
SYMBOLS = {
    "stock": {"tun_get_tx_queue": False, "tap_get_tx_queue": False, "tun_wake_queue": False, "param": False},
    "nodrop": {"tun_get_tx_queue": False, "tap_get_tx_queue": False, "tun_wake_queue": True, "param": False},
    "nodrop-v1": {"tun_get_tx_queue": True, "tap_get_tx_queue": True, "tun_wake_queue": False, "param": False},
    "nodrop-optin": {"tun_get_tx_queue": False, "tap_get_tx_queue": False, "tun_wake_queue": True, "param": True},
}


@dataclass(frozen=True)
class Case:
    kernel: str
    expect: str  # "drops" | "holds" | "mostly-holds" | "noqueue-tail-drop" | "noqueue-enetdown"
    reader: str = "poll"
    txqueuelen: int = 1
    qdisc: str = "pfifo_fast"
    iff_backpressure: bool = False  # droptest --iff-backpressure
    backpressure_all: bool | None = None  # nodrop-optin's module parameter (None: recipe has none)
    frames: int = FRAMES
    read_every: int | None = None  # None: droptest's default pauses

    @property
    def id(self) -> str:
        bits = [self.kernel, self.reader, f"qlen{self.txqueuelen}", self.qdisc]
        if self.frames != FRAMES:
            bits.append(f"{self.frames}fast" if self.read_every == 0 else str(self.frames))
        if self.iff_backpressure:
            bits.append("flag")
        if self.backpressure_all is not None:
            bits.append(f"all{int(self.backpressure_all)}")
        return "-".join(bits)


READERS = (("poll", 1), ("poll", 10), ("blocking", 1), ("vhost", 1), ("vhost", 10))


def _cases() -> list[Case]:
    out = [Case("stock", "drops", reader, qlen) for reader, qlen in READERS]
    out.append(Case("stock", "drops", iff_backpressure=True))  # an unknown flag is ignored
    out.append(Case("stock", "noqueue-tail-drop", qdisc="noqueue"))
    out += [Case("nodrop", "holds", reader, qlen) for reader, qlen in READERS]
    out.append(Case("nodrop", "noqueue-tail-drop", qdisc="noqueue"))
    out.append(Case("nodrop", "holds", "vhost", 1, frames=LONG_FRAMES, read_every=0))
    out += [Case("nodrop-v1", "mostly-holds", reader, qlen) for reader, qlen in READERS]
    out.append(Case("nodrop-v1", "noqueue-enetdown", qdisc="noqueue"))
    out.append(Case("nodrop-v1", "mostly-holds", "vhost", 1, frames=LONG_FRAMES, read_every=0))
    optin = "nodrop-optin"
    out += [
        # Neither the flag nor the knob: as stock.
        Case(optin, "drops", "poll", 1, backpressure_all=False),
        Case(optin, "drops", "vhost", 1, backpressure_all=False),
        # The flag on the tap (what a user of IFF_BACKPRESSURE does).
        Case(optin, "holds", "poll", 1, iff_backpressure=True, backpressure_all=False),
        Case(optin, "holds", "vhost", 1, iff_backpressure=True, backpressure_all=False),
        Case(optin, "noqueue-tail-drop", qdisc="noqueue", iff_backpressure=True, backpressure_all=False),
        # The lab-only knob (what a tap that QEMU/libvirt opened gets).
        Case(optin, "holds", "poll", 1, backpressure_all=True),
        Case(optin, "holds", "poll", 10, backpressure_all=True),
        Case(optin, "holds", "blocking", 1, backpressure_all=True),
        Case(optin, "holds", "vhost", 1, backpressure_all=True),
        Case(optin, "holds", "vhost", 10, backpressure_all=True),
        Case(optin, "noqueue-tail-drop", qdisc="noqueue", backpressure_all=True),
        Case(optin, "holds", "vhost", 1, iff_backpressure=True, backpressure_all=False, frames=LONG_FRAMES, read_every=0),
    ]
    return out


CASES = _cases()
# One case per behaviour each recipe must show: what CI (nox -s tests) runs.
CORE = {
    "stock-poll-qlen1-pfifo_fast",
    "stock-poll-qlen1-noqueue",
    "nodrop-poll-qlen1-pfifo_fast",
    "nodrop-vhost-qlen1-pfifo_fast",
    "nodrop-poll-qlen1-noqueue",
    "nodrop-v1-poll-qlen1-noqueue",
    "nodrop-optin-poll-qlen1-pfifo_fast-all0",
    "nodrop-optin-poll-qlen1-pfifo_fast-flag-all0",
}
assert {c.id for c in CASES} >= CORE, CORE - {c.id for c in CASES}


def _param(case: Case):
    marks = () if case.id in CORE else (pytest.mark.kernel_series,)
    return pytest.param(case.kernel, case, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def kernel_session(tmp_path_factory, e2e_ready):
    """A lab whose host lab1 is booted once and runs each recipe's modules in turn; down afterwards."""
    from lab.config import load_config
    from lab.lifecycle import down
    from lab.session import LabContext, LabSession

    name = os.environ.get("LAB_E2E_KERNEL_LAB", "vhk")
    ctx = LabContext.open(load_config(make_lab_toml(tmp_path_factory.mktemp("lab"), name)))
    session = LabSession(ctx, ctx.cfg.hosts["lab1"])
    yield session
    session.close()
    down(ctx)


@pytest.fixture(scope="module")
def recipe_host(request, kernel_session):
    """Lab host lab1 running the recipe named by the (indirect) parameter: its modules, by build-id."""
    kernel = request.param
    host = kernel_session.kernel(kernel)
    loaded = kernel_session.modules_loaded()
    assert loaded is not None and loaded["recipe"] == kernel, loaded
    probe = host.probe()
    assert probe.nodrop is (kernel != "stock"), probe
    if not kernel_session.swaps:  # the boot's own modules (a swap checks the build-ids itself)
        assert probe.modules_match is True, f"{kernel}: loaded tun/tap/vhost modules are not the ones built: {probe.modules}"
    return host


def _asks_to_queue(host) -> int:
    return host.run(["dmesg"], timeout=60).stdout.count(ASKS_TO_QUEUE)


def _droptest(host, case: Case) -> dict:
    if case.backpressure_all is not None:
        host.run(["modprobe", "tun"], timeout=60)
        host.run(["sh", "-c", f"echo {int(case.backpressure_all)} > {PARAM}"], timeout=60)
    # Generous bounds: under TCG on a shared machine a noqueue run (every tail
    # drop is an ENOBUFS and a resend) took up to a minute for 5000 datagrams.
    bound = 240 if case.frames == FRAMES else 1200
    argv = ["--txqueuelen", str(case.txqueuelen), "--frames", str(case.frames), "--reader", case.reader]
    argv += ["--qdisc", case.qdisc, "--timeout", str(bound), "--json"]
    if case.read_every is not None:
        argv += ["--read-every", str(case.read_every)]
    if case.iff_backpressure:
        argv.append("--iff-backpressure")
    before = _asks_to_queue(host)
    res = host.run(host.python() + ["-m", "lab.onhost.droptest", *argv], timeout=bound + 120)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["asks_to_queue"] = _asks_to_queue(host) - before
    if case.backpressure_all is not None:
        host.run(["sh", "-c", f"echo 0 > {PARAM}"], timeout=60)
    print(
        f"\n{case.id}: sent {out['sent']} received {out['received']} gaps {out['gaps']} "
        f"tap tx_dropped {out['tap_tx_dropped']} qdisc drops {out['qdisc_drops']} requeues {out['qdisc_requeues']} "
        f"backlog peak {out['qdisc_backlog_peak']} ENOBUFS {out['send_enobufs']} ENETDOWN {out['send_enetdown']} "
        f"asks-to-queue {out['asks_to_queue']} flag {out['iff_backpressure']} stall {out['stall']} {out['duration_s']}s"
    )
    return out


@pytest.mark.parametrize(("recipe_host", "kernel"), [(k, k) for k in SYMBOLS], ids=list(SYMBOLS), indirect=["recipe_host"], scope="module")
def test_recipe_is_identified_by_its_exports(recipe_host, kernel):
    host = recipe_host
    host.run(["modprobe", "vhost_net"], timeout=60)  # pulls in tun and tap
    syms = set(re.findall(r"^\S+ \S (\S+)\s+\[(?:tun|tap)\]$", host.run(["cat", "/proc/kallsyms"], timeout=60).stdout, re.MULTILINE))
    seen = {s: s in syms for s in ("tun_get_tx_queue", "tap_get_tx_queue", "tun_wake_queue")}
    seen["param"] = host.run(["test", "-e", PARAM], check=False, timeout=60).rc == 0
    assert seen == SYMBOLS[kernel]
    if kernel == "nodrop-optin":
        # TUNGETFEATURES announces IFF_BACKPRESSURE (0x0080), so the built
        # module saw the patched uapi header.
        code = "import fcntl,os,struct; fd=os.open('/dev/net/tun',os.O_RDWR); print(struct.unpack('I',fcntl.ioctl(fd,0x800454CF,bytes(4)))[0])"
        features = int(host.run(["python3", "-c", code], timeout=60).stdout)
        assert features & 0x0080


@pytest.mark.parametrize(("recipe_host", "case"), [_param(c) for c in CASES], indirect=["recipe_host"], scope="module")
def test_full_ring(recipe_host, case: Case):
    out = _droptest(recipe_host, case)
    assert out["sent"] == case.frames, out
    assert out["stall"] is False, out
    assert out["iff_backpressure"] is (case.iff_backpressure and case.kernel == "nodrop-optin"), out
    if case.expect == "drops":
        assert out["gaps"] > 0, out
        assert out["tap_tx_dropped"] > 0, out
        # What went missing is exactly what the tap dropped at its ring.
        assert out["gaps"] == out["tap_tx_dropped"], out
    elif case.expect == "holds":
        assert out["gaps"] == 0, out
        assert out["received"] == case.frames, out
        assert out["tap_tx_dropped"] == 0, out
        # The backlog moved up into the qdisc: the stopped queue shows as requeues or a backlog.
        assert out["qdisc_requeues"] > 0 or out["qdisc_backlog_peak"] > 0, out
    elif case.expect == "mostly-holds":
        # nodrop-v1: a spurious wake in front of a full ring drops the next packet.
        assert out["gaps"] == out["tap_tx_dropped"], out
        assert out["tap_tx_dropped"] <= case.frames // 100, out
        assert out["qdisc_requeues"] > 0 or out["qdisc_backlog_peak"] > 0, out
    elif case.expect == "noqueue-tail-drop":
        # No qdisc to hold anything: the ring tail-drops (the driver's drop
        # reaches the sender as ENOBUFS, which resends), and the queue is
        # never stopped: no ENETDOWN, no "asks to queue packet".
        assert out["qdisc"] == "noqueue", out
        assert out["tap_tx_dropped"] > 0, out
        assert out["send_enetdown"] == 0, out
        assert out["asks_to_queue"] == 0, out
    elif case.expect == "noqueue-enetdown":
        # nodrop-v1 stops the queue under noqueue too: the core refuses the
        # packets of a stopped queue, says so, and the sender sees ENETDOWN.
        assert out["qdisc"] == "noqueue", out
        assert out["send_enetdown"] > 0, out
        assert out["asks_to_queue"] > 0, out
    else:
        raise AssertionError(case.expect)


# ------------------------------------------------------------------ pktgen into a tap
# pktgen (queue_xmit mode, what the upstream-review matrix drives a guest's tap
# with) into a tap that lab.onhost.pktgen reads itself, in a namespace of its
# own on the lab host. pktgen counts a packet as sent once dev_queue_xmit()
# took it; a refusal (the qdisc's, or under noqueue the ring's, handed back
# as an error) is an `error` and the same packet is sent again. So:
#   with a qdisc: received + tap tx_dropped == sent, errors == qdisc drops;
#   under noqueue: received == sent, errors == tap tx_dropped.
PKTGEN_COUNT = 5000


@dataclass(frozen=True)
class PktgenCase:
    kernel: str
    qdisc: str = "pfifo_fast"
    threads: int = 2
    txqueuelen: int = 1

    @property
    def id(self) -> str:
        return f"{self.kernel}-pktgen-T{self.threads}-qlen{self.txqueuelen}-{self.qdisc}"


PKTGEN_CASES = [PktgenCase("stock"), PktgenCase("nodrop"), PktgenCase("stock", "noqueue"), PktgenCase("nodrop", "noqueue")]
PKTGEN_CORE = {"stock-pktgen-T2-qlen1-pfifo_fast", "nodrop-pktgen-T2-qlen1-pfifo_fast"}


def _pktgen_param(case: PktgenCase):
    marks = () if case.id in PKTGEN_CORE else (pytest.mark.kernel_series,)
    return pytest.param(case.kernel, case, id=case.id, marks=marks)


@pytest.mark.parametrize(("recipe_host", "case"), [_pktgen_param(c) for c in PKTGEN_CASES], indirect=["recipe_host"], scope="module")
def test_pktgen_into_a_real_tap(recipe_host, case: PktgenCase):
    argv = ["--threads", str(case.threads), "--count", str(PKTGEN_COUNT), "--txqueuelen", str(case.txqueuelen)]
    argv += ["--qdisc", case.qdisc, "--timeout", "240", "--json"]
    res = recipe_host.run(recipe_host.python() + ["-m", "lab.onhost.pktgen", *argv], timeout=400)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\n{case.id}: {out}")
    total = case.threads * PKTGEN_COUNT
    assert out["qdisc"] == case.qdisc and out["threads"] == case.threads, out
    assert out["senders_ok"] is True and out["stopped"] is False, out
    assert out["sent"] == total and out["other_frames"] == 0, out
    if case.qdisc == "noqueue":
        # Nothing to hold a backlog: the ring's drop goes back to pktgen, which resends.
        assert out["received"] == total, out
        assert out["errors"] == out["tap_tx_dropped"] > 0, out
        return
    assert out["received"] + out["tap_tx_dropped"] == total, out
    assert out["errors"] == out["qdisc_drops"], out
    if case.kernel == "stock":
        assert out["tap_tx_dropped"] > 0, out
        # pktgen holds its own reference to each skb, so most ring drops reach the
        # drop tracepoint as NOT_SPECIFIED, not FULL_RING: the matrix's pktgen cells
        # count ring drops with the tap's counter (lab.measure.matrix).
        assert (out["drops"] or {}).get("FULL_RING", 0) < out["tap_tx_dropped"], out
    else:
        # The queue stopped at the full ring: the qdisc refused instead, pktgen resent.
        assert out["tap_tx_dropped"] == 0 and out["received"] == total, out
        assert out["qdisc_drops"] > 0, out


def test_hot_unplug_swap_keeps_the_guest(kernel_session):
    """swap = "hot-unplug": the modules change under a running guest whose NIC is unplugged and plugged back.

    The same guest (not rebooted) runs on the other recipe's modules (build-ids
    checked by the swap, the recipe by its exports) and streams through them.
    """
    from lab.onhost.traffic import Iperf3Run
    from lab.session import guest_plan

    s = kernel_session
    before = (s.modules_loaded() or {}).get("recipe") or "stock"
    host = s.kernel("stock")
    plan = guest_plan(s.ctx, s.ctx.cfg.guests["guest1"], backend="vhost")
    guest = s.guest(plan)
    policy, s.swap_policy = s.swap_policy, "hot-unplug"
    try:
        s.kernel("nodrop")
        swap = s.swaps[-1]
        assert s.guests.get("guest1") is guest, "the guest was rebooted, not kept"
        assert swap["release"] == "hot-unplug" and "replug_s" in swap, swap
        assert (s.modules_loaded() or {}).get("recipe") == "nodrop"
        assert host.probe().nodrop is True
        m = host.agent.stream(Iperf3Run(server=plan.guest_ip, duration_s=3), plan.tap, sample_ms=0, count_drops=False)
        assert (m.iperf3.throughput_mbps or 0) > 0
        print(f"\nhot-unplug swap: release {swap['release_s']} s, swap {swap['seconds']} s, NIC back {swap['replug_s']} s, "
              f"then {m.iperf3.throughput_mbps:.0f} Mbit/s")
    finally:
        s.swap_policy = policy
        s.drop_guest("guest1", destroy=True)
        s.kernel(before)
