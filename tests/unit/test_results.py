"""lab.verdicts.results: the run store (append/fsync, torn and corrupt lines, resume) and aggregation."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.errors import LabError
from lab.verdicts.results import (
    STABLE_KEYS,
    CellResult,
    RunMeta,
    RunStore,
    aggregate,
    list_runs,
    load_run,
    new_run_id,
    resolve_run,
)

CONTRACT_KEYS = [
    "cell", "kernel", "backend", "txqueuelen", "rtt_ms", "repeat", "kind", "streams", "queues", "qdisc",
    "threads", "status", "error", "throughput_mbps", "retransmits", "host_retrans_segs", "tcp_out_segs",
    "tap_tx_dropped", "tap_tx_packets", "qdisc_drops", "qdisc_requeues", "qdisc_overlimits",
    "qdisc_backlog_peak", "measured_rtt_ms", "cpu_sender_pct", "cpu_receiver_pct", "ring_drops",
    "drop_reasons", "queue_stats", "pktgen_sent", "pktgen_errors", "pktgen_pps", "guest_rx_packets",
    "guest_rx_pps", "pktgen_lost", "accel", "host_accel", "kernel_recipe", "kernel_release", "duration_s",
    "started_at", "finished_at", "host", "boot_id", "modules_loaded", "order", "attempts", "host_crashes",
    "commands", "console_log",
]


def cell(kernel="stock", backend="vhost", qlen=1000, rtt=0, repeat=1, repeats=1, status="ok", tp=100.0, **kw):
    cid = f"{backend}-qlen{qlen}-rtt{rtt}-{kernel}" + (f"-r{repeat}" if repeats > 1 else "")
    return CellResult(
        cell=cid,
        kernel=kernel,
        backend=backend,
        txqueuelen=qlen,
        rtt_ms=rtt,
        repeat=repeat,
        status=status,
        throughput_mbps=tp if status == "ok" else None,
        error=None if status == "ok" else "iperf3 timed out",
        **kw,
    )


def make_store(tmp_path: Path, planned=()) -> RunStore:
    store = RunStore(tmp_path / "runs" / "20250101-120000-m")
    store.create(RunMeta(run_id="20250101-120000-m", matrix="m", planned=list(planned)))
    return store


# --------------------------------------------------------------------------- CellResult


def test_stable_keys_are_exactly_the_contract():
    assert list(STABLE_KEYS) == CONTRACT_KEYS


def test_cell_round_trip_keeps_unknown_keys():
    r = cell(retransmits=3, commands=[["iperf3", "-c", "10.0.0.2"]])
    d = r.to_dict()
    d["future_field"] = {"x": 1}
    back = CellResult.from_dict(json.loads(json.dumps(d)))
    assert back.extra == {"future_field": {"x": 1}}
    assert back.to_dict() == d
    assert back.retransmits == 3 and back.commands == [["iperf3", "-c", "10.0.0.2"]]


def test_old_file_without_optional_keys_loads():
    r = CellResult.from_dict({"cell": "c", "kernel": "stock", "backend": "tap", "txqueuelen": 1, "rtt_ms": 0.0})
    assert r.status == "ok" and r.tap_tx_dropped is None and r.commands == []
    assert r.rtt_ms == 0 and isinstance(r.rtt_ms, int)  # 0.0 normalised, groups with 0


def test_missing_identifying_key_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        CellResult.from_dict({"cell": "c", "kernel": "stock", "txqueuelen": 1, "rtt_ms": 0})


# --------------------------------------------------------------------------- store


def test_append_fsyncs_every_line_and_round_trips(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    rs = [cell(qlen=q, tp=q * 2.0, tap_tx_dropped=q) for q in (1000, 100, 10, 1)]
    for r in rs:
        store.append(r)
    assert len(synced) == 4
    data = store.load()
    assert data.warnings == []
    assert [r.to_dict() for r in data.results] == [r.to_dict() for r in rs]
    assert store.results_path.read_text().count("\n") == 4


def test_concurrent_appends_stay_whole_lines(tmp_path):
    import threading

    store = make_store(tmp_path)
    big = [["iperf3", "-c", "10.0.0.2", "--json", "x" * 3000]] * 5  # lines well over a buffer size

    def worker(k: int) -> None:
        for q in range(20):
            store.append(cell(kernel=f"k{k}", qlen=q + 1, commands=big))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = store.load()
    assert data.warnings == [] and len(data.results) == 80


def test_meta_written_atomically_and_create_refuses_overwrite(tmp_path):
    store = make_store(tmp_path)
    meta = store.read_meta()
    meta.finished_at = "2025-01-01T12:30:00+00:00"
    store.write_meta(meta)
    assert store.read_meta().finished_at == "2025-01-01T12:30:00+00:00"
    assert sorted(p.name for p in store.run_dir.iterdir()) == [
        "logs",
        "meta.json",
        "results.jsonl",
    ]  # no tmp left behind
    with pytest.raises(LabError, match="already holds a run"):
        store.create(meta)


def test_meta_unknown_keys_and_duration_alias():
    m = RunMeta.from_dict({"run_id": "r", "matrix": "m", "duration": 10, "newthing": 1})
    assert m.duration_s == 10 and m.extra == {"newthing": 1}
    assert m.to_dict()["newthing"] == 1


def test_torn_last_line_is_ignored_with_warning(tmp_path):
    store = make_store(tmp_path)
    store.append(cell(qlen=1000))
    store.append(cell(qlen=1))
    with open(store.results_path, "ab") as f:
        f.write(b'{"cell": "vhost-qlen10-rtt0-stock", "kernel": "sto')  # crash mid-write
    data = store.load()
    assert [r.txqueuelen for r in data.results] == [1000, 1]
    assert len(data.warnings) == 1
    assert "results.jsonl:3:" in data.warnings[0] and "torn" in data.warnings[0]


def test_append_after_torn_line_keeps_new_line_whole(tmp_path):
    store = make_store(tmp_path)
    store.append(cell(qlen=1000))
    with open(store.results_path, "ab") as f:
        f.write(b'{"cell": "torn')
    store.append(cell(qlen=1))  # a --resume after the crash
    data = store.load()
    assert [r.txqueuelen for r in data.results] == [1000, 1]
    assert len(data.warnings) == 1 and ":2:" in data.warnings[0] and "corrupt" in data.warnings[0]


def test_corrupt_middle_line_is_skipped_with_warning(tmp_path):
    store = make_store(tmp_path)
    store.append(cell(qlen=1000))
    with open(store.results_path, "ab") as f:
        f.write(b"\x00\xffgarbage\n")
        f.write(b'{"cell": "no-kernel"}\n')  # valid JSON, not a cell
        f.write(b"[1, 2]\n")
    store.append(cell(qlen=1))
    data = store.load()
    assert [r.txqueuelen for r in data.results] == [1000, 1]
    assert all(str(store.results_path) in w for w in data.warnings)
    assert [":2:" in data.warnings[0], ":3:" in data.warnings[1], ":4:" in data.warnings[2]] == [True] * 3


def test_empty_and_missing_results_file(tmp_path):
    store = make_store(tmp_path)
    assert store.load().results == [] and store.load().warnings == []
    store.results_path.unlink()
    data = store.load()
    assert data.results == [] and "no results file" in data.warnings[0]


def test_resume_completed_ids_use_latest_attempt(tmp_path):
    store = make_store(tmp_path)
    store.append(cell(qlen=1000, status="error"))  # failed, then re-run ok
    store.append(cell(qlen=1000))
    store.append(cell(qlen=100))  # ok, then re-run failed: must be re-run again
    store.append(cell(qlen=100, status="error"))
    store.append(cell(qlen=10, status="error"))
    assert store.completed_ids() == {"vhost-qlen1000-rtt0-stock"}


def test_latest_follows_plan_order(tmp_path):
    planned = ["vhost-qlen1000-rtt0-stock", "vhost-qlen100-rtt0-stock", "vhost-qlen1-rtt0-stock"]
    store = make_store(tmp_path, planned)
    store.append(cell(qlen=1))
    store.append(cell(qlen=1000, status="error"))
    store.append(cell(qlen=7))  # not in the plan: goes last
    store.append(cell(qlen=1000, tp=5.0))
    data = store.load()
    assert [r.cell for r in data.latest()] == [planned[0], planned[2], "vhost-qlen7-rtt0-stock"]
    assert data.latest()[0].throughput_mbps == 5.0
    assert data.missing_ids() == [planned[1]]


def test_host_accel_tcg_wins(tmp_path):
    store = make_store(tmp_path)
    store.append(cell(host_accel="kvm"))
    assert store.load().host_accel() == "kvm"
    store.append(cell(qlen=1, host_accel="tcg"))
    assert store.load().host_accel() == "tcg"


# --------------------------------------------------------------------------- aggregation


def test_aggregate_medians_sums_and_errors():
    rs = [
        cell(repeat=1, repeats=3, tp=100.0, retransmits=10, tap_tx_dropped=1),
        cell(repeat=2, repeats=3, tp=300.0, retransmits=30, tap_tx_dropped=2),
        cell(repeat=3, repeats=3, tp=200.0, retransmits=20, tap_tx_dropped=None),
        cell(repeat=4, repeats=4, status="error"),
        cell(kernel="nodrop", tp=50.0),
    ]
    s, n = aggregate(rs)
    assert (s.kernel, s.backend, s.txqueuelen, s.rtt_ms) == ("stock", "vhost", 1000, 0)
    assert (s.n_ok, s.n_error) == (3, 1)
    assert s.throughput_mbps.median == 200 and s.throughput_mbps.min == 100 and s.throughput_mbps.max == 300
    assert s.retransmits.sum == 60 and s.retransmits.median == 20
    assert s.tap_tx_dropped.sum == 3 and s.tap_tx_dropped.n == 2  # None = not measured, not 0
    assert s.errors == ("vhost-qlen1000-rtt0-stock-r4: iperf3 timed out",)
    assert n.kernel == "nodrop" and n.throughput_mbps.median == 50 and n.qdisc_drops is None


def test_aggregate_counts_only_latest_attempt():
    rs = [cell(status="error"), cell(tp=42.0)]
    (s,) = aggregate(rs)
    assert (s.n_ok, s.n_error, s.throughput_mbps.median) == (1, 0, 42.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e5, allow_nan=False), min_size=1, max_size=9))
def test_aggregate_median_bounds(values):
    rs = [cell(repeat=i + 1, repeats=len(values) + 1, tp=v) for i, v in enumerate(values)]
    (s,) = aggregate(rs)
    t = s.throughput_mbps
    assert t.min <= t.median <= t.max and t.n == len(values) and s.n_ok == len(values)


# --------------------------------------------------------------------------- naming runs


def test_new_run_id_format():
    assert new_run_id("vhost-matrix", datetime(2025, 3, 4, 5, 6, 7)) == "20250304-050607-vhost-matrix"


def test_resolve_run(tmp_path):
    for rid in ("20250101-120000-a", "20250102-090000-b"):
        RunStore(tmp_path / "runs" / rid).create(RunMeta(run_id=rid, matrix=rid[-1]))
    (tmp_path / "runs" / "junk").mkdir()  # not a run: no meta.json
    assert list_runs(tmp_path) == ["20250101-120000-a", "20250102-090000-b"]
    assert resolve_run(tmp_path, "latest").name == "20250102-090000-b"
    assert resolve_run(tmp_path, "20250101-120000-a").name == "20250101-120000-a"
    assert resolve_run(tmp_path, "20250101").name == "20250101-120000-a"  # unique prefix
    p = tmp_path / "runs" / "20250101-120000-a"
    assert resolve_run(tmp_path, str(p)) == p
    assert resolve_run(tmp_path, str(p / "results.jsonl")) == p
    assert load_run(tmp_path, "latest").meta.matrix == "b"
    with pytest.raises(LabError) as e:
        resolve_run(tmp_path, "nope")
    assert "20250101-120000-a" in str(e.value) and "20250102-090000-b" in str(e.value)
    assert "junk" not in str(e.value)
    with pytest.raises(LabError, match="ambiguous"):
        resolve_run(tmp_path, "2025")


def test_resolve_latest_without_runs(tmp_path):
    with pytest.raises(LabError, match="no runs"):
        resolve_run(tmp_path, "latest")


def test_pktgen_points_are_compared_by_what_the_guest_received():
    # Stock offers more (its ring takes the packet, then tail-drops it); nodrop
    # holds back. The comparison must see the guest's side: nodrop delivered more.
    def pg(kernel: str, offered: float, received: float) -> CellResult:
        return CellResult(cell=f"pktgen-vhost-qlen1-rtt0-T1-{kernel}", kernel=kernel, backend="vhost", txqueuelen=1, rtt_ms=0.0,
                          kind="pktgen", threads=1, pktgen_pps=offered, guest_rx_pps=received)
    stock, nodrop = pg("stock", 70_000.0, 9_000.0), pg("nodrop", 12_000.0, 12_000.0)
    assert (stock.value, nodrop.value) == (9_000.0, 12_000.0)
    s, n = aggregate([stock, nodrop])
    assert s.value.median == 9_000.0 and n.value.median == 12_000.0
    assert s.pktgen_pps.median == 70_000.0  # pktgen's own rate is still kept (results.jsonl)
