"""Quoting against a real sshd on a loopback port of this machine (root): hostile key paths and argv survive ssh.

The pure quoting properties are in tests/unit/test_shell_safety.py; these
start sshd, so they are integration tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lab.hosts.remote import SshEndpoint
from tests.helpers import CONTROL, NASTY, hostile

pytestmark = [pytest.mark.integration]


def _sshd() -> str | None:
    return next((p for p in ("/usr/sbin/sshd", shutil.which("sshd") or "") if p and Path(p).exists()), None)


@pytest.fixture(scope="module")
def real_sshd(tmp_path_factory):
    """An sshd on a loopback port of this machine, with a key under a hostile path."""
    sshd = _sshd()
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-server/openssh-client are not installed")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here")
    base = tmp_path_factory.mktemp("sshd")
    keydir = base / "k%h %% $x 'q\" \\b #c {a,b} ~"
    keydir.mkdir()
    key = keydir / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "hostkey")], check=True)
    (base / "authorized_keys").write_text((keydir / "id.pub").read_text())
    privsep = Path("/run/sshd")
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sshd, "-D", "-e", "-f", "/dev/null", "-p", str(port), "-h", str(base / "hostkey"),
         "-o", "ListenAddress=127.0.0.1", "-o", f"AuthorizedKeysFile={base / 'authorized_keys'}",
         "-o", "StrictModes=no", "-o", "PidFile=none", "-o", "UsePAM=no", "-o", "PermitRootLogin=prohibit-password",
         "-o", "MaxStartups=100"],
        stdout=subprocess.DEVNULL, stderr=open(base / "sshd.log", "w"),
    )
    try:
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (base / "sshd.log").read_text()
                assert time.monotonic() - t0 < 15, "sshd did not listen"
                time.sleep(0.1)
        yield {"port": port, "key": key}
    finally:
        proc.terminate()
        proc.wait(10)
        if made_privsep:
            privsep.rmdir()


def _run_remote(ep: SshEndpoint, argv: list[str]) -> list[str]:
    prog = "import sys, json; print(json.dumps(sys.argv[1:]))"
    cmd = ep.ssh_argv([sys.executable, "-c", prog, *argv])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{cmd}\n{p.stderr}"
    return json.loads(p.stdout)


def test_real_ssh_with_hostile_key_path_and_argv(real_sshd):
    """The key path has %, spaces, quotes, $, # and a backslash; the argv everything sh reads."""
    ep = SshEndpoint("127.0.0.1", real_sshd["port"], "root", real_sshd["key"], connect_timeout=10)
    argv = [a for a in NASTY if not CONTROL.search(a)]
    assert _run_remote(ep, argv) == argv


def test_real_ssh_through_a_jump(real_sshd):
    """ProxyCommand (itself a shell line with %-tokens) carries the hostile key path intact."""
    jump = SshEndpoint("127.0.0.1", real_sshd["port"], "root", real_sshd["key"], connect_timeout=10)
    ep = SshEndpoint("127.0.0.1", real_sshd["port"], "root", real_sshd["key"], jump=jump, connect_timeout=10)
    argv = [a for a in NASTY if not CONTROL.search(a)]
    assert _run_remote(ep, argv) == argv


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(hostile, min_size=1, max_size=4))
def test_real_ssh_round_trips_any_argv(real_sshd, argv):
    assume(not any(CONTROL.search(a) for a in argv))
    ep = SshEndpoint("127.0.0.1", real_sshd["port"], "root", real_sshd["key"], connect_timeout=10)
    assert _run_remote(ep, argv) == argv


def test_real_ssh_local_forward_with_percent_in_path(real_sshd, tmp_path):
    """The libvirt socket forward (-L path:...) is %-expanded by ssh: the lab escapes it."""
    from lab.hosts.remote import ssh_escape

    ep = SshEndpoint("127.0.0.1", real_sshd["port"], "root", real_sshd["key"], connect_timeout=10)
    sock = tmp_path / "fwd%h%p.sock"
    argv = ep.ssh_argv()[:-1] + ["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{ssh_escape(str(sock))}:/tmp/vhr-nothing.sock",
                                 "root@127.0.0.1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while not sock.exists() and proc.poll() is None and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        assert sock.exists(), f"forward socket not at {sock}: {sorted(p.name for p in tmp_path.iterdir())}"
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------- traffic argv


