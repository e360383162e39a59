"""lab.artifacts.image (recipe validation, cache key, overlay argv, error classification) and lab.hosts.sshkeys.

No mmdebstrap run here: the real build is tests/integration/test_image_build.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from lab.artifacts import image
from lab.artifacts.image import (
    GuestImage,
    ImageRecipe,
    build_image,
    image_key,
    load_recipe,
)
from lab.errors import ConfigError, LabError
from lab.hosts.sshkeys import ensure_keypair

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "images" / "bookworm.toml"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake vhost-lab-vhl"
PUBKEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOtherOtherOthe vhost-lab-vhl"

MINIMAL = """\
name = "tiny"
suite = "bookworm"
packages = ["openssh-server", "iperf3", "iproute2"]
init = "init.sh"
"""


def write_recipe(d: Path, body: str, name: str = "tiny.toml") -> Path:
    (d / "init.sh").write_text("#!/bin/sh\necho hi\n")
    p = d / name
    p.write_text(body)
    return p


def config_error(tmp_path: Path, body: str) -> ConfigError:
    p = write_recipe(tmp_path, body)
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    return ei.value


# --------------------------------------------------------------------------- the real recipe


def test_bookworm_recipe_loads() -> None:
    r = load_recipe(RECIPE)
    assert r.name == "bookworm"
    assert r.suite == "bookworm"
    assert r.format == "qcow2"
    assert r.init == RECIPE.parent / "guest-init.sh"
    for p in ("openssh-server", "iperf3", "iproute2"):
        assert p in r.packages
    sshd = dict(r.sshd)
    assert sshd["PasswordAuthentication"] == "no"
    assert sshd["PermitRootLogin"] == "prohibit-password"
    assert sshd["KbdInteractiveAuthentication"] == "no"
    assert sshd["UseDNS"] == "no"


def test_guest_init_is_posix_sh_and_prints_the_markers() -> None:
    text = (RECIPE.parent / "guest-init.sh").read_text()
    assert text.startswith("#!/bin/sh\n")
    assert 'LAB-GUEST-READY $HOST' in text
    assert "/usr/sbin/sshd" in text and "iperf3 -s -D" in text
    if shutil.which("dash"):
        import subprocess

        assert subprocess.run(["dash", "-n", str(RECIPE.parent / "guest-init.sh")], check=False).returncode == 0


# --------------------------------------------------------------------------- validation


def test_minimal_recipe_defaults(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, MINIMAL))
    assert (r.variant, r.size_mib, r.format, r.label, r.architecture) == ("essential", 1024, "qcow2", "labroot", "amd64")
    assert r.mirrors == () and r.files == () and r.sshd == ()


@pytest.mark.parametrize(
    "edit, key_path, words",
    [
        (lambda b: b.replace('"iperf3", "iproute2"', '"iperf3", "Bad_Name"'), "packages[2]", "expected a Debian package name, got \"Bad_Name\""),
        (lambda b: b.replace('"iperf3", "iproute2"', '"iperf3", 7'), "packages[2]", "got an integer (7)"),
        (lambda b: b.replace('"iperf3", "iproute2"', '"iperf3", "iperf3"'), "packages[2]", "expected no duplicates"),
        (lambda b: b.replace(', "iproute2"', ""), "packages", "to include \"iproute2\""),
        (lambda b: b.replace('name = "tiny"\n', ""), "name", "required key is missing"),
        (lambda b: b.replace('name = "tiny"', 'name = "Tiny Image"'), "name", "expected a name matching"),
        (lambda b: b + "pakages = []\n", "pakages", "unknown key"),
        (lambda b: b + "size_mib = \"1G\"\n", "size_mib", "got a string (\"1G\")"),
        (lambda b: b + "size_mib = 16\n", "size_mib", "expected an integer from 128 to 65536 (MiB), got 16"),
        (lambda b: b + "format = \"vmdk\"\n", "format", "expected \"qcow2\" or \"raw\", got \"vmdk\""),
        (lambda b: b + "variant = \"fat\"\n", "variant", "got \"fat\""),
        (lambda b: b + "mirrors = [\"/etc/passwd\"]\n", "mirrors[0]", "expected a mirror URI"),
        (lambda b: b + "remove = [\"/usr/share/doc\", \"../etc\"]\n", "remove[1]", "absolute path"),
        (lambda b: b + "remove = [\"/*\"]\n", "remove[0]", "absolute path"),
        (lambda b: b + "hook_dirs = [\"../evil\"]\n", "hook_dirs[0]", "expected a hook directory name"),
        (lambda b: b.replace('"init.sh"', '"missing.sh"'), "init", "no such file"),
        (lambda b: b.replace('"init.sh"', '"/etc/passwd"'), "init", "relative"),
        (lambda b: b + "[sshd]\nUseDNS = false\n", "sshd.UseDNS", "got a boolean (false)"),
        (lambda b: b + "[sshd]\nUseDNS = \"no\\nPermitRootLogin yes\"\n", "sshd.UseDNS", "single line"),
        (lambda b: b + "[sshd]\n\"Use DNS\" = \"no\"\n", "sshd.\"Use DNS\"", "expected an sshd_config keyword"),
        (lambda b: b + "[[files]]\nsrc = \"init.sh\"\ndest = \"etc/x\"\n", "files[0].dest", "absolute file path"),
        (lambda b: b + "[[files]]\nsrc = \"init.sh\"\ndest = \"/etc/x\"\nmode = \"rw\"\n", "files[0].mode", "octal"),
        (lambda b: b + "[[files]]\nsrc = \"nope\"\ndest = \"/etc/x\"\n", "files[0].src", "no such file"),
        (lambda b: b + "[[files]]\nsrc = \"init.sh\"\ndest = \"/etc/x\"\nowner = \"me\"\n", "files[0].owner", "unknown key"),
    ],
)
def test_validation_errors_name_file_and_key_path(tmp_path: Path, monkeypatch, edit, key_path, words) -> None:
    monkeypatch.chdir(tmp_path)
    err = config_error(tmp_path, edit(MINIMAL))
    assert err.key_path == f"tiny.toml: {key_path}", str(err)
    assert str(err).startswith(f"tiny.toml: {key_path}: ")
    assert words in err.problem


def test_invalid_toml_names_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    err = config_error(tmp_path, "name = \n")
    assert str(err).startswith("tiny.toml: not valid TOML")


def test_error_path_is_absolute_outside_cwd(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    p = write_recipe(tmp_path / "a", MINIMAL.replace('"iproute2"', '"X"'))
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    assert str(ei.value).startswith(f"{p}: packages[2]: ")


def test_files_are_loaded(tmp_path: Path) -> None:
    (tmp_path / "motd").write_text("hello\n")
    r = load_recipe(write_recipe(tmp_path, MINIMAL + '[[files]]\nsrc = "motd"\ndest = "/etc/motd"\nmode = "0600"\n'))
    assert r.files[0].src == tmp_path / "motd"
    assert (r.files[0].dest, r.files[0].mode) == ("/etc/motd", 0o600)


# --------------------------------------------------------------------------- cache key


def key_of(p: Path, pub: str = PUBKEY, tool: str = "mmdebstrap 1.3.5") -> str:
    return image_key(load_recipe(p), pub, tool)


def test_key_is_stable_and_ignores_location_and_unrelated_files(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pa = write_recipe(a, MINIMAL)
    pb = write_recipe(b, MINIMAL, name="other-name.toml")
    k = key_of(pa)
    assert len(k) == 64
    assert key_of(pa) == k
    assert key_of(pb) == k  # same contents elsewhere, under another file name
    (a / "unrelated.txt").write_text("x")
    assert key_of(pa) == k
    assert key_of(pa, pub=f"  {PUBKEY}\n") == k  # whitespace around the key line


def test_key_changes_with_each_input(tmp_path: Path) -> None:
    p = write_recipe(tmp_path, MINIMAL + '[[files]]\nsrc = "extra"\ndest = "/etc/extra"\n')
    (tmp_path / "extra").write_text("1\n")
    keys = {key_of(p)}
    keys.add(key_of(p, pub=PUBKEY2))
    keys.add(key_of(p, tool="mmdebstrap 1.5.0"))
    (tmp_path / "init.sh").write_text("#!/bin/sh\necho changed\n")
    keys.add(key_of(p))
    (tmp_path / "extra").write_text("2\n")
    keys.add(key_of(p))
    p.write_text(p.read_text() + "# a comment is a change too\n")
    keys.add(key_of(p))
    assert len(keys) == 6


def test_key_changes_with_builder_version(tmp_path: Path, monkeypatch) -> None:
    p = write_recipe(tmp_path, MINIMAL)
    k = key_of(p)
    monkeypatch.setattr(image, "BUILDER_VERSION", image.BUILDER_VERSION + 1)
    assert key_of(p) != k


# --------------------------------------------------------------------------- cache hit, overlay


def fake_cache_entry(workdir: Path, recipe: ImageRecipe, key: str) -> Path:
    d = workdir / "images" / f"{recipe.name}-{key[:12]}"
    d.mkdir(parents=True)
    (d / "tiny.qcow2").write_bytes(b"QFI\xfb")
    manifest = {
        "name": recipe.name, "key": key, "file": "tiny.qcow2", "format": "qcow2", "size_mib": 1024,
        "built_at": "2025-01-01T00:00:00+00:00", "ssh_host_key": "ssh-ed25519 AAAA root@vhost-lab-guest",
    }  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_cached_image_is_returned_without_building(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(image, "mmdebstrap_version", lambda: "mmdebstrap 1.3.5")

    def no_build(*a, **k):
        raise AssertionError("must not build")

    monkeypatch.setattr(image, "_build_in", no_build)
    p = write_recipe(tmp_path, MINIMAL)
    r = load_recipe(p)
    d = fake_cache_entry(tmp_path / "wd", r, image_key(r, PUBKEY, "mmdebstrap 1.3.5"))
    steps = []
    img = build_image(p, tmp_path / "wd", PUBKEY, progress=lambda s: steps.append((s.subject, s.action, s.fraction)))
    assert img.path == d / "tiny.qcow2"
    assert img.manifest_path == d / "manifest.json"
    assert (img.name, img.format, img.size_mib) == ("tiny", "qcow2", 1024)
    assert img.host_key.startswith("ssh-ed25519 ")
    assert steps == [("image tiny", "cached", 1.0)]


def test_incomplete_cache_entry_is_not_an_image(tmp_path: Path) -> None:
    d = tmp_path / "images" / "x-123"
    d.mkdir(parents=True)
    assert GuestImage.from_dir(d) is None
    (d / "manifest.json").write_text('{"name": "x", "key": "k", "file": "x.qcow2"}')
    assert GuestImage.from_dir(d) is None


@pytest.mark.parametrize("bad", ["", "not a key", "ssh-ed25519 AAAA\nssh-ed25519 BBBB"])
def test_bad_public_key_is_refused(tmp_path: Path, monkeypatch, bad: str) -> None:
    monkeypatch.setattr(image, "mmdebstrap_version", lambda: "mmdebstrap 1.3.5")
    monkeypatch.setattr(image, "_build_in", lambda *a, **k: pytest.fail("must not build"))
    with pytest.raises(LabError, match="public key"):
        build_image(write_recipe(tmp_path, MINIMAL), tmp_path / "wd", bad)


# --------------------------------------------------------------------------- failure messages


def bookworm() -> ImageRecipe:
    return load_recipe(RECIPE)


def test_no_network_error_names_the_mirror_and_apt_line(tmp_path: Path) -> None:
    tail = [
        "I: running apt-get update...",
        "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Could not resolve 'deb.debian.org'",
        "E: apt-get update --error-on=any -oAPT::Status-Fd=<$fd> -oDpkg::Use-Pty=false failed",
    ]
    err = image._bootstrap_error(bookworm(), 1, tail, tmp_path / "f.log")
    assert type(err) is LabError
    first = str(err).splitlines()[0]
    assert "needs Debian's mirror" in first and "deb.debian.org" in first
    assert "Could not resolve 'deb.debian.org'" in first
    assert "mirrors" in err.hint and str(tmp_path / "f.log") in err.hint


def test_unknown_package_error_names_the_recipe_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    r = bookworm()
    tail = ["I: downloading packages with apt...", f"E: Unable to locate package {r.packages[1]}"]
    err = image._bootstrap_error(r, 1, tail, tmp_path / "f.log")
    assert isinstance(err, ConfigError)
    assert err.key_path == "images/bookworm.toml: packages[1]"


def test_other_failures_carry_the_last_lines(tmp_path: Path) -> None:
    tail = [f"line {i}" for i in range(image.TAIL_LINES)]
    err = image._bootstrap_error(bookworm(), 100, tail, tmp_path / "f.log")
    text = str(err)
    assert "mmdebstrap exited 100" in text
    assert "line 0" in text and f"line {image.TAIL_LINES - 1}" in text


# --------------------------------------------------------------------------- customisation helpers


def test_in_root_resolves_symlinks_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "sbin").mkdir(parents=True)
    (root / "sbin").symlink_to("usr/sbin")
    (root / "abs").symlink_to("/usr/sbin")
    (root / "usr" / "sbin" / "up").symlink_to("../../../../../../etc")
    r = root.resolve()
    assert image._in_root(root, "/sbin/lab-init") == r / "usr" / "sbin" / "lab-init"
    assert image._in_root(root, "/abs/x") == r / "usr" / "sbin" / "x"
    assert image._in_root(root, "/sbin/up/passwd") == r / "etc" / "passwd"  # clamped at the root
    assert image._in_root(root, "/../../etc/passwd") == r / "etc" / "passwd"


def test_remove_glob_stays_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/share/doc/pkg").mkdir(parents=True)
    (root / "usr/share/doc/pkg/README").write_text("x")
    (root / "usr/share/doc/link").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("x")
    image._remove_glob(root, "/usr/share/doc/*")
    assert list((root / "usr/share/doc").iterdir()) == []
    assert (tmp_path / "outside" / "keep").exists()


# --------------------------------------------------------------------------- ssh keys


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_ensure_keypair_creates_once_with_private_modes(tmp_path: Path) -> None:
    kp = ensure_keypair(tmp_path, "vhl")
    assert kp.private == tmp_path / "vhl" / "ssh" / "id_ed25519"
    assert kp.public == tmp_path / "vhl" / "ssh" / "id_ed25519.pub"
    assert stat.S_IMODE(os.stat(kp.private).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(kp.private.parent).st_mode) == 0o700
    text = kp.public_key_text()
    assert text.startswith("ssh-ed25519 ") and text.endswith(" vhost-lab-vhl") and "\n" not in text
    before = kp.private.read_bytes()
    again = ensure_keypair(tmp_path, "vhl")
    assert again == kp and kp.private.read_bytes() == before
    assert sorted(p.name for p in kp.private.parent.iterdir()) == ["id_ed25519", "id_ed25519.pub"]


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_ensure_keypair_repairs_public_half_and_modes(tmp_path: Path) -> None:
    kp = ensure_keypair(tmp_path, "vhl")
    text = kp.public_key_text()
    kp.public.unlink()
    os.chmod(kp.private, 0o644)
    again = ensure_keypair(tmp_path, "vhl")
    assert again.public_key_text().split()[:2] == text.split()[:2]
    assert stat.S_IMODE(os.stat(kp.private).st_mode) == 0o600


def test_ensure_keypair_refuses_path_like_lab_names(tmp_path: Path) -> None:
    with pytest.raises(LabError):
        ensure_keypair(tmp_path, "../x")
