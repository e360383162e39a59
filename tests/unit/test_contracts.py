"""docs/CONTRACTS.md is what docs/gen_contracts.py makes of the code: the seams' dataclasses as they are."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_contracts_md_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_contracts", REPO / "docs" / "gen_contracts.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    expected = gen.render()
    actual = (REPO / "docs" / "CONTRACTS.md").read_text()
    assert actual == expected, "docs/CONTRACTS.md is stale: python docs/gen_contracts.py > docs/CONTRACTS.md"
    # and it really lists the result file's keys
    from lab.verdicts.results import STABLE_KEYS

    assert all(f"- `{k}:" in actual for k in STABLE_KEYS)
