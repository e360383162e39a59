"""Judging a difference: is the patched kernel faster, slower, the same, or can the data not tell?

For every point (backend, txqueuelen, RTT, flows, queues, qdisc) measured on
a baseline arm (stock) and another arm, `compare` takes the repeats of both
and gives

- the ratio of medians (other / baseline),
- its 95 % confidence interval: with at least MIN_BOOTSTRAP_N repeats per arm
  by bootstrap (scipy.stats.bootstrap, percentile method, resampling each arm
  on its own); with fewer, Welch's t interval on the log values (the ratio of
  geometric means, scipy.stats.ttest_ind). Measured on samples drawn from one
  distribution (CV 5-30 %): with 3 against 3 repeats the percentile bootstrap
  said faster/slower 10 % of the time (BCa 7.5-10 %, "basic" 25 %), twice
  what a 95 % interval promises; Welch on logs 1.3-4.3 %. From 5 against 5
  the bootstrap is back at 3 %. What the t interval costs is power: a 20 %
  difference at CV 15 % is called `slower` in 20 % of 3-against-3 runs
  instead of 42 % (tests/unit/test_stats.py keeps the calibration check);
- a two-sided Mann-Whitney U p-value (scipy.stats.mannwhitneyu; with 3
  against 3 repeats it cannot go below 0.1),

and one verdict word:

- `same`: the whole CI lies within 1 +- tolerance (a difference, if any, too
  small to matter at that tolerance);
- `faster` / `slower`: the CI lies entirely above / below 1;
- `inconclusive`: neither; `needed` estimates how many repeats per arm would
  narrow the CI to +- tolerance (CI width shrinks as 1/sqrt(n)).

No statistics are written by hand here: scipy does the resampling and the
test. The bootstrap's random state is seeded from the run and the point, so
re-rendering a report gives the same intervals.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lab.verdicts.results import CellSummary, Point

VERDICTS = ("faster", "slower", "same", "inconclusive")
N_RESAMPLES = 4999
MIN_BOOTSTRAP_N = 5  # fewer repeats in an arm: Welch's t on logs (see the module doc)


@dataclass(frozen=True)
class Judgement:
    """The statistics of one comparison of two samples (b against baseline a)."""

    n_a: int
    n_b: int
    median_a: float | None
    median_b: float | None
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    verdict: str
    needed: int | None = None  # repeats per arm that would decide, when inconclusive


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline at one point (`lab report --json`'s "comparisons")."""

    point: Point
    a: str
    b: str
    judgement: Judgement
    cv_a: float | None
    cv_b: float | None
    same_boot: bool | None  # both arms' repeats come from the same lab host boot(s)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: backend, txqueuelen, rtt_ms, a, b, n_a, n_b, medians, ratio, CI, p, verdict, ..."""
        p = self.point
        return {
            "backend": p.backend,
            "txqueuelen": p.txqueuelen,
            "rtt_ms": p.rtt_ms,
            "kind": p.kind,
            "streams": p.streams,
            "queues": p.queues,
            "qdisc": p.qdisc,
            "threads": p.threads,
            "a": self.a,
            "b": self.b,
            **asdict(self.judgement),
            "cv_a": self.cv_a,
            "cv_b": self.cv_b,
            "same_boot": self.same_boot,
            "note": self.note,
        }


def seed_of(*parts: object) -> int:
    """A stable 64-bit seed from any values (Python's hash() of str changes per process)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def judge(
    a: Sequence[float], b: Sequence[float], *, tolerance: float = 0.10, confidence: float = 0.95, seed: int = 0
) -> Judgement:
    """Compare sample `b` against baseline `a` (see the module doc)."""
    import numpy as np
    from scipy import stats

    xa = np.asarray([float(v) for v in a], dtype=float)
    xb = np.asarray([float(v) for v in b], dtype=float)
    n_a, n_b = len(xa), len(xb)
    med_a = float(np.median(xa)) if n_a else None
    med_b = float(np.median(xb)) if n_b else None
    ratio = med_b / med_a if med_a and med_b is not None else None
    if n_a < 2 or n_b < 2 or not med_a or ratio is None or (xa <= 0).any():
        return Judgement(n_a, n_b, med_a, med_b, ratio, None, None, None, "inconclusive", needed=max(3, 2 * max(n_a, n_b, 1)))

    def ratio_of_medians(x: Any, y: Any, axis: int = -1) -> Any:
        return np.median(y, axis=axis) / np.median(x, axis=axis)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate (constant) sample gives a zero-width CI, which is right
        p = float(stats.mannwhitneyu(xa, xb, alternative="two-sided").pvalue)
        # a zero in the other arm (a total collapse) has no logarithm: the bootstrap takes it
        if min(n_a, n_b) >= MIN_BOOTSTRAP_N or (xb <= 0).any():
            res = stats.bootstrap(
                (xa, xb), ratio_of_medians, paired=False, vectorized=True, n_resamples=N_RESAMPLES,
                confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed),
            )  # fmt: skip
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        elif np.ptp(xa) == 0 and np.ptp(xb) == 0:
            lo = hi = ratio  # two constant samples: nothing to be uncertain about
        else:
            ci = stats.ttest_ind(np.log(xb), np.log(xa), equal_var=False).confidence_interval(confidence)
            lo, hi = math.exp(float(ci.low)), math.exp(float(ci.high))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Judgement(n_a, n_b, med_a, med_b, ratio, None, None, p, "inconclusive", needed=2 * max(n_a, n_b))
    if 1 - tolerance <= lo and hi <= 1 + tolerance:
        verdict = "same"
    elif lo > 1:
        verdict = "faster"
    elif hi < 1:
        verdict = "slower"
    else:
        verdict = "inconclusive"
    needed = None
    if verdict == "inconclusive" and lo > 0:
        half = math.log(hi / lo) / 2
        target = math.log(1 + tolerance)
        needed = max(min(n_a, n_b) + 1, math.ceil(min(n_a, n_b) * (half / target) ** 2))
    return Judgement(n_a, n_b, med_a, med_b, ratio, lo, hi, p, verdict, needed)


def compare_summaries(
    base: CellSummary, other: CellSummary, *, tolerance: float, confidence: float, salt: str = ""
) -> Comparison:
    """`other` against `base` at the same point (the summaries' values, their CVs, where they were measured)."""
    va, vb = base.value, other.value
    a_vals = list(va.values) if va else []
    b_vals = list(vb.values) if vb else []
    j = judge(a_vals, b_vals, tolerance=tolerance, confidence=confidence, seed=seed_of(salt, base.point, base.kernel, other.kernel))
    same_boot: bool | None = None
    note = ""
    if base.boots and other.boots:
        same_boot = set(base.boots) == set(other.boots)
        if not same_boot:
            note = "measured in different lab host boots (boot-to-boot noise included)"
    return Comparison(base.point, base.kernel, other.kernel, j, va.cv if va else None, vb.cv if vb else None, same_boot, note)


def comparisons(
    summaries: Iterable[CellSummary],
    baseline: str,
    *,
    tolerance: float = 0.10,
    confidence: float = 0.95,
    salt: str = "",
) -> list[Comparison]:
    """Every other arm against `baseline` at every point both measured.

    A comparison is only made between repeats measured on one host: where the
    two arms ran on different hosts, the point is skipped with a note instead
    of mixing hosts in one ratio (see `refused`).
    """
    by_point: dict[Point, dict[str, CellSummary]] = {}
    for s in summaries:
        by_point.setdefault(s.point, {})[s.kernel] = s
    out: list[Comparison] = []
    for arms in by_point.values():
        base = arms.get(baseline)
        if base is None or base.n_ok == 0:
            continue
        for kernel, other in arms.items():
            if kernel == baseline or other.n_ok == 0:
                continue
            if base.hosts and other.hosts and set(base.hosts) != set(other.hosts):
                continue  # never mix hosts in one ratio
            out.append(compare_summaries(base, other, tolerance=tolerance, confidence=confidence, salt=salt))
    return out


def refused(summaries: Iterable[CellSummary], baseline: str) -> list[str]:
    """Points where the arms were measured on different hosts, so no ratio is given."""
    by_point: dict[Point, dict[str, CellSummary]] = {}
    for s in summaries:
        by_point.setdefault(s.point, {})[s.kernel] = s
    out = []
    for point, arms in by_point.items():
        base = arms.get(baseline)
        for kernel, other in arms.items():
            if base is None or kernel == baseline:
                continue
            if base.hosts and other.hosts and set(base.hosts) != set(other.hosts):
                out.append(f"{point.backend} {point.label()}: {baseline} on {', '.join(base.hosts)}, {kernel} on "
                           f"{', '.join(other.hosts)}: not compared (hosts differ)")
    return out
