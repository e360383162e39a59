"""Faults done for real to a test lab ("vhr"): nothing leaks, nothing is lost, bad input is refused.

Every VM test drives the real CLI (or the real lifecycle API) on the nested
provider and then looks for anything of the lab left on this machine: libvirt
domains named "vhr-*", processes mentioning the lab (QEMU, ssh port/socket
forwarders, CLI processes), files under /tmp, /dev/shm, /run/netns, and stale
runtime files in the lab's state directory. What each fault left behind is
printed (run with -s to see it) and must be nothing.

Slow tests boot one lab host (TCG) and at most one guest inside it. Every wait
is bounded by an explicit subprocess timeout or deadline (no pytest-timeout).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

try:
    from tests.e2e.conftest import LabCli, make_lab_toml
except ImportError:  # tests/ not a package: conftest is on sys.path directly
    from conftest import LabCli, make_lab_toml  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
LAB = "vhr"  # this suite's lab; "vhs" is the second lab of the isolation test
OTHER = "vhs"
slow = pytest.mark.slow


# --------------------------------------------------------------------------- what is left behind


def outer_domains(prefix: str) -> list[str]:
    """This machine's libvirt domains of lab `prefix` (active or not)."""
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True,
                         timeout=60, check=True)
    return sorted(n for n in out.stdout.split() if n.startswith(prefix + "-"))


def domain_state(name: str) -> str:
    p = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", name], capture_output=True, text=True, timeout=60)
    return p.stdout.strip() if p.returncode == 0 else "absent"


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def lab_processes(lab: str) -> list[str]:
    """Processes on this machine that belong to lab `lab`: its QEMU, ssh forwarders
    and sessions (they name the lab's key or state dir), iperf3, CLI processes."""
    mine = _ancestors()
    pat = re.compile(rf"guest={lab}-|/{lab}/|\b{lab}\.toml\b|\b{lab}-(lab1|guest1)\b")
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, timeout=30).stdout
    found = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if int(pid) in mine or args.startswith("ps "):
            continue
        if pat.search(args):
            found.append(f"{pid} {args[:200]}")
    return found


def stray_files(lab: str) -> list[str]:
    """Files of the lab outside its workdir."""
    pats = [f"/tmp/{lab}*", f"/dev/shm/{lab}*", f"/run/netns/{lab}*", f"/run/libvirt/qemu/{lab}-*",
            f"/var/run/libvirt/qemu/{lab}-*"]
    return sorted({os.path.realpath(p) for pat in pats for p in glob.glob(pat)})


# The state directory may keep evidence (console logs, the public key the lab
# host admits, libvirt's capability cache); runtime files mean "still running".
STATE_KEEP = re.compile(r"(^|/)(console\.log|authorized_keys|guests|guests/[^/]+\.console\.log|libvirt-capabilities(/.*)?)$")


def stale_state(workdir: Path, lab: str) -> list[str]:
    hosts = workdir / lab / "hosts"
    if not hosts.is_dir():
        return []
    out = []
    for h in sorted(hosts.iterdir()):
        if not h.is_dir():
            out.append(str(h))
            continue
        out += [str(p) for p in sorted(h.rglob("*")) if not STATE_KEEP.search(p.relative_to(h).as_posix())]
    return out


def leftovers(lab: str, workdir: Path) -> dict[str, list[str]]:
    return {
        "domains": outer_domains(lab),
        "processes": lab_processes(lab),
        "files outside the workdir": stray_files(lab),
        "stale runtime files in the workdir": stale_state(workdir, lab),
    }


def assert_nothing_left(lab: str, workdir: Path, what: str, grace: float = 45.0) -> None:
    """Everything of the lab gone within `grace` seconds (processes may take a moment to exit)."""
    deadline = time.monotonic() + grace
    while True:
        left = leftovers(lab, workdir)
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"\n[{what}] left behind: " + (json.dumps({k: v for k, v in left.items() if v}, indent=2) if any(left.values()) else "nothing"))
    assert not any(left.values()), f"{what}: left behind {left}"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lab_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    return {"vhr": make_lab_toml(d, LAB), "vhs": make_lab_toml(d, OTHER)}


@pytest.fixture(scope="module")
def workdir(lab_files) -> Path:
    from lab.config import load_config

    return load_config(lab_files["vhr"]).workdir


@pytest.fixture(scope="module")
def vhr(e2e_ready, lab_files, workdir):
    """The CLI of lab "vhr"; the lab is down before and after the module, whatever happened."""
    cli = LabCli(lab_files["vhr"])
    cli("down", check=False, timeout=300)
    yield cli
    cli("down", check=False, timeout=300)
    print(f"\n[module end] left behind: {leftovers(LAB, workdir)}")


def _lab_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")


def _start_up(config: Path, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "lab.cli", "-c", str(config), "up"], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=_lab_env())


def _guest_console(workdir: Path) -> Path:
    return workdir / LAB / "hosts" / "lab1" / "guests" / "guest1.console.log"


def _wait_stage(p: subprocess.Popen, stage: str, workdir: Path, log: Path) -> None:
    """Until `lab up` reached `stage`: "host-booting" (the lab host domain exists)
    or "guest-booting" (the guest's serial console has output)."""
    def alive_and(cond):
        def check():
            if p.poll() is not None:
                raise AssertionError(f"lab up ended early ({p.returncode}):\n{log.read_text()}")
            return cond()
        return check

    wait_until(alive_and(lambda: f"{LAB}-lab1" in outer_domains(LAB)), 600, "the lab host domain")
    if stage == "host-booting":
        time.sleep(3)  # inside boot_host's wait for the host's readiness
        return
    console = _guest_console(workdir)
    wait_until(alive_and(lambda: console.exists() and console.stat().st_size > 0), 900, "the guest's console output")


# --------------------------------------------------------------------------- a. Ctrl-C during `lab up`


@slow
@pytest.mark.parametrize("stage", ["host-booting", "guest-booting"])
def test_sigint_during_up_leaves_nothing(vhr, lab_files, workdir, tmp_path, stage):
    _guest_console(workdir).unlink(missing_ok=True)
    log = tmp_path / "up.log"
    t0 = time.monotonic()
    p = _start_up(lab_files["vhr"], log)
    try:
        _wait_stage(p, stage, workdir, log)
        print(f"\n[sigint {stage}] SIGINT after {time.monotonic() - t0:.0f}s")
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    out = log.read_text()
    print(f"[sigint {stage}] exit {rc} after {time.monotonic() - t0:.0f}s; output tail:\n{textwrap.indent(out[-800:], '  ')}")
    assert rc in (130, 2), out
    assert "Traceback" not in out, out
    assert "cleaning up" in out and "interrupted" in out, out
    assert_nothing_left(LAB, workdir, f"SIGINT while {stage}")


# --------------------------------------------------------------------------- b. kill -9 of `lab up`, then `lab down`


@slow
def test_kill9_during_up_then_down_leaves_nothing(vhr, lab_files, workdir, tmp_path):
    _guest_console(workdir).unlink(missing_ok=True)
    log = tmp_path / "up.log"
    p = _start_up(lab_files["vhr"], log)
    try:
        _wait_stage(p, "guest-booting", workdir, log)
        p.kill()
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    # What a kill -9 leaves (no handler ran): the report; `lab down` must clear all of it.
    time.sleep(2)
    print(f"\n[kill -9 of lab up] before lab down: {json.dumps(leftovers(LAB, workdir), indent=2)}")
    assert outer_domains(LAB) == [f"{LAB}-lab1"]
    t0 = time.monotonic()
    d = vhr("down", timeout=300)
    print(f"[kill -9 of lab up] lab down in {time.monotonic() - t0:.1f}s: {d.stdout.strip()}")
    assert f"lab host {LAB}-lab1" in d.stdout
    assert_nothing_left(LAB, workdir, "kill -9 of lab up, then lab down")
    again = vhr("down", timeout=300)
    assert "nothing was running" in again.stdout


# --------------------------------------------------------------------------- c. a guest that hangs, then crashes


@slow
def test_hung_guest_is_bounded_then_crash_is_seen(vhr, lab_files, workdir):
    from lab.config import load_config
    from lab.hosts.remote import ABORT_GRACE_S, SshRunner
    from lab.lifecycle import guest_ssh_endpoint
    from lab.session import LabContext

    t0 = time.monotonic()
    vhr("up", timeout=1200)
    print(f"\n[hang] lab up in {time.monotonic() - t0:.0f}s")
    ctx = LabContext.open(load_config(lab_files["vhr"]))
    try:
        ep = guest_ssh_endpoint(ctx, "guest1")
        runner = SshRunner(ep, 10)
        assert runner.run(["true"], timeout=60).rc == 0  # a live connection, then the guest freezes under it
        vhr("shell", "lab1", "--", "virsh", "suspend", f"{LAB}-guest1", timeout=120)
        assert "paused" in vhr("shell", "lab1", "--", "virsh", "domstate", f"{LAB}-guest1", timeout=120).stdout

        # 1. a command on the open connection: bounded by its timeout (+ the watchdog's grace)
        t = time.monotonic()
        res = runner.run(["true"], timeout=10, check=False)
        took = time.monotonic() - t
        print(f"[hang] open connection: rc {res.rc} in {took:.1f}s: {res.stderr}")
        assert res.rc == 124 and "timed out" in res.stderr
        assert took <= 10 + ABORT_GRACE_S + 3

        # 2. a fresh connection: bounded by timeout + connect_timeout per hop
        fresh = SshRunner(ep, 10)
        t = time.monotonic()
        res = fresh.run(["true"], timeout=10, check=False)
        took = time.monotonic() - t
        print(f"[hang] fresh connection: rc {res.rc} in {took:.1f}s: {res.stderr}")
        assert res.rc in (124, 255) and res.stderr
        assert took <= 10 + ABORT_GRACE_S + 2 * ep.connect_timeout + 5
        fresh.close()

        # 3. `lab shell guest1 -- true`: ssh's own ConnectTimeout bounds it; it says why
        t = time.monotonic()
        p = vhr("shell", "guest1", "--", "true", check=False, timeout=150)
        took = time.monotonic() - t
        print(f"[hang] lab shell: exit {p.returncode} in {took:.1f}s: {p.stderr.strip()}")
        assert p.returncode == 255 and p.stderr.strip()
        assert took <= ep.connect_timeout + 30

        # the lab host itself is unaffected
        assert vhr("shell", "lab1", "--", "true", timeout=120).returncode == 0

        vhr("shell", "lab1", "--", "virsh", "resume", f"{LAB}-guest1", timeout=120)
        wait_until(lambda: vhr("shell", "guest1", "--", "true", check=False, timeout=120).returncode == 0, 240,
                   "the resumed guest to answer SSH", interval=2)
        res = runner.run(["uname", "-r"], timeout=60)  # the runner reconnects after its abort
        assert res.rc == 0 and res.stdout.strip()
        runner.close()

        def transports() -> list[str]:
            # paramiko's Transport is a Thread; close() does not join it, so give it a moment
            return [repr(t) for t in threading.enumerate() if "paramiko" in repr(t).lower()]
        try:
            wait_until(lambda: not transports(), 15, "paramiko transports to end after close")
        except AssertionError:
            pytest.fail(f"SSH connections left open after close: {transports()}")
    finally:
        ctx.close()

    # Crash the guest: the panic is in its console log, status says down, down cleans.
    t = time.monotonic()
    p = vhr("shell", "guest1", "--", "sh", "-c", "echo c > /proc/sysrq-trigger", check=False, timeout=150)
    print(f"[crash] lab shell returned {p.returncode} in {time.monotonic() - t:.0f}s: {p.stderr.strip()[-200:]}")
    assert p.returncode != 0
    console = wait_until(lambda: (c := vhr("console", "guest1", check=False, timeout=60).stdout) and "Kernel panic" in c and c,
                         120, "the panic in the guest's console log", interval=2)
    print("[crash] console: " + " | ".join(line for line in console.splitlines() if "panic" in line.lower() or "sysrq" in line.lower())[:400])
    assert "sysrq" in console.lower()

    def guest_down():
        status = vhr("status", timeout=300).stdout
        row = next((line for line in status.splitlines() if "guest1" in line), "")
        return "down" in row and status
    status = wait_until(guest_down, 120, "lab status to show guest1 down", interval=3)
    host_row = next(line for line in status.splitlines() if "lab1" in line and "nested" in line)
    assert " up " in f" {host_row} ", status  # the host survives its guest's crash
    d = vhr("down", timeout=300)
    print(f"[crash] lab down: {d.stdout.strip()}")
    assert_nothing_left(LAB, workdir, "guest hang + crash, then lab down")


# --------------------------------------------------------------------------- d/e. a lab host only; two labs; the host dies


@pytest.fixture(scope="module")
def vhr_host(vhr, lab_files, workdir):
    """Lab "vhr" with its lab host only (lifecycle.up_host: no guest), in this process."""
    from lab.config import load_config
    from lab.lifecycle import down
    from lab.session import LabContext, up_host

    ctx = LabContext.open(load_config(lab_files["vhr"]))
    t0 = time.monotonic()
    try:
        host = up_host(ctx, ctx.cfg.hosts["lab1"])
        print(f"\n[host only] up_host in {time.monotonic() - t0:.0f}s")
        yield ctx, host
    finally:
        ctx.close()
        down(ctx)


@slow
def test_two_labs_do_not_touch_each_other(vhr_host, lab_files, workdir):
    ctx, host = vhr_host
    other = LabCli(lab_files["vhs"])
    assert host.run(["true"], timeout=60).rc == 0
    before = outer_domains(LAB)
    d = other("down", timeout=300)
    assert "nothing was running" in d.stdout, d.stdout
    s = other("status", timeout=300).stdout
    assert f"{LAB}-" not in s and "lab vhs" in s
    assert outer_domains(LAB) == before == [f"{LAB}-lab1"]
    assert domain_state(f"{LAB}-lab1") == "running"
    assert host.run(["true"], timeout=60).rc == 0
    assert host.call(["probe"], timeout=120)["release"]
    assert LabCli(lab_files["vhr"])("status", timeout=300).stdout.count(" up ") >= 1
    assert outer_domains(OTHER) == []
    print(f"\n[two labs] lab vhs down/status left vhr running: {outer_domains(LAB)}")


@slow
def test_lab_host_freezes_while_connected(vhr_host, lab_files):
    """A paused lab host (its QEMU still accepts TCP on the forward, nothing answers):
    every call ends within its bound with a LabError; after resume everything works again."""
    from lab.errors import HostGone, LabError
    from lab.hosts.remote import ABORT_GRACE_S

    ctx, host = vhr_host
    cli = LabCli(lab_files["vhr"])
    assert host.call(["probe"], timeout=120)["release"]
    assert host.run(["true"], timeout=60).rc == 0
    subprocess.run(["virsh", "-c", "qemu:///system", "suspend", f"{LAB}-lab1"], check=True, timeout=120, capture_output=True)
    try:
        connect = host.endpoint().connect_timeout
        t = time.monotonic()
        with pytest.raises(LabError) as err:
            host.call(["probe"], timeout=10)  # the agent session is open: its reply never comes
        took = time.monotonic() - t
        print(f"\n[host frozen] agent on the open session: {type(err.value).__name__} in {took:.1f}s: {err.value}")
        assert took <= 10 + 5

        t = time.monotonic()
        with pytest.raises(LabError) as err:
            host.run(["true"], timeout=10)
        took = time.monotonic() - t
        print(f"[host frozen] run on the open connection: in {took:.1f}s: {err.value}")
        assert took <= 10 + ABORT_GRACE_S + connect + 5

        t = time.monotonic()
        with pytest.raises((HostGone, LabError)) as err:
            host.call(["probe"], timeout=10)  # a new session: connect, exec, then "does the host answer?"
        took = time.monotonic() - t
        print(f"[host frozen] agent, new session: {type(err.value).__name__} in {took:.1f}s: {err.value}")
        assert took <= (2 * connect + ABORT_GRACE_S) + (30 + ABORT_GRACE_S + connect) + 10

        t = time.monotonic()
        p = cli("status", timeout=600, check=False)
        took = time.monotonic() - t
        row = next((line for line in p.stdout.splitlines() if "lab1" in line and "nested" in line), p.stdout + p.stderr)
        print(f"[host frozen] lab status: exit {p.returncode} in {took:.1f}s: {row.strip()}")
        assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr
        assert "unreachable" in row or "down" in row
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "resume", f"{LAB}-lab1"], timeout=120, capture_output=True)
    wait_until(lambda: host.run(["true"], timeout=30, check=False).rc == 0, 180, "the resumed host to answer", interval=2)
    assert host.call(["probe"], timeout=120)["release"]
    assert cli("status", timeout=300).stdout.count(" up ") >= 1


@slow
def test_lab_host_dies_while_connected(vhr_host, lab_files, workdir):
    from lab.errors import HostGone, LabError
    from lab.guests import list_lab_guests

    ctx, host = vhr_host
    cli = LabCli(lab_files["vhr"])
    assert host.call(["probe"], timeout=120)["release"]
    assert list_lab_guests(host, LAB) == []  # opens the libvirt socket forwarder (an ssh -L process)
    assert lab_processes(LAB), "expected the lab host's QEMU and the forwarder"

    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", f"{LAB}-lab1"], check=True, timeout=120, capture_output=True)

    t = time.monotonic()
    with pytest.raises((HostGone, LabError)) as err:
        host.call(["probe"], timeout=20)
    took = time.monotonic() - t
    print(f"\n[host dies] agent: {type(err.value).__name__} in {took:.1f}s: {err.value}")
    assert took <= 20 + 30 + 10

    t = time.monotonic()
    with pytest.raises(LabError) as err:
        host.run(["true"], timeout=10)
    took = time.monotonic() - t
    print(f"[host dies] run: {type(err.value).__name__} in {took:.1f}s: {err.value}")
    assert took <= 10 + 30 + 5

    t = time.monotonic()
    with pytest.raises((HostGone, LabError)) as err:
        list_lab_guests(host, LAB)
    print(f"[host dies] libvirt: {type(err.value).__name__} in {time.monotonic() - t:.1f}s: {err.value}")

    status = cli("status", timeout=300).stdout
    row = next(line for line in status.splitlines() if "lab1" in line and "nested" in line)
    assert "down" in row, status
    ctx.close()  # what the lab's own process holds (the forwarder) goes with it
    d1 = cli("down", timeout=300)
    d2 = cli("down", timeout=300)
    assert d1.returncode == d2.returncode == 0 and "nothing was running" in d2.stdout
    assert_nothing_left(LAB, workdir, "lab host destroyed under a connected lab")


# --------------------------------------------------------------------------- e. taps of two labs on one machine


def test_tap_cleanup_by_prefix_touches_only_its_own_lab(e2e_ready):
    """Taps of labs vhr, vhs and vhr2 (a lab whose name starts like vhr's) in one
    namespace: listing and cleaning up vhr's (as lab down does, by "<lab>-") leaves the others."""
    from lab.onhost import net

    ns = f"{LAB}-iso-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        names = [f"{LAB}-guest1", f"{LAB}-guest2", f"{OTHER}-guest1", f"{LAB}2-guest1", f"{LAB}x"]
        for n in names:
            net.create_tap(net.TapDevice(name=n, txqueuelen=10, netns=ns))
        # a device with the lab's prefix that is not a tap (no dummy module here: a veth pair)
        subprocess.run(["ip", "-n", ns, "link", "add", f"{LAB}-veth0", "type", "veth", "peer", "name", f"{LAB}-veth1"],
                       check=True, timeout=30)
        assert [t.name for t in net.list_taps(f"{LAB}-", netns=ns)] == [f"{LAB}-guest1", f"{LAB}-guest2"]
        # the cleanup lab down runs on a host, through the real agent
        env = dict(os.environ, PYTHONPATH=str(REPO))

        def agent(*args: str) -> dict:
            p = subprocess.run([sys.executable, "-m", "lab.onhost.agent", "--netns", ns, *args], capture_output=True, text=True,
                               timeout=60, env=env)
            return json.loads(p.stdout)

        for tap in agent("tap-list", "--prefix", f"{LAB}-")["taps"]:
            agent("tap-delete", "--name", tap["name"])
        left = sorted(t.name for t in net.list_taps("v", netns=ns))
        assert left == sorted([f"{LAB}2-guest1", f"{OTHER}-guest1", f"{LAB}x"])
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, timeout=30).stdout
        assert f"{LAB}-veth0" in links  # not a tap: never listed, never deleted
        with pytest.raises(ValueError):
            net.list_taps("", netns=ns)  # an empty prefix would sweep every tap
        err = agent("tap-delete", "--name", f"{LAB}-veth0")
        assert "error" in err and "not a tap" in err["error"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
    assert not Path(f"/run/netns/{ns}").exists()


# --------------------------------------------------------------------------- f. results survive a crash

WRITER = textwrap.dedent(
    """
    import sys, time
    from lab.verdicts.results import CellResult, RunMeta, RunStore
    store = RunStore(sys.argv[1])
    store.create(RunMeta(run_id="r1", matrix="m", planned=[f"c{i}" for i in range(1000)]))
    i = 0
    while True:
        store.append(CellResult(cell=f"c{i}", kernel="stock", backend="vhost", txqueuelen=1, rtt_ms=0,
                                throughput_mbps=float(i), commands=[["iperf3", "-c", "10.99.1.2"]]))
        print(i, flush=True)
        i += 1
        if i % 7 == 0:
            meta = store.read_meta(); meta.extra["progress"] = i; store.write_meta(meta)
    """
)


def test_results_survive_kill9_and_a_torn_line(tmp_path):
    from lab.verdicts.results import CellResult, RunStore

    run_dir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    reported = -1
    try:
        t0 = time.monotonic()
        while reported < 50 and time.monotonic() - t0 < 60:
            line = p.stdout.readline()
            if not line:
                break
            reported = int(line)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait(30)
    assert reported >= 50, "the writer did not get going"

    data = RunStore(run_dir).load()
    ids = [r.cell for r in data.results]
    # every append the writer reported done is there (fsync before returning), in order, once
    assert ids[: reported + 1] == [f"c{i}" for i in range(reported + 1)]
    assert len(ids) == len(set(ids)) and len(ids) <= reported + 2
    assert data.warnings == [], data.warnings
    assert data.meta.run_id == "r1"  # meta.json is replaced atomically: always whole
    tmp_left = sorted(p.name for p in run_dir.iterdir() if p.name not in ("meta.json", "results.jsonl", "logs"))
    print(f"\n[results kill -9] {len(ids)} results after {reported + 1} reported; other files in the run dir: {tmp_left}")

    # a torn last line (a crash inside write()): ignored with a warning, nothing else lost
    with open(run_dir / "results.jsonl", "ab") as f:
        f.write(b'{"cell":"torn","kernel":"sto')
    data = RunStore(run_dir).load()
    assert [r.cell for r in data.results] == ids
    assert len(data.warnings) == 1 and "torn last line ignored" in data.warnings[0]

    # the next append starts on a fresh line: the new result is whole, the fragment stays skipped
    RunStore(run_dir).append(CellResult(cell="after", kernel="stock", backend="vhost", txqueuelen=1, rtt_ms=0))
    data = RunStore(run_dir).load()
    assert [r.cell for r in data.results] == ids + ["after"]
    assert len(data.warnings) == 1 and "corrupt line skipped" in data.warnings[0]


# --------------------------------------------------------------------------- g. missing pieces


def _stripped_path(tmp_path: Path, without: set[str]) -> str:
    """A PATH with every tool of /usr/bin, /bin, /usr/sbin, /sbin except `without`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for exe in Path(d).glob("*"):
            if exe.name in without or (bindir / exe.name).exists():
                continue
            if exe.is_file() and os.access(exe, os.X_OK):
                (bindir / exe.name).symlink_to(exe)
    return str(bindir)


def test_doctor_names_the_fix_for_missing_tools(tmp_path):
    """The real `lab doctor` on a machine without iperf3 and QEMU (PATH without them)."""
    missing = {"iperf3", "qemu-system-x86_64", "qemu-img"}
    if not all(shutil.which(t) for t in missing):
        pytest.skip("iperf3/qemu are not installed here: nothing to hide")
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="400", PATH=_stripped_path(tmp_path, missing))
    p = subprocess.run([sys.executable, "-m", "lab.cli", "doctor"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    row = next(line for line in p.stdout.splitlines() if "tools" in line)
    assert "FAIL" in row and "apt-get install iperf3 qemu-system-x86 qemu-utils" in row, row
    # with everything on PATH the same check is fine
    p = subprocess.run([sys.executable, "-m", "lab.cli", "doctor"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="400"))
    assert "FAIL" not in next(line for line in p.stdout.splitlines() if "tools" in line)


def _nobody_python() -> list[str] | None:
    """`setpriv ... env PYTHONPATH=... PYTHON`: an interpreter user nobody may run with
    the lab's dependencies (this venv's own may sit under root's 0700 home), or None."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return None
    import libvirt

    site = str(Path(libvirt.__file__).parent)
    for py in (sys.executable, "/usr/bin/python3"):
        argv = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env", f"PYTHONPATH={REPO}:{site}", py]
        p = subprocess.run(argv + ["-c", "import lab, libvirt, fabric, rich, sys; print(tuple(sys.version_info[:2]))"],
                           capture_output=True, text=True, timeout=60, cwd="/")
        if p.returncode == 0 and p.stdout.strip() == str(tuple(sys.version_info[:2])):
            return argv
    return None


@pytest.fixture
def as_nobody(tmp_path):
    """(run, home, cfg): run(args, env) runs `python -m lab.cli -c cfg args` as user nobody."""
    import tempfile

    base = _nobody_python()
    if base is None:
        pytest.skip("no interpreter with the lab's packages that user nobody may run")
    home = Path(tempfile.mkdtemp(prefix="lab-nobody-"))  # pytest's tmp dirs are root-only
    try:
        cfg = home / f"{OTHER}.toml"
        text = make_lab_toml(tmp_path, OTHER).read_text()
        cfg.write_text(re.sub(r'(?m)^workdir = .*$', f'workdir = "{home / "work"}"', text))
        subprocess.run(["chown", "-R", "nobody:nogroup", str(home)], check=True, timeout=30)
        os.chmod(home, 0o755)

        def run(args: list[str], env: list[str] = (), prefix: list[str] = ()) -> subprocess.CompletedProcess:
            argv = base[:5] + [f"HOME={home}", *env] + base[5:] + ["-m", "lab.cli", "-c", str(cfg), *args]
            return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120, cwd=home)

        yield run, home, cfg
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_non_root_user_is_told_to_run_as_root(as_nobody):
    """Real libvirtd, real CLI, user nobody: one line, the right fix, nothing built or started."""
    run, home, cfg = as_nobody
    for cmd in ("up", "down"):
        p = run([cmd])
        lines = p.stderr.splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert "cannot connect to libvirtd" in lines[0] and "run lab as root" in lines[0], lines[0]
    built = sorted(p.name for p in (home / "work").iterdir())
    assert built == [OTHER], f"`lab up` as non-root created {built} before refusing"  # only the key pair
    assert outer_domains(OTHER) == []


@pytest.mark.parametrize("daemon", ["virtlogd", "libvirtd"])
def test_daemon_not_running_as_non_root_names_the_command(as_nobody, daemon):
    """libvirtd (or virtlogd) not running, non-root: MissingPiece naming `<daemon> -d`.

    The daemons do run on this shared machine (and must stay up), so the CLI
    runs in a PID namespace of its own (its /proc shows no daemon), with a
    stand-in process named after the daemon that is "running" (virtlogd, when
    libvirtd is the one missing): the lab's check reads /proc, the rest is the
    real code."""
    run, home, cfg = as_nobody
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) on this machine")
    stand_in = ""
    if daemon == "libvirtd":
        stand_in = str(home / "virtlogd")
        shutil.copy("/bin/sleep", stand_in)
    script = '[ -n "$1" ] && "$1" 120 & shift; exec "$@"'
    p = run(["down"], prefix=[unshare, "--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh", stand_in])
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert f"{daemon} is not running" in lines[0] and f"{daemon} -d" in lines[0], lines[0]


# --------------------------------------------------------------------------- f. a matrix run killed with -9, then --resume

# A small profile of the real matrix: one lab host boot, one guest boot, three cells.
FAULTS_PROFILE = """
[matrices.vhost-matrix.profiles.faults]
kernels = ["stock"]
backends = ["vhost"]
txqueuelens = [1000, 100, 1]
rtts_ms = []
duration_s = 3
repeats = 1
"""


def _runs_of(workdir: Path, config: Path) -> list[Path]:
    """Run directories written by `config` (the runs dir is shared with other labs)."""
    out = []
    for meta in sorted((workdir / "runs").glob("*/meta.json")):
        try:
            m = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if m.get("lab_name") == LAB and m.get("config_path") == str(config):
            out.append(meta.parent)
    return out


@slow
def test_matrix_kill9_then_resume_records_every_cell_once(vhr, workdir, tmp_path):
    from lab.config import load_config
    from lab.measure.cells import expand
    from lab.verdicts.results import RunStore

    config = make_lab_toml(tmp_path, LAB, extra=FAULTS_PROFILE)
    spec = load_config(config).matrices["vhost-matrix"].with_profile("faults")
    planned = [c.id for c in expand(spec)]
    cli = LabCli(config)
    log = tmp_path / "run.log"
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "lab.cli", "-c", str(config), "run", "vhost-matrix", "--profile", "faults"],
                         stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_lab_env())
    try:
        def first_cell():
            if p.poll() is not None:
                raise AssertionError(f"lab run ended early ({p.returncode}):\n{log.read_text()}")
            runs = _runs_of(workdir, config)
            if runs and (runs[-1] / "results.jsonl").exists():
                return runs[-1] if (runs[-1] / "results.jsonl").read_bytes().count(b"\n") >= 1 else None
            return None
        run_dir = wait_until(first_cell, 1200, "the first cell's result line", interval=0.5)
        p.kill()
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    killed = RunStore(run_dir).load()
    print(f"\n[matrix kill -9] after {time.monotonic() - t0:.0f}s: {[r.cell for r in killed.results]} recorded; "
          f"left: {json.dumps({k: v for k, v in leftovers(LAB, workdir).items() if v})}")
    assert killed.warnings == [] and 1 <= len(killed.results) < len(planned)

    t1 = time.monotonic()
    r = cli("run", "vhost-matrix", "--resume", run_dir.name, check=False, timeout=1800)
    print(f"[matrix resume] exit {r.returncode} in {time.monotonic() - t1:.0f}s; tail:\n{textwrap.indent(r.stdout[-600:], '  ')}")
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: a property failed (one kernel only), not a crash
    assert "Traceback" not in r.stdout + r.stderr

    data = RunStore(run_dir).load()
    latest = [x.cell for x in data.latest()]
    attempts = [x.cell for x in data.results]
    print(f"[matrix resume] attempts {attempts}; latest {[(x.cell, x.status) for x in data.latest()]}")
    assert data.warnings == []
    # every planned cell once, in the order the run scheduled them (interleaved,
    # so not expand()'s declaration order)
    assert sorted(latest) == sorted(planned) and latest == data.meta.planned
    assert all(x.ok for x in data.latest()), [(x.cell, x.error) for x in data.latest() if not x.ok]
    # cells recorded before the kill were not run again
    assert attempts[: len(killed.results)] == [x.cell for x in killed.results]
    assert sorted(attempts) == sorted(set(attempts))
    assert len(data.meta.extra.get("resumed", [])) == 1

    cli("down", timeout=300)
    assert_nothing_left(LAB, workdir, "matrix kill -9, --resume, lab down")
    # the runs directory is shared by every lab of the workdir: this test's run
    # must not become the user's `lab report latest`
    shutil.rmtree(run_dir)
