"""lab.artifacts.initramfs on the real Debian module tree: dependency order, built-in modules,
the newc archive (read back by our own parser and by cpio(1)), and the cache.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from lab.artifacts import initramfs
from lab.artifacts.initramfs import InitramfsSpec, build_initramfs, cached_initramfs, resolve_modules
from lab.errors import MissingPiece
from lab.hosts.nested import LABHOST_MODULES

RELEASE = "6.12.117+deb12-amd64"
MODULES = Path("/lib/modules") / RELEASE

needs_modules = pytest.mark.skipif(
    not (MODULES / "modules.dep").is_file(),
    reason=f"{MODULES} is absent (apt-get install linux-image-{RELEASE})",
)
needs_busybox = pytest.mark.skipif(not initramfs.BUSYBOX.exists(), reason="busybox is absent (apt-get install busybox-static)")

INIT = "#!/bin/sh\necho lab-test-init\nexec /bin/sh\n"


def _deps() -> dict[str, list[str]]:
    out = {}
    for line in (MODULES / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        out[path] = rest.split()
    return out


def _names(paths: list[str]) -> list[str]:
    return [Path(p).name.split(".ko")[0] for p in paths]


# --------------------------------------------------------------------------
# resolve_modules
# --------------------------------------------------------------------------


@needs_modules
def test_ext4_after_its_dependencies() -> None:
    order = _names(resolve_modules(MODULES, ("ext4",)))
    assert order[-1] == "ext4"
    assert {"jbd2", "mbcache", "crc16"} <= set(order)
    assert all(order.index(d) < order.index("ext4") for d in ("jbd2", "mbcache", "crc16"))


@needs_modules
def test_9p_after_netfs_and_9pnet() -> None:
    order = _names(resolve_modules(MODULES, LABHOST_MODULES))
    for dep in ("netfs", "9pnet"):
        assert order.index(dep) < order.index("9p")
        assert order.index(dep) < order.index("9pnet_virtio")
    assert "overlay" in order
    assert len(order) == len(set(order)), "a shared dependency is loaded once"


@needs_modules
@pytest.mark.parametrize("wanted", [("vhost_net",), ("ext4", "9p"), ("9pnet_virtio", "9p", "overlay", "ext4", "vhost_net")])
def test_every_module_after_all_its_dependencies(wanted: tuple[str, ...]) -> None:
    deps = _deps()
    order = resolve_modules(MODULES, wanted)
    pos = {p: i for i, p in enumerate(order)}
    for path in order:
        for d in deps[path]:  # modules.dep lists the full closure
            assert d in pos and pos[d] < pos[path], f"{d} must load before {path}"
    assert set(_names(order)) >= set(wanted)


@needs_modules
def test_dash_and_underscore_are_the_same_module() -> None:
    assert resolve_modules(MODULES, ("vhost-net",)) == resolve_modules(MODULES, ("vhost_net",))


@needs_modules
def test_unknown_module_is_named() -> None:
    with pytest.raises(MissingPiece) as ei:
        resolve_modules(MODULES, ("overlay", "no_such_mod_xyz"))
    assert "'no_such_mod_xyz'" in str(ei.value)
    assert str(MODULES) in str(ei.value)


@needs_modules
def test_builtin_modules_are_skipped() -> None:
    builtin = (MODULES / "modules.builtin").read_text().split()
    assert any(Path(b).name == "virtio_pci.ko" for b in builtin), "Debian builds virtio_pci in"
    assert resolve_modules(MODULES, ("virtio_pci",)) == []
    assert resolve_modules(MODULES, ("virtio-pci", "virtio")) == []
    assert _names(resolve_modules(MODULES, ("virtio_pci", "overlay"))) == ["overlay"]


def test_missing_modules_dep(tmp_path: Path) -> None:
    with pytest.raises(MissingPiece, match="modules.dep"):
        resolve_modules(tmp_path, ("ext4",))


def test_dependency_cycle_terminates(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\nkernel/c.ko: kernel/a.ko\n")
    order = resolve_modules(tmp_path, ("c",))
    assert sorted(order) == ["kernel/a.ko", "kernel/b.ko", "kernel/c.ko"]
    assert order[-1] == "kernel/c.ko"


# --------------------------------------------------------------------------
# The archive
# --------------------------------------------------------------------------


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive; checks magic, alignment and the trailer."""
    out: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        assert off % 4 == 0
        hdr = data[off : off + 110]
        assert hdr[:6] == b"070701", f"bad magic at {off}: {hdr[:6]!r}"
        f = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = f[1], f[6], f[11]
        name_start = off + 110
        name = data[name_start : name_start + namesize]
        assert name.endswith(b"\0")
        name = name[:-1].decode()
        data_start = name_start + namesize
        data_start += (4 - data_start % 4) % 4
        body = data[data_start : data_start + filesize]
        assert len(body) == filesize
        off = data_start + filesize
        off += (4 - off % 4) % 4
        if name == "TRAILER!!!":
            assert off == len(data)
            return out
        assert name not in out, f"duplicate entry {name}"
        out[name] = (mode, body)


@pytest.fixture(scope="module")
def labhost_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (MODULES / "modules.dep").is_file():
        pytest.skip(f"{MODULES} is absent")
    if not initramfs.BUSYBOX.exists():
        pytest.skip("busybox is absent (apt-get install busybox-static)")
    out = tmp_path_factory.mktemp("initrd") / "sub" / "labhost.cpio"
    spec = InitramfsSpec(MODULES, ("9p", "9pnet_virtio", "overlay", "virtio_pci"), INIT)
    assert build_initramfs(spec, out) == out
    return out


def test_archive_layout(labhost_archive: Path) -> None:
    entries = read_newc(labhost_archive.read_bytes())
    mode, init = entries["init"]
    assert init.decode() == INIT
    assert stat.S_ISREG(mode) and mode & 0o111
    mode, bb = entries["bin/busybox"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert bb == initramfs.BUSYBOX.read_bytes()
    mode, target = entries["bin/sh"]
    assert stat.S_ISLNK(mode) and target == b"busybox"
    for d in ("bin", "dev", "proc", "sys", "modules", "newroot", "lower", "upper", "tmp", "run"):
        assert stat.S_ISDIR(entries[d][0]), d
    # no parent directory comes after a child: the kernel's unpacker needs them first
    names = list(entries)
    for n in names:
        if "/" in n:
            assert names.index(n.rsplit("/", 1)[0]) < names.index(n)


def test_archive_modules_in_order_decompressed(labhost_archive: Path) -> None:
    entries = read_newc(labhost_archive.read_bytes())
    order = entries["modules/order"][1].decode().splitlines()
    kos = sorted(n.removeprefix("modules/") for n in entries if n.startswith("modules/") and n.endswith(".ko"))
    assert sorted(order) == kos
    assert order == sorted(order), "NN- prefixes keep the load order"
    want = _names(resolve_modules(MODULES, ("9p", "9pnet_virtio", "overlay")))
    assert [o.split("-", 1)[1].removesuffix(".ko") for o in order] == want
    for name in order:
        body = entries[f"modules/{name}"][1]
        assert body[:4] == b"\x7fELF", f"{name} is not a decompressed ELF object"
    assert not any("virtio_pci" in o for o in order)  # built in: not packed


def test_archive_listed_by_cpio(labhost_archive: Path, tmp_path: Path) -> None:
    cpio = shutil.which("cpio")
    if cpio is None:
        pytest.skip("cpio is not installed (apt-get install cpio); the newc parser above still ran")
    listing = subprocess.run(
        [cpio, "-t", "--quiet", "-F", str(labhost_archive)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "init" in listing and "bin/busybox" in listing and "modules/order" in listing
    assert any(n.startswith("modules/") and n.endswith("-9p.ko") for n in listing)
    # and cpio unpacks it to the same bytes
    subprocess.run([cpio, "-i", "-d", "--quiet", "-F", str(labhost_archive)], cwd=tmp_path, check=True)
    assert (tmp_path / "init").read_text() == INIT
    assert (tmp_path / "bin" / "sh").is_symlink() and os.readlink(tmp_path / "bin" / "sh") == "busybox"
    assert (tmp_path / "modules" / "order").is_file()


@needs_modules
@needs_busybox
def test_build_leaves_no_temp_file_and_replaces_atomically(tmp_path: Path) -> None:
    out = tmp_path / "x.cpio"
    out.write_bytes(b"old")
    build_initramfs(InitramfsSpec(MODULES, ("overlay",), INIT), out)
    assert read_newc(out.read_bytes())["init"][1] == INIT.encode()
    assert [p.name for p in tmp_path.iterdir()] == ["x.cpio"]


@needs_modules
@needs_busybox
def test_build_with_unknown_module_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "y.cpio"
    with pytest.raises(MissingPiece, match="nope_mod"):
        build_initramfs(InitramfsSpec(MODULES, ("nope_mod",), INIT), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------


@needs_modules
@needs_busybox
def test_cached_initramfs_same_spec_same_file(tmp_path: Path) -> None:
    spec = InitramfsSpec(MODULES, ("overlay",), INIT)
    first = cached_initramfs(spec, tmp_path, "guest")
    assert first.parent == tmp_path and first.name.startswith("guest-") and first.suffix == ".cpio"
    ino, mtime = first.stat().st_ino, first.stat().st_mtime_ns
    again = cached_initramfs(InitramfsSpec(MODULES, ("overlay",), INIT), tmp_path, "guest")
    assert again == first
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (ino, mtime), "not rebuilt"


@needs_modules
@needs_busybox
def test_cached_initramfs_new_file_when_init_changes(tmp_path: Path) -> None:
    first = cached_initramfs(InitramfsSpec(MODULES, ("overlay",), INIT), tmp_path, "guest")
    changed = INIT.replace("lab-test-init", "lab-test-init v2")
    second = cached_initramfs(InitramfsSpec(MODULES, ("overlay",), changed), tmp_path, "guest")
    assert second != first
    assert read_newc(second.read_bytes())["init"][1] == changed.encode()
    # Older archives stay: another lab sharing the workdir may boot from one.
    assert first.exists()
    # another stem is left alone
    other = cached_initramfs(InitramfsSpec(MODULES, ("overlay",), INIT), tmp_path, "labhost-0123")
    assert second.exists() and other.exists()


@needs_modules
def test_spec_key_covers_modules_and_tree(tmp_path: Path) -> None:
    base = InitramfsSpec(MODULES, ("9p", "overlay"), INIT)
    assert base.key() == InitramfsSpec(MODULES, ("9p", "overlay"), INIT).key()
    assert base.key() != InitramfsSpec(MODULES, ("overlay", "9p"), INIT).key()
    assert base.key() != InitramfsSpec(MODULES, ("9p",), INIT).key()
    assert base.key() != InitramfsSpec(MODULES, ("9p", "overlay"), INIT + "\n").key()
    other = tmp_path / "modules"
    other.mkdir()
    (other / "modules.dep").write_text((MODULES / "modules.dep").read_text())
    assert base.key() != InitramfsSpec(other, ("9p", "overlay"), INIT).key()
