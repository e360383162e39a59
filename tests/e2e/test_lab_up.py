"""The lab exists: `lab up`, a shell in guest1 on tap + vhost_net, `lab down` leaves nothing."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.e2e.conftest import LabCli, make_lab_toml

pytestmark = pytest.mark.slow


def _outer_domains(prefix: str) -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True, check=True)
    return [n for n in out.stdout.split() if n.startswith(prefix + "-")]


BROKEN_GUEST = """
[images.broken]
recipe = "{recipe}"

[guests.guest2]
host = "lab1"
image = "broken"
memory_mib = 512
"""


def test_up_shell_status_down(test_lab, tmp_path):
    t0 = time.monotonic()
    test_lab("up")
    up_s = time.monotonic() - t0
    print(f"lab up: {up_s:.1f}s")

    # A shell in the guest: its NIC is up, its kernel is the lab's.
    p = test_lab("shell", "guest1", "--", "cat", "/sys/class/net/eth0/operstate")
    assert p.stdout.strip() == "up"
    p = test_lab("shell", "guest1", "--", "uname", "-r")
    assert p.stdout.strip() == "6.12.117+deb12-amd64"
    # `lab shell NAME -- CMD` returns CMD's exit code.
    p = test_lab("shell", "guest1", "--", "sh", "-c", "exit 7", check=False)
    assert p.returncode == 7

    # The guest's QEMU on the lab host holds /dev/vhost-net, and the host
    # runs the vhost worker for it (a thread of QEMU since vhost_task: 6.4+).
    p = test_lab("shell", "lab1", "--", "sh", "-c",
                 "for p in $(pgrep -f guest=vht-guest1,); do ls -l /proc/$p/fd; done; ps -eLo comm")
    assert "/dev/vhost-net" in p.stdout
    assert re.search(r"(?m)^vhost-\d+", p.stdout), p.stdout

    # A `lab up` that fails (a second guest whose image recipe is broken) leaves what it did not start.
    recipe = tmp_path / "broken.toml"
    recipe.write_text('name = "broken"\nsuite = "bookworm"\npackages = ["iperf3"]\ninit = "missing-init.sh"\n')
    broken = LabCli(make_lab_toml(tmp_path, "vht", BROKEN_GUEST.format(recipe=recipe)))
    p = broken("up", "guest2", check=False)
    assert p.returncode == 2 and "broken.toml" in p.stderr, p.stderr
    assert test_lab("shell", "guest1", "--", "true", check=False).returncode == 0, "guest1 was taken down"
    assert "vht-lab1" in _outer_domains("vht")

    status = test_lab("status").stdout
    assert "vht-guest1" in status and "1000" in status, status
    row = next(line for line in status.splitlines() if "vht-guest1" in line)
    assert "running" in row and "vhost" in row and " on " in f" {row} ", row

    # Idempotent teardown that leaves no domain (and so no tap: taps live
    # inside the lab host VM, which is gone).
    test_lab("down")
    assert _outer_domains("vht") == []
    test_lab("down")
    assert _outer_domains("vht") == []
    leftover = subprocess.run(["pgrep", "-af", "vht/hosts"], capture_output=True, text=True).stdout
    assert leftover == "", f"processes left behind: {leftover}"
