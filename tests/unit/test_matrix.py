"""lab.measure.matrix: the pure parts (netem split, measurements -> CellResult, property names, the
overhead target) and the runner's state machine driven through a lab session over fake hosts and
guests (swaps, interleaving, faults, crashes and retries, resume, teardown) -- no VMs, no libvirt, no root."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lab.measure.matrix as M
import lab.session as S
from lab.config import DEFAULT_CONFIG, loads_config
from lab.errors import HostGone, LabError
from lab.events import CellFinished, HostBooted, HostCrash, ModulesSwapped
from lab.guests import GuestPlan
from lab.hosts.host import HostProbe
from lab.hosts.remote import CommandResult
from lab.measure.cells import Cell
from lab.onhost.modules import ModulesLoaded
from lab.onhost.net import CountersDelta, QdiscCounters, TapCounters
from lab.onhost.pktgen import PktgenMeasurement, PktgenResult
from lab.paths import LabPaths
from lab.verdicts.results import STABLE_KEYS, RunMeta, RunStore
from tests.helpers import stream_measurement

# A lab.toml of its own (not the repository's, which may change): the default lab's shape.
LAB_TOML = """
[lab]
name = "vhl"
workdir = "WORKDIR"

[timeouts]
cell_grace = 60

[kernels.stock]
source = "debian:6.12.117-1~deb12u1"

[kernels.nodrop]
source = "debian:6.12.117-1~deb12u1"
patches = ["kernel/patches/nodrop"]

[kernels.nodrop-full]
source = "debian:6.12.117-1~deb12u1"
patches = ["kernel/patches/nodrop"]
strategy = "full"

[images.bookworm]
recipe = "images/bookworm.toml"

[hosts.lab1]
provider = "nested"
kernel = "stock"

[guests.guest1]
host = "lab1"
image = "bookworm"

[matrices.vhost-matrix]
host = "lab1"
guest = "guest1"
kernels = ["stock", "nodrop"]
backends = ["tap", "vhost"]
txqueuelens = [1000, 100, 10, 1]
rtts_ms = [60, 120]
duration_s = 10
repeats = 1
warmup_s = 2
retries = 2
max_host_crashes = 3

[matrices.vhost-matrix.profiles.smoke]
txqueuelens = [1000, 1]
rtts_ms = []
duration_s = 5
repeats = 2

[expectations]
stock_kernel = "stock"
nodrop_kernel = "nodrop"
"""

OOPS = """[  175.578960] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[  175.579366] CPU: 0 UID: 0 PID: 333 Comm: rpc-libvirtd Not tainted 6.12.117+deb12-amd64 #1
[  175.579596] RIP: 0010:free_unref_folios+0xed/0x7e0
[  175.580930] Call Trace:
[  175.580930]  <TASK>
[  175.580930]  folios_put_refs+0x121/0x200
[  175.599000] Kernel panic - not syncing: Fatal exception in interrupt
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
    values: dict[str, Any] = dict(matrix="m", kernel="nodrop", backend="vhost", txqueuelen=1, rtt_ms=0.0, repeat=1, repeats=1,
                                  duration_s=10)
    values.update(kw)
    return Cell(**values)


WHERE = M.Where(host="lab1", boot_id="lab1@1", host_accel="tcg", kernel_recipe="nodrop", kernel_release="6.12.117",
                modules_loaded={"recipe": "nodrop", "arm": "nodrop", "build_ids": {"tun": "ab"}}, order=3)


# =========================================================================== pure parts


def test_netem_delays_unsplit_puts_the_whole_rtt_on_the_tap():
    assert M.netem_delays(0, False) == (None, None)
    assert M.netem_delays(60.0, False) == (60.0, None)
    assert M.netem_delays(60.0, True) == (30.0, 30.0)
    with pytest.raises(ValueError):
        M.netem_delays(-1, False)


@given(rtt=st.floats(0.001, 60_000), split=st.booleans())
def test_netem_split_adds_up_to_the_rtt(rtt, split):
    tap, guest = M.netem_delays(rtt, split)
    assert tap + (guest or 0) == pytest.approx(rtt)


def test_guest_commands_are_argv_lists():
    assert M.guest_netem_argv(30.0, 1000) == ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "30ms", "limit", "1000"]
    assert M.guest_netem_argv(None, 1000) == ["tc", "qdisc", "del", "dev", "eth0", "root"]
    assert M.guest_rx_argv() == ["cat", "/sys/class/net/eth0/statistics/rx_packets"]


def test_cell_result_from_stream_takes_identity_measurements_and_where():
    c = cell(streams=8, queues=4, qdisc="noqueue", txqueuelen=1000)
    children = [QdiscCounters(kind="fq_codel", parent=0x80010001, drops=1, requeues=5, sent_packets=100)]
    m = stream_measurement(412.5, retransmits=3, tx_dropped=2, qdisc_requeues=9, drops={"FULL_RING": 2, "QDISC_DROP": 4},
                           qdiscs=[QdiscCounters(kind="mq"), *children])
    r = M.cell_result_from_stream(c, m, WHERE, started_at="s", finished_at="f", commands=[["agent", "txqueuelen"]])
    assert (r.cell, r.kernel, r.kind, r.streams, r.queues, r.qdisc) == (c.id, "nodrop", "iperf3", 8, 4, "noqueue")
    assert (r.status, r.throughput_mbps, r.retransmits, r.tap_tx_dropped, r.qdisc_requeues) == ("ok", 412.5, 3, 2, 9)
    assert r.ring_drops == 2 and r.drop_reasons == {"FULL_RING": 2, "QDISC_DROP": 4}
    assert r.queue_stats == [{"parent": "0x80010001", "kind": "fq_codel", "drops": 1, "requeues": 5, "sent_packets": 100}]
    assert (r.host, r.boot_id, r.order, r.attempts, r.host_crashes) == ("lab1", "lab1@1", 3, 1, [])
    assert r.modules_loaded["recipe"] == "nodrop" and (r.accel, r.host_accel) == ("kvm", "tcg")
    assert r.commands == [["agent", "txqueuelen"], ["iperf3", "-c", "10.99.1.2", "-J"]]
    assert set(r.to_dict()) == set(STABLE_KEYS)


def test_no_drop_reasons_means_unknown_not_zero():
    r = M.cell_result_from_stream(cell(), stream_measurement(drops=None), WHERE, started_at=None, finished_at=None)
    assert r.ring_drops is None and r.tap_tx_dropped == 0


def test_cell_result_without_throughput_is_an_error():
    r = M.cell_result_from_stream(cell(), stream_measurement(None), WHERE, started_at=None, finished_at=None)
    assert (r.status, r.error) == ("error", "iperf3 reported no throughput")


def test_cell_result_from_pktgen_counts_loss_in_the_guest():
    c = cell(kind="pktgen", threads=4, qdisc="noqueue", txqueuelen=1000)
    res = PktgenResult(threads=4, kernel_threads=2, sent=200_000, errors=3, seconds=2.0, pps=100_000.0)
    m = PktgenMeasurement(res, CountersDelta("t", 2.0, TapCounters(tx_packets=190_000, tx_dropped=10_000), QdiscCounters(drops=7)),
                          {"NOT_SPECIFIED": 10_000})
    r = M.cell_result_from_pktgen(c, m, 1_000, 181_000, WHERE, started_at=None, finished_at=None)
    assert (r.pktgen_sent, r.pktgen_errors, r.pktgen_pps, r.guest_rx_packets, r.guest_rx_pps, r.pktgen_lost) == (
        200_000, 3, 100_000.0, 180_000, 90_000.0, 20_000)
    # pktgen's skbs reach the drop tracepoint as NOT_SPECIFIED: ring drops are the tap's count
    # compared by what the guest received, not by what pktgen offered
    assert r.ring_drops == 10_000 and r.qdisc_drops == 7 and r.value == 90_000.0
    assert r.drop_reasons == {"NOT_SPECIFIED": 10_000}
    unknown = M.cell_result_from_pktgen(c, m, None, 5, WHERE, started_at=None, finished_at=None)
    assert unknown.pktgen_lost is None and unknown.ok


def test_error_result_and_messages():
    r = M.error_result(cell(), M.describe_error(ValueError("boom\nsecond line"), "cell"), WHERE, started_at="a", finished_at="b")
    assert (r.status, r.error, r.throughput_mbps) == ("error", "cell: ValueError: boom | second line", None)
    assert M.describe_error(LabError("lab host lab1 did not come up"), "lab host boot") == "lab host boot: lab host lab1 did not come up"


def test_property_names_match_what_evaluate_reports(tmp_path):
    cfg = make_cfg(tmp_path)
    names = M.property_names(["tap", "vhost"], cfg.expectations)
    assert "tap/nodrop-no-ring-drops" in names and "vhost/vhost-absolute-throughput" in names
    assert "tap/vhost-absolute-throughput" not in names and len(names) == 13


def test_overhead_target():
    assert M.overhead(wall_s=219, traffic_s=40, boots_s=170)["met"] is True
    assert M.overhead(wall_s=300, traffic_s=40, boots_s=170)["met"] is False
    assert M.overhead(wall_s=1500, traffic_s=100, boots_s=300, builds_s=1100)["met"] is True


# =========================================================================== the runner, with fakes


@dataclass
class FakeShell:
    """A guest's SSH runner: records argv lists; `answers` False makes every command fail like a dead guest."""

    lab: FakeLab
    closed: bool = False

    def run(self, argv, timeout=None, check=True, stdin=None):
        self.lab.guest_cmds.append(list(argv))
        rc = 0 if self.lab.guest_answers else 255
        out = str(self.lab.rx) if argv[:1] == ["cat"] else ""
        if argv[:1] == ["cat"]:
            self.lab.rx += self.lab.rx_step
        return CommandResult(tuple(argv), rc, out, "" if rc == 0 else "ssh: no route", 0.01)

    def close(self):
        self.closed = True


def _recipe_of(moddir) -> str:
    """The recipe of a fake artifact's module tree: /art/<recipe>/lib/modules/<release>."""
    return Path(moddir).relative_to("/art").parts[0]


class FakeAgent:
    """The typed agent client of a fake host: records verbs, replies with measurements."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.lab = host.lab

    def _rec(self, verb: str, *args: Any) -> None:
        self.lab.calls.append((self.host.modules, verb, args))

    def set_txqueuelen(self, dev, n):
        self._rec("txqueuelen", dev, n)
        self.lab.qlen = n
        return n

    def set_netem(self, dev, netem):
        self._rec("netem", dev, None if netem is None else netem.delay_ms)
        return QdiscCounters(kind="netem")

    def set_qdisc(self, dev, kind):
        self._rec("qdisc", dev, kind)
        return QdiscCounters(kind=kind)

    def tap_list(self, prefix):
        return []

    def tap_delete(self, name):
        return True

    def swap_modules(self, moddir, params=(), timeout=None):
        self._rec("swap", str(moddir), tuple(params))
        self.host.modules = _recipe_of(moddir)
        return ModulesLoaded(build_ids={"tun": f"bid-{self.host.modules}"}, seconds=1.5)

    def stream(self, run, dev, *, grace_s=60.0, sample_ms=10.0, count_drops=True):
        self._rec("stream", dev, run.duration_s, run.streams, count_drops)
        handler = self.lab.on_stream
        if handler is not None:
            out = handler(self.host, run, dev)
            if out is not None:
                return out
        backend = self.lab.guest.plan.backend if self.lab.guest else "?"
        return stream_measurement(self.lab.mbps.get((self.host.modules, backend, self.lab.qlen), 500.0), drops={"FULL_RING": 0},
                                  seconds=float(run.duration_s))

    def pktgen(self, run):
        self._rec("pktgen", run.dev, run.threads)
        res = PktgenResult(threads=run.threads, kernel_threads=2, sent=run.count, errors=0, seconds=1.0, pps=float(run.count))
        return PktgenMeasurement(res, CountersDelta("t", 1.0, TapCounters(tx_packets=run.count), QdiscCounters()), {})


@dataclass
class FakeHost:
    lab: FakeLab
    recipe: str
    modules: str
    started_at: float
    name: str = "lab1"
    provider: str = "nested"
    closed: bool = False
    sees_local_files: bool = True

    @property
    def runtime(self):
        return SimpleNamespace(started_at=self.started_at, kernel_recipe=self.recipe)

    @property
    def agent(self):
        return FakeAgent(self)

    def run(self, argv, timeout=None, check=True, stdin=None):
        return CommandResult(tuple(argv), 255 if self.lab.host_dead else 0, "", "", 0.0)

    def probe(self):
        return HostProbe(name=self.name, provider="nested", release="6.12.117+deb12-amd64", accel="tcg", kvm=True, vhost_net=True,
                         tun=True, netem=True, modules={"tun": f"bid-{self.modules}"}, nodrop=None, cpu_model="QEMU TCG CPU",
                         kernel_recipe=self.recipe, modules_match=True)

    def close(self):
        self.closed = True

    def guest_log(self, guest):
        return f"/var/lib/vhost-lab/state/guests/{guest}.console.log"


@dataclass
class FakeGuest:
    plan: GuestPlan
    host: FakeHost
    lab: FakeLab
    domain: str = "vhl-guest1"

    def runner(self, timeout=120.0):
        return FakeShell(self.lab)


@dataclass
class FakeLab:
    """Stands in for the lab session's hosts and guests: counts boots, swaps and destroys, scripts faults."""

    ctx: Any = None
    host: FakeHost | None = None
    guest: FakeGuest | None = None
    host_boots: list[str] = field(default_factory=list)
    guest_boots: list[tuple[str, str, int]] = field(default_factory=list)
    guest_destroys: int = 0
    host_destroys: int = 0
    calls: list[tuple[str, str, tuple]] = field(default_factory=list)
    guest_cmds: list[list[str]] = field(default_factory=list)
    on_stream: Any = None
    guest_answers: bool = True
    host_dead: bool = False
    fail_host_boot: set[str] = field(default_factory=set)
    fail_guest_boots: int = 0  # the next N guest boots time out
    mbps: dict[tuple[str, str, int], float] = field(default_factory=dict)
    qlen: int = 1000
    rx: int = 0
    rx_step: int = 0
    clock: float = 1000.0

    def verbs(self, verb: str) -> list[tuple[str, tuple]]:
        return [(modules, args) for modules, v, args in self.calls if v == verb]

    def crash(self, console: Path, last_words: str = OOPS) -> None:
        """The host dies: its console shows `last_words` (an oops), its VM is gone."""
        console.parent.mkdir(parents=True, exist_ok=True)
        console.write_text(last_words)
        self.host_dead = True


@pytest.fixture
def lab(monkeypatch, tmp_path):
    fl = FakeLab()

    def up_host(ctx, spec, kernel=None, progress=None):
        if kernel in fl.fail_host_boot:
            raise LabError(f"lab host {spec.name} failed to boot; console: panic")
        if fl.host is not None and not fl.host_dead and fl.host.recipe == kernel:
            return fl.host
        fl.host_boots.append(kernel)
        fl.clock += 1
        fl.host = FakeHost(fl, kernel, kernel, fl.clock)
        fl.guest = None
        fl.host_dead = False
        ctx.paths.host_console(spec.name).parent.mkdir(parents=True, exist_ok=True)
        ctx.paths.host_console(spec.name).write_text("[ 0.0] booting\n")
        return fl.host

    def find_host(paths, name, key, command_timeout=120.0):
        return None if fl.host is None or fl.host_dead else fl.host

    def guest_plan(ctx, spec, backend=None, txqueuelen=None, queues=None, progress=None):
        return GuestPlan(name=spec.name, index=spec.index, vcpus=1, memory_mib=1024, backend=backend or spec.net.backend,
                         txqueuelen=txqueuelen or spec.net.txqueuelen, tap=spec.net.tap, image=Path("/img"), kernel=Path("/vmlinuz"),
                         modules_dir=Path("/mods"), queues=queues or 1)

    def boot_guest(paths, host, plan, key, boot_timeout=240.0, progress=None):
        assert host is fl.host and not fl.host_dead
        if fl.fail_guest_boots > 0:
            fl.fail_guest_boots -= 1
            raise LabError(f"guest {plan.name} did not come up in {boot_timeout:.0f}s; console: []")
        fl.guest_boots.append((host.modules, plan.backend, plan.queues))
        fl.guest = FakeGuest(plan, host, fl)
        return fl.guest

    def destroy_guest(paths, host, name, tap):
        fl.guest_destroys += 1
        fl.guest = None

    def destroy_host(paths, name):
        if fl.host is not None:
            fl.host_destroys += 1
        fl.host = fl.guest = None  # a lab host VM takes its guests with it
        return True

    def kernel_boot(ctx, recipe, progress=None):
        return SimpleNamespace(modules_root=Path("/art") / recipe, release="rel", cmdline=(), recipe=recipe)

    def artifact_build_ids(moddir):
        return {"tun": f"bid-{_recipe_of(moddir)}"}

    monkeypatch.setattr(S, "up_host", up_host)
    monkeypatch.setattr(S, "find_host", find_host)
    monkeypatch.setattr(S, "boot_guest", boot_guest)
    monkeypatch.setattr(S, "destroy_guest", destroy_guest)
    monkeypatch.setattr(S, "destroy_host", destroy_host)
    monkeypatch.setattr(S, "kernel_boot", kernel_boot)
    monkeypatch.setattr(S, "artifact_build_ids", artifact_build_ids)
    monkeypatch.setattr(S, "list_lab_guests", lambda host, lab: [])
    monkeypatch.setattr(S, "guest_plan", guest_plan)
    monkeypatch.setattr(M, "guest_plan", guest_plan)
    monkeypatch.setattr(M, "console_tail", lambda host, guest, lines=20: "[  1.0] guest console\nLAB-GUEST-READY")
    return fl


def context(tmp_path, **matrix_overrides) -> S.LabContext:
    cfg = make_cfg(tmp_path, **matrix_overrides)
    key = SimpleNamespace(private=tmp_path / "key", public_key_text=lambda: "ssh-ed25519 AAAA test")
    return S.LabContext(cfg, LabPaths(cfg.workdir, cfg.name), key)  # type: ignore[arg-type]


def runner_for(tmp_path, profile="smoke", events=None, aa=False, **matrix_overrides) -> M.MatrixRunner:
    ctx = context(tmp_path, **matrix_overrides)
    spec, store = M.open_run(ctx, "vhost-matrix", profile, argv=["lab", "run"], aa=aa)
    return M.MatrixRunner(ctx, spec, store, (events.append if events is not None else M.quiet))


def test_smoke_runs_both_kernels_in_one_boot_interleaved_and_records_where(lab, tmp_path):
    events: list[Any] = []
    r = runner_for(tmp_path, events=events)
    plan = r.plan()
    assert [c.id for c in r.pending()] == [c.id for c in plan] and len(plan) == 2 * 2 * 2 * 2
    results = [r.run_cell(c) for c in plan]
    assert all(x.ok for x in results), [x.error for x in results]
    assert lab.host_boots == ["stock"], "one lab host boot serves both kernels"
    swaps = lab.verbs("swap")
    assert [_recipe_of(a[0]) for _, a in swaps] == ["nodrop", "stock", "nodrop", "stock"][: len(swaps)]
    assert r.timing.module_swaps == len(swaps) >= 2 and r.timing.host_boots == 1
    # every swap and every backend change boots a fresh guest, and a warm-up stream (no drop counting) runs first
    assert len(lab.guest_boots) == r.timing.guest_boots == len(swaps) + 2  # + the first guest of each backend
    warmups = [a for _, a in lab.verbs("stream") if a[0] is None]
    assert len(warmups) == len(lab.guest_boots) and all(a[1] == 2 and a[3] is False for a in warmups)
    # each cell ran on the modules of its own arm, in the same boot
    data = r.store.load()
    assert [x.cell for x in data.results] == [c.id for c in plan]
    assert {x.boot_id for x in data.results} == {"lab1@1001"}
    assert all(x.modules_loaded["arm"] == x.kernel and x.modules_loaded["build_ids"] == {"tun": f"bid-{x.kernel}"}
               for x in data.results)
    assert [x.order for x in data.results] == list(range(len(plan)))
    # a cell: txqueuelen, qdisc (RTT 0), then the measured stream
    verbs = [v for _, v, _ in lab.calls if v in ("txqueuelen", "qdisc", "netem")][:2]
    assert verbs == ["txqueuelen", "qdisc"]
    meta = data.meta
    assert meta.extra["arms"] == [{"name": "stock", "recipe": "stock"}, {"name": "nodrop", "recipe": "nodrop"}]
    assert meta.extra["expected"]["host_boots"] == 1 and meta.extra["expected"]["module_swaps"] == len(swaps)
    assert sum(isinstance(e, ModulesSwapped) for e in events) == len(swaps)
    assert sum(isinstance(e, HostBooted) for e in events) == 1
    assert [e.cell for e in events if isinstance(e, CellFinished)] == [c.id for c in plan]
    r.close()
    assert lab.host_destroys == 1 and lab.host is None


def test_recipes_that_cannot_share_a_boot_get_their_own(lab, tmp_path):
    r = runner_for(tmp_path, kernels=("stock", "nodrop-full"), backends=("vhost",))
    for c in r.plan():
        assert r.run_cell(c).ok
    assert lab.host_boots == ["stock", "nodrop-full"] and lab.verbs("swap") == []
    assert len({x.boot_id for x in r.store.load().results}) == 2


def test_an_aa_control_swaps_between_two_arms_of_one_recipe(lab, tmp_path):
    r = runner_for(tmp_path, aa=True, backends=("tap",))
    for c in r.plan():
        assert r.run_cell(c).ok
    data = r.store.load()
    assert {x.kernel for x in data.results} == {"stock", "stock-aa"}
    assert {x.kernel_recipe for x in data.results} == {"stock"}
    assert lab.verbs("swap") and all(_recipe_of(a[0]) == "stock" for _, a in lab.verbs("swap"))
    assert data.meta.extra["aa"] is True and data.meta.extra["baseline"] == "stock"
    props = M.evaluate_run(data, r.ctx.cfg)
    assert {p.name for p in props} >= {"tap/nodrop-no-regression"}  # the copy plays the patched arm


def test_rtt_cells_use_netem_and_split_adds_guest_side(lab, tmp_path):
    r = runner_for(tmp_path, profile=None, kernels=("stock",), backends=("vhost",), txqueuelens=(1000,), rtts_ms=(60.0,),
                   netem_split=True)
    for c in r.plan():
        assert r.run_cell(c).ok
    assert [a for _, a in lab.verbs("netem")] == [("vhl-guest1", 30.0)]
    assert [a for _, a in lab.verbs("qdisc")] == [("vhl-guest1", "default")]
    assert ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "30ms", "limit", "100000"] in lab.guest_cmds


def test_qdisc_streams_and_queues_reach_the_agent_and_the_guest(lab, tmp_path):
    r = runner_for(tmp_path, profile=None, kernels=("stock",), backends=("vhost",), txqueuelens=(1000,), rtts_ms=(),
                   qdiscs=("noqueue",), streams=(8,), queues=(4,))
    (c,) = r.plan()
    res = r.run_cell(c)
    assert res.ok and (res.streams, res.queues, res.qdisc) == (8, 4, "noqueue")
    assert lab.guest_boots == [("stock", "vhost", 4)]
    assert ("vhl-guest1", "noqueue") in [a for _, a in lab.verbs("qdisc")]
    assert [a[2] for _, a in lab.verbs("stream") if a[0] is not None] == [8]


def test_pktgen_cells_count_what_the_guest_received(lab, tmp_path):
    lab.rx_step = 90_000
    r = runner_for(tmp_path, profile=None, kernels=("stock",), backends=("vhost",), txqueuelens=(1000,), rtts_ms=(),
                   pktgen_threads=(4,), pktgen_count=100_000)
    pk = [c for c in r.plan() if c.kind == "pktgen"]
    res = r.run_cell(pk[0])
    assert res.ok and res.pktgen_sent == 100_000 and res.guest_rx_packets == 90_000 and res.pktgen_lost == 10_000
    assert lab.verbs("pktgen") == [("stock", ("vhl-guest1", 4))]


def test_a_failed_cell_is_recorded_and_the_iperf3_server_restarted(lab, tmp_path):
    r = runner_for(tmp_path)
    cells = r.plan()

    def fail_once(host, run, dev):
        if dev is not None and not getattr(fail_once, "done", False):
            fail_once.done = True
            raise LabError("lab1: lab agent stream: iperf3 to 10.99.1.2:5201 did not finish within 65 s; killed")
        return None

    lab.on_stream = fail_once
    bad = r.run_cell(cells[0])
    assert bad.status == "error" and "did not finish" in bad.error and bad.error.startswith("cell: ")
    assert bad.throughput_mbps is None and bad.attempts == 1
    log = Path(bad.console_log)
    assert log == r.store.logs_dir / f"{cells[0].id}.console.log" and "LAB-GUEST-READY" in log.read_text()
    assert lab.guest_cmds[-3:] == [["true"], ["pkill", "-x", "iperf3"], ["iperf3", "-s", "-p", "5201", "-D"]]
    good = r.run_cell(cells[1])
    assert good.ok and len(lab.guest_boots) == 1  # same guest, no reboot
    assert [c.id for c in r.pending()][0] == cells[0].id  # resume re-runs the errored cell


def test_a_guest_that_stops_answering_is_destroyed_and_rebooted(lab, tmp_path):
    r = runner_for(tmp_path)
    cells = r.plan()
    assert r.run_cell(cells[0]).ok
    lab.guest_answers = False
    lab.on_stream = lambda host, run, dev: (_ for _ in ()).throw(LabError("lab agent stream: timed out after 95s")) if dev else None
    bad = r.run_cell(cells[1])
    assert bad.status == "error" and lab.guest_destroys == 1 and "guest1" not in r.session.guests
    lab.guest_answers, lab.on_stream = True, None
    assert r.run_cell(cells[1]).ok  # the same backend again: a fresh guest
    assert len(lab.guest_boots) == 2


def test_a_host_crash_is_recorded_and_the_cell_retried_on_a_new_host(lab, tmp_path):
    events: list[Any] = []
    r = runner_for(tmp_path, events=events)
    cells = r.plan()
    assert r.run_cell(cells[0]).ok
    console = r.ctx.paths.host_console("lab1")

    def crash_once(host, run, dev):
        if dev is not None and not getattr(crash_once, "done", False):
            crash_once.done = True
            lab.crash(console)
            raise HostGone("lab host lab1 does not answer (EOFError: the lab agent exited)")
        return None

    lab.on_stream = crash_once
    res = r.run_cell(cells[1])
    assert res.ok and res.attempts == 2
    (crash,) = res.host_crashes
    assert crash["oops"] == "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI" and Path(crash["console_log"]).read_text() == OOPS
    assert crash["stage"] == "cell" and crash["cell"] == cells[1].id
    assert lab.host_boots == ["stock", "stock"], "rebooted on the same kernel"
    meta = r.store.read_meta()
    assert meta.extra["host_crashes"][0]["head"].splitlines()[2].startswith("RIP: 0010:free_unref_folios")
    assert any(isinstance(e, HostCrash) and e.oops.startswith("Oops: int3") for e in events)
    assert r.timing.host_crashes == 1 and r.timing.retries == 1
    assert all(r.run_cell(c).ok for c in cells[2:])  # the run goes on


def test_a_host_lost_without_an_oops_records_the_stall_it_printed(lab, tmp_path):
    r = runner_for(tmp_path)
    cells = r.plan()
    assert r.run_cell(cells[0]).ok
    console = r.ctx.paths.host_console("lab1")

    def starve_once(host, run, dev):
        if dev is not None and not getattr(starve_once, "done", False):
            starve_once.done = True
            lab.crash(console, "[  961.048719] watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [python:253]\n")
            raise HostGone("lab host lab1 does not answer (SSHException: No existing session)")
        return None

    lab.on_stream = starve_once
    res = r.run_cell(cells[1])
    assert res.ok and res.attempts == 2
    (crash,) = res.host_crashes
    assert crash["oops"] is None and crash["stall"] == "watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [python:253]"


def test_a_stalled_iperf3_is_run_again_on_the_same_host_and_only_so_often(lab, tmp_path):
    from lab.errors import AgentFailed

    r = runner_for(tmp_path, retries=1)
    cells = r.plan()
    assert r.run_cell(cells[0]).ok
    stalls: list[str] = []

    def stall(host, run, dev, times):
        if dev is not None and len(stalls) < times:
            stalls.append(run.server)
            raise AgentFailed("lab1: lab agent stream: iperf3 to 10.99.1.2:5201 did not finish within 70 s; killed",
                              kind="Iperf3Timeout")
        return None

    lab.on_stream = lambda host, run, dev: stall(host, run, dev, 1)
    res = r.run_cell(cells[1])
    assert res.ok and res.attempts == 2 and not res.host_crashes
    assert lab.host_boots == ["stock"], "a stalled stream is not a host crash: no reboot"
    assert r.timing.retries == 1 and r.timing.host_crashes == 0

    stalls.clear()
    lab.on_stream = lambda host, run, dev: stall(host, run, dev, 5)
    res = r.run_cell(cells[2])
    assert res.status == "error" and res.attempts == 2 and "did not finish" in res.error  # retries = 1
    # a verb that did not answer in time (a starved lab host) is run again too
    from lab.errors import AgentTimeout

    timeouts: list[str] = []

    def deaf(host, run, dev):
        if dev is not None and not timeouts:
            timeouts.append(run.server)
            raise AgentTimeout("lab1: lab agent stream did not answer in 100s")
        return None

    lab.on_stream = deaf
    res = r.run_cell(cells[4])
    assert res.ok and res.attempts == 2 and timeouts and lab.host_boots == ["stock"]
    # another agent error is not retried
    lab.on_stream = lambda host, run, dev: (_ for _ in ()).throw(AgentFailed("lab1: lab agent stream: bad", kind="Iperf3Error")) if dev else None
    res = r.run_cell(cells[3])
    assert res.status == "error" and res.attempts == 1


def test_a_cell_that_crashes_its_host_every_time_is_an_error_after_its_retries(lab, tmp_path):
    r = runner_for(tmp_path, retries=1, max_host_crashes=5)
    console = r.ctx.paths.host_console("lab1")

    def always(host, run, dev):
        if dev is not None:
            lab.crash(console)
            raise HostGone("lab host lab1 does not answer")
        return None

    lab.on_stream = always
    res = r.run_cell(r.plan()[0])
    assert res.status == "error" and res.attempts == 2 and len(res.host_crashes) == 2 and "(2 attempts)" in res.error
    lab.on_stream = None
    assert r.run_cell(r.plan()[1]).ok  # the next cell still runs


def test_the_crash_budget_stops_the_run(lab, tmp_path):
    r = runner_for(tmp_path, retries=5, max_host_crashes=2)
    console = r.ctx.paths.host_console("lab1")

    def always(host, run, dev):
        if dev is not None:
            lab.crash(console)
            raise HostGone("lab host lab1 does not answer")
        return None

    lab.on_stream = always
    with pytest.raises(HostGone, match="3 lab host crashes"):
        r.run_cell(r.plan()[0])
    (rec,) = r.store.load().results
    assert rec.status == "error" and rec.attempts == 3 and "crash budget" in rec.error
    with pytest.raises(HostGone, match="not run"):
        r.run_cell(r.plan()[1])
    assert len(r.store.load().results) == 1  # refused cells write nothing


def test_a_kernel_that_does_not_boot_fails_its_cells_fast(lab, tmp_path):
    r = runner_for(tmp_path, kernels=("nodrop-full", "stock"))
    lab.fail_host_boot.add("nodrop-full")
    results = [r.run_cell(c) for c in r.plan()]
    full = [x for x in results if x.kernel == "nodrop-full"]
    assert all(x.status == "error" and x.error.startswith("lab host boot: ") for x in full)
    assert "not attempted" in full[-1].error  # after MAX_BOOT_ATTEMPTS real attempts
    assert all(x.ok for x in results if x.kernel == "stock") and lab.host_boots == ["stock"]


def test_a_guest_that_did_not_boot_is_booted_again_for_its_cell_then_given_up(lab, tmp_path):
    r = runner_for(tmp_path, retries=2)
    cells = r.plan()
    lab.fail_guest_boots = 1
    res = r.run_cell(cells[0])
    assert res.ok and res.attempts == 2 and not res.host_crashes and lab.host_boots == ["stock"]
    assert r.timing.retries == 1
    # a guest config that keeps failing: MAX_BOOT_ATTEMPTS boots in the run, then refused without a boot
    r2 = runner_for(tmp_path / "two", retries=2)
    lab.guest = None
    lab.fail_guest_boots = 99
    first = r2.run_cell(r2.plan()[0])
    assert first.status == "error" and first.attempts == M.MAX_BOOT_ATTEMPTS + 1 and "not attempted" in first.error
    assert lab.fail_guest_boots == 99 - M.MAX_BOOT_ATTEMPTS
    later = r2.run_cell(r2.plan()[1])
    assert later.status == "error" and later.attempts == 1 and "not attempted" in later.error


def test_an_artifact_that_does_not_build_fails_its_cells_fast(lab, tmp_path, monkeypatch):
    calls = []

    def kernel_boot(ctx, recipe, progress=None):
        calls.append(recipe)
        if recipe == "nodrop":
            raise LabError("patch 0001-tun.patch does not apply")
        return SimpleNamespace(modules_root=Path("/art") / recipe, release="rel", cmdline=())

    monkeypatch.setattr(S, "kernel_boot", kernel_boot)
    r = runner_for(tmp_path)
    results = [r.run_cell(c) for c in r.plan()]
    assert all(x.error.startswith("artifacts: ") for x in results) and "not attempted" in results[-1].error
    assert calls.count("nodrop") == M.MAX_BOOT_ATTEMPTS and lab.host_boots == []


def test_resume_runs_only_missing_and_errored_cells(lab, tmp_path):
    r = runner_for(tmp_path)
    cells = r.plan()
    r.run_cell(cells[0])
    lab.on_stream = lambda host, run, dev: (_ for _ in ()).throw(LabError("boom")) if dev else None
    r.run_cell(cells[1])
    r.close()
    lab.on_stream = None
    spec, store = M.open_run(r.ctx, "vhost-matrix", None, resume=r.store.run_dir.name, argv=["lab", "run", "--resume"])
    assert spec.profile == "smoke" and store.run_dir == r.store.run_dir
    r2 = M.MatrixRunner(r.ctx, spec, store)
    assert [c.id for c in r2.pending()] == [c.id for c in cells[1:]]
    assert store.read_meta().extra["resumed"][0]["argv"] == ["lab", "run", "--resume"]
    with pytest.raises(LabError, match="not 'other'"):
        M.open_run(r.ctx, "other", None, resume=r.store.run_dir.name)
    with pytest.raises(LabError, match="profile"):
        M.open_run(r.ctx, "vhost-matrix", "nope", resume=r.store.run_dir.name)


def test_close_keep_leaves_everything_and_an_adopted_host_is_not_destroyed(lab, tmp_path):
    r = runner_for(tmp_path)
    r.run_cell(r.plan()[0])
    r.close(keep=True)
    assert lab.host is not None and lab.host_destroys == 0
    r2 = runner_for(tmp_path / "b")  # the kept host is adopted ...
    assert r2.run_cell(r2.plan()[0]).ok and lab.host_boots == ["stock"]
    r2.close()
    r2.close()
    assert lab.host_destroys == 0  # ... and, not booted by this run, not destroyed


def test_run_matrix_end_to_end_with_fakes(lab, tmp_path):
    ctx = context(tmp_path)
    lab.mbps = {(k, b, q): (2.0 if (k, q) == ("stock", 1) else 500.0) for k in ("stock", "nodrop") for b in ("tap", "vhost")
                for q in (1000, 1)}
    seen: list[Any] = []
    outcome = M.run_matrix(ctx, "vhost-matrix", profile="smoke", emit=seen.append,
                           on_start=lambda runner, plan, pending: seen.append(("start", len(plan), len(pending))))
    assert ("start", 16, 16) in seen
    assert outcome.stopped is None and outcome.run_dir.is_dir() and len(outcome.run_data.results) == 16
    verdicts = {p.name: p.verdict for p in outcome.properties}
    assert verdicts["vhost/stock-collapses-qlen1"] == "PASS" and verdicts["tap/nodrop-holds-qlen1"] == "PASS"
    # the fakes answer exactly 500 every time: a zero-width CI at 1.0, so "same" and no regression
    assert verdicts["vhost/nodrop-no-regression"] == "PASS"
    assert lab.host is None and lab.host_destroys == 1
    meta = RunStore(outcome.run_dir).read_meta()
    assert meta.finished_at and meta.extra["sessions"][0]["host_boots"] == 1 and meta.extra["module_swaps"] >= 2
    assert meta.extra["lab_session"]["swaps"] and M.summary_line(outcome).startswith("wall ")


def test_run_matrix_tears_down_on_keyboard_interrupt_and_resumes(lab, tmp_path):
    ctx = context(tmp_path)
    n = {"streams": 0}

    def interrupt(host, run, dev):
        if dev is not None:
            n["streams"] += 1
            if n["streams"] == 2:
                raise KeyboardInterrupt
        return None

    lab.on_stream = interrupt
    with pytest.raises(KeyboardInterrupt):
        M.run_matrix(ctx, "vhost-matrix", profile="smoke")
    assert lab.host is None and lab.guest is None
    run_dir = sorted((ctx.cfg.workdir / "runs").iterdir())[-1]
    assert RunStore(run_dir).read_meta().extra["stopped"] == "interrupted" and len(RunStore(run_dir).load().results) == 1
    lab.on_stream = None
    again = M.run_matrix(ctx, "vhost-matrix", resume=run_dir.name)
    assert again.stopped is None and len(again.run_data.latest()) == 16
    assert len(RunStore(run_dir).read_meta().extra["sessions"]) == 2


def test_a_single_kernel_matrix_may_use_a_local_host_but_not_a_comparison(lab, tmp_path):
    ctx = context(tmp_path)
    hosts = dict(ctx.cfg.hosts)
    hosts["lab1"] = replace(hosts["lab1"], provider="local")
    ctx = S.LabContext(replace(ctx.cfg, hosts=hosts), ctx.paths, ctx.key)
    spec, store = M.open_run(ctx, "vhost-matrix", "smoke", argv=[])
    with pytest.raises(LabError, match="cannot switch kernels"):
        M.MatrixRunner(ctx, spec, store)
    M.MatrixRunner(ctx, replace(spec, kernels=("stock",)), RunStore(store.run_dir), arms=[M.Arm("stock", "stock")])


def test_unknown_matrix_names_the_known_ones(tmp_path):
    with pytest.raises(LabError, match="vhost-matrix"):
        M.open_run(context(tmp_path), "nope", argv=[])


def test_resuming_a_finished_run_boots_nothing_and_keeps_its_totals(lab, tmp_path):
    ctx = context(tmp_path)
    first = M.run_matrix(ctx, "vhost-matrix", profile="smoke")
    meta = RunStore(first.run_dir).read_meta()
    boots = (len(lab.host_boots), len(lab.guest_boots))
    again = M.run_matrix(ctx, "vhost-matrix", resume="latest")
    assert (len(lab.host_boots), len(lab.guest_boots)) == boots
    after = RunStore(first.run_dir).read_meta()
    assert after.finished_at == meta.finished_at and len(after.extra["sessions"]) == 1
    line = M.summary_line(again)
    assert line.startswith("wall ") and "traffic 80s" in line
    assert M.summary_line(replace(again, run_data=replace(again.run_data, meta=RunMeta(run_id="x", matrix="m")),
                                  traffic_s=0.0)).endswith("no traffic ran in this session")


def test_run_matrix_over_two_hosts_measures_each_cell_on_its_assigned_host(lab, tmp_path):
    """`lab run` with matrices.<name>.hosts: one runner per host (here in turn; pytest-xdist runs them at once)."""
    from lab.measure.cells import assign_hosts

    ctx = context(tmp_path, hosts=("lab1", "lab2"))
    ctx.cfg.hosts["lab2"] = replace(ctx.cfg.hosts["lab1"], name="lab2")
    outcome = M.run_matrix(ctx, "vhost-matrix", profile="smoke")
    plan = M.planned_cells(ctx.cfg, ctx.cfg.matrices["vhost-matrix"].with_profile("smoke"))
    where = assign_hosts(plan, ("lab1", "lab2"))
    latest = {r.cell: r for r in outcome.run_data.latest()}
    assert set(latest) == set(where) and all(r.ok for r in latest.values())
    assert {cid: r.host for cid, r in latest.items()} == where
    assert set(where.values()) == {"lab1", "lab2"}
    meta = RunStore(outcome.run_dir).read_meta()
    assert [s["host"] for s in meta.extra["sessions"]] == ["lab1", "lab2"]
    assert set(meta.extra["lab_sessions"]) == {"lab1", "lab2"}
    assert len(lab.host_boots) == 2 and lab.host_destroys == 2  # each runner booted and tore down its own host
    assert outcome.stopped is None


def test_retry_reason_names_what_may_be_run_again():
    from lab.errors import AgentFailed, AgentTimeout

    assert M.retry_reason(AgentFailed("x", kind="Iperf3Timeout"), "cell") == "Iperf3Timeout"
    assert M.retry_reason(AgentTimeout("x"), "cell") == "AgentTimeout"
    assert M.retry_reason(AgentFailed("x", kind="Iperf3Error"), "cell") is None
    assert M.retry_reason(AgentTimeout("x"), "guest boot") is None  # an agent failure is only retried mid-cell
    assert M.retry_reason(LabError("guest guest1 did not come up in 240s"), "guest boot") == "guest did not boot"
    assert M.retry_reason(M.BootRefused("not attempted"), "guest boot") is None
    assert M.retry_reason(LabError("boom"), "cell") is None and M.retry_reason(LabError("x"), "lab host boot") is None
