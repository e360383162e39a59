"""lab.verdicts.stats: known samples in, the right verdict out; comparisons never mix hosts."""

from __future__ import annotations

import random

import pytest

from lab.verdicts.results import aggregate
from lab.verdicts.stats import comparisons, judge, refused, seed_of
from tests.helpers import patch, reference_results


def samples(center: float, rel_sd: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + rng.gauss(0, rel_sd)) for _ in range(n)]


def test_equal_samples_are_the_same() -> None:
    j = judge(samples(100, 0.02, 8, 1), samples(100, 0.02, 8, 2), tolerance=0.10)
    assert j.verdict == "same"
    assert 0.9 <= j.ci_low <= j.ratio <= j.ci_high <= 1.1
    assert j.p_value > 0.05 and j.needed is None


def test_twenty_percent_apart_is_faster_or_slower() -> None:
    a = samples(100, 0.03, 8, 3)
    slower = judge(a, samples(80, 0.03, 8, 4), tolerance=0.10)
    faster = judge(a, samples(120, 0.03, 8, 5), tolerance=0.10)
    assert slower.verdict == "slower" and slower.ci_high < 1 and 0.75 < slower.ratio < 0.85
    assert faster.verdict == "faster" and faster.ci_low > 1 and 1.15 < faster.ratio < 1.25
    assert slower.p_value < 0.01 and faster.p_value < 0.01


def test_very_noisy_samples_are_inconclusive_and_say_how_many_repeats_would_do() -> None:
    j = judge(samples(100, 0.5, 4, 6), samples(100, 0.5, 4, 7), tolerance=0.10)
    assert j.verdict == "inconclusive"
    assert j.ci_low < 0.9 and j.ci_high > 1.1
    assert j.needed is not None and j.needed > 4


def test_a_collapse_with_three_repeats_is_decided_by_the_ci() -> None:
    # Mann-Whitney can not go below p = 0.1 with 3 against 3; the CI still decides
    j = judge([0.7, 1.1, 2.0], [150.0, 200.0, 300.0])
    assert j.verdict == "faster" and j.ci_low > 50
    assert j.p_value == pytest.approx(0.1)


def test_too_few_repeats_is_inconclusive_not_an_error() -> None:
    j = judge([1.0], [2.0])
    assert (j.verdict, j.ratio, j.ci_low, j.p_value) == ("inconclusive", 2.0, None, None)
    assert j.needed >= 3


def test_a_constant_sample_gives_a_zero_width_ci() -> None:
    j = judge([100.0] * 4, [100.0] * 4)
    assert j.verdict == "same" and j.ci_low == j.ci_high == 1.0


def test_the_bootstrap_is_reproducible_by_seed() -> None:
    a, b = samples(100, 0.1, 6, 8), samples(105, 0.1, 6, 9)
    assert judge(a, b, seed=seed_of("run", "p")) == judge(a, b, seed=seed_of("run", "p"))
    assert seed_of("x", 1) == seed_of("x", 1) != seed_of("x", 2)


def test_comparisons_over_a_run() -> None:
    rs = reference_results(backends=("vhost",), repeats=5, noise=0.01)
    cmps = comparisons(aggregate(rs), "stock", tolerance=0.10)
    by_point = {c.point.label(): c for c in cmps}
    assert set(by_point) == {"qlen1000", "qlen100", "qlen10", "qlen1", "rtt60", "rtt120"}
    assert all(c.a == "stock" and c.b == "nodrop" and c.same_boot for c in cmps)
    assert by_point["qlen1"].judgement.verdict == "faster"  # 0.7 -> 19245 Mbit/s
    assert by_point["qlen1000"].judgement.verdict == "same"  # 23404 vs 23859
    assert by_point["rtt120"].judgement.verdict == "same"
    d = by_point["qlen1000"].to_dict()
    assert {"backend", "txqueuelen", "rtt_ms", "a", "b", "n_a", "n_b", "median_a", "median_b", "ratio", "ci_low", "ci_high",
            "p_value", "verdict"} <= set(d)
    assert (d["n_a"], d["n_b"], d["backend"], d["txqueuelen"]) == (5, 5, "vhost", 1000)


def test_comparisons_note_other_boots_and_refuse_other_hosts() -> None:
    rs = reference_results(backends=("tap",), repeats=3, rtts=False)
    rs = patch(rs, "tap-qlen1000-rtt0-nodrop", boot_id="lab1@2")
    rs = patch(rs, "tap-qlen100-rtt0-nodrop", host="box2", boot_id="box2@1")
    cmps = {c.point.label(): c for c in comparisons(aggregate(rs), "stock")}
    assert cmps["qlen1000"].same_boot is False and "different lab host boots" in cmps["qlen1000"].note
    assert "qlen100" not in cmps  # never a ratio across hosts
    (why,) = refused(aggregate(rs), "stock")
    assert "qlen100" in why and "hosts differ" in why


def test_three_against_three_from_one_distribution_rarely_says_faster_or_slower() -> None:
    # The calibration behind MIN_BOOTSTRAP_N: at most about the 5 % a 95 % interval promises.
    import numpy as np

    rng = np.random.default_rng(20261202)
    for cv in (0.05, 0.15, 0.3):
        words = [judge(list(rng.lognormal(0, cv, 3) * 300), list(rng.lognormal(0, cv, 3) * 300), seed=i).verdict
                 for i in range(400)]
        false = sum(w in ("faster", "slower") for w in words) / len(words)
        assert false <= 0.07, (cv, false)


def test_a_total_collapse_to_zero_is_still_decided() -> None:
    j = judge([300.0, 310.0, 290.0], [0.0, 0.0, 1.0])
    assert j.verdict == "slower" and j.ci_high < 0.1
