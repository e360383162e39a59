"""lab.artifacts.image for real: mmdebstrap from Debian's mirror -> ext4 -> qcow2, checked with debugfs.

Needs root, mmdebstrap, e2fsprogs, qemu-utils and Debian's mirror. A cold build
takes about half a minute here. Set VHOST_LAB_WORKDIR to reuse a cache
directory between runs (the image is then built once).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lab.artifacts.image import build_image, load_recipe
from lab.errors import ConfigError, LabError
from lab.hosts.sshkeys import ensure_keypair

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "images" / "bookworm.toml"
TOOLS = ("mmdebstrap", "mke2fs", "debugfs", "qemu-img", "ssh-keygen")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="image builds need root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    env = os.environ.get("VHOST_LAB_WORKDIR")
    workdir = Path(env).expanduser() if env else tmp_path_factory.mktemp("imgwd")
    kp = ensure_keypair(workdir, "vhltst")
    t0 = time.monotonic()
    img = build_image(RECIPE, workdir, kp.public_key_text(), timeout=1800)
    return img, kp, workdir, time.monotonic() - t0


@pytest.fixture(scope="module")
def raw(built, tmp_path_factory) -> Path:
    img = built[0]
    out = tmp_path_factory.mktemp("raw") / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img.path), str(out)], check=True)
    return out


def debugfs(raw: Path, cmd: str) -> str:
    r = subprocess.run(["debugfs", "-R", cmd, str(raw)], capture_output=True, text=True, check=True)
    return r.stdout


def inode(raw: Path, path: str) -> tuple[str, int, int, int]:
    """(type, mode, uid, gid) of a path in the image (symlinks are not followed)."""
    out = debugfs(raw, f"stat {path}")
    m = re.search(r"Type: (.+?)\s+Mode:\s+(\d+)", out)
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    assert m and u, f"{path} not in the image:\n{out}"
    return m.group(1), int(m.group(2), 8), int(u.group(1)), int(u.group(2))


def test_build_produces_a_qcow2_and_manifest(built) -> None:
    img, _, workdir, seconds = built
    assert img.path.parent.parent == workdir / "images"
    assert img.path.parent.name == f"bookworm-{img.key[:12]}"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img.path)],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 1024 << 20
    assert "backing-filename" not in info
    m = json.loads(img.manifest_path.read_text())
    assert m["key"] == img.key and m["file"] == img.path.name
    assert "openssh-server" in m["packages"] and "iperf3" in m["packages"]
    assert "perl" not in m["packages"]  # merged-usr hook: no usrmerge, no perl
    assert img.host_key.startswith("ssh-ed25519 ")
    assert not list((workdir / "images").glob(".staging-*"))
    print(f"image build: {seconds:.1f} s, {img.path.stat().st_size >> 20} MiB qcow2")


def test_image_content(built, raw: Path) -> None:
    img, kp, _, _ = built
    recipe = load_recipe(RECIPE)

    assert inode(raw, "/") == ("directory", 0o755, 0, 0)
    assert inode(raw, "/root") == ("directory", 0o700, 0, 0)
    assert inode(raw, "/root/.ssh") == ("directory", 0o700, 0, 0)
    assert inode(raw, "/root/.ssh/authorized_keys") == ("regular", 0o600, 0, 0)
    assert debugfs(raw, "cat /root/.ssh/authorized_keys").strip() == kp.public_key_text()

    # /sbin is merged into /usr/sbin
    assert inode(raw, "/sbin")[0] == "symlink"
    assert inode(raw, "/usr/sbin/lab-init") == ("regular", 0o755, 0, 0)
    assert debugfs(raw, "cat /usr/sbin/lab-init") == recipe.init.read_text()

    conf = debugfs(raw, "cat /etc/ssh/sshd_config.d/00-vhost-lab.conf")
    for line in ("PasswordAuthentication no", "PermitRootLogin prohibit-password",
                 "KbdInteractiveAuthentication no", "UseDNS no"):  # fmt: skip
        assert line in conf.splitlines()
    assert "Include /etc/ssh/sshd_config.d/*.conf" in debugfs(raw, "cat /etc/ssh/sshd_config")
    assert inode(raw, "/etc/ssh/ssh_host_ed25519_key") == ("regular", 0o600, 0, 0)
    assert debugfs(raw, "cat /etc/ssh/ssh_host_ed25519_key.pub").strip() == img.host_key
    assert "ssh_host_rsa_key" not in debugfs(raw, "ls /etc/ssh")

    for exe in ("/usr/sbin/sshd", "/usr/bin/iperf3", "/usr/bin/ip", "/usr/bin/mount", "/usr/sbin/ethtool"):
        assert inode(raw, exe)[0] in ("regular", "symlink"), exe
    assert inode(raw, "/usr/bin/su") == ("regular", 0o4755, 0, 0)  # setuid survives mke2fs -d
    assert inode(raw, "/tmp") == ("directory", 0o1777, 0, 0)
    assert inode(raw, "/dev/console")[0] == "character special"
    assert inode(raw, "/dev/null")[0] == "character special"

    assert debugfs(raw, "cat /etc/hostname").strip() == "guest"
    assert "nameserver" not in debugfs(raw, "cat /etc/resolv.conf")
    assert debugfs(raw, "ls /usr/share/doc").split() == [".", ".."] or "ls" not in debugfs(raw, "ls /usr/share/doc")
    assert "systemd" not in json.loads(img.manifest_path.read_text())["packages"]

    label = subprocess.run(["e2label", str(raw)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == "labroot"


def test_second_build_is_a_cache_hit(built) -> None:
    img, kp, workdir, _ = built
    steps = []
    t0 = time.monotonic()
    again = build_image(RECIPE, workdir, kp.public_key_text(), progress=lambda step: steps.append(step.action))
    assert time.monotonic() - t0 < 10
    assert again.path == img.path and again.key == img.key
    assert steps == ["cached"]


# --------------------------------------------------------------------------- failures leave nothing


def variant(tmp_path: Path, name: str, edit) -> Path:
    d = tmp_path / "recipe"
    d.mkdir()
    shutil.copy(RECIPE.parent / "guest-init.sh", d / "guest-init.sh")
    body = RECIPE.read_text().replace('name = "bookworm"', f'name = "{name}"')
    (d / f"{name}.toml").write_text(edit(body))
    return d / f"{name}.toml"


def assert_no_cache_entry(workdir: Path, name: str) -> None:
    images = workdir / "images"
    left = [p.name for p in images.iterdir()] if images.exists() else []
    assert not [n for n in left if n.startswith(f"{name}-") and not n.endswith(".failed.log")], left
    assert not [n for n in left if n.startswith(".staging")], left


def our_processes(marker: str) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                out.append(f"{p.name}: {cmd}")
    return out


def test_unknown_package_fails_cleanly(tmp_path: Path) -> None:
    recipe = variant(tmp_path, "badpkg", lambda b: b.replace("packages = [", 'packages = [\n    "vhost-lab-no-such-package",'))
    kp = ensure_keypair(tmp_path, "vhltst")
    with pytest.raises(LabError) as ei:
        build_image(recipe, tmp_path / "wd", kp.public_key_text(), timeout=900)
    assert isinstance(ei.value, ConfigError)
    assert ei.value.key_path.endswith("badpkg.toml: packages[0]")
    assert "vhost-lab-no-such-package" in str(ei.value)
    assert "--- last" in str(ei.value)  # mmdebstrap's last lines come with the error
    assert_no_cache_entry(tmp_path / "wd", "badpkg")


def test_unreachable_mirror_names_the_mirror(tmp_path: Path) -> None:
    # Port 9 on loopback: nothing listens, apt gets "connection refused" at once.
    recipe = variant(tmp_path, "nonet", lambda b: b.replace("mirrors = []", 'mirrors = ["http://127.0.0.1:9/debian"]'))
    kp = ensure_keypair(tmp_path, "vhltst")
    with pytest.raises(LabError) as ei:
        build_image(recipe, tmp_path / "wd", kp.public_key_text(), timeout=600)
    first = str(ei.value).splitlines()[0]
    assert "needs Debian's mirror (http://127.0.0.1:9/debian)" in first
    assert "mirrors" in (ei.value.hint or "")
    assert_no_cache_entry(tmp_path / "wd", "nonet")


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    recipe = variant(tmp_path, "intr", lambda b: b)
    kp = ensure_keypair(tmp_path, "vhltst")
    workdir = tmp_path / "wd"

    def progress(step) -> None:
        if "installing" in step.action:  # mid-bootstrap: dpkg running inside the chroot
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_image(recipe, workdir, kp.public_key_text(), progress=progress, timeout=900)
    assert_no_cache_entry(workdir, "intr")
    assert our_processes(str(workdir / "images")) == []
