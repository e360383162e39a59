"""lab.onhost.stoppedqueue on this machine's own tun (stock): detach and re-attach a queue of a full four-queue tap.

Stock never stops its queues (the rings tail-drop), so traffic must resume
at once; the patched kernels run the same code on lab hosts (tests/scenarios).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.onhost.stoppedqueue import PASS, StoppedQueueOptions, run

pytestmark = [pytest.mark.integration]


@pytest.fixture
def root_and_tun() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a tap and a network namespace)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun")


def test_detach_while_full_on_stock(root_and_tun: None) -> None:
    r = run(StoppedQueueOptions("detach-while-stopped", tap="vhlsqi0"))
    n = r.numbers
    assert r.verdict == PASS, r.detail
    # four rings of txqueuelen slots filled, the rest of the first burst tail-dropped at them
    assert n["first_ring_drops"] == n["first_sent"] - 4 * 32
    assert n["stopped"] is False
    assert n["second_lost"] == 0 and len(n["second_per_queue"]) == 4 and min(n["second_per_queue"]) > 0
    assert sum(n["second_per_queue"]) == 400
    assert n["second_drop_reasons"] is None or n["second_drop_reasons"].get("FULL_RING", 0) == 0
    assert not Path("/run/netns").exists() or not [p for p in Path("/run/netns").iterdir() if p.name.startswith("vhldt-")]


def test_backend_reset_needs_vhost_net(root_and_tun: None) -> None:
    if Path("/dev/vhost-net").exists():
        r = run(StoppedQueueOptions("backend-reset-while-stopped", tap="vhlsqi1"))
        assert r.verdict == PASS, r.detail
        assert r.numbers["second_lost"] == 0
    else:
        from lab.onhost.droptest import DropTestError

        with pytest.raises(DropTestError, match="/dev/vhost-net is missing"):
            run(StoppedQueueOptions("backend-reset-while-stopped", tap="vhlsqi1"))
