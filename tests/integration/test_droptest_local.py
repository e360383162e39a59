"""lab.onhost.droptest on this machine's own (stock) tun: a 1-slot ring tail-drops.

Real tap, real namespace, real counters: no mocks. On a kernel carrying the
nodrop patch these expectations flip (gaps == 0), so the test states which
kernel it expects and skips on a patched one.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lab.onhost.droptest import DropTestOptions, run_droptest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a tap and a network namespace"),
    pytest.mark.skipif(not Path("/dev/net/tun").exists(), reason="needs /dev/net/tun (modprobe tun)"),
]


def _kernel_has_nodrop() -> bool:
    # The nodrop-v1 tun exports tun_get_tx_queue; nodrop (v2) and nodrop-optin
    # export tun_wake_queue instead (kernel/README.md).
    try:
        syms = Path("/proc/kallsyms").read_text()
    except OSError:
        return False
    return " tun_get_tx_queue" in syms or " tun_wake_queue" in syms


@pytest.fixture(scope="module")
def stock_only() -> None:
    if _kernel_has_nodrop():
        pytest.skip(f"{platform.release()} carries the nodrop patch: a full ring does not drop here")


def test_stock_tun_with_one_slot_ring_drops(stock_only: None) -> None:
    r = run_droptest(DropTestOptions(tap="vhldti0", txqueuelen=1, frames=20000, timeout=60))
    assert r.sent == 20000
    assert not r.stall
    # Lost where the sender could not see it: in the tap's 1-slot ring.
    assert r.gaps > 0
    assert r.tap_tx_dropped > 0
    # Every datagram the reader missed is one the tap counted as dropped.
    assert r.gaps <= r.tap_tx_dropped
    assert r.received + r.gaps == r.sent
    assert r.tap_tx_packets >= r.received


def test_cli_prints_json_and_cleans_up(stock_only: None) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lab.onhost.droptest", "--tap", "vhldti1", "--txqueuelen", "1", "--frames", "5000", "--json"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["sent"] == 5000
    assert r["gaps"] > 0 and r["tap_tx_dropped"] > 0
    assert r["kernel_release"] == platform.release()
    # The tap went with its fd, and the namespace the tool made is gone.
    netns = r["netns"]
    assert netns.startswith("vhldt-")
    assert not Path("/run/netns", netns).exists()
    assert not Path("/sys/class/net/vhldti1").exists()


def test_stock_noqueue_tail_drop_is_enobufs_never_enetdown(stock_only: None) -> None:
    # Without a qdisc the driver's NET_XMIT_DROP reaches the sender (IP_RECVERR:
    # ENOBUFS, resent), and a stock tap never stops its queue: no ENETDOWN.
    # The IFF_BACKPRESSURE bit is ignored by a kernel that does not know it.
    r = run_droptest(DropTestOptions(tap="vhldti2", txqueuelen=1, frames=3000, qdisc="noqueue", iff_backpressure=True, timeout=60))
    assert r.qdisc == "noqueue"
    assert r.iff_backpressure is False
    assert r.sent == 3000 and not r.stall
    assert r.send_enetdown == 0
    assert r.gaps == 0
    assert r.tap_tx_dropped > 0 and r.send_enobufs == r.tap_tx_dropped
