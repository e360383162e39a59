"""Real hosts (issue #12), the pure parts: ssh host keys, a matrix over several hosts,
cell-to-host assignment, the module push plan, the kexec command line, and the run lock
across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from lab.errors import LabError
from lab.hosts.deploy import BootedKernel, KexecTarget, kexec_argv, kexec_cmdline, module_push_plan, verify_boot
from lab.hosts.host import SshHost
from lab.measure.cells import Arm, assign_hosts, expand, schedule
from lab.onhost.modules import outside_deps
from lab.verdicts.results import CellResult, RunMeta, RunStore
from tests.helpers import fake_ko
from tests.unit import test_config
from tests.unit.test_cells import matrix
from tests.unit.test_config import MEM, assert_error, base_lab, changed, error, load

# test_config's lab directory fixture, under this module's own name
lab_dir = pytest.fixture(scope="module", name="lab_dir")(test_config.lab_dir.__wrapped__)

SSH = {"provider": "ssh", "uri": "qemu+ssh://root@far/system?keyfile=/k&no_verify=1", "address": "far"}


# --------------------------------------------------------------------------- config: ssh hosts


def test_ssh_host_python_and_lab_path(lab_dir: Path) -> None:
    data = changed(base_lab(), "hosts.far", {**SSH, "python": "/opt/vhl/bin/python", "lab_path": "/opt/vhost-lab"})
    host = load(lab_dir, data).hosts["far"]
    assert (host.python, host.lab_path) == ("/opt/vhl/bin/python", "/opt/vhost-lab")
    # defaults: the remote's python3 with the lab installed in it
    plain = load(lab_dir, changed(base_lab(), "hosts.far", SSH)).hosts["far"]
    assert (plain.python, plain.lab_path) == ("python3", "")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("python", "python3 -I", "the remote's Python"),
        ("python", "-c", "the remote's Python"),
        ("python", "", "the remote's Python"),
        ("lab_path", "relative/dir", "an absolute path on the remote"),
        ("lab_path", "/opt/a b", "an absolute path on the remote"),
        ("lab_path", "/opt/../etc", "without '..'"),
        ("lab_path", "/opt/x;rm", "an absolute path on the remote"),
    ],
)
def test_ssh_host_bad_python_or_lab_path_names_the_key(lab_dir: Path, key: str, value: str, fragment: str) -> None:
    err = error(lab_dir, changed(base_lab(), "hosts.far", {**SSH, key: value}))
    assert_error(err, f"hosts.far.{key}", fragment)


@pytest.mark.parametrize("key", ["python", "lab_path"])
def test_python_and_lab_path_only_for_ssh_hosts(lab_dir: Path, key: str) -> None:
    err = error(lab_dir, changed(base_lab(), f"hosts.h1.{key}", "/opt/x"))
    assert_error(err, f"hosts.h1.{key}", 'only "ssh" hosts have one')


def test_ssh_host_runs_the_agent_from_its_own_python() -> None:
    h = SshHost(name="far", uri="qemu+ssh://far/system", address="far", user="root", key=Path("/k"),
                remote_python="/opt/vhl/bin/python", lab_path="/opt/vhost-lab")
    assert h.python() == ["env", "PYTHONPATH=/opt/vhost-lab", "/opt/vhl/bin/python"]
    assert not h.sees_local_files
    installed = SshHost(name="far", uri="qemu+ssh://far/system", address="far", user="root", key=Path("/k"))
    assert installed.python() == ["python3"]


# --------------------------------------------------------------------------- config: matrices over hosts


def _two_hosts(data: dict) -> dict:
    data = changed(data, "hosts.h2", {"provider": "nested", "kernel": "stock", "memory_mib": 2048})
    return changed(data, "hosts.far", SSH)


def test_matrix_hosts_key(lab_dir: Path) -> None:
    data = changed(_two_hosts(base_lab()), "matrices.m.hosts", ["h1", "h2", "far"])
    m = load(lab_dir, data).matrices["m"]
    assert m.hosts == ("h1", "h2", "far") and m.run_hosts == ("h1", "h2", "far")
    assert m.host == "h1"
    # without `host`, the first of `hosts` is the template
    data = changed(changed(data, "matrices.m.host", None), "matrices.m.hosts", ["h2", "h1"])
    del data["matrices"]["m"]["host"]
    m = load(lab_dir, data).matrices["m"]
    assert (m.host, m.run_hosts) == ("h2", ("h2", "h1"))
    # no `hosts`: just `host`
    assert load(lab_dir, base_lab()).matrices["m"].run_hosts == ("h1",)


@pytest.mark.parametrize(
    ("hosts", "path", "fragment"),
    [
        ([], "matrices.m.hosts", "non-empty array"),
        (["h1", "nope"], "matrices.m.hosts[1]", "the name of a host"),
        (["h1", "h1"], "matrices.m.hosts[1]", "no duplicates"),
        ("h1", "matrices.m.hosts", "an array"),
        (["h2", "far"], "matrices.m.host", "one of the matrix's hosts"),
    ],
)
def test_matrix_hosts_errors_name_the_key(lab_dir: Path, hosts: object, path: str, fragment: str) -> None:
    err = error(lab_dir, changed(_two_hosts(base_lab()), "matrices.m.hosts", hosts))
    assert_error(err, path, fragment)


def test_matrix_refuses_two_local_hosts(lab_dir: Path) -> None:
    data = changed(base_lab(), "hosts.here", {"provider": "local"})
    data = changed(data, "hosts.also", {"provider": "local"})
    err = error(lab_dir, changed(data, "matrices.m.hosts", ["h1", "here", "also"]), mem=MEM)
    assert_error(err, "matrices.m.hosts", 'at most one "local" host')


# --------------------------------------------------------------------------- cells -> hosts


def _plan(**kw: object) -> list:
    spec = matrix(**kw)
    return schedule(expand(spec), lambda r: "debian:6.12", spec.order, spec.seed)


def test_every_comparison_stays_on_one_host() -> None:
    cells = _plan(repeats=3, txqueuelens=(1000, 100, 10, 1), rtts_ms=(60.0, 120.0))
    where = assign_hosts(cells, ["box1", "box2"])
    assert set(where) == {c.id for c in cells}
    by_point: dict = {}
    for c in cells:
        by_point.setdefault(c.point, set()).add(where[c.id])
    # every arm and repeat of a point on one host
    assert all(len(hosts) == 1 for hosts in by_point.values())
    # and the within-kernel properties too: one backend (guest config) on one host
    by_config: dict = {}
    for c in cells:
        by_config.setdefault(c.guest_config, set()).add(where[c.id])
    assert all(len(hosts) == 1 for hosts in by_config.values())
    # both hosts work, about equally
    counts = [sum(1 for h in where.values() if h == b) for b in ("box1", "box2")]
    assert counts[0] == counts[1] == len(cells) // 2


def test_fewer_guest_configs_than_hosts_splits_by_point_never_inside_one() -> None:
    cells = _plan(backends=("vhost",), txqueuelens=(1000, 100, 10, 1), rtts_ms=(), repeats=2)
    where = assign_hosts(cells, ["a", "b", "c"])
    assert set(where.values()) == {"a", "b", "c"}
    by_point: dict = {}
    for c in cells:
        by_point.setdefault(c.point, set()).add(where[c.id])
    assert all(len(h) == 1 for h in by_point.values())


def test_assignment_is_deterministic_and_one_host_gets_everything() -> None:
    cells = _plan(repeats=2)
    assert assign_hosts(cells, ["x", "y"]) == assign_hosts(list(cells), ["x", "y"])
    assert set(assign_hosts(cells, ["only"]).values()) == {"only"}
    # more hosts than points: the extra hosts get nothing, and no point is split
    small = _plan(backends=("vhost",), txqueuelens=(1000,), rtts_ms=(), kernels=("stock", "nodrop"))
    where = assign_hosts(small, ["a", "b", "c"])
    assert len(set(where.values())) == 1
    with pytest.raises(ValueError):
        assign_hosts(cells, [])


def test_aa_arms_share_their_host() -> None:
    spec = matrix(kernels=("stock",), repeats=2)
    arms = [Arm("stock", "stock"), Arm("stock-aa", "stock")]
    cells = schedule(expand(spec, arms), lambda r: "k", "abba", 1)
    where = assign_hosts(cells, ["a", "b"])
    for c in cells:
        twin = next(d for d in cells if d.point == c.point and d.kernel != c.kernel)
        assert where[c.id] == where[twin.id]


# --------------------------------------------------------------------------- the module push plan


def _artifact_tree(root: Path) -> Path:
    moddir = root / "lib" / "modules" / "6.12.117+deb12-amd64"
    files = {
        "kernel/drivers/net/tun.ko.xz": b"\x01" * 20,
        "kernel/drivers/net/tap.ko.xz": b"\x02" * 20,
        "kernel/drivers/vhost/vhost.ko.xz": b"\x03" * 20,
        "kernel/drivers/vhost/vhost_net.ko.xz": b"\x04" * 20,
        "kernel/drivers/vhost/vhost_iotlb.ko.xz": b"\x05" * 20,
        "kernel/drivers/net/macvtap.ko.xz": b"\x06" * 20,
    }
    for rel, bid in files.items():
        fake_ko(moddir / rel, bid)
    (moddir / "modules.dep").write_text(
        "kernel/drivers/net/macvtap.ko.xz: kernel/drivers/net/macvlan.ko.xz kernel/drivers/net/tap.ko.xz\n"
        "kernel/drivers/net/tun.ko.xz:\n"
        "kernel/drivers/net/tap.ko.xz:\n"
        "kernel/drivers/vhost/vhost_net.ko.xz: kernel/drivers/net/tun.ko.xz kernel/drivers/vhost/vhost.ko.xz "
        "kernel/drivers/vhost/vhost_iotlb.ko.xz kernel/drivers/net/tap.ko.xz\n"
        "kernel/drivers/vhost/vhost.ko.xz: kernel/drivers/vhost/vhost_iotlb.ko.xz\n"
        "kernel/drivers/vhost/vhost_iotlb.ko.xz:\n"
    )
    return moddir


def test_push_plan_holds_only_the_lab_modules_and_their_dep_lines(tmp_path: Path) -> None:
    moddir = _artifact_tree(tmp_path)
    plan = module_push_plan(moddir)
    assert plan.release == "6.12.117+deb12-amd64"
    assert sorted(rel for _, rel in plan.files) == [
        "kernel/drivers/net/tap.ko.xz", "kernel/drivers/net/tun.ko.xz",
        "kernel/drivers/vhost/vhost.ko.xz", "kernel/drivers/vhost/vhost_net.ko.xz",
    ]
    assert all(local == moddir / rel for local, rel in plan.files)
    # macvtap and vhost_iotlb stay home; vhost_iotlb is what the remote's kernel must give
    assert "macvtap" not in plan.modules_dep and not any(ln.startswith("kernel/drivers/vhost/vhost_iotlb") for ln in
                                                          plan.modules_dep.splitlines())
    assert plan.needs == ("vhost_iotlb",)
    assert plan.build_ids == {"tun": "01" * 20, "tap": "02" * 20, "vhost": "03" * 20, "vhost_net": "04" * 20}
    # the pushed tree's modules.dep, read back the way the swap reads it, asks for vhost_iotlb first
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    (pushed / "modules.dep").write_text(plan.modules_dep)
    assert outside_deps(pushed) == ["vhost_iotlb"]


def test_push_plan_refuses_a_tree_without_the_lab_modules(tmp_path: Path) -> None:
    moddir = _artifact_tree(tmp_path)
    (moddir / "modules.dep").write_text("kernel/drivers/net/tun.ko.xz:\n")
    with pytest.raises(LabError, match="no tap, vhost, vhost_net module"):
        module_push_plan(moddir)
    with pytest.raises(LabError, match="modules.dep is not readable"):
        module_push_plan(tmp_path / "nowhere")


# --------------------------------------------------------------------------- kexec


def test_kexec_cmdline_drops_boot_loader_words_and_replaces_keys() -> None:
    current = "BOOT_IMAGE=/vmlinuz-6.1 root=UUID=x ro quiet tun.backpressure_all=0 initrd=/initrd.img"
    assert kexec_cmdline(current) == "root=UUID=x ro quiet tun.backpressure_all=0"
    assert kexec_cmdline(current, ("tun.backpressure_all=1", "nokaslr")) == "root=UUID=x ro quiet tun.backpressure_all=1 nokaslr"


def test_kexec_argv_is_one_list() -> None:
    t = KexecTarget("6.12.1", "/var/lib/vhost-lab/kernels/k/vmlinuz", "/var/lib/vhost-lab/kernels/k/initrd.img", "root=/dev/sda ro")
    assert kexec_argv(t) == ["kexec", "-l", t.vmlinuz, f"--initrd={t.initrd}", "--command-line=root=/dev/sda ro"]


def test_verify_boot_names_every_failed_check() -> None:
    before = BootedKernel("6.1.0", "aaaa", "ro")
    good = BootedKernel("6.12.1", "bbbb", "ro")
    want = {"tun": "11", "vhost_net": "22"}
    assert verify_boot(before, good, "6.12.1", {"tun": "11", "vhost_net": "22", "tap": "33"}, want) == []
    problems = verify_boot(before, BootedKernel("6.1.0", "aaaa", "ro"), "6.12.1", {"tun": "99"}, want)
    assert len(problems) == 3
    assert "same boot id" in problems[0] and "not 6.12.1" in problems[1] and "tun, vhost_net" in problems[2]


# --------------------------------------------------------------------------- the run lock across processes


def _append_many(run_dir: str, worker: int, n: int) -> None:
    store = RunStore(run_dir)
    for i in range(n):
        store.append(CellResult(cell=f"vhost-qlen{worker}-rtt0-stock-r{i + 1}", kernel="stock", backend="vhost",
                                txqueuelen=worker, rtt_ms=0, repeat=i + 1, throughput_mbps=float(i), commands=[["x" * 3000]]))
        store.update_meta(lambda m, w=worker, i=i: m.extra.setdefault("seen", []).append(f"{w}:{i}"))


def test_appends_and_meta_updates_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    store.create(RunMeta(run_id="run", matrix="m"))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(store.run_dir), w, 40)) for w in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = store.load()
    assert data.warnings == []
    assert len(data.results) == 120
    # every line whole (a 3 kB line written by three processes at once would tear without the lock)
    lines = store.results_path.read_text().splitlines()
    assert len(lines) == 120 and all(json.loads(ln)["cell"] for ln in lines)
    # no read-modify-write of meta.json lost another process's update
    seen = store.read_meta().extra["seen"]
    assert sorted(seen) == sorted(f"{w}:{i}" for w in (1, 2, 3) for i in range(40))


def test_the_lock_is_an_flock_other_processes_wait_for(tmp_path: Path) -> None:
    import fcntl

    store = RunStore(tmp_path / "run")
    store.create(RunMeta(run_id="run", matrix="m"))
    with store.locked():
        fd = os.open(store.run_dir / ".lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # re-entrant inside one thread: an update inside an append block does not deadlock
            store.update_meta(lambda m: m.extra.__setitem__("x", 1))
        finally:
            os.close(fd)
    fd = os.open(store.run_dir / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)
    assert store.read_meta().extra["x"] == 1


# --------------------------------------------------------------------------- the report: which host measured what


def _spread_cells(stock_q1_host: str) -> list[CellResult]:
    from dataclasses import replace

    from tests.unit.test_report import reference_cells

    cells = reference_cells(repeats=3)
    out = []
    for c in cells:
        host = "box1" if c.backend == "tap" else "box2"
        if c.kernel == "stock" and c.backend == "vhost" and c.txqueuelen == 1 and c.rtt_ms == 0:
            host = stock_q1_host
        out.append(replace(c, host=host, boot_id=f"{host}@1"))
    return out


def test_report_says_which_host_measured_each_point(tmp_path: Path) -> None:
    from lab.verdicts.report import ReportContext, to_json, to_markdown, to_text
    from tests.unit.test_report import store_run

    run = store_run(tmp_path, _spread_cells("box2"))
    rc = ReportContext("stock", 0.10, 0.95)
    text = to_text(run, [], rc=rc)
    tap_part, vhost_part = text.split("\nvhost_net (", 1)
    tap_rows = [ln for ln in tap_part.splitlines() if re.match(r"\s*(qlen|RTT) \d", ln)]
    vhost_rows = [ln for ln in vhost_part.splitlines() if re.match(r"\s*(qlen|RTT) \d", ln)]
    assert tap_rows and all("box1" in ln and "box2" not in ln for ln in tap_rows), text
    assert vhost_rows and all("box2" in ln and "box1" not in ln for ln in vhost_rows), text
    header = next(ln for ln in to_markdown(run, [], rc=rc).splitlines() if ln.startswith("| cell"))
    assert "| host |" in header, header
    assert "refused" not in text
    # two boots in the run, but every point's arms come from one of them: no "across boots" note
    assert "span different lab host boots" not in " ".join(text.split())
    # one host: no host column
    single = store_run(tmp_path / "one", [replace_host(c, "lab1") for c in _spread_cells("box2")])
    assert "box" not in to_text(single, [], rc=rc)
    assert to_json(run, [], rc=rc)["comparisons"]


def replace_host(c: CellResult, host: str) -> CellResult:
    from dataclasses import replace

    return replace(c, host=host, boot_id=f"{host}@1")


def test_report_refuses_a_ratio_across_hosts_and_shows_it(tmp_path: Path) -> None:
    from lab.verdicts.report import ReportContext, run_comparisons, to_text
    from tests.unit.test_report import store_run

    run = store_run(tmp_path, _spread_cells("box1"))  # stock vhost qlen1 on box1, nodrop's on box2
    rc = ReportContext("stock", 0.10, 0.95)
    cmps = run_comparisons(run, rc)
    assert not any(c.point.backend == "vhost" and c.point.txqueuelen == 1 and c.point.rtt_ms == 0 for c in cmps)
    text = to_text(run, [], rc=rc)
    flat = " ".join(text.split())
    assert re.search(r"refused: vhost qlen1: stock on box1, nodrop on box2: not compared \(hosts differ\)", flat), text
    # the point whose arms ran on two hosts says so in its row
    assert any(re.match(r"\s*qlen 1\s+box1,box2\b", ln) for ln in text.splitlines()), text


# --------------------------------------------------------------------------- the README's lab.toml for a KVM machine


def test_readme_local_lab_toml_loads_and_its_ssh_host_block_too(tmp_path: Path) -> None:
    """The "On your own KVM machine" section's lab.toml is a valid lab, and so is it with the ssh host block in it."""
    import textwrap

    from lab.config import DEFAULT_CONFIG, loads_config

    readme = (DEFAULT_CONFIG.parent / "README.md").read_text()
    section = readme.split("## On your own KVM machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"\n((?:    .*\n|\n)+)", section)
    local = textwrap.dedent(next(b for b in blocks if "# lab.toml" in b))
    cfg = loads_config(local, DEFAULT_CONFIG.parent, tmp_path / "lab.toml", mem_total_mib=65536)
    assert cfg.hosts["here"].provider == "local" and cfg.matrices["vhost-matrix"].run_hosts == ("here",)
    ssh_block = textwrap.dedent(next(b for b in blocks if 'provider = "ssh"' in b))
    cfg = loads_config(local + ssh_block, DEFAULT_CONFIG.parent, tmp_path / "lab.toml", mem_total_mib=65536)
    far = cfg.hosts["box1"]
    assert (far.python, far.lab_path, far.address) == ("/opt/vhost-lab/venv/bin/python", "/opt/vhost-lab", "192.0.2.10")


def test_local_host_takes_the_lab_command_timeout() -> None:
    """What lab.session.up_host gives a "local" host (it had no such field: `lab up` on provider local crashed)."""
    from lab.hosts.host import LocalHost

    h = LocalHost(name="here", command_timeout=7.5)
    assert (h.name, h.command_timeout, h.sees_local_files) == ("here", 7.5, True)
    assert h.run(["sh", "-c", "echo $0", "ok"]).stdout.strip() == "ok"
    assert h.stage(Path("/etc/hostname"), "x") == "/etc/hostname"


# --------------------------------------------------------------------------- pytest-xdist: one worker per host


def test_xdist_puts_each_hosts_cells_in_one_worker(tmp_path: Path) -> None:
    """tests/matrix under `-n 2 --dist loadgroup` (no VM: libvirt is hidden, so every cell skips where it lands):
    each host's cells go to one worker, the two hosts to two workers, the properties after the last host's cells."""
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install -e .[test])")
    import subprocess
    import sys

    from lab.config import load_config
    from lab.measure.matrix import matrix_spec, planned_cells
    from tests.e2e.conftest import REPO, make_lab_toml
    from tests.e2e.test_real_hosts import TWO_HOSTS

    cfg_path = make_lab_toml(tmp_path, "rhx", TWO_HOSTS)
    cfg_path.write_text(cfg_path.read_text().replace('workdir = "~/.cache/vhost-lab"', f'workdir = "{tmp_path / "work"}"', 1))
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "libvirt.py").write_text('raise ImportError("hidden: a dry run of the xdist plumbing")\n')
    cfg = load_config(cfg_path)
    plan = planned_cells(cfg, matrix_spec(cfg, "spread"))
    from lab.measure.cells import assign_hosts

    where = assign_hosts(plan, ("box1", "box2"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(REPO), *sys.path[1:]]))
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/matrix", "--lab-config", str(cfg_path), "--matrix", "spread",
                        "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = re.findall(r"\[(gw\d+)\] \[ *\d+%\] SKIPPED \S+::(test_cell|test_property)\[([^\]]+)\]", p.stdout)
    assert len(lines) == len(plan) + 13, p.stdout[-3000:] + p.stderr[-2000:]
    cell_worker = {name: w for w, kind, name in lines if kind == "test_cell"}
    assert set(cell_worker) == set(where)
    per_host = {h: {cell_worker[c] for c in where if where[c] == h} for h in ("box1", "box2")}
    assert all(len(w) == 1 for w in per_host.values()) and per_host["box1"] != per_host["box2"], per_host
    assert {w for w, kind, _ in lines if kind == "test_property"} == per_host["box2"]
    # the controller opened one run directory for both workers
    runs = list((tmp_path / "work" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "meta.json").is_file()


# --------------------------------------------------------------------------- kexec_deploy's decisions, on a scripted box


class ScriptedBox:
    """A stand-in for a host that kexecs: each `kexec -e` starts a new boot of the loaded kernel.

    Only the control flow of lab.hosts.deploy is under test here (the real
    kexec runs in tests/e2e/test_real_hosts.py); this box answers what the
    deploy asks and nothing else.
    """

    name = "box"
    sees_local_files = False

    def __init__(self, releases: dict[str, str]) -> None:
        self.releases = releases  # vmlinuz path -> the release it boots
        self.release, self.boot, self.loaded, self.closed = "6.1.0", 1, None, 0
        self.argvs: list[list[str]] = []

    def run(self, argv, timeout=None, check=True, stdin=None):
        from lab.proc import Completed

        argv = list(argv)
        self.argvs.append(argv)
        out, rc = "", 0
        if argv[:2] == ["cat", "/proc/sys/kernel/osrelease"]:
            out = f"{self.release}\nboot-{self.boot}\nBOOT_IMAGE=/vmlinuz root=/dev/vda ro\n"
        elif argv[:2] == ["kexec", "-l"]:
            self.loaded = argv[2]
        elif argv[0] == "setsid":
            self.boot += 1
            self.release = self.releases[self.loaded]
        elif argv[0] == "test":
            rc = 1  # no /boot/vmlinuz-<release> here
        return Completed(tuple(argv), rc, out, "", 0.0)

    def close(self) -> None:
        self.closed += 1


NEW = KexecTarget("6.12.1", "/k/new/vmlinuz", "/k/new/initrd", "root=/dev/vda ro")
OLD = KexecTarget("6.1.0", "/k/old/vmlinuz", "/k/old/initrd", "root=/dev/vda ro")
IDS = {"tun": "11", "vhost_net": "22"}


def test_kexec_deploy_checks_the_new_boot() -> None:
    from lab.hosts.deploy import kexec_deploy

    box = ScriptedBox({NEW.vmlinuz: "6.12.1"})
    out = kexec_deploy(box, NEW, IDS, boot_timeout=30, loaded_build_ids=lambda h: IDS)
    assert (out.before.release, out.after.release, out.fell_back) == ("6.1.0", "6.12.1", False)
    assert out.after.boot_id == "boot-2" and box.closed >= 1
    assert ["kexec", "-l", NEW.vmlinuz, f"--initrd={NEW.initrd}", f"--command-line={NEW.cmdline}"] in box.argvs


def test_kexec_deploy_falls_back_when_a_check_fails_and_installs_the_fallback_on_that_boot() -> None:
    from lab.hosts.deploy import kexec_deploy

    box = ScriptedBox({NEW.vmlinuz: "6.12.1", OLD.vmlinuz: "6.1.0"})
    calls: list[int] = []

    def reinstall() -> KexecTarget:
        calls.append(box.boot)
        return OLD

    with pytest.raises(LabError, match=r"tun, vhost_net loaded with other build-ids.*fell back to 6\.1\.0 \(boot boot-3\)"):
        kexec_deploy(box, NEW, IDS, boot_timeout=30, fallback=reinstall, loaded_build_ids=lambda h: {"tun": "99"})
    assert calls == [2], "the fallback is put in place on the boot that failed"
    assert [a[2] for a in box.argvs if a[:2] == ["kexec", "-l"]] == [NEW.vmlinuz, OLD.vmlinuz]
    assert (box.release, box.boot) == ("6.1.0", 3)


def test_kexec_deploy_without_a_previous_kernel_says_so() -> None:
    from lab.hosts.deploy import kexec_deploy

    box = ScriptedBox({NEW.vmlinuz: "6.9.9"})  # boots, but not the release asked for
    with pytest.raises(LabError, match=r"uname -r is 6\.9\.9, not 6\.12\.1; no previous kernel to fall back to"):
        kexec_deploy(box, NEW, IDS, boot_timeout=30, loaded_build_ids=lambda h: IDS)
    assert sum(1 for a in box.argvs if a[0] == "setsid") == 1
