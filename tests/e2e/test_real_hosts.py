"""Real hosts (issue #12), end to end: a lab host stands in for a user's KVM machine.

- `local`: inside a lab host (nested KVM and vhost_net work there, this tree is
  visible through the shared root) the lab runs with provider = "local":
  `lab doctor`, `lab up`, `lab shell guest1`, a one-kernel smoke matrix,
  `lab down`, all through the lab CLI run on the lab host (host.run).
- `ssh`: a lab host plays a remote box (its sshd on the loopback forward, its
  own libvirtd). A lab on this machine with provider = "ssh" boots a guest
  there through qemu+ssh://, with the image, guest kernel and initramfs
  uploaded (SFTP, checked by SHA-256), runs a stock-vs-nodrop matrix whose
  nodrop modules are pushed and swapped in place (build-ids checked), then
  kexecs the box into a kernel and checks uname -r, the new boot id and the
  module build-ids, and falls back when a check fails.

A full kernel build takes 20+ minutes here, so the kexec test kexecs into the
stock artifact's kernel (the one the box runs): that proves the mechanism
(install, kexec -l/-e, wait for SSH, verify, fall back), not a new kernel.

These tests are slow (a TCG lab host boot each, minutes): `nox -s real-hosts`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, LabCli, make_lab_toml

pytestmark = [pytest.mark.slow, pytest.mark.real_hosts]

KEY_DIR = Path("~/.cache/vhost-lab").expanduser()


def lab_toml(tmp: Path, name: str, extra: str) -> Path:
    """make_lab_toml with boot bounds for a busy machine: a guest nested in a TCG lab host took 100-240 s to boot
    here while other people's VMs shared the 2 cores (lab.toml's 240 s is for a quiet one)."""
    path = make_lab_toml(tmp, name, extra)
    text = path.read_text()
    text = re.sub(r"(?m)^host_boot = \d+", "host_boot = 900", text, count=1)
    text = re.sub(r"(?m)^guest_boot = \d+", "guest_boot = 900", text, count=1)
    path.write_text(text)
    return path


def _timed(what: str, t0: float) -> None:
    print(f"\n[{what}: {time.monotonic() - t0:.0f}s]", flush=True)


# --------------------------------------------------------------------------- local, inside a lab host

LOCAL_PROFILE = """
[matrices.vhost-matrix.profiles.local]
kernels = ["stock"]
backends = ["vhost"]
txqueuelens = [1000, 1]
rtts_ms = []
repeats = 1
duration_s = 5
warmup_s = 1
"""

OUTER_BOX = """
[hosts.box]
provider = "nested"
kernel = "stock"
vcpus = 2
memory_mib = 4096
"""


def test_local_provider_inside_a_lab_host(tmp_path, e2e_ready):
    """The path of a user with a KVM box: provider "local", run on a lab host as if it were that box."""
    t_all = time.monotonic()
    lab = "rhl"
    outer = LabCli(lab_toml(tmp_path, lab, OUTER_BOX))
    try:
        # The guest image (its cache key holds the lab's public key) and the kernels
        # are built here, before the lab host boots: it has no network, and its 9p
        # view of this machine's root may not show files made after it booted.
        outer("build", "image", "bookworm", timeout=1800)
        outer("build", "kernel", "stock", timeout=1800)
        t0 = time.monotonic()
        outer("up", "box", timeout=900)
        _timed("outer lab host up", t0)

        from lab.config import load_config
        from lab.session import LabContext, connect_host

        ctx = LabContext.open(load_config(outer.config))
        box = connect_host(ctx, ctx.cfg.hosts["box"])
        assert box is not None
        # The inner lab: the same lab name (same key, so the same cached image),
        # lab1 turned into a "local" host. It goes into the host's state share,
        # which the lab host reads without a cache.
        (tmp_path / "inner").mkdir()
        text = lab_toml(tmp_path / "inner", lab, LOCAL_PROFILE).read_text()
        text = text.replace('provider = "nested"', 'provider = "local"', 1)
        state = ctx.paths.host_dir("box")
        (state / "inner.toml").write_text(text)
        inner_cfg = "/var/lib/vhost-lab/state/inner.toml"
        # the lab's own Python and tree, seen through the shared root (as a user's checkout would be)
        py = ["env", "COLUMNS=200", f"PYTHONPATH={REPO}", sys.executable, "-m", "lab.cli", "-c", inner_cfg]

        def inner(*args: str, timeout: float = 900, check: bool = True):
            res = box.run([*py, *args], timeout=timeout, check=False)
            if check and res.rc != 0:
                raise AssertionError(f"inner lab {' '.join(args)} exited {res.rc}\n{res.stdout}\n{res.stderr}")
            return res

        try:
            doctor = inner("doctor", check=False)
            print(doctor.stdout)
            rows = {ln.split("│")[1].strip(): ln for ln in doctor.stdout.splitlines() if ln.count("│") > 3}
            for check in ("kvm", "vhost_net", "tun", "sch_netem", "libvirtd", "iperf3", "root"):
                assert check in rows and " ok " in rows[check], (check, doctor.stdout)

            t0 = time.monotonic()
            up = inner("up", "guest1", timeout=1500)
            _timed("inner lab up (provider local)", t0)
            assert "guest1" in up.stdout

            p = inner("shell", "guest1", "--", "uname", "-r")
            assert p.stdout.strip() == "6.12.117+deb12-amd64"
            p = inner("shell", "guest1", "--", "cat", "/sys/class/net/eth0/operstate")
            assert p.stdout.strip() == "up"
            status = inner("status").stdout
            row = next(ln for ln in status.splitlines() if "guest1" in ln and "running" in ln)
            assert "vhost" in row and re.search(r"\bon\b", row), status
            host_row = next(ln for ln in status.splitlines() if "lab1" in ln and "local" in ln)
            assert "6.12.117" in host_row, status
            # the guest's QEMU holds /dev/vhost-net on the box
            fds = box.run(["sh", "-c", f"ls -l /proc/$(pgrep -f guest={lab}-guest1, | head -1)/fd"], check=False).stdout
            assert "/dev/vhost-net" in fds

            t0 = time.monotonic()
            run = inner("run", "vhost-matrix", "--profile", "local", timeout=1500, check=False)
            _timed("inner smoke matrix (one kernel)", t0)
            report = json.loads(inner("report", "latest", "--json").stdout)
            cells = report.get("cells") or report.get("results") or []
            latest = {c["cell"]: c for c in cells}
            assert sorted(latest) == ["vhost-qlen1-rtt0-stock", "vhost-qlen1000-rtt0-stock"], (run.stdout, run.stderr)
            for c in latest.values():
                assert c["status"] == "ok", c
                assert c["host"] == "lab1" and c["throughput_mbps"] > 0, c
                assert c["kernel_release"] == "6.12.117+deb12-amd64"
            # txqueuelen 1 on the stock tap ring: drops and retransmits (the bug the patch is about)
            q1 = latest["vhost-qlen1-rtt0-stock"]
            assert q1["tap_tx_dropped"] > 0 or q1["retransmits"] > 0, q1
        finally:
            down = inner("down", check=False, timeout=300)
            print(down.stdout, down.stderr)
            gone = box.run(["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"], check=False).stdout
            assert f"{lab}-guest1" not in gone
            ctx.close()
    finally:
        outer("down", check=False, timeout=300)
        _timed("test_local_provider_inside_a_lab_host total", t_all)


# --------------------------------------------------------------------------- ssh to a lab host


def _ssh_lab_extra(lab: str, port: int) -> str:
    key = KEY_DIR / lab / "ssh" / "id_ed25519"
    return f"""
[hosts.box1]
provider = "nested"
kernel = "stock"
vcpus = 2
memory_mib = 4096
ssh_port = {port}

[hosts.far]
provider = "ssh"
address = "127.0.0.1"
ssh_port = {port}
user = "root"
uri = "qemu+ssh://root@127.0.0.1:{port}/system?keyfile={key}&no_verify=1&no_tty=1"
python = "{sys.executable}"
lab_path = "{REPO}"
kernel = "stock"

[guests.gfar]
host = "far"
image = "bookworm"
vcpus = 1
memory_mib = 1024

[matrices.far]
host = "far"
guest = "gfar"
kernels = ["stock", "nodrop"]
backends = ["vhost"]
txqueuelens = [1000]
rtts_ms = []
repeats = 1
duration_s = 3
warmup_s = 1
"""


@pytest.fixture(scope="module")
def far_lab(tmp_path_factory, e2e_ready):
    """Lab "rhs": lab host box1 (nested) boots, then the same machine is host "far" (provider "ssh")."""
    from lab.hosts.remote import free_loopback_port

    lab = "rhs"
    tmp = tmp_path_factory.mktemp("ssh")
    cli = LabCli(lab_toml(tmp, lab, _ssh_lab_extra(lab, free_loopback_port())))
    cli("build", "image", "bookworm", timeout=1800)
    cli("build", "kernel", "stock", "nodrop", timeout=1800)
    t0 = time.monotonic()
    cli("up", "box1", timeout=900)
    _timed("stand-in lab host up", t0)
    yield cli
    cli("down", check=False, timeout=300)


def test_ssh_provider_boots_a_guest_and_runs_cells_on_a_remote(far_lab):
    t_all = time.monotonic()
    from lab.config import load_config
    from lab.session import LabContext, connect_host, kernel_boot

    t0 = time.monotonic()
    up = far_lab("up", "gfar", timeout=1200)
    _timed("lab up gfar on the ssh host", t0)
    assert "gfar" in up.stdout
    p = far_lab("shell", "gfar", "--", "uname", "-r")
    assert p.stdout.strip() == "6.12.117+deb12-amd64"
    status = far_lab("status").stdout
    assert re.search(r"far\s.*ssh\s.*up", status), status

    ctx = LabContext.open(load_config(far_lab.config))
    try:
        far = connect_host(ctx, ctx.cfg.hosts["far"])
        assert far is not None and not far.sees_local_files
        # what the guest boots from was uploaded, not read through the shared root
        files = far.run(["find", "/var/lib/vhost-lab/files", "-type", "f"]).stdout.split()
        image = next(Path(f) for f in files if f.endswith("bookworm.qcow2"))
        assert any(f.endswith(".cpio") for f in files) and any("/vmlinuz-" in f for f in files), files
        local_image = ctx.paths.workdir / "images" / image.parent.name / "bookworm.qcow2"
        from lab.hosts.host import file_sha256

        assert far.run(["sha256sum", str(image)]).stdout.split()[0] == file_sha256(local_image)
        dom = far.run(["virsh", "-q", "-c", "qemu:///system", "dumpxml", "rhs-gfar"]).stdout
        assert "/var/lib/vhost-lab/files/" in dom and str(ctx.paths.workdir) not in dom, dom
    finally:
        ctx.close()

    # stock vs nodrop on the ssh host: nodrop's modules pushed and swapped in that boot
    t0 = time.monotonic()
    run = far_lab("run", "far", timeout=1800, check=False)
    _timed("stock vs nodrop matrix on the ssh host", t0)
    report = json.loads(far_lab("report", "latest", "--json").stdout)
    cells = {c["cell"]: c for c in report.get("cells") or report.get("results") or []}
    assert set(cells) == {"vhost-qlen1000-rtt0-stock", "vhost-qlen1000-rtt0-nodrop"}, run.stdout + run.stderr
    nodrop_ids = kernel_boot(ctx, "nodrop").module_build_ids
    for c in cells.values():
        assert c["status"] == "ok" and c["host"] == "far", c
    n = cells["vhost-qlen1000-rtt0-nodrop"]
    assert n["modules_loaded"]["recipe"] == "nodrop" and n["modules_loaded"]["build_ids"] == nodrop_ids, n
    assert cells["vhost-qlen1000-rtt0-stock"]["boot_id"] == n["boot_id"], "the swap happened in one boot"
    meta = report["run"]
    assert len(meta["lab_session"]["swaps"]) >= 1, meta["lab_session"]
    ctx = LabContext.open(load_config(far_lab.config))
    try:
        far = connect_host(ctx, ctx.cfg.hosts["far"])
        pushed = far.run(["find", "/var/lib/vhost-lab/modules", "-name", "*.ko*"]).stdout.split()
        assert sorted(Path(p).name.split(".ko")[0] for p in pushed if "/6.12.117" in p) >= ["tap", "tun", "vhost", "vhost_net"]
    finally:
        ctx.close()
    _timed("test_ssh_provider_boots_a_guest_and_runs_cells_on_a_remote total", t_all)


def test_kexec_deploy_verifies_and_falls_back(far_lab):
    """kexec into the stock artifact's kernel (a full build takes 20+ minutes here), checked; then a failed check falls back."""
    t_all = time.monotonic()
    from lab.config import load_config
    from lab.errors import LabError
    from lab.hosts.deploy import running_kernel
    from lab.session import LabContext, connect_host, deploy_full, kernel_boot

    # (a guest still running on the box would die with the old kernel: the matrix run destroyed its own)
    ctx = LabContext.open(load_config(far_lab.config))
    try:
        far = connect_host(ctx, ctx.cfg.hosts["far"])
        kb = kernel_boot(ctx, "stock")
        before = running_kernel(far)
        t0 = time.monotonic()
        out = deploy_full(ctx, far, kb, boot_timeout=600, fallback_kb=kb)
        _timed("kexec into stock, verified", t0)
        assert out.before.boot_id == before.boot_id and out.after.boot_id != before.boot_id
        assert out.after.release == kb.release and running_kernel(far).boot_id == out.after.boot_id
        assert out.build_ids == {**out.build_ids, **kb.module_build_ids} and kb.module_build_ids
        assert not out.fell_back
        # the box answers the lab agent after the kexec (its libvirtd restarted with the new boot)
        assert far.probe().release == kb.release

        # A check that fails (the artifact's build-ids are not what runs): kexec back, and say so.
        from dataclasses import replace

        wrong = replace(kb, module_build_ids={m: "00" * 20 for m in kb.module_build_ids})
        first = running_kernel(far)
        t0 = time.monotonic()
        with pytest.raises(LabError, match=r"build-ids.*fell back to 6\.12\.117"):
            deploy_full(ctx, far, wrong, boot_timeout=600, fallback_kb=kb)
        _timed("kexec with a failing check, then the fallback kexec", t0)
        last = running_kernel(far)
        assert last.boot_id not in (first.boot_id, out.after.boot_id), "the fallback is a boot of its own"
        assert far.probe().modules == kb.module_build_ids
    finally:
        ctx.close()
    _timed("test_kexec_deploy_verifies_and_falls_back total", t_all)


# --------------------------------------------------------------------------- two hosts, one matrix, pytest-xdist

TWO_HOSTS = """
[hosts.box1]
provider = "nested"
kernel = "stock"
vcpus = 2
memory_mib = 3072

[hosts.box2]
provider = "nested"
kernel = "stock"
vcpus = 2
memory_mib = 3072

[matrices.spread]
hosts = ["box1", "box2"]
guest = "guest1"
kernels = ["stock", "nodrop"]
backends = ["tap", "vhost"]
txqueuelens = [1000, 1]
rtts_ms = []
repeats = 1
duration_s = 3
warmup_s = 1
"""


def test_two_hosts_one_matrix_with_xdist(tmp_path, e2e_ready):
    """One run, cells spread over two lab hosts by pytest-xdist (one worker per host), results in one run directory."""
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install -e .[test])")
    import os
    import subprocess

    t_all = time.monotonic()
    lab = "rh2"
    cli = LabCli(lab_toml(tmp_path, lab, TWO_HOSTS))
    cli("build", "image", "bookworm", timeout=1800)
    cli("build", "kernel", "stock", "nodrop", timeout=1800)
    from lab.config import load_config
    from lab.measure.cells import assign_hosts
    from lab.measure.matrix import matrix_spec, planned_cells
    from lab.verdicts.results import load_run

    cfg = load_config(cli.config)
    spec = matrix_spec(cfg, "spread")
    plan = planned_cells(cfg, spec)
    where = assign_hosts(plan, spec.run_hosts)
    assert set(where.values()) == {"box1", "box2"}
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path[1:]]), COLUMNS="200")
        argv = [sys.executable, "-m", "pytest", "tests/matrix", "--lab-config", str(cli.config), "--matrix", "spread",
                "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "-v", "-rA"]
        t0 = time.monotonic()
        p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        _timed("pytest -n 2 over two lab hosts", t0)
        print(p.stdout[-6000:], p.stderr[-3000:])
        passed = set(re.findall(r"PASSED tests/matrix/test_vhost_matrix.py::test_cell\[([^\]]+)\]", p.stdout))
        assert passed == {c.id for c in plan}, p.stdout[-4000:]
        # each host's cells ran in one worker, and the two hosts in two workers
        worker_of = {m.group(2): m.group(1) for m in re.finditer(r"\[(gw\d+)\][^\n]*?PASSED [^\n]*?test_cell\[([^\]]+)\]", p.stdout)}
        assert set(worker_of) == {c.id for c in plan}, p.stdout[-4000:]
        per_host = {h: {worker_of[c] for c, hh in where.items() if hh == h} for h in ("box1", "box2")}
        assert all(len(w) == 1 for w in per_host.values()) and per_host["box1"] != per_host["box2"], per_host

        data = load_run(cfg.workdir, "latest")
        assert data.meta.matrix == "spread" and data.warnings == []
        latest = {r.cell: r for r in data.latest()}
        assert set(latest) == {c.id for c in plan}
        for cid, r in latest.items():
            assert r.ok, (cid, r.error)
            assert r.host == where[cid], (cid, r.host, where[cid])  # measured where it was assigned
        # each host's cells come from one boot of that host; the two hosts' boots differ
        boots = {h: {r.boot_id for r in latest.values() if r.host == h} for h in ("box1", "box2")}
        assert all(len(b) == 1 for b in boots.values()) and boots["box1"] != boots["box2"], boots
        # one session per host, in two processes (xdist workers)
        sessions = [s for s in data.meta.extra["sessions"] if isinstance(s, dict)]
        assert {s["host"] for s in sessions} == {"box1", "box2"}
        assert len({s["pid"] for s in sessions}) == 2 and {s["worker"] for s in sessions} == {"gw0", "gw1"}, sessions
        assert set(data.meta.extra["lab_sessions"]) == {"box1", "box2"}
        # every comparison is between cells of one host; nothing refused, since the assignment kept points together
        from lab.verdicts.report import ReportContext, run_comparisons, to_text
        from lab.verdicts.stats import refused

        cmps = run_comparisons(data, ReportContext(None, 0.10, 0.95))
        assert len(cmps) == 4
        summaries = {(s.kernel, s.point): s for s in data.summaries()}
        for c in cmps:
            assert summaries[(c.a, c.point)].hosts == summaries[(c.b, c.point)].hosts
            assert len(summaries[(c.a, c.point)].hosts) == 1
        assert refused(data.summaries(), "stock") == []
        text = to_text(data, [], rc=ReportContext(None, 0.10, 0.95))
        rows = [ln for ln in text.splitlines() if re.match(r"\s*qlen \d", ln)]
        assert any("box1" in ln for ln in rows) and any("box2" in ln for ln in rows), text
    finally:
        cli("down", check=False, timeout=300)
        _timed("test_two_hosts_one_matrix_with_xdist total", t_all)
