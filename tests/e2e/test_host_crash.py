"""A lab host whose kernel dies mid-cell: the matrix sees the crash on its console, reboots the
host on the same kernel, retries the cell, and finishes the run with the crash in results and report."""

from __future__ import annotations

import threading
import time

import pytest

from tests.e2e.conftest import make_lab_toml

pytestmark = pytest.mark.slow

PROFILE = """
[matrices.vhost-matrix.profiles.crash]
kernels = ["stock"]
backends = ["vhost"]
txqueuelens = [1000]
rtts_ms = []
repeats = 3
duration_s = 8
warmup_s = 1
"""


def test_a_kernel_crash_mid_cell_is_survived(tmp_path, e2e_ready):
    from lab.config import load_config
    from lab.events import CellStarted, HostCrash
    from lab.lifecycle import down
    from lab.measure.matrix import MatrixRunner, finish_run, open_run
    from lab.session import LabContext
    from lab.verdicts.report import to_text
    from lab.verdicts.results import now_iso

    ctx = LabContext.open(load_config(make_lab_toml(tmp_path, "vhc", PROFILE)))
    events: list[object] = []
    killed: list[str] = []

    def kill_host_soon(cell_id: str) -> None:
        time.sleep(2)  # iperf3 runs now
        host = runner.session.state.host
        console = ctx.paths.host_console(host.name)
        # A TCG lab host busy with a stream may refuse a new SSH session
        # ("Error reading SSH protocol banner"): try again until the console
        # shows the crash; the SSH command itself never returns.
        for _ in range(6):
            try:
                host.run(["python3", "-c", "open('/proc/sysrq-trigger', 'w').write('c')"], timeout=10, check=False)
            except Exception:
                pass
            if "sysrq" in console.read_text(errors="replace").lower():
                killed.append(cell_id)
                return
            time.sleep(0.5)

    def emit(event: object) -> None:
        events.append(event)
        if isinstance(event, CellStarted) and event.index == 2 and event.attempt == 1 and not killed:
            threading.Thread(target=kill_host_soon, args=(event.cell,), daemon=True).start()

    try:
        spec, store = open_run(ctx, "vhost-matrix", "crash", argv=["test"])
        runner = MatrixRunner(ctx, spec, store, emit)
        t0, at = time.monotonic(), now_iso()
        results = [runner.run_cell(c) for c in runner.plan()]
        runner.close()
        outcome = finish_run(runner, t0, at)
    finally:
        down(ctx)
    assert killed, "the kill never happened"
    assert all(r.ok for r in results), [r.error for r in results]
    crashed = next(r for r in results if r.cell == killed[0])
    assert crashed.attempts == 2
    (crash,) = crashed.host_crashes
    assert "Kernel panic" in crash["oops"] or "sysrq" in crash["oops"], crash
    assert [e for e in events if isinstance(e, HostCrash)]
    meta = outcome.run_data.meta
    assert len(meta.extra["host_crashes"]) == 1 and meta.extra["host_crashes"][0]["console_log"]
    assert len({r.boot_id for r in results}) == 2  # a new boot after the crash
    text = to_text(outcome.run_data, outcome.properties)
    assert "1 lab host crash(es), 1 cell attempt(s) retried" in text
    print("\n" + text)
