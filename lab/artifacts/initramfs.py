"""Build small initramfs images: busybox, a few kernel modules, one init script.

Both the lab host (9p root + tmpfs overlay) and the guests (ext4 on virtio-blk)
boot Debian's prebuilt kernel, whose storage and filesystem drivers are
modules. Instead of Debian's initramfs-tools (slow, host-specific) the lab
packs exactly the modules it needs, decompressed, in dependency order, and
an init script of its own.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

from lab.errors import MissingPiece

BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class InitramfsSpec:
    """What goes into one initramfs."""

    modules_dir: Path  # .../lib/modules/<release>
    modules: tuple[str, ...]  # module names, e.g. ("9p", "overlay"); deps are added
    init_script: str  # the /init, a busybox sh script

    def key(self) -> str:
        """A cache key over everything that changes the archive's content."""
        h = hashlib.sha256()
        h.update(str(self.modules_dir.resolve()).encode())
        h.update(b"\0".join(m.encode() for m in self.modules))
        h.update(self.init_script.encode())
        dep = self.modules_dir / "modules.dep"
        if dep.exists():
            h.update(dep.read_bytes())
        if BUSYBOX.exists():
            h.update(str(BUSYBOX.stat().st_size).encode())
        return h.hexdigest()


def _module_index(modules_dir: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map module name -> relative path and relative path -> its dependencies."""
    dep_file = modules_dir / "modules.dep"
    if not dep_file.exists():
        raise MissingPiece(f"{dep_file} is missing: the kernel's module tree was not prepared (depmod)")
    by_name: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in dep_file.read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
        deps[path] = rest.split()
    return by_name, deps


def resolve_modules(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Relative module paths for `names` plus their dependencies, load order first."""
    by_name, deps = _module_index(modules_dir)
    order: list[str] = []

    def visit(path: str, trail: tuple[str, ...]) -> None:
        if path in order or path in trail:
            return
        for d in deps.get(path, []):
            visit(d, trail + (path,))
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            # Built into the kernel: nothing to load. modules.builtin tells.
            builtin = modules_dir / "modules.builtin"
            if builtin.exists() and any(
                Path(x).name.split(".ko")[0].replace("-", "_") == key for x in builtin.read_text().split()
            ):
                continue
            raise MissingPiece(f"kernel module {name!r} is neither in {modules_dir}/modules.dep nor built in")
        visit(by_name[key], ())
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if path.name.endswith(".zst"):
        raise MissingPiece(f"{path}: zstd-compressed modules are not supported by the lab's initramfs builder")
    return data


class _Newc:
    """A minimal writer for the cpio 'newc' format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        namez = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(namez)
        self.buf.write(b"\0" * ((4 - (110 + len(namez)) % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - len(data) % 4) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(spec: InitramfsSpec, out: Path) -> Path:
    """Write the initramfs for `spec` to `out` (atomically) and return it.

    Layout: /bin/busybox (+ sh symlink), /modules/NN-name.ko in load order,
    /modules/order (the load order), /init.
    """
    if not BUSYBOX.exists():
        raise MissingPiece("busybox is not installed", hint="apt-get install busybox-static")
    paths = resolve_modules(spec.modules_dir, spec.modules)
    cpio = _Newc()
    for d in ("bin", "dev", "proc", "sys", "modules", "newroot", "lower", "upper", "tmp", "run"):
        cpio.directory(d)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    names = []
    for i, rel in enumerate(paths):
        name = f"{i:02d}-{Path(rel).name.split('.ko')[0]}.ko"
        cpio.file(f"modules/{name}", _read_module(spec.modules_dir / rel))
        names.append(name)
    cpio.file("modules/order", ("\n".join(names) + "\n").encode())
    cpio.file("init", spec.init_script.encode(), 0o755)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        tmp.write_bytes(cpio.finish())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def cached_initramfs(spec: InitramfsSpec, cache_dir: Path, stem: str) -> Path:
    """Build the initramfs once per content key under `cache_dir`."""
    # Never delete other entries: another lab sharing this workdir may be
    # about to boot from one. They are small (a few MiB).
    out = cache_dir / f"{stem}-{spec.key()[:12]}.cpio"
    if out.exists():
        return out
    return build_initramfs(spec, out)
