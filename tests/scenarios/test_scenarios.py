"""The failure scenarios on every kernel of lab.toml's [scenarios] (nox -s scenarios).

One lab host boot runs them all, the kernels' modules swapped in turn. What
the lab must show: stock passes every scenario; nodrop-v1 (today's first
series) fails noqueue and paused-guest; nodrop-optin with its flag off behaves
as stock. The other recipes' verdicts are findings, printed in the table.
"""

from __future__ import annotations

import io
import os

import pytest

pytestmark = [pytest.mark.scenarios, pytest.mark.slow]


@pytest.fixture(scope="module")
def scenario_run():
    if os.geteuid() != 0:
        pytest.skip("the scenarios boot lab hosts (libvirt's system instance): run as root")
    from rich.console import Console

    from lab.config import load_config
    from lab.measure.scenarios import run_scenarios
    from lab.session import LabContext
    from lab.verdicts.report import render_scenarios, scenarios_text

    ctx = LabContext.open(load_config(os.environ.get("LAB_CONFIG")))
    try:
        run = run_scenarios(ctx)
    finally:
        ctx.close()
    buf = io.StringIO()
    render_scenarios(run.results, Console(file=buf, width=200))
    print("\n" + buf.getvalue() + "\n" + scenarios_text(run.results) + f"\nresults: {run.path}")
    assert run.stopped is None, run.stopped
    return {(r.kernel, r.scenario): r for r in run.results}


def _verdicts(results, kernel):
    return {s: r.verdict for (k, s), r in results.items() if k == kernel}


def test_every_scenario_ran(scenario_run):
    na = {k: r.detail for k, r in scenario_run.items() if r.verdict == "n/a"}
    assert not na, na


def test_stock_passes_every_scenario(scenario_run):
    v = _verdicts(scenario_run, "stock")
    assert v and set(v.values()) == {"PASS"}, {s: scenario_run[("stock", s)].detail for s in v if v[s] != "PASS"}


def test_nodrop_v1_fails_noqueue_and_paused_guest(scenario_run):
    v = _verdicts(scenario_run, "nodrop-v1")
    if not v:
        pytest.skip("nodrop-v1 is not among [scenarios] kernels")
    assert v["noqueue"] == "FAIL", scenario_run[("nodrop-v1", "noqueue")].detail
    assert v["paused-guest"] == "FAIL", scenario_run[("nodrop-v1", "paused-guest")].detail


def test_optin_with_the_flag_off_behaves_as_stock(scenario_run):
    v = _verdicts(scenario_run, "nodrop-optin")
    if not v:
        pytest.skip("nodrop-optin is not among [scenarios] kernels")
    assert v == _verdicts(scenario_run, "stock"), {s: scenario_run[("nodrop-optin", s)].detail for s in v}
