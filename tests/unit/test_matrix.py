"""lab.measure.matrix: the pure parts (netem split, agent arguments, stream reply -> CellResult, boot
planning, property names, the overhead target) and the runner's state machine driven with fake
hosts and guests (transitions, faults, resume, teardown) -- no VMs, no libvirt, no root."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import lab.measure.matrix as M
from lab.measure.cells import Cell, expand
from lab.config import DEFAULT_CONFIG, loads_config
from lab.errors import HostGone, LabError
from lab.verdicts.expect import evaluate
from lab.guests import GuestPlan
from lab.lifecycle import LabContext
from lab.paths import LabPaths
from lab.hosts.remote import CommandResult
from lab.verdicts.results import STABLE_KEYS, CellResult, RunMeta, RunStore, aggregate

# A lab.toml of its own (not the repository's, which may change): the default lab's shape.
LAB_TOML = """
[lab]
name = "vhl"
workdir = "WORKDIR"

[timeouts]
cell_grace = 60

[kernels.stock]
source = "debian:6.12.117-1~deb12u1"
strategy = "modules"

[kernels.nodrop]
source = "debian:6.12.117-1~deb12u1"
patches = ["kernel/patches/nodrop"]
strategy = "modules"

[images.bookworm]
recipe = "images/bookworm.toml"

[hosts.lab1]
provider = "nested"
kernel = "stock"
vcpus = 2
memory_mib = 4096

[guests.guest1]
host = "lab1"
image = "bookworm"
vcpus = 1
memory_mib = 1024

[guests.guest1.net]
backend = "vhost"
txqueuelen = 1000

[matrices.vhost-matrix]
host = "lab1"
guest = "guest1"
kernels = ["stock", "nodrop"]
backends = ["tap", "vhost"]
txqueuelens = [1000, 100, 10, 1]
rtts_ms = [60, 120]
rtt_txqueuelen = 1000
duration_s = 10
netem_limit = 100000

[matrices.vhost-matrix.profiles.smoke]
txqueuelens = [1000, 1]
rtts_ms = []
duration_s = 5

[expectations]
stock_kernel = "stock"
nodrop_kernel = "nodrop"
"""


def make_cfg(tmp_path: Path, **matrix_overrides: Any):
    """LAB_TOML with its workdir in tmp_path; the matrix's fields adjustable."""
    text = LAB_TOML.replace("WORKDIR", str(tmp_path / "work"))
    cfg = loads_config(text, DEFAULT_CONFIG.parent, DEFAULT_CONFIG.parent / "test-lab.toml", mem_total_mib=65536)
    if matrix_overrides:
        m = cfg.matrices["vhost-matrix"]
        cfg.matrices["vhost-matrix"] = replace(m, **matrix_overrides)
    return cfg


def cell(**kw: Any) -> Cell:
    values: dict[str, Any] = dict(matrix="m", kernel="nodrop", backend="vhost", txqueuelen=1, rtt_ms=0.0,
                                  repeat=1, repeats=1, duration_s=10)
    values.update(kw)
    return Cell(**values)


# =========================================================================== pure parts


def test_netem_delays_unsplit_puts_the_whole_rtt_on_the_tap():
    assert M.netem_delays(0, False) == (None, None)
    assert M.netem_delays(0, True) == (None, None)
    assert M.netem_delays(60, False) == (60.0, None)
    assert M.netem_delays(120.0, True) == (60.0, 60.0)
    with pytest.raises(ValueError):
        M.netem_delays(-1, False)


@given(st.floats(min_value=0.001, max_value=60_000, allow_nan=False), st.booleans())
def test_netem_split_adds_up_to_the_rtt(rtt, split):
    tap, guest = M.netem_delays(rtt, split)
    assert tap is not None
    assert tap + (guest or 0.0) == pytest.approx(rtt)
    assert (guest is not None) == split


def test_netem_commands_are_argv_lists():
    assert M.agent_netem_args("vhl-guest1", None, 100000) == ["netem", "--dev", "vhl-guest1", "--clear"]
    assert M.agent_netem_args("vhl-guest1", 60.0, 100000) == [
        "netem", "--dev", "vhl-guest1", "--delay-ms", "60", "--limit", "100000"]
    assert M.agent_netem_args("t", 0.25, 5)[4] == "0.25"
    assert M.guest_netem_argv(30.0, 100000) == [
        "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "30ms", "limit", "100000"]
    assert M.guest_netem_argv(None, 100000) == ["tc", "qdisc", "del", "dev", "eth0", "root"]


def test_stream_args_bound_iperf3_and_the_call(tmp_path):
    spec = make_cfg(tmp_path).matrices["vhost-matrix"]
    c = cell(duration_s=10)
    args = M.stream_args(c, spec, "10.99.1.2", "vhl-guest1", 60.0)
    assert args == ["stream", "--server", "10.99.1.2", "--duration", "10", "--streams", "1",
                    "--sample-dev", "vhl-guest1", "--timeout", "70"]
    tuned = replace(spec, iperf3=replace(spec.iperf3, streams=4, congestion="bbr", length="128K"))
    args = M.stream_args(c, tuned, "10.99.1.2", "t0", 5)
    assert args[args.index("--congestion") + 1] == "bbr"
    assert args[args.index("--length") + 1] == "128K"
    assert args[args.index("--streams") + 1] == "4"
    assert args[args.index("--timeout") + 1] == "15"
    assert M.stream_call_timeout(c, 60) == 10 + 60 + M.AGENT_SLACK_S
    # the agent's parser accepts exactly these arguments
    from lab.onhost.agent import build_parser

    ns = build_parser().parse_args(args)
    assert (ns.verb, ns.duration, ns.streams, ns.timeout, ns.sample_dev) == ("stream", 10, 4, 15.0, "t0")


def stream_reply(**fields: Any) -> dict[str, Any]:
    """A reply shaped like lab.onhost.agent's stream verb."""
    f = {
        "throughput_mbps": 512.5, "retransmits": 3, "host_retrans_segs": 4, "tcp_out_segs": 40000,
        "tap_tx_dropped": 0, "tap_tx_packets": 39000, "qdisc_drops": 0, "qdisc_requeues": 12,
        "qdisc_overlimits": 0, "qdisc_backlog_peak": 7, "measured_rtt_ms": 0.4,
        "cpu_sender_pct": 50.0, "cpu_receiver_pct": 80.0,
    }
    f.update(fields)
    return {
        "argv": ["iperf3", "-c", "10.99.1.2", "-p", "5201", "-t", "10", "-P", "1", "-J"],
        "iperf3": {"throughput_mbps": f["throughput_mbps"], "seconds": 10.0002},
        "dev": "vhl-guest1",
        "fields": f,
    }


FACTS = {"kernel_recipe": "nodrop", "kernel_release": "6.12.117+deb12-amd64", "accel": "tcg", "guest_accel": "kvm"}


def test_cell_result_from_stream_takes_fields_and_identity():
    c = cell(kernel="nodrop", backend="vhost", txqueuelen=1, rtt_ms=0.0)
    pre = [["python3", "-m", "lab.onhost.agent", "txqueuelen", "--name", "t", "--value", "1"]]
    r = M.cell_result_from_stream(c, stream_reply(), host_facts=FACTS, started_at="a", finished_at="b", commands=pre)
    assert r.ok and r.error is None
    assert (r.cell, r.kernel, r.backend, r.txqueuelen, r.rtt_ms, r.repeat) == (c.id, "nodrop", "vhost", 1, 0.0, 1)
    assert r.throughput_mbps == 512.5 and r.retransmits == 3 and r.tap_tx_dropped == 0 and r.qdisc_backlog_peak == 7
    assert (r.accel, r.host_accel) == ("kvm", "tcg")
    assert (r.kernel_recipe, r.kernel_release) == ("nodrop", "6.12.117+deb12-amd64")
    assert r.duration_s == pytest.approx(10.0002)
    assert r.commands == pre + [stream_reply()["argv"]]
    assert (r.started_at, r.finished_at, r.console_log) == ("a", "b", None)
    # one results.jsonl line with every stable key
    assert set(json.loads(json.dumps(r.to_dict()))) == set(STABLE_KEYS)


def test_cell_result_from_stream_never_lets_fields_override_identity_or_status():
    c = cell()
    reply = stream_reply(cell="evil", status="error", kernel="other", new_counter=5)
    r = M.cell_result_from_stream(c, reply, host_facts=FACTS, started_at=None, finished_at=None)
    assert (r.cell, r.status, r.kernel) == (c.id, "ok", "nodrop")
    assert r.extra == {"new_counter": 5}


def test_cell_result_without_throughput_is_an_error():
    r = M.cell_result_from_stream(cell(), stream_reply(throughput_mbps=None), host_facts=None, started_at=None,
                                  finished_at=None)
    assert r.status == "error" and "no throughput" in r.error
    assert r.duration_s == pytest.approx(10.0002)
    assert r.accel is None and r.host_accel is None and r.kernel_recipe == "nodrop"
    r = M.cell_result_from_stream(cell(), {}, host_facts=None, started_at=None, finished_at=None)
    assert r.status == "error" and r.duration_s == 10.0 and r.commands == []


def test_error_result_and_messages():
    r = M.error_result(cell(), "cell: boom", host_facts=FACTS, started_at="a", finished_at="b",
                       commands=[["x"]], console_log="/x/logs/c.console.log")
    assert (r.status, r.error, r.throughput_mbps, r.console_log, r.commands) == (
        "error", "cell: boom", None, "/x/logs/c.console.log", [["x"]])
    assert M.describe_error(LabError("iperf3 timed out"), "cell") == "cell: iperf3 timed out"
    assert M.describe_error(KeyError("k"), "cell") == "cell: KeyError: 'k'"
    assert M.describe_error(LabError("a\n\nb\nc\nd\ne"), "guest boot") == "guest boot: a | b | c | d"


def test_boot_planning_follows_the_groups(tmp_path):
    spec = make_cfg(tmp_path).matrices["vhost-matrix"]
    cells = expand(spec)  # 2 kernels x 2 backends x 6 points
    assert len(cells) == 24
    assert M.boot_counts(cells) == (2, 4)
    ts = M.plan_transitions(cells)
    assert [t.cell for t in ts if t.boot_host] == ["tap-qlen1000-rtt0-stock", "tap-qlen1000-rtt0-nodrop"]
    assert [t.cell for t in ts if t.boot_guest] == [
        "tap-qlen1000-rtt0-stock", "vhost-qlen1000-rtt0-stock", "tap-qlen1000-rtt0-nodrop", "vhost-qlen1000-rtt0-nodrop"]
    # a host already on the first kernel with the right guest: no boot for the first group
    assert M.boot_counts(cells, running_kernel="stock", running_backend="tap") == (1, 3)
    # a guest without a host is no guest
    assert M.boot_counts(cells, running_kernel=None, running_backend="tap") == (2, 4)
    smoke = expand(spec.with_profile("smoke"))
    assert M.boot_counts(smoke) == (2, 4)
    assert M.boot_counts([]) == (0, 0)
    # resume: only the nodrop vhost cells are left
    left = [c for c in cells if c.kernel == "nodrop" and c.backend == "vhost"]
    assert M.boot_counts(left) == (1, 1)
    # one kernel, many repeats: one host, one guest per backend
    assert M.boot_counts(expand(replace(spec, kernels=("stock",), repeats=3))) == (1, 2)


@given(st.lists(st.tuples(st.sampled_from(["stock", "nodrop", "k3"]), st.sampled_from(["tap", "vhost"])), max_size=30))
def test_boots_never_exceed_changes(seq):
    cells = [cell(kernel=k, backend=b, txqueuelen=i + 1) for i, (k, b) in enumerate(seq)]
    hosts, guests = M.boot_counts(cells)
    kernel_changes = sum(1 for i, c in enumerate(cells) if i == 0 or cells[i - 1].kernel != c.kernel)
    group_changes = sum(1 for i, c in enumerate(cells) if i == 0 or cells[i - 1].group != c.group)
    assert (hosts, guests) == (kernel_changes, group_changes)


def test_property_names_match_what_evaluate_reports(tmp_path):
    exp = make_cfg(tmp_path).expectations
    names = M.property_names(["tap", "vhost"], exp)
    assert names[0] == "tap/nodrop-no-ring-drops"
    assert "tap/delay-nodrop-vs-stock" in names and "vhost/delay-nodrop-vs-stock" not in names
    assert "vhost/vhost-absolute-throughput" in names and "tap/vhost-absolute-throughput" not in names
    results = [
        CellResult(cell=f"{b}-qlen{q}-rtt{r}-{k}", kernel=k, backend=b, txqueuelen=q, rtt_ms=r, throughput_mbps=100.0)
        for b in ("vhost", "tap") for k in ("stock", "nodrop") for q, r in ((1000, 0), (1, 0), (1000, 60))
    ]
    assert names == [p.name for p in evaluate(aggregate(results), exp, "tcg")]
    assert M.property_names(["vhost"], exp) == [n for n in names if n.startswith("vhost/")]


def test_overhead_target():
    o = M.overhead(wall_s=400, traffic_s=100, boots_s=300)
    assert o["limit_s"] == 425 and o["met"] is True
    assert M.overhead(wall_s=500, traffic_s=100, boots_s=300)["met"] is False
    assert M.overhead(wall_s=1500, traffic_s=100, boots_s=300, builds_s=1100)["met"] is True


# =========================================================================== the runner, with fakes


@dataclass
class FakeShell:
    """A guest's SSH runner: records argv lists; `answers` False makes every command fail like a dead guest."""

    log: list[list[str]]
    answers: bool = True
    closed: bool = False

    def run(self, argv, timeout=None, check=True, stdin=None):
        self.log.append(list(argv))
        rc = 0 if self.answers else 255
        return CommandResult(tuple(argv), rc, "", "" if rc == 0 else "ssh: no route", 0.01)

    def close(self):
        self.closed = True


@dataclass
class FakeHost:
    lab: FakeLab
    kernel: str
    name: str = "lab1"
    provider: str = "nested"
    runtime: Any = None
    closed: bool = False

    def python(self):
        return ["python3"]

    def agent(self, args, timeout=None, module="lab.onhost.agent"):
        self.lab.agent_calls.append((self.kernel, list(args), timeout))
        handler = self.lab.on_agent
        if handler is not None:
            out = handler(self, list(args))
            if out is not None:
                return out
        if args[0] == "stream":
            return stream_reply(throughput_mbps=self.lab.mbps.get((self.kernel, self.lab.backend_of_tap()), 500.0))
        return {}

    def run(self, argv, timeout=None, check=True, stdin=None):
        rc = 255 if self.lab.host_dead else 0
        return CommandResult(tuple(argv), rc, "", "", 0.0)

    def probe(self):
        return SimpleNamespace(release=f"6.12.117-{self.kernel}", accel="tcg", cpu_model="QEMU TCG CPU",
                               nodrop=self.kernel == "nodrop", modules_match=True)

    def close(self):
        self.closed = True

    def local_guest_log(self, guest):
        return None


@dataclass
class FakeGuest:
    plan: GuestPlan
    host: FakeHost
    shell: FakeShell
    domain: str = "vhl-guest1"

    def runner(self, timeout=120.0):
        return self.shell


@dataclass
class FakeLab:
    """Stands in for lifecycle/guests/nested: counts boots and destroys, scripts faults."""

    host: FakeHost | None = None
    guest: FakeGuest | None = None
    host_boots: list[str] = field(default_factory=list)
    guest_boots: list[tuple[str, str, int]] = field(default_factory=list)
    guest_destroys: int = 0
    host_destroys: int = 0
    agent_calls: list[tuple[str, list[str], float | None]] = field(default_factory=list)
    guest_cmds: list[list[str]] = field(default_factory=list)
    on_agent: Any = None
    guest_answers: bool = True
    host_dead: bool = False
    fail_host_boot: set[str] = field(default_factory=set)
    mbps: dict[tuple[str, str], float] = field(default_factory=dict)

    def backend_of_tap(self) -> str:
        return self.guest.plan.backend if self.guest else "?"


@pytest.fixture
def lab(monkeypatch, tmp_path):
    fl = FakeLab()
    t = [1000.0]

    def up_host(ctx, spec, kernel=None, progress=None):
        if kernel in fl.fail_host_boot:
            raise LabError(f"lab host {spec.name} failed to boot; console: panic")
        if fl.host is not None and fl.host.kernel == kernel:
            return fl.host
        fl.host_boots.append(kernel)
        t[0] += 1
        fl.host = FakeHost(fl, kernel, runtime=SimpleNamespace(started_at=t[0], kernel_recipe=kernel))
        fl.guest = None
        fl.host_dead = False
        return fl.host

    def find_host(paths, name, key, command_timeout=120.0):
        if fl.host is None or fl.host_dead:
            return None
        return fl.host

    def guest_plan(ctx, spec, backend=None, txqueuelen=None, progress=None):
        return GuestPlan(name=spec.name, index=spec.index, vcpus=1, memory_mib=1024,
                         backend=backend or spec.net.backend, txqueuelen=txqueuelen or spec.net.txqueuelen,
                         tap=spec.net.tap, image=Path("/img"), kernel=Path("/vmlinuz"), modules_dir=Path("/mods"))

    def boot_guest(paths, host, plan, key, boot_timeout=240.0, progress=None):
        assert host is fl.host
        fl.guest_boots.append((host.kernel, plan.backend, plan.txqueuelen))
        fl.guest = FakeGuest(plan, host, FakeShell(fl.guest_cmds, fl.guest_answers))
        return fl.guest

    def destroy_guest(paths, host, name, tap):
        fl.guest_destroys += 1
        fl.guest = None

    def destroy_host(paths, name):
        fl.host_destroys += 1
        fl.host = fl.guest = None  # a lab host VM takes its guests with it
        return True

    monkeypatch.setattr(M.lifecycle, "kernel_boot", lambda ctx, recipe, progress=None: None)
    monkeypatch.setattr(M.lifecycle, "up_host", up_host)
    monkeypatch.setattr(M.lifecycle, "guest_plan", guest_plan)
    monkeypatch.setattr(M.guests, "boot_guest", boot_guest)
    monkeypatch.setattr(M.guests, "destroy_guest", destroy_guest)
    monkeypatch.setattr(M.guests, "console_tail", lambda host, guest, lines=20: "[  1.0] guest console\nLAB-GUEST-READY")
    monkeypatch.setattr(M.nested, "find_host", find_host)
    monkeypatch.setattr(M.nested, "destroy_host", destroy_host)
    return fl


def context(tmp_path, **matrix_overrides) -> LabContext:
    cfg = make_cfg(tmp_path, **matrix_overrides)
    key = SimpleNamespace(private=tmp_path / "key", public_key_text=lambda: "ssh-ed25519 AAAA test")
    return LabContext(cfg, LabPaths(cfg.workdir, cfg.name), key)  # type: ignore[arg-type]


def runner_for(tmp_path, profile="smoke", **matrix_overrides) -> M.MatrixRunner:
    ctx = context(tmp_path, **matrix_overrides)
    spec, store = M.open_run(ctx, "vhost-matrix", profile, argv=["lab", "run"])
    return M.MatrixRunner(ctx, spec, store)


def test_smoke_plan_boots_two_hosts_four_guests_and_records_everything(lab, tmp_path):
    r = runner_for(tmp_path)
    assert [c.id for c in r.pending()] == [c.id for c in r.plan()]
    results = [r.run_cell(c) for c in r.pending()]
    assert all(x.ok for x in results), [x.error for x in results]
    assert lab.host_boots == ["stock", "nodrop"]
    assert lab.guest_boots == [("stock", "tap", 1000), ("stock", "vhost", 1000),
                               ("nodrop", "tap", 1000), ("nodrop", "vhost", 1000)]
    assert (r.timing.host_boots, r.timing.guest_boots, r.timing.cells_run) == (2, 4, 8)
    assert r.timing.traffic_s == pytest.approx(8 * 10.0002)
    # every cell set the tap's txqueuelen and cleared netem, then streamed
    verbs = [a[0] for _, a, _ in lab.agent_calls]
    assert verbs == ["txqueuelen", "netem", "stream"] * 8
    qlen_call = lab.agent_calls[3][1]
    assert qlen_call == ["txqueuelen", "--name", "vhl-guest1", "--value", "1"]
    assert lab.agent_calls[4][1] == ["netem", "--dev", "vhl-guest1", "--clear"]
    stream_timeout = lab.agent_calls[2][2]
    assert stream_timeout == 5 + 60 + M.AGENT_SLACK_S  # smoke: 5 s cells, cell_grace 60
    # stored: one line per cell, host facts in meta keyed "<host>/<kernel>"
    data = r.store.load()
    assert [x.cell for x in data.results] == [c.id for c in r.plan()]
    first = data.results[0]
    assert first.commands[0] == ["python3", "-m", "lab.onhost.agent", "txqueuelen", "--name", "vhl-guest1", "--value", "1000"]
    assert first.commands[-1][0] == "iperf3"
    assert (first.accel, first.host_accel, first.kernel_release) == ("kvm", "tcg", "6.12.117-stock")
    assert set(data.meta.hosts) == {"lab1/stock", "lab1/nodrop"}
    assert data.meta.hosts["lab1/nodrop"]["nodrop"] is True
    assert data.meta.hosts["lab1/stock"]["guest_accel"] == "kvm"
    assert r.pending() == []
    r.close(keep=False)
    # the host VM takes the guest with it: no separate guest destroy, nothing destroyed twice
    assert lab.host_destroys == 1 and lab.guest_destroys == 0 and lab.host is None and lab.guest is None


def test_rtt_cells_use_netem_and_split_adds_guest_side(lab, tmp_path):
    r = runner_for(tmp_path, profile=None, kernels=("stock",), backends=("vhost",), txqueuelens=(1000,),
                   rtts_ms=(60.0,), netem_split=True)
    for c in r.plan():
        assert r.run_cell(c).ok
    netem = [a for _, a, _ in lab.agent_calls if a[0] == "netem"]
    assert netem == [["netem", "--dev", "vhl-guest1", "--clear"],
                     ["netem", "--dev", "vhl-guest1", "--delay-ms", "30", "--limit", "100000"]]
    assert lab.guest_cmds == [["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "30ms",
                               "limit", "100000"]]
    rec = r.store.load().results[-1]
    assert ["ssh", "root@10.99.1.2", "--", *lab.guest_cmds[0]] in rec.commands


def test_split_netem_is_removed_from_the_guest_when_the_next_cell_has_no_rtt(lab, tmp_path):
    r = runner_for(tmp_path, profile=None, kernels=("stock",), backends=("vhost",), txqueuelens=(),
                   rtts_ms=(60.0,), netem_split=True)
    c60 = r.plan()[0]
    c0 = replace(c60, rtt_ms=0.0)
    r.run_cell(c60)
    r.run_cell(c0)
    r.run_cell(c0)
    assert lab.guest_cmds[1] == ["tc", "qdisc", "del", "dev", "eth0", "root"]
    assert len(lab.guest_cmds) == 2  # nothing to remove the second time


def test_a_failed_cell_is_recorded_and_the_iperf3_server_restarted(lab, tmp_path):
    r = runner_for(tmp_path)
    cells = r.plan()

    def fail_once(host, args):
        if args[0] == "stream" and not getattr(fail_once, "done", False):
            fail_once.done = True
            raise LabError("lab1: lab.onhost.agent stream: iperf3 to 10.99.1.2:5201 did not finish within 65 s; killed")
        return None

    lab.on_agent = fail_once
    bad = r.run_cell(cells[0])
    assert bad.status == "error" and "did not finish" in bad.error and bad.error.startswith("cell: ")
    assert bad.throughput_mbps is None
    log = Path(bad.console_log)
    assert log == r.store.logs_dir / f"{cells[0].id}.console.log" and "LAB-GUEST-READY" in log.read_text()
    assert bad.commands[-1][:4] == ["python3", "-m", "lab.onhost.agent", "stream"]
    assert lab.guest_cmds == [["true"], ["pkill", "-x", "iperf3"], ["iperf3", "-s", "-p", "5201", "-D"]]
    good = r.run_cell(cells[1])
    assert good.ok and len(lab.guest_boots) == 1  # same guest, no reboot
    assert r.store.completed_ids() == {cells[1].id}
    assert [c.id for c in r.pending()][0] == cells[0].id  # resume re-runs the errored cell


def test_a_guest_that_stops_answering_is_destroyed_and_rebooted(lab, tmp_path):
    r = runner_for(tmp_path)
    cells = r.plan()
    r.run_cell(cells[0])
    lab.guest.shell.answers = False

    def hang(host, args):
        if args[0] == "stream":
            raise LabError("lab1: lab.onhost.agent stream: timed out after 95s")
        return None

    lab.on_agent = hang
    bad = r.run_cell(cells[1])
    assert bad.status == "error" and r.guest is None and lab.guest_destroys == 1
    lab.on_agent = None
    assert r.run_cell(cells[1]).ok  # the same backend again: a fresh guest
    assert lab.guest_boots == [("stock", "tap", 1000), ("stock", "tap", 1)]


def test_a_lost_host_stops_the_run_after_recording_the_cell(lab, tmp_path):
    r = runner_for(tmp_path)
    cells = r.plan()
    r.run_cell(cells[0])

    def die(host, args):
        if args[0] == "stream":
            lab.host_dead = True
            raise HostGone("lab host lab1 does not answer: ssh: Connection refused")
        return None

    lab.on_agent = die
    with pytest.raises(HostGone, match="gone"):
        r.run_cell(cells[1])
    data = r.store.load()
    assert [x.status for x in data.results] == ["ok", "error"]
    assert "does not answer" in data.results[1].error
    with pytest.raises(HostGone, match="not run"):
        r.run_cell(cells[2])
    assert len(r.store.load().results) == 2  # refused cells write nothing
    r.close()  # the lost host's guest is not talked to; the host domain is destroyed
    assert lab.guest_destroys == 0 and lab.host_destroys == 1


def test_a_host_whose_domain_vanished_is_gone_even_without_hostgone(lab, tmp_path):
    r = runner_for(tmp_path)
    r.run_cell(r.plan()[0])

    def crash(host, args):
        if args[0] == "stream":
            lab.host_dead = True  # nested.find_host now returns None
            raise LabError("lab1: lab.onhost.agent stream: exit 1")
        return None

    lab.on_agent = crash
    with pytest.raises(HostGone):
        r.run_cell(r.plan()[1])


def test_a_kernel_that_does_not_boot_fails_its_cells_fast(lab, tmp_path):
    r = runner_for(tmp_path)
    lab.fail_host_boot.add("stock")
    results = [r.run_cell(c) for c in r.plan()]
    stock = [x for x in results if x.kernel == "stock"]
    assert all(x.status == "error" and x.error.startswith("lab host boot: ") for x in stock)
    assert "not attempted" in stock[-1].error  # after MAX_BOOT_ATTEMPTS real attempts
    assert all(x.ok for x in results if x.kernel == "nodrop")
    assert lab.host_boots == ["nodrop"]


def test_an_artifact_that_does_not_build_fails_its_cells_fast(lab, tmp_path, monkeypatch):
    calls = []

    def kernel_boot(ctx, recipe, progress=None):
        calls.append(recipe)
        if recipe == "nodrop":
            raise LabError("patch 0001-tun.patch does not apply")

    monkeypatch.setattr(M.lifecycle, "kernel_boot", kernel_boot)
    r = runner_for(tmp_path)
    results = [r.run_cell(c) for c in r.plan()]
    nodrop = [x for x in results if x.kernel == "nodrop"]
    assert all(x.error.startswith("artifacts: ") for x in nodrop) and "not attempted" in nodrop[-1].error
    assert calls.count("nodrop") == M.MAX_BOOT_ATTEMPTS and lab.host_boots == ["stock"]
    assert all(x.console_log is None for x in nodrop)


def test_resume_runs_only_missing_and_errored_cells(lab, tmp_path):
    r = runner_for(tmp_path)
    cells = r.plan()
    r.run_cell(cells[0])
    lab.on_agent = lambda host, args: (_ for _ in ()).throw(LabError("boom")) if args[0] == "stream" else None
    r.run_cell(cells[1])
    r.close()
    lab.on_agent = None
    spec, store = M.open_run(r.ctx, "vhost-matrix", None, resume=r.store.run_dir.name, argv=["lab", "run", "--resume"])
    assert spec.profile == "smoke" and store.run_dir == r.store.run_dir
    r2 = M.MatrixRunner(r.ctx, spec, store)
    assert [c.id for c in r2.pending()] == [c.id for c in cells[1:]]
    meta = store.read_meta()
    assert meta.extra["resumed"][0]["argv"] == ["lab", "run", "--resume"]
    with pytest.raises(LabError, match="not 'other'"):
        M.open_run(r.ctx, "other", None, resume=r.store.run_dir.name)
    with pytest.raises(LabError, match="profile"):
        M.open_run(r.ctx, "vhost-matrix", "nope", resume=r.store.run_dir.name)


def test_close_keep_leaves_everything_and_close_twice_is_harmless(lab, tmp_path):
    r = runner_for(tmp_path)
    r.run_cell(r.plan()[0])
    r.close(keep=True)
    assert lab.host is not None and lab.guest is not None and lab.host_destroys == 0
    lab.host = lab.guest = None  # (a kept host would be adopted, and then not destroyed)
    r2 = runner_for(tmp_path / "b")
    r2.run_cell(r2.plan()[0])
    r2.close()
    r2.close()
    assert lab.host_destroys == 1


def test_an_adopted_host_on_the_right_kernel_is_not_destroyed(lab, tmp_path):
    r = runner_for(tmp_path)
    lab.host = FakeHost(lab, "stock", runtime=SimpleNamespace(started_at=1.0, kernel_recipe="stock"))
    r.run_cell(r.plan()[0])
    assert lab.host_boots == [] and r.timing.host_boots == 0
    r.close()
    assert lab.host_destroys == 0 and lab.guest_destroys >= 1


def test_run_matrix_end_to_end_with_fakes(lab, tmp_path, monkeypatch):
    ctx = context(tmp_path)
    lab.mbps = {("stock", "tap"): 500.0, ("nodrop", "tap"): 500.0, ("stock", "vhost"): 500.0, ("nodrop", "vhost"): 500.0}

    def by_qlen(host, args):
        if args[0] == "stream":
            qlen = int([a for _, a, _ in lab.agent_calls if a[0] == "txqueuelen"][-1][-1])
            mbps = 2.0 if (host.kernel == "stock" and qlen == 1) else 500.0
            return stream_reply(throughput_mbps=mbps, retransmits=0 if host.kernel == "nodrop" else 300,
                                tap_tx_dropped=0 if host.kernel == "nodrop" else 400)
        return None

    lab.on_agent = by_qlen
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False)
    outcome = M.run_matrix(ctx, "vhost-matrix", profile="smoke", console=console)
    assert outcome.all_passed, [(p.name, p.passed, p.detail) for p in outcome.properties]
    assert outcome.stopped is None and outcome.run_dir.is_dir()
    assert len(outcome.run_data.results) == 8
    assert lab.host is None and lab.host_destroys == 1  # (booting nodrop replaced stock); teardown
    meta = RunStore(outcome.run_dir).read_meta()
    assert meta.finished_at and meta.planned == [c.id for c in expand(ctx.cfg.matrices["vhost-matrix"].with_profile("smoke"))]
    assert meta.extra["sessions"][0]["host_boots"] == 2 and meta.extra["sessions"][0]["guest_boots"] == 4
    assert meta.extra["overhead"]["met"] in (True, False) and "traffic_s" in meta.extra
    text = out.getvalue()
    assert "8 of 8 cells to run, 2 lab host boot(s), 4 guest boot(s)" in " ".join(text.split())
    assert "Properties" in text and "wall" in text


def test_run_matrix_tears_down_on_keyboard_interrupt_and_stops_on_host_loss(lab, tmp_path):
    ctx = context(tmp_path)

    def interrupt(host, args):
        if args[0] == "stream" and len([1 for _, a, _ in lab.agent_calls if a[0] == "stream"]) == 2:
            raise KeyboardInterrupt
        return None

    lab.on_agent = interrupt
    console = Console(file=io.StringIO(), width=120)
    with pytest.raises(KeyboardInterrupt):
        M.run_matrix(ctx, "vhost-matrix", profile="smoke", console=console)
    assert lab.host is None and lab.guest is None
    run_dir = sorted((ctx.cfg.workdir / "runs").iterdir())[-1]
    meta = RunStore(run_dir).read_meta()
    assert meta.extra["stopped"] == "interrupted" and len(RunStore(run_dir).load().results) == 1

    def die(host, args):
        if args[0] == "stream":
            lab.host_dead = True
            raise HostGone("lab host lab1 does not answer")
        return None

    lab.on_agent = die
    outcome = M.run_matrix(ctx, "vhost-matrix", resume=run_dir.name, console=console)
    assert outcome.stopped and "gone" in outcome.stopped and not outcome.all_passed
    assert len(outcome.run_data.results) == 2  # the interrupted run's ok cell + the one that lost the host
    assert len(RunStore(run_dir).read_meta().extra["sessions"]) == 2


def test_a_single_kernel_matrix_may_use_a_local_host_but_not_a_comparison(lab, tmp_path):
    ctx = context(tmp_path)
    hosts = dict(ctx.cfg.hosts)
    hosts["lab1"] = replace(hosts["lab1"], provider="local")
    cfg = replace(ctx.cfg, hosts=hosts)
    ctx = LabContext(cfg, ctx.paths, ctx.key)
    spec, store = M.open_run(ctx, "vhost-matrix", "smoke", argv=[])
    with pytest.raises(LabError, match="cannot switch kernels"):
        M.MatrixRunner(ctx, spec, store)
    M.MatrixRunner(ctx, replace(spec, kernels=("stock",)), store)


def test_unknown_matrix_names_the_known_ones(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(LabError, match="vhost-matrix"):
        M.open_run(ctx, "nope", argv=[])


def test_resuming_a_finished_run_boots_nothing_and_keeps_its_totals(lab, tmp_path):
    ctx = context(tmp_path)
    console = Console(file=io.StringIO(), width=200)
    first = M.run_matrix(ctx, "vhost-matrix", profile="smoke", console=console)
    meta = RunStore(first.run_dir).read_meta()
    boots = (len(lab.host_boots), len(lab.guest_boots))
    out = io.StringIO()
    again = M.run_matrix(ctx, "vhost-matrix", resume="latest", console=Console(file=out, width=200))
    assert (len(lab.host_boots), len(lab.guest_boots)) == boots
    after = RunStore(first.run_dir).read_meta()
    assert after.finished_at == meta.finished_at and len(after.extra["sessions"]) == 1
    assert "0 of 8 cells to run" in out.getvalue()
    line = M.summary_line(again)
    assert line.startswith("wall ") and "traffic 80s" in line and "boots" in line
    assert M.summary_line(replace(again, run_data=replace(again.run_data, meta=RunMeta(run_id="x", matrix="m")),
                                  traffic_s=0.0)).endswith("no traffic ran in this session")
