"""lab.measure.cells: cell ids (and their inverse), matrix expansion, arms, and the interleaved run order."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.config import DEFAULT_CONFIG, Iperf3Options, MatrixSpec, load_config
from lab.measure.cells import Arm, Cell, arms_of, expand, format_rtt, parse_cell_id, schedule, swaps_and_boots


def matrix(**overrides: object) -> MatrixSpec:
    """A small MatrixSpec built by hand (no lab.toml involved)."""
    values: dict[str, object] = {
        "name": "m",
        "host": "h1",
        "guest": "g1",
        "kernels": ("stock", "nodrop"),
        "backends": ("tap", "vhost"),
        "txqueuelens": (1000, 1),
        "rtts_ms": (60.0,),
        "rtt_txqueuelen": 1000,
        "repeats": 1,
        "duration_s": 10,
        "netem_limit": 100_000,
        "netem_split": False,
        "iperf3": Iperf3Options(),
    }
    values.update(overrides)
    return MatrixSpec(**values)  # type: ignore[arg-type]


def cell(**overrides: object) -> Cell:
    values: dict[str, object] = {
        "matrix": "m",
        "kernel": "nodrop",
        "backend": "vhost",
        "txqueuelen": 1,
        "rtt_ms": 0.0,
        "repeat": 1,
        "repeats": 1,
        "duration_s": 10,
    }
    values.update(overrides)
    return Cell(**values)  # type: ignore[arg-type]


ONE_BOOT = lambda recipe: "debian"  # noqa: E731 - every recipe shares one lab host boot
OWN_BOOT = lambda recipe: recipe  # noqa: E731 - every recipe gets a boot of its own


# ---------------------------------------------------------------- ids


def test_id_spelling() -> None:
    assert cell().id == "vhost-qlen1-rtt0-nodrop"
    assert cell(backend="tap", txqueuelen=1000, rtt_ms=60.0, kernel="stock").id == "tap-qlen1000-rtt60-stock"
    assert cell(rtt_ms=0.5).id == "vhost-qlen1-rtt0.5-nodrop"
    assert cell(rtt_ms=1e-05).id == "vhost-qlen1-rtt0.00001-nodrop"  # never exponent notation
    assert cell(kernel="nodrop-full").id == "vhost-qlen1-rtt0-nodrop-full"


def test_axes_are_spelled_only_away_from_their_defaults() -> None:
    assert cell(txqueuelen=1000, streams=8).id == "vhost-qlen1000-rtt0-P8-nodrop"
    assert cell(txqueuelen=1000, streams=8, queues=4, qdisc="noqueue").id == "vhost-qlen1000-rtt0-P8-Q4-Dnoqueue-nodrop"
    assert cell(kind="pktgen", threads=4, qdisc="fq_codel").id == "pktgen-vhost-qlen1-rtt0-Dfq_codel-T4-nodrop"
    assert cell(kernel="nodrop-optin-on", repeats=3, repeat=2, queues=2).id == "vhost-qlen1-rtt0-Q2-nodrop-optin-on-r2"


def test_repeat_suffix_only_when_repeated() -> None:
    assert cell(repeat=1, repeats=1).id == "vhost-qlen1-rtt0-nodrop"
    assert cell(repeat=1, repeats=3).id == "vhost-qlen1-rtt0-nodrop-r1"
    assert cell(repeat=3, repeats=3).id == "vhost-qlen1-rtt0-nodrop-r3"


def test_point_and_guest_config() -> None:
    c = cell(backend="tap", queues=4, streams=8, txqueuelen=1000)
    assert c.guest_config == ("tap", 4)
    p = c.point
    assert (p.kind, p.backend, p.txqueuelen, p.rtt_ms, p.streams, p.queues, p.qdisc, p.threads) == ("iperf3", "tap", 1000, 0.0, 8, 4,
                                                                                                   "default", 0)
    # the point does not depend on the kernel or the repeat: that is what makes a comparison
    assert cell(kernel="stock", repeat=2, repeats=3).point == cell(kernel="nodrop").point


def test_recipe_name_defaults_to_the_kernel() -> None:
    assert cell().recipe_name == "nodrop"
    assert cell(kernel="stock-aa", recipe="stock").recipe_name == "stock"


def test_format_rtt() -> None:
    assert [format_rtt(x) for x in (0, 0.0, 60.0, 120, 0.25)] == ["0", "0", "60", "120", "0.25"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"backend": "virtio"},
        {"kernel": "nodrop-r2"},  # would read back as kernel "nodrop", repeat 2
        {"kernel": "-x"},
        {"kernel": "Nodrop"},  # upper case would read as an axis marker
        {"txqueuelen": True},
        {"rtt_ms": float("nan")},
        {"rtt_ms": -1.0},
        {"repeat": 0},
        {"repeat": 3, "repeats": 2},
        {"kind": "pktgen"},  # pktgen without senders
        {"threads": 2},  # senders without pktgen
        {"qdisc": "fq-codel"},
        {"kind": "udp"},
    ],
)
def test_cell_refuses_what_its_id_cannot_spell(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        cell(**overrides)


def test_parse_cell_id() -> None:
    base = {"kind": "iperf3", "streams": 1, "queues": 1, "qdisc": "default", "threads": 0}
    assert parse_cell_id("vhost-qlen1-rtt0-nodrop") == {**base, "backend": "vhost", "txqueuelen": 1, "rtt_ms": 0.0,
                                                        "kernel": "nodrop", "repeat": 1}
    assert parse_cell_id("tap-qlen1000-rtt60-nodrop-full-r12") == {**base, "backend": "tap", "txqueuelen": 1000, "rtt_ms": 60.0,
                                                                   "kernel": "nodrop-full", "repeat": 12}
    assert parse_cell_id("pktgen-vhost-qlen10-rtt0-Q4-Dnoqueue-T4-stock-r2") == {
        "kind": "pktgen", "backend": "vhost", "txqueuelen": 10, "rtt_ms": 0.0, "streams": 1, "queues": 4, "qdisc": "noqueue",
        "threads": 4, "kernel": "stock", "repeat": 2,
    }
    assert parse_cell_id("tap-qlen10-rtt0.5-stock")["rtt_ms"] == 0.5


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "vhost",
        "virtio-qlen1-rtt0-stock",
        "vhost-qlen-rtt0-stock",
        "vhost-qlen1-rtt-stock",
        "vhost-qlen1-rtt0-",
        "vhost-qlen1-rtt1e-05-stock",
        "vhost-qlen1-rtt0-stock\n",
        "vhost-qlen1-rtt0-stock ",
        "vhost-qlen1-rtt0-stock-r0",
        "vhost-qlen1-rtt0-stock-r01",
        "vhost-qlen1-rtt0-P0-stock",
        "vhost-qlen1-rtt0-Q4-P8-stock",  # markers in the wrong order
        "udp-vhost-qlen1-rtt0-stock",
    ],
)
def test_parse_cell_id_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="not a cell id"):
        parse_cell_id(bad)


kernel_names = st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True).filter(lambda k: not re.search(r"-r[0-9]+\Z", k))
rtts = st.one_of(
    st.integers(min_value=0, max_value=60_000).map(float),
    st.floats(min_value=0, max_value=60_000, allow_nan=False, allow_infinity=False),
)


@st.composite
def cells(draw: st.DrawFn) -> Cell:
    repeats = draw(st.integers(min_value=1, max_value=100))
    pktgen = draw(st.booleans())
    return Cell(
        matrix=draw(st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)),
        kernel=draw(kernel_names),
        backend=draw(st.sampled_from(["tap", "vhost"])),
        txqueuelen=draw(st.integers(min_value=0, max_value=2**32 - 1)),
        rtt_ms=draw(rtts),
        repeat=draw(st.integers(min_value=1, max_value=repeats)),
        repeats=repeats,
        duration_s=draw(st.integers(min_value=1, max_value=3600)),
        streams=draw(st.integers(min_value=1, max_value=128)),
        queues=draw(st.integers(min_value=1, max_value=16)),
        qdisc=draw(st.sampled_from(["default", "fq_codel", "noqueue", "pfifo_fast"])),
        kind="pktgen" if pktgen else "iperf3",
        threads=draw(st.integers(min_value=1, max_value=8)) if pktgen else 0,
    )


@settings(max_examples=300)
@given(cells())
def test_cell_id_round_trip(c: Cell) -> None:
    parsed = parse_cell_id(c.id)
    assert parsed == {
        "kind": c.kind,
        "backend": c.backend,
        "txqueuelen": c.txqueuelen,
        "rtt_ms": c.rtt_ms,
        "streams": c.streams,
        "queues": c.queues,
        "qdisc": c.qdisc,
        "threads": c.threads,
        "kernel": c.kernel,
        "repeat": c.repeat if c.repeats > 1 else 1,
    }


# ---------------------------------------------------------------- expansion


def test_expand_points_in_cover_letter_order() -> None:
    ids = [c.id for c in expand(matrix(kernels=("stock",), backends=("tap",)))]
    assert ids == ["tap-qlen1000-rtt0-stock", "tap-qlen1-rtt0-stock", "tap-qlen1000-rtt60-stock"]


def test_expand_qdiscs_apply_at_rtt0_only_and_streams_everywhere() -> None:
    spec = matrix(kernels=("stock",), backends=("vhost",), txqueuelens=(1000,), qdiscs=("default", "noqueue"), streams=(1, 8))
    ids = {c.id for c in expand(spec)}
    assert ids == {
        "vhost-qlen1000-rtt0-stock", "vhost-qlen1000-rtt0-P8-stock",
        "vhost-qlen1000-rtt0-Dnoqueue-stock", "vhost-qlen1000-rtt0-P8-Dnoqueue-stock",
        # an RTT cell's root qdisc is netem itself
        "vhost-qlen1000-rtt60-stock", "vhost-qlen1000-rtt60-P8-stock",
    }


def test_expand_pktgen_cells_per_sender_count_qdisc_and_txqueuelen() -> None:
    spec = matrix(kernels=("stock",), backends=("vhost",), rtts_ms=(), qdiscs=("default", "noqueue"), pktgen_threads=(1, 4))
    pk = [c for c in expand(spec) if c.kind == "pktgen"]
    assert len(pk) == 2 * 2 * 2  # threads x txqueuelens x qdiscs
    assert {c.threads for c in pk} == {1, 4} and {c.rtt_ms for c in pk} == {0.0} and {c.streams for c in pk} == {1}
    assert "pktgen-vhost-qlen1-rtt0-Dnoqueue-T4-stock" in {c.id for c in pk}


def test_expand_queues_are_a_guest_config() -> None:
    spec = matrix(kernels=("stock",), backends=("vhost",), rtts_ms=(), txqueuelens=(1000,), queues=(1, 4))
    assert {c.guest_config for c in expand(spec)} == {("vhost", 1), ("vhost", 4)}


def test_expand_repeats_and_dedup() -> None:
    spec = matrix(kernels=("stock", "stock"), backends=("tap", "tap"), txqueuelens=(1000, 1000), rtts_ms=(0.0,), repeats=2)
    ids = [c.id for c in expand(spec)]
    assert ids == ["tap-qlen1000-rtt0-stock-r1", "tap-qlen1000-rtt0-stock-r2"]  # rtt 0 at rtt_txqueuelen is qlen1000 again


def test_expand_only_rtts_and_no_points() -> None:
    assert [c.rtt_ms for c in expand(matrix(kernels=("a",), backends=("tap",), txqueuelens=(), rtts_ms=(60.0, 120.0)))] == [60.0, 120.0]
    assert expand(matrix(txqueuelens=(), rtts_ms=())) == []


def test_arms_and_the_aa_control() -> None:
    assert arms_of(matrix()) == [Arm("stock", "stock"), Arm("nodrop", "nodrop")]
    assert arms_of(matrix(), aa=True) == [Arm("stock", "stock"), Arm("stock-aa", "stock")]
    assert arms_of(matrix(aa=True)) == [Arm("stock", "stock"), Arm("stock-aa", "stock")]
    aa = expand(matrix(backends=("tap",), rtts_ms=()), arms_of(matrix(), aa=True))
    assert {c.kernel for c in aa} == {"stock", "stock-aa"} and {c.recipe_name for c in aa} == {"stock"}


# ---------------------------------------------------------------- the run order


def _blocks(cells_: list[Cell]) -> list[str]:
    return [k for k, _ in itertools.groupby(c.kernel for c in cells_)]


def test_schedule_alternates_arms_abba_per_round() -> None:
    spec = matrix(backends=("tap",), repeats=4)
    run = schedule(expand(spec), ONE_BOOT, "abba", seed=7)
    # round 1: stock nodrop, round 2: nodrop stock, ... adjacent blocks of one arm merge
    assert _blocks(run) == ["stock", "nodrop", "stock", "nodrop", "stock"]  # s n | n s | s n | n s
    rounds = [c.repeat for c in run]
    assert rounds == sorted(rounds)  # every arm's repeat r runs before anyone's repeat r+1
    assert sorted(c.id for c in run) == sorted(c.id for c in expand(spec))


def test_schedule_is_seeded() -> None:
    spec = matrix(repeats=3)
    a = [c.id for c in schedule(expand(spec), ONE_BOOT, "abba", seed=1)]
    b = [c.id for c in schedule(expand(spec), ONE_BOOT, "abba", seed=1)]
    c = [c.id for c in schedule(expand(spec), ONE_BOOT, "shuffle", seed=2)]
    assert a == b and sorted(a) == sorted(c)
    assert any(a != [x.id for x in schedule(expand(spec), ONE_BOOT, "abba", seed=s)] for s in range(2, 12))


def test_schedule_keeps_a_guest_config_together() -> None:
    run = schedule(expand(matrix(repeats=2)), ONE_BOOT)
    configs = [k for k, _ in itertools.groupby(c.guest_config for c in run)]
    assert configs == [("tap", 1), ("vhost", 1)]


def test_schedule_gives_recipes_that_cannot_share_a_boot_their_own_stretch() -> None:
    run = schedule(expand(matrix(repeats=2)), OWN_BOOT)
    assert _blocks(run) == ["stock", "nodrop"]


def test_swaps_and_boots() -> None:
    spec = matrix(repeats=3)
    shared = swaps_and_boots(schedule(expand(spec), ONE_BOOT), ONE_BOOT)
    # tap: s n | n s | s n, then vhost carries on: n s | s n | n s -> 3 + 3 swaps, none at the backend change
    assert shared == {"host_boots": 1, "module_swaps": 6, "guest_boots": 8}
    own = swaps_and_boots(schedule(expand(spec), OWN_BOOT), OWN_BOOT)
    assert own == {"host_boots": 2, "module_swaps": 0, "guest_boots": 4}
    aa = expand(matrix(backends=("tap",)), arms_of(matrix(), aa=True))
    assert swaps_and_boots(schedule(aa, ONE_BOOT), ONE_BOOT)["module_swaps"] == 1  # one recipe, two arms: still a swap


@given(repeats=st.integers(1, 5), n_kernels=st.integers(1, 3), order=st.sampled_from(["abba", "shuffle"]), seed=st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_schedule_is_a_permutation(repeats: int, n_kernels: int, order: str, seed: int) -> None:
    spec = matrix(kernels=tuple(f"k{i}" for i in range(n_kernels)), repeats=repeats)
    cells_ = expand(spec)
    run = schedule(cells_, ONE_BOOT, order, seed)
    assert sorted(c.id for c in run) == sorted(c.id for c in cells_)
    assert len({c.id for c in run}) == len(run)


# ---------------------------------------------------------------- lab.toml's matrices


@pytest.fixture(scope="module")
def default_lab():
    return load_config(DEFAULT_CONFIG, mem_total_mib=64 * 1024)


def test_default_full_matrix(default_lab) -> None:
    spec = default_lab.matrices["vhost-matrix"]
    cells_ = expand(spec)
    assert len(cells_) == 2 * 2 * 6 * spec.repeats  # kernels x backends x (4 txqueuelens + 2 RTTs) x repeats
    assert {c.duration_s for c in cells_} == {10}
    assert "vhost-qlen1-rtt0-nodrop-r1" in {c.id for c in cells_}


def test_default_smoke_and_aa_profiles(default_lab) -> None:
    m = default_lab.matrices["vhost-matrix"]
    smoke = expand(m.with_profile("smoke"))
    assert len(smoke) == 2 * 2 * 2 * 3 and {c.rtt_ms for c in smoke} == {0.0} and {c.duration_s for c in smoke} == {5}
    aa_spec = m.with_profile("aa")
    aa = expand(aa_spec, arms_of(aa_spec))
    assert {c.kernel for c in aa} == {"stock", "stock-aa"}


def test_upstream_review_matrix(default_lab) -> None:
    spec = default_lab.matrices["upstream-review"]
    cells_ = expand(spec)
    points = {dataclasses.replace(c, kernel="x", repeat=1).point for c in cells_}
    assert {p.streams for p in points} == {1, 8} and {p.qdisc for p in points} == {"default", "fq_codel", "noqueue"}
    assert {p.threads for p in points if p.kind == "pktgen"} == {1, 4} and {p.queues for p in points} == {4}
    assert set(spec.kernels) == {"stock", "nodrop", "nodrop-optin-on"}
    # per kernel: 2 stream counts x 3 qdiscs iperf3 points + 3 qdiscs x 2 thread counts pktgen points, 3 repeats each
    assert len(cells_) == 3 * (2 * 3 + 3 * 2) * 3
