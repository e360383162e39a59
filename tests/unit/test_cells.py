"""lab.measure.cells: cell ids, their inverse, and matrix expansion."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.measure.cells import Cell, expand, format_rtt, parse_cell_id
from lab.config import DEFAULT_CONFIG, Iperf3Options, MatrixSpec, load_config


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


def assert_groups_contiguous(cells: list[Cell]) -> None:
    """Each (kernel, backend) group appears as one run of consecutive cells."""
    runs = [group for group, _ in itertools.groupby(c.group for c in cells)]
    assert len(runs) == len(set(runs)), runs


# ---------------------------------------------------------------- ids


def test_id_spelling() -> None:
    assert cell().id == "vhost-qlen1-rtt0-nodrop"
    assert cell(backend="tap", txqueuelen=1000, rtt_ms=60.0, kernel="stock").id == "tap-qlen1000-rtt60-stock"
    assert cell(rtt_ms=0.5).id == "vhost-qlen1-rtt0.5-nodrop"
    assert cell(rtt_ms=1e-05).id == "vhost-qlen1-rtt0.00001-nodrop"  # never exponent notation
    assert cell(kernel="nodrop-full").id == "vhost-qlen1-rtt0-nodrop-full"


def test_repeat_suffix_only_when_repeated() -> None:
    assert cell(repeat=1, repeats=1).id == "vhost-qlen1-rtt0-nodrop"
    assert cell(repeat=1, repeats=3).id == "vhost-qlen1-rtt0-nodrop-r1"
    assert cell(repeat=3, repeats=3).id == "vhost-qlen1-rtt0-nodrop-r3"


def test_group() -> None:
    assert cell(kernel="stock", backend="tap").group == ("stock", "tap")


def test_format_rtt() -> None:
    assert [format_rtt(x) for x in (0, 0.0, 60.0, 120, 0.25)] == ["0", "0", "60", "120", "0.25"]
    with pytest.raises(ValueError):
        format_rtt(-1.0)
    with pytest.raises(ValueError):
        format_rtt(float("inf"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"backend": "virtio"},
        {"kernel": "nodrop-r2"},  # would read back as kernel "nodrop", repeat 2
        {"kernel": "-x"},
        {"txqueuelen": True},
        {"rtt_ms": float("nan")},
        {"rtt_ms": -1.0},
        {"repeat": 0},
        {"repeat": 3, "repeats": 2},
    ],
)
def test_cell_refuses_what_its_id_cannot_spell(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        cell(**overrides)


def test_parse_cell_id() -> None:
    assert parse_cell_id("vhost-qlen1-rtt0-nodrop") == {
        "backend": "vhost",
        "txqueuelen": 1,
        "rtt_ms": 0.0,
        "kernel": "nodrop",
        "repeat": 1,
    }
    assert parse_cell_id("tap-qlen1000-rtt60-nodrop-full-r12") == {
        "backend": "tap",
        "txqueuelen": 1000,
        "rtt_ms": 60.0,
        "kernel": "nodrop-full",
        "repeat": 12,
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
    return Cell(
        matrix=draw(st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)),
        kernel=draw(kernel_names),
        backend=draw(st.sampled_from(["tap", "vhost"])),
        txqueuelen=draw(st.integers(min_value=0, max_value=2**32 - 1)),
        rtt_ms=draw(rtts),
        repeat=draw(st.integers(min_value=1, max_value=repeats)),
        repeats=repeats,
        duration_s=draw(st.integers(min_value=1, max_value=3600)),
    )


@settings(max_examples=300)
@given(cells())
def test_cell_id_round_trip(c: Cell) -> None:
    parsed = parse_cell_id(c.id)
    assert parsed == {
        "backend": c.backend,
        "txqueuelen": c.txqueuelen,
        "rtt_ms": c.rtt_ms,
        "kernel": c.kernel,
        "repeat": c.repeat if c.repeats > 1 else 1,
    }


# ---------------------------------------------------------------- expansion


def test_expand_order_and_grouping() -> None:
    ids = [c.id for c in expand(matrix())]
    assert ids == [
        "tap-qlen1000-rtt0-stock",
        "tap-qlen1-rtt0-stock",
        "tap-qlen1000-rtt60-stock",
        "vhost-qlen1000-rtt0-stock",
        "vhost-qlen1-rtt0-stock",
        "vhost-qlen1000-rtt60-stock",
        "tap-qlen1000-rtt0-nodrop",
        "tap-qlen1-rtt0-nodrop",
        "tap-qlen1000-rtt60-nodrop",
        "vhost-qlen1000-rtt0-nodrop",
        "vhost-qlen1-rtt0-nodrop",
        "vhost-qlen1000-rtt60-nodrop",
    ]


def test_expand_repeats_in_a_row() -> None:
    ids = [
        c.id for c in expand(matrix(kernels=("stock",), backends=("vhost",), txqueuelens=(1,), rtts_ms=(), repeats=3))
    ]
    assert ids == ["vhost-qlen1-rtt0-stock-r1", "vhost-qlen1-rtt0-stock-r2", "vhost-qlen1-rtt0-stock-r3"]


def test_expand_skips_rtt0_already_measured() -> None:
    cells_ = expand(matrix(kernels=("stock",), backends=("tap",), txqueuelens=(1000, 1), rtts_ms=(0.0, 60.0)))
    assert [c.id for c in cells_] == ["tap-qlen1000-rtt0-stock", "tap-qlen1-rtt0-stock", "tap-qlen1000-rtt60-stock"]


def test_expand_keeps_rtt0_at_a_new_txqueuelen() -> None:
    cells_ = expand(matrix(kernels=("stock",), backends=("tap",), txqueuelens=(1,), rtts_ms=(0.0,), rtt_txqueuelen=500))
    assert [c.id for c in cells_] == ["tap-qlen1-rtt0-stock", "tap-qlen500-rtt0-stock"]


def test_expand_deduplicates_a_hand_built_matrix() -> None:
    cells_ = expand(matrix(kernels=("stock", "stock"), backends=("tap", "tap"), txqueuelens=(1, 1), rtts_ms=(60.0, 60)))
    assert [c.id for c in cells_] == ["tap-qlen1-rtt0-stock", "tap-qlen1000-rtt60-stock"]


def test_expand_no_points() -> None:
    assert expand(matrix(txqueuelens=(), rtts_ms=())) == []


def test_expand_carries_matrix_fields() -> None:
    c = expand(matrix(duration_s=7, repeats=2))[0]
    assert (c.matrix, c.duration_s, c.repeats, c.repeat) == ("m", 7, 2, 1)


def test_expand_only_rtts() -> None:
    cells_ = expand(matrix(kernels=("stock",), backends=("vhost",), txqueuelens=(), rtts_ms=(60.0, 120.0)))
    assert [c.id for c in cells_] == ["vhost-qlen1000-rtt60-stock", "vhost-qlen1000-rtt120-stock"]


@settings(max_examples=200)
@given(
    kernels=st.lists(kernel_names, min_size=1, max_size=3, unique=True),
    backends=st.lists(st.sampled_from(["tap", "vhost"]), min_size=1, max_size=2, unique=True),
    # at least one point, as in every validated matrix (test_expand_no_points covers none)
    txqueuelens=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=5),
    rtts_ms=st.lists(st.sampled_from([0.0, 0.5, 60.0, 120.0]), max_size=4),
    rtt_txqueuelen=st.integers(min_value=1, max_value=5000),
    repeats=st.integers(min_value=1, max_value=3),
)
def test_expand_properties(
    kernels: list[str],
    backends: list[str],
    txqueuelens: list[int],
    rtts_ms: list[float],
    rtt_txqueuelen: int,
    repeats: int,
) -> None:
    m = matrix(
        kernels=tuple(kernels),
        backends=tuple(backends),
        txqueuelens=tuple(txqueuelens),
        rtts_ms=tuple(rtts_ms),
        rtt_txqueuelen=rtt_txqueuelen,
        repeats=repeats,
    )
    cells_ = expand(m)
    points = {(q, 0.0) for q in txqueuelens} | {(rtt_txqueuelen, r) for r in rtts_ms}
    assert len(cells_) == len(kernels) * len(backends) * len(points) * repeats
    ids = [c.id for c in cells_]
    assert len(ids) == len(set(ids))
    assert_groups_contiguous(cells_)
    assert [g for g, _ in itertools.groupby(c.group for c in cells_)] == [(k, b) for k in kernels for b in backends]
    for c in cells_:
        assert parse_cell_id(c.id)["kernel"] == c.kernel


# ---------------------------------------------------------------- the repo's default lab


@pytest.fixture(scope="module")
def default_matrix() -> MatrixSpec:
    return load_config(DEFAULT_CONFIG, mem_total_mib=64 * 1024).matrices["vhost-matrix"]


def test_default_full_matrix(default_matrix: MatrixSpec) -> None:
    cells_ = expand(default_matrix)
    assert len(cells_) == 24  # 2 kernels x 2 backends x (4 txqueuelens + 2 RTTs)
    assert_groups_contiguous(cells_)
    assert [c.group for c in cells_[::6]] == [
        ("stock", "tap"),
        ("stock", "vhost"),
        ("nodrop", "tap"),
        ("nodrop", "vhost"),
    ]
    assert [c.id for c in cells_[18:]] == [
        "vhost-qlen1000-rtt0-nodrop",
        "vhost-qlen100-rtt0-nodrop",
        "vhost-qlen10-rtt0-nodrop",
        "vhost-qlen1-rtt0-nodrop",
        "vhost-qlen1000-rtt60-nodrop",
        "vhost-qlen1000-rtt120-nodrop",
    ]
    assert {c.duration_s for c in cells_} == {10}


def test_default_smoke_profile(default_matrix: MatrixSpec) -> None:
    smoke = default_matrix.with_profile("smoke")
    cells_ = expand(smoke)
    assert len(cells_) == 24  # 2 kernels x 2 backends x 2 txqueuelens x 3 repeats, no RTTs
    assert {c.duration_s for c in cells_} == {5}
    assert {c.repeat for c in cells_} == {1, 2, 3}
    assert {c.rtt_ms for c in cells_} == {0.0}
    assert {c.txqueuelen for c in cells_} == {1000, 1}
    assert_groups_contiguous(cells_)
    assert "vhost-qlen1-rtt0-nodrop-r3" in {c.id for c in cells_}
