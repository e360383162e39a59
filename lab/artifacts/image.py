"""Guest images: a declarative recipe (images/<name>.toml) -> a cached qcow2 base.

The build, as root, with no loop mounts and no shell strings built from recipe
values:

1. ``mmdebstrap`` bootstraps the recipe's suite and packages into a directory
   (``--mode=unshare`` when this machine can unshare a mount namespace, so no
   mount of the bootstrap can leak; ``--mode=root`` otherwise).
2. Python customises that directory: removes docs/locales, installs the init
   (/sbin/lab-init), the lab's public key (/root/.ssh/authorized_keys), an
   sshd drop-in, makes sure the host key exists (generated at build time, so a
   boot never pays for it), a few static /dev nodes.
3. ``mke2fs -t ext4 -d <rootdir>`` makes the file system (ownership, modes,
   setuid bits and xattrs are copied from the directory).
4. ``qemu-img convert -O qcow2`` (uncompressed: faster boot).

Everything is built in a staging directory and renamed into the cache only on
success: a failed or interrupted build (Ctrl-C too) leaves no cache entry.

Cache: <workdir>/images/<name>-<key12>/{<name>.qcow2, manifest.json}. The key
is a sha256 over the recipe file, every file it references (init, files[]),
the lab's SSH public key, mmdebstrap's version and BUILDER_VERSION. Debian's
archive moving on does not change the key: ``force=True`` rebuilds.

Recipe keys (see images/bookworm.toml):
    name, suite, architecture="amd64", variant="essential", mirrors=[],
    hook_dirs=[], apt_options=[], packages, remove=[], size_mib=1024,
    format="qcow2", label="labroot", init, [sshd] option = "value",
    [[files]] src (relative to the recipe), dest (absolute), mode="0644".
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import proc
from lab import tomlcheck as check
from lab.errors import ConfigError, LabError, MissingPiece
from lab.events import Progress, Step, quiet

# Bump when the build steps change in a way that changes the image.
BUILDER_VERSION = 1

INIT_PATH = "/sbin/lab-init"
SSHD_DROPIN = "/etc/ssh/sshd_config.d/00-vhost-lab.conf"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
MMDEBSTRAP_HOOKS = Path("/usr/share/mmdebstrap/hooks")
TAIL_LINES = 30

# The builder's own step reporter: (action, fraction); build_image turns it into Steps.
_Report = Callable[[str, "float | None"], None]

VARIANTS = ("essential", "apt", "required", "minbase", "important", "standard")
FORMATS = ("qcow2", "raw")
# lab-init cannot do its job without these.
REQUIRED_PACKAGES = ("openssh-server", "iperf3", "iproute2")

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_SUITE = re.compile(r"^[a-z][a-z0-9.-]{0,63}$")
_ARCH = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_HOOK = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_SSHD_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_MODE = re.compile(r"^0?[0-7]{3,4}$")
_PUBKEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-[a-z0-9]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( [^\n\r]*)?$")

_KNOWN_KEYS = (
    "name", "suite", "architecture", "variant", "mirrors", "hook_dirs", "apt_options",
    "packages", "remove", "size_mib", "format", "label", "init", "sshd", "files",
)  # fmt: skip


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class FileSpec:
    """One file copied into the image: src (on this machine) -> dest (in the image)."""

    src: Path
    dest: str
    mode: int = 0o644


@dataclass(frozen=True)
class ImageRecipe:
    path: Path
    name: str
    suite: str
    packages: tuple[str, ...]
    init: Path
    architecture: str = "amd64"
    variant: str = "essential"
    mirrors: tuple[str, ...] = ()
    hook_dirs: tuple[str, ...] = ()
    apt_options: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    size_mib: int = 1024
    format: str = "qcow2"
    label: str = "labroot"
    sshd: tuple[tuple[str, str], ...] = ()
    files: tuple[FileSpec, ...] = ()

    @property
    def display(self) -> str:
        return _display(self.path)

    def referenced_files(self) -> list[tuple[str, Path]]:
        """(role, path) of every file the recipe pulls in, in a stable order."""
        out = [("init", self.init)]
        out += [(f"file:{f.dest}", f.src) for f in self.files]
        return out

    def image_filename(self) -> str:
        return f"{self.name}.{'qcow2' if self.format == 'qcow2' else 'raw'}"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_recipe(path: Path) -> ImageRecipe:
    """Load and validate a recipe; every error names the file and the key path (lab.tomlcheck's style)."""
    path = Path(path)
    disp = _display(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(disp, f"cannot read the image recipe: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(disp, f"not valid TOML: {e}") from None
    try:
        return _recipe(path, data)
    except ConfigError as e:
        # the same message, with the recipe file in front of its key path
        raise ConfigError(f"{disp}: {e.key_path}" if e.key_path else disp, e.problem, e.hint) from None


def _line(path: str, value: object) -> str:
    """A non-empty single-line string."""
    text = check.string(path, value, "a non-empty single-line string")
    if not text or any(c in text for c in "\n\r\0"):
        raise ConfigError(path, f"expected a non-empty single-line string, got {check.found(text)}")
    return text


def _recipe(path: Path, data: dict) -> ImageRecipe:
    t = check.Table("", data, _KNOWN_KEYS)
    name = check.pattern(t.at("name"), t.get("name", expected="a name"), _NAME, f"a name matching {_NAME.pattern}")
    suite = check.pattern(t.at("suite"), t.get("suite", expected="a suite name"), _SUITE, "a Debian suite name")
    architecture = check.pattern(t.at("architecture"), t.get("architecture", "amd64"), _ARCH, "an architecture name")
    variant = check.choice(t.at("variant"), t.get("variant", "essential"), VARIANTS)

    def mirror(p: str, v: object) -> str:
        m = _line(p, v)
        if not (m.startswith("deb ") or re.fullmatch(r"[a-z][a-z0-9+]*://\S+", m)):
            raise ConfigError(p, f"expected a mirror URI (http://...) or a 'deb ...' line, got {check.q(m)}")
        return m

    def hook(p: str, v: object) -> str:
        return check.pattern(p, v, _HOOK, f"a hook directory name under {MMDEBSTRAP_HOOKS}")

    def package(p: str, v: object) -> str:
        return check.pattern(p, v, _PACKAGE, "a Debian package name")

    def removal(p: str, v: object) -> str:
        r = _line(p, v)
        if not r.startswith("/") or ".." in r.split("/") or r.strip("/*") == "":
            raise ConfigError(p, f"expected an absolute path (globs allowed) below /, without '..', got {check.q(r)}")
        return r

    mirrors = check.list_of(t.at("mirrors"), t.get("mirrors", []), mirror, what="mirror URIs or 'deb ...' lines")
    hook_dirs = check.list_of(t.at("hook_dirs"), t.get("hook_dirs", []), hook, what="hook directory names")
    apt_options = check.list_of(t.at("apt_options"), t.get("apt_options", []), _line, what="apt options")
    packages = check.list_of(t.at("packages"), t.get("packages", expected="an array of package names"), package,
                             what="Debian package names", non_empty=True)
    for p in REQUIRED_PACKAGES:
        if p not in packages:
            raise ConfigError(t.at("packages"), f"expected the list to include {check.q(p)} (lab-init needs it)")
    remove = check.list_of(t.at("remove"), t.get("remove", []), removal, what="absolute paths")
    size = check.integer(t.at("size_mib"), t.get("size_mib", 1024), 128, 65536, " (MiB)")
    fmt = check.choice(t.at("format"), t.get("format", "qcow2"), FORMATS)
    label = check.pattern(t.at("label"), t.get("label", "labroot"), _LABEL, "an ext4 label ([A-Za-z0-9_-], at most 16)")
    init = _recipe_file(path, t.at("init"), t.get("init", expected="the path of the guest's init script"))

    s = check.section(t, "sshd", None, required=False)
    sshd: list[tuple[str, str]] = []
    for k, v in s.data.items():
        kp = s.at(k)
        if not _SSHD_KEY.fullmatch(k):
            raise ConfigError(kp, f"expected an sshd_config keyword, got {check.q(k)}")
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise check.type_error(kp, 'a string (e.g. "yes")', v)
        text = str(v)
        if not text.strip() or any(c in text for c in "\n\r\0#"):
            raise ConfigError(kp, f"expected a non-empty single line without '#', got {check.q(text)}")
        sshd.append((k, text))

    files: list[FileSpec] = []
    raw_files = t.get("files", [])
    if not isinstance(raw_files, list):
        raise check.type_error(t.at("files"), "an array of tables ([[files]])", raw_files)
    for i, raw in enumerate(raw_files):
        ft = check.table(f"files[{i}]", raw, ("src", "dest", "mode"))
        src = _recipe_file(path, ft.at("src"), ft.get("src", expected="a path relative to the recipe"))
        dest = _line(ft.at("dest"), ft.get("dest", expected="an absolute path in the image"))
        if not dest.startswith("/") or ".." in dest.split("/") or dest.endswith("/"):
            raise ConfigError(ft.at("dest"), f"expected an absolute file path in the image, without '..', got {check.q(dest)}")
        mode = check.pattern(ft.at("mode"), ft.get("mode", "0644"), _MODE, 'an octal mode string like "0644"')
        files.append(FileSpec(src, dest, int(mode, 8)))

    return ImageRecipe(
        path=path,
        name=name,
        suite=suite,
        packages=packages,
        init=init,
        architecture=architecture,
        variant=variant,
        mirrors=mirrors,
        hook_dirs=hook_dirs,
        apt_options=apt_options,
        remove=remove,
        size_mib=size,
        format=fmt,
        label=label,
        sshd=tuple(sshd),
        files=tuple(files),
    )


def _recipe_file(recipe: Path, key: str, rel: object) -> Path:
    text = check.string(key, rel, "a path relative to the recipe's directory")
    if not text or Path(text).is_absolute():
        raise ConfigError(key, f"expected a path relative to the recipe's directory, got {check.q(text)}")
    p = recipe.parent / text
    if not p.is_file():
        raise ConfigError(key, f"expected an existing file, got {check.q(text)} (no such file: {p})", check.path_hint(text, p))
    return p


# --------------------------------------------------------------------------- cache key


def mmdebstrap_version() -> str:
    exe = shutil.which("mmdebstrap")
    if not exe:
        raise MissingPiece("mmdebstrap is not installed (it builds guest images)", hint="apt-get install mmdebstrap")
    out = proc.run([exe, "--version"], timeout=60)
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def image_key(recipe: ImageRecipe, ssh_public_key: str, tool_version: str | None = None) -> str:
    """sha256 over everything that decides the image's content."""
    h = hashlib.sha256()

    def add(role: str, data: bytes) -> None:
        h.update(f"{role}\0{len(data)}\0".encode())
        h.update(data)

    add("builder", str(BUILDER_VERSION).encode())
    add("recipe", recipe.path.read_bytes())
    for role, p in recipe.referenced_files():
        add(role, p.read_bytes())
    add("ssh_public_key", " ".join(ssh_public_key.split()).encode())
    add("mmdebstrap", (tool_version if tool_version is not None else mmdebstrap_version()).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the artifact


@dataclass(frozen=True)
class GuestImage:
    name: str
    key: str
    path: Path  # the base disk (qcow2 unless the recipe says raw): never write to it
    format: str
    size_mib: int  # virtual size of the disk
    built_at: str  # ISO 8601, UTC
    host_key: str = ""  # the guests' ssh host public key ("ssh-ed25519 AAAA..."), for known_hosts
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def manifest_path(self) -> Path:
        return self.path.parent / "manifest.json"

    @classmethod
    def from_dir(cls, d: Path) -> GuestImage | None:
        """The image in a cache directory, or None if it is not a complete entry."""
        try:
            m = json.loads((d / "manifest.json").read_text())
            p = d / m["file"]
            if not p.is_file():
                return None
            return cls(
                name=m["name"],
                key=m["key"],
                path=p,
                format=m["format"],
                size_mib=int(m["size_mib"]),
                built_at=m["built_at"],
                host_key=m.get("ssh_host_key", ""),
                manifest=m,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def images_dir(workdir: Path) -> Path:
    return Path(workdir).expanduser() / "images"


def cache_dir_for(recipe: ImageRecipe, workdir: Path, key: str) -> Path:
    return images_dir(workdir) / f"{recipe.name}-{key[:12]}"


# --------------------------------------------------------------------------- build


def build_image(
    recipe_path: Path,
    workdir: Path,
    ssh_public_key: str,
    progress: Progress | None = None,
    timeout: float = 3600,
    *,
    force: bool = False,
    mode: str | None = None,
) -> GuestImage:
    """Build (or find in the cache) the guest image for a recipe and a lab key."""
    recipe = load_recipe(recipe_path)
    emit = progress or quiet

    def report(action: str, fraction: float | None) -> None:
        emit(Step(f"image {recipe.name}", action, fraction=fraction))

    ssh_public_key = ssh_public_key.strip()
    if "\n" in ssh_public_key or "\r" in ssh_public_key or not _PUBKEY.fullmatch(" ".join(ssh_public_key.split())):
        raise LabError("the lab's SSH public key is not a single OpenSSH public key line", hint="see lab/hosts/sshkeys.py")
    ssh_public_key = " ".join(ssh_public_key.split())

    version = mmdebstrap_version()
    key = image_key(recipe, ssh_public_key, version)
    final = cache_dir_for(recipe, workdir, key)
    if not force and (img := GuestImage.from_dir(final)) is not None:
        report("cached", 1.0)
        return img

    _check_tools(recipe)
    if os.geteuid() != 0:
        raise LabError(
            "building a guest image needs root (mmdebstrap makes root-owned files, mke2fs copies them)",
            hint="run the build as root (sudo)",
        )

    idir = images_dir(workdir)
    idir.mkdir(parents=True, exist_ok=True)
    with _locked(idir, report):
        if not force and (img := GuestImage.from_dir(final)) is not None:
            report("cached", 1.0)
            return img
        for stale in idir.glob(".staging-*"):
            _safe_rmtree(stale)  # we hold the lock: nobody else is building here
        staging = idir / f".staging-{final.name}-{os.getpid()}"
        failed_log = idir / f"{final.name}.failed.log"
        staging.mkdir(mode=0o755)
        try:
            img = _build_in(recipe, key, version, ssh_public_key, staging, final, failed_log, report, timeout, mode)
        except BaseException:
            with _interrupts_deferred():
                log = staging / "build.log"
                if log.exists():
                    try:
                        shutil.copyfile(log, failed_log)
                    except OSError:
                        pass
                _safe_rmtree(staging)
            raise
        failed_log.unlink(missing_ok=True)
        return img


def _check_tools(recipe: ImageRecipe) -> None:
    for tool, pkg in (("mke2fs", "e2fsprogs"), ("qemu-img", "qemu-utils"), ("ssh-keygen", "openssh-client")):
        if not shutil.which(tool):
            raise MissingPiece(f"{tool} is not installed (it builds guest images)", hint=f"apt-get install {pkg}")
    out = proc.run(["mke2fs", "-V"], timeout=60)
    m = re.search(r"mke2fs (\d+)\.(\d+)", out.stdout + out.stderr)
    if m and (int(m.group(1)), int(m.group(2))) < (1, 43):
        raise MissingPiece("mke2fs is older than 1.43 and cannot populate a file system (-d)", hint="upgrade e2fsprogs")
    for h in recipe.hook_dirs:
        if not (MMDEBSTRAP_HOOKS / h).is_dir():
            raise ConfigError(f"{recipe.display}: hook_dirs", f"{h!r}: no {MMDEBSTRAP_HOOKS / h}")


def _choose_mode() -> str:
    """unshare (private mount namespace: nothing can leak) when possible, else root."""
    unshare = shutil.which("unshare")
    if unshare:
        r = proc.run([unshare, "--mount", "--pid", "--fork", "--uts", "--ipc", "true"], timeout=60)
        if r.rc == 0:
            return "unshare"
    return "root"


_PHASES = (
    ("running apt-get update", "apt-get update", 0.04),
    ("downloading packages", "downloading packages", 0.12),
    ("extracting archives", "extracting archives", 0.35),
    ("installing essential packages", "installing essential packages", 0.45),
    ("installing remaining packages", "installing packages", 0.60),
    ("cleaning package lists", "cleaning up", 0.75),
    ("success in", "bootstrap done", 0.78),
)


def _build_in(
    recipe: ImageRecipe,
    key: str,
    version: str,
    pubkey: str,
    staging: Path,
    final: Path,
    failed_log: Path,
    report: _Report,
    timeout: float,
    mode: str | None,
) -> GuestImage:
    started = time.monotonic()
    deadline = started + timeout
    rootdir = staging / "rootfs"
    log = staging / "build.log"
    mode = mode or _choose_mode()

    # 0. the init must at least parse
    r = proc.run(["sh", "-n", str(recipe.init)], timeout=60)
    if r.rc != 0:
        raise ConfigError(f"{recipe.display}: init", f"{recipe.init.name} has a syntax error: {r.stderr.strip()}")

    # 1. bootstrap
    argv = [
        "mmdebstrap",
        f"--mode={mode}",
        f"--variant={recipe.variant}",
        f"--architectures={recipe.architecture}",
        "--format=directory",
        *(f"--hook-dir={MMDEBSTRAP_HOOKS / h}" for h in recipe.hook_dirs),
        *(f"--aptopt={o}" for o in recipe.apt_options),
        *(f"--include={p}" for p in recipe.packages),
        "--",
        recipe.suite,
        str(rootdir),
        *recipe.mirrors,
    ]
    report("bootstrap: starting mmdebstrap", 0.01)
    rc, tail = _run_logged(argv, log, deadline, timeout, report)
    if rc != 0:
        raise _bootstrap_error(recipe, rc, tail, failed_log)

    # 2. customise
    report("customising the root file system", 0.80)
    with open(log, "a") as logf:
        logf.write(f"\n# customise {rootdir}\n")
    _customise(recipe, rootdir, pubkey, deadline)
    packages = _package_versions(rootdir)
    host_key = _read_in(rootdir, HOST_KEY + ".pub").decode().strip()

    # 3. file system
    used_mib = _du_mib(rootdir)
    if used_mib > recipe.size_mib * 0.85:
        raise ConfigError(
            f"{recipe.display}: size_mib",
            f"{recipe.size_mib} MiB is too small for a root file system of {used_mib:.0f} MiB",
            hint=f"size_mib = {int(used_mib * 1.5) + 64}",
        )
    report("making the ext4 file system", 0.88)
    raw = staging / f"{recipe.name}.raw"
    _run_step(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-d", str(rootdir), "-L", recipe.label, "-m", "0",
            "-E", "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
            str(raw), f"{recipe.size_mib}M",
        ],
        log, deadline, "mke2fs",
    )  # fmt: skip
    _safe_rmtree(rootdir)

    # 4. disk format
    out = staging / recipe.image_filename()
    if recipe.format == "qcow2":
        report("converting to qcow2", 0.94)
        _run_step(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], log, deadline, "qemu-img")
        raw.unlink()
    elif raw != out:
        raw.rename(out)
    os.chmod(out, 0o444)  # the shared base: guests write to their own overlays

    built_at = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    manifest = {
        "name": recipe.name,
        "key": key,
        "file": out.name,
        "format": recipe.format,
        "size_mib": recipe.size_mib,
        "file_bytes": out.stat().st_size,
        "built_at": built_at,
        "build_seconds": round(time.monotonic() - started, 1),
        "recipe": str(recipe.path),
        "suite": recipe.suite,
        "variant": recipe.variant,
        "architecture": recipe.architecture,
        "label": recipe.label,
        "init": INIT_PATH,
        "ssh_host_key": host_key,
        "mmdebstrap": version,
        "mmdebstrap_mode": mode,
        "builder_version": BUILDER_VERSION,
        "packages": packages,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    # 5. publish
    report("publishing into the cache", 0.99)
    with _interrupts_deferred():
        old = None
        if final.exists():  # force=True
            old = final.with_name(f".staging-old-{final.name}-{os.getpid()}")
            os.rename(final, old)
        os.rename(staging, final)
        if old is not None:
            _safe_rmtree(old)
    report("done", 1.0)
    img = GuestImage.from_dir(final)
    assert img is not None
    return img


def _run_logged(argv: list[str], log: Path, deadline: float, timeout: float, report: _Report) -> tuple[int, list[str]]:
    """Run argv, its output streamed to `log` and parsed for progress; returns (rc, last lines).

    mmdebstrap defers SIGTERM until its current step is done, so at the deadline
    it gets proc's short grace and then SIGKILL. That leaks nothing: in unshare
    mode its mounts die with its mount namespace; in root mode _safe_rmtree
    unmounts what is left below the staging directory.
    """

    def phase(line: str) -> None:
        if line.startswith("I: "):
            for needle, step, frac in _PHASES:
                if needle in line:
                    report(f"bootstrap: {step}", frac)
                    break

    r = proc.run(argv, timeout=max(1.0, deadline - time.monotonic()), log=log, on_line=phase, tail=TAIL_LINES)
    if r.timed_out:
        raise LabError(
            f"image build timed out after {timeout:.0f} s (in mmdebstrap)",
            hint="raise timeouts.build in lab.toml, or check the mirror's speed",
        )
    return r.rc, list(r.tail)


def _run_step(argv: list[str], log: Path, deadline: float, what: str) -> None:
    r = proc.run(argv, timeout=max(1.0, deadline - time.monotonic()), log=log, tail=TAIL_LINES)
    if r.timed_out:
        raise LabError(f"image build timed out (in {what})", hint="raise timeouts.build in lab.toml")
    if r.rc != 0:
        raise LabError(f"image build failed: {what} exited {r.rc}:\n" + "\n".join(r.tail))


_NET_ERR = re.compile(
    r"(Could not resolve|Temporary failure resolving|Could not connect|Failed to fetch|Unable to connect"
    r"|Network is unreachable|No route to host|Connection refused|Connection timed out|Cannot initiate the connection"
    r"|Unable to fetch some archives|Some index files failed to download)"
)
_NO_PKG = re.compile(
    r"(?:Unable to locate package |Package '?)([a-z0-9][a-z0-9+.-]+)'?(?: has no installation candidate)?"
)


def _bootstrap_error(recipe: ImageRecipe, rc: int, tail: list[str], failed_log: Path) -> LabError:
    shown = "\n".join(tail)
    detail = f"\n--- last {len(tail)} lines of mmdebstrap's output ---\n{shown}" if tail else ""
    hint_log = f"full log: {failed_log}"
    for line in tail:
        m = _NO_PKG.search(line)
        if m and ("Unable to locate" in line or "no installation candidate" in line) and m.group(1) in recipe.packages:
            i = recipe.packages.index(m.group(1))
            return ConfigError(
                f"{recipe.display}: packages[{i}]",
                f"apt cannot find package {m.group(1)!r} in {recipe.suite} ({line.strip()}){detail}",
                hint=f"fix the name (apt-cache policy {m.group(1)}); {hint_log}",
            )
    net = next((ln.strip() for ln in tail if _NET_ERR.search(ln)), None)
    if net:
        where = ", ".join(recipe.mirrors) or "http://deb.debian.org/debian (+ -updates, -security)"
        return LabError(
            f"the image build needs Debian's mirror ({where}) and apt could not reach it: {net}{detail}",
            hint="make the mirror reachable (network, or http_proxy), or point `mirrors` in "
            f"{recipe.display} at a reachable Debian mirror; {hint_log}",
        )
    return LabError(f"image build failed: mmdebstrap exited {rc}{detail}", hint=hint_log)


# --------------------------------------------------------------------------- customisation


def _in_root(rootdir: Path, path: str) -> Path:
    """`path` inside the chroot, symlinks resolved as the chroot would (never escaping it)."""
    root = rootdir.resolve()
    cur = root
    parts = [p for p in path.split("/") if p not in ("", ".")]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / part
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                raise LabError(f"too many symlinks resolving {path} in the image")
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = root
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        cur = nxt
    return cur


def _write_in(rootdir: Path, path: str, data: bytes, mode: int, dir_mode: int = 0o755) -> None:
    parent = _in_root(rootdir, os.path.dirname(path))
    if not parent.is_dir():
        _makedirs_in(rootdir, os.path.dirname(path), dir_mode)
        parent = _in_root(rootdir, os.path.dirname(path))
    target = parent / os.path.basename(path)
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            raise LabError(f"{path} is a directory in the image")
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _makedirs_in(rootdir: Path, path: str, mode: int) -> None:
    cur = ""
    for part in [p for p in path.split("/") if p]:
        cur += "/" + part
        p = _in_root(rootdir, cur)
        if not p.exists():
            p.mkdir(mode=mode)
            os.chown(p, 0, 0)
            os.chmod(p, mode)


def _read_in(rootdir: Path, path: str) -> bytes:
    return _in_root(rootdir, path).read_bytes()


def _remove_glob(rootdir: Path, pattern: str) -> None:
    root = rootdir.resolve()
    for p in sorted(root.glob(pattern.lstrip("/")), key=lambda q: len(q.parts), reverse=True):
        try:
            p.relative_to(root)
        except ValueError:
            continue
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p)


def _customise(recipe: ImageRecipe, rootdir: Path, pubkey: str, deadline: float) -> None:
    for pattern in recipe.remove:
        _remove_glob(rootdir, pattern)

    # Identity and name service: nothing of the build machine stays in the image.
    _write_in(rootdir, "/etc/hostname", b"guest\n", 0o644)
    _write_in(rootdir, "/etc/resolv.conf", b"# vhost-lab guests use no DNS\n", 0o644)

    # PID 1.
    _write_in(rootdir, INIT_PATH, recipe.init.read_bytes(), 0o755)
    for f in recipe.files:
        _write_in(rootdir, f.dest, f.src.read_bytes(), f.mode)

    # The lab's key: root login by key only.
    _makedirs_in(rootdir, "/root/.ssh", 0o700)
    ssh_dir = _in_root(rootdir, "/root/.ssh")
    os.chown(ssh_dir, 0, 0)
    os.chmod(ssh_dir, 0o700)
    _write_in(rootdir, "/root/.ssh/authorized_keys", (pubkey + "\n").encode(), 0o600, dir_mode=0o700)

    # sshd: the recipe's options first (first value wins in sshd_config).
    body = "# written by vhost-lab (lab/artifacts/image.py) from the image recipe's [sshd] table\n"
    body += "".join(f"{k} {v}\n" for k, v in recipe.sshd)
    _write_in(rootdir, SSHD_DROPIN, body.encode(), 0o644)

    # One ed25519 host key made here (not the package's, whose comment names the
    # build machine), so a boot never waits for ssh-keygen. Its public half goes
    # into the manifest for the lab's known_hosts.
    etc_ssh = _in_root(rootdir, "/etc/ssh")
    for old in etc_ssh.glob("ssh_host_*"):
        old.unlink()
    host_key = _in_root(rootdir, HOST_KEY)
    _run_quiet(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@vhost-lab-guest", "-f", str(host_key)])
    os.chown(host_key, 0, 0)
    os.chmod(host_key, 0o600)
    os.chown(f"{host_key}.pub", 0, 0)
    os.chmod(f"{host_key}.pub", 0o644)

    # Static nodes, for the instants before lab-init mounts devtmpfs on /dev.
    dev = _in_root(rootdir, "/dev")
    for name, major, minor, m in (("console", 5, 1, 0o600), ("null", 1, 3, 0o666)):
        node = dev / name
        if not node.exists() and not node.is_symlink():
            os.mknod(node, m | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(node, m)

    # sshd must accept the configuration as written.
    sshd = _in_root(rootdir, "/usr/sbin/sshd")
    if sshd.exists():
        privsep = _in_root(rootdir, "/run/sshd")  # lab-init makes it at boot (/run is a tmpfs)
        made = not privsep.exists()
        if made:
            privsep.mkdir(mode=0o755)
        try:
            r = proc.run(["chroot", str(rootdir), "/usr/sbin/sshd", "-t"], timeout=max(1.0, min(60.0, deadline - time.monotonic())))
        finally:
            if made:
                privsep.rmdir()
        if r.rc != 0:
            msg = (r.stderr or r.stdout).strip()
            m = re.search(r"00-vhost-lab\.conf line (\d+)", msg)
            keypath = "sshd"
            if m and 2 <= int(m.group(1)) <= len(recipe.sshd) + 1:
                keypath = f"sshd.{recipe.sshd[int(m.group(1)) - 2][0]}"
            raise ConfigError(f"{recipe.display}: {keypath}", f"sshd rejects the configuration: {msg}")


def _run_quiet(argv: list[str]) -> None:
    r = proc.run(argv, timeout=600)
    if r.rc != 0:
        raise LabError(f"`{' '.join(argv)}` exited {r.rc}: {(r.stderr or r.stdout).strip()}")


def _package_versions(rootdir: Path) -> dict[str, str]:
    r = proc.run(["dpkg-query", f"--admindir={rootdir / 'var/lib/dpkg'}", "-W", "-f", "${Package}\t${Version}\n"], timeout=120)
    out = {}
    for line in r.stdout.splitlines():
        if "\t" in line:
            k, v = line.split("\t", 1)
            out[k] = v
    return out


def _du_mib(rootdir: Path) -> float:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(rootdir):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total / (1 << 20)


# --------------------------------------------------------------------------- housekeeping


@contextmanager
def _locked(d: Path, report: _Report) -> Iterator[None]:
    """One image build at a time per workdir (flock on the directory: no lock file left)."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report("waiting for another image build in this workdir", None)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold off Ctrl-C while cleaning up or publishing, so neither is left half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            raise KeyboardInterrupt


def _mounts_under(path: Path) -> list[str]:
    p = str(path.resolve())
    out = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if mp == p or mp.startswith(p + "/"):
            out.append(mp)
    return out


def _safe_rmtree(path: Path) -> None:
    """Remove a build tree, but never through a mount left inside it (e.g. /proc of a chroot)."""
    if not path.exists() and not path.is_symlink():
        return
    for mp in sorted(_mounts_under(path), key=len, reverse=True):
        proc.run(["umount", "--lazy", mp], timeout=60)
    left = _mounts_under(path)
    if left:
        raise LabError(f"cannot remove {path}: still mounted below it: {', '.join(left)}", hint=f"umount {left[0]}")
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)
