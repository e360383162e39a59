"""Strategy "full": the nodrop kernel as a small bzImage, booted as a lab host, drop-tested.

Long (a kernel build: tens of minutes on 2 cores), so only `nox -s kernel-full`
selects it (marker kernel_full); the default test run deselects it.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import make_lab_toml

pytestmark = [pytest.mark.slow, pytest.mark.kernel_full]


def test_full_nodrop_kernel_boots_and_holds_back(tmp_path, e2e_ready):
    from lab.config import load_config
    from lab.lifecycle import down
    from lab.session import LabContext, up_host

    ctx = LabContext.open(load_config(make_lab_toml(tmp_path, "vhf")))
    try:
        host = up_host(ctx, ctx.cfg.hosts["lab1"], kernel="nodrop-full")
        probe = host.probe()
        assert probe.kernel_recipe == "nodrop-full"
        assert probe.nodrop is True
        res = host.run(host.python() + ["-m", "lab.onhost.droptest", "--txqueuelen", "1", "--frames", "5000", "--json"], timeout=300)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"\nnodrop-full txqueuelen 1: {out}")
        assert out["gaps"] == 0 and out["tap_tx_dropped"] == 0 and out["stall"] is False, out
    finally:
        down(ctx)
