"""The vhost matrix as pytest tests: one per cell, then one per property (lab/verdicts/expect.py).

    pytest tests/matrix --profile smoke -v
    pytest tests/matrix --resume latest          # only missing/errored cells run

A cell passes when it measured (status "ok"); whether the numbers have the
right shape is for the properties, which run after every cell. A property
that cannot be evaluated (its cells are not in this profile, or under TCG the
absolute throughput) is skipped with the reason.
"""

from __future__ import annotations

import pytest

from lab.errors import HostGone
from lab.verdicts.expect import fmt_mbps

pytestmark = [pytest.mark.matrix, pytest.mark.slow]


def test_cell(matrix_run, cell_id: str) -> None:
    runner = matrix_run.runner_for(cell_id)
    stored = matrix_run.completed_at_start.get(cell_id)
    if stored is not None:
        pytest.skip(
            f"already completed in run {runner.store.run_dir.name}: {fmt_mbps(stored.throughput_mbps)} Mbit/s, "
            f"{stored.retransmits} retransmits, tap tx_dropped {stored.tap_tx_dropped}"
        )
    if runner.gone is not None:
        pytest.skip(
            f"not run: the lab host went away earlier ({runner.gone}); "
            f"resume with --resume {runner.store.run_dir.name}"
        )
    try:
        result = runner.run_cell(runner.cell(cell_id))
    except HostGone as e:
        matrix_run.stopped = str(e)
        pytest.fail(f"{cell_id}: {e}; the run stops here (resume with --resume {runner.store.run_dir.name})",
                    pytrace=False)
    detail = f" (console: {result.console_log})" if result.console_log else ""
    assert result.status == "ok", f"{cell_id}: {result.error}{detail}"


def test_property(matrix_properties, property_name: str) -> None:
    props = {p.name: p for p in matrix_properties}
    prop = props.get(property_name)
    if prop is None:
        pytest.skip(f"{property_name}: not evaluated over this run")
    if prop.passed is None:
        # INCONCLUSIVE (the data cannot decide: the report says how many repeats
        # would) or n/a: neither is a pass, neither a regression found.
        pytest.skip(f"{prop.verdict}: {prop.detail}")
    assert prop.passed is not False, f"{prop.name}: {prop.detail} ({prop.description})"
