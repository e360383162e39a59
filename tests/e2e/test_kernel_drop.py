"""Proof at the kernel level: a full tap ring drops on stock, holds back on nodrop.

No guest: on a lab host booted on each kernel recipe, `lab.onhost.droptest` pushes
numbered UDP datagrams out of a tap faster than a reader drains the tap's fd
and counts what went missing.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import make_lab_toml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel_lab(tmp_path_factory, e2e_ready):
    """A lab "vhk" whose host lab1 is rebooted per kernel; down afterwards."""
    from lab.config import load_config
    from lab.lifecycle import down
    from lab.session import LabContext

    ctx = LabContext.open(load_config(make_lab_toml(tmp_path_factory.mktemp("lab"), "vhk")))
    yield ctx
    down(ctx)


def _droptest(ctx, kernel: str, txqueuelen: int) -> dict:
    from lab.session import up_host

    host = up_host(ctx, ctx.cfg.hosts["lab1"], kernel=kernel)
    probe = host.probe()
    assert probe.kernel_recipe == kernel
    assert probe.modules_match is True, f"{kernel}: loaded tun/tap/vhost modules are not the ones built: {probe.modules}"
    assert probe.nodrop is (kernel == "nodrop")
    res = host.run(host.python() + ["-m", "lab.onhost.droptest", "--txqueuelen", str(txqueuelen), "--frames", "5000", "--json"], timeout=300)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\n{kernel} txqueuelen {txqueuelen}: sent {out['sent']} received {out['received']} gaps {out['gaps']} "
          f"tap tx_dropped {out['tap_tx_dropped']} qdisc drops {out['qdisc_drops']} requeues {out['qdisc_requeues']} "
          f"backlog peak {out['qdisc_backlog_peak']} stall {out['stall']}")
    return out


@pytest.mark.parametrize("txqueuelen", [1, 10])
def test_stock_tail_drops_at_the_ring(kernel_lab, txqueuelen):
    out = _droptest(kernel_lab, "stock", txqueuelen)
    assert out["sent"] == 5000
    assert out["gaps"] > 0, out
    assert out["tap_tx_dropped"] > 0, out
    # What went missing is exactly what the tap dropped at its ring.
    assert out["gaps"] == out["tap_tx_dropped"], out


@pytest.mark.parametrize("txqueuelen", [1, 10])
def test_nodrop_holds_back_instead(kernel_lab, txqueuelen):
    out = _droptest(kernel_lab, "nodrop", txqueuelen)
    assert out["sent"] == 5000
    assert out["gaps"] == 0, out
    assert out["received"] == 5000, out
    assert out["tap_tx_dropped"] == 0, out
    assert out["stall"] is False, out
    # The backlog moved up into the qdisc: the stopped queue shows as requeues.
    assert out["qdisc_requeues"] > 0 or out["qdisc_backlog_peak"] > 0, out
