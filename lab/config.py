"""Load and validate lab.toml into frozen, typed objects.

Every problem is a `lab.errors.ConfigError` whose message starts with the key
path it is about and says what was expected and what was found, e.g.

    guests.guest1.net.backend: expected "tap" or "vhost", got "vhots" (fix: did you mean "vhost"?)

Validation stops at the first problem, in document order (lab, timeouts,
kernels, images, hosts, guests, matrices, expectations), because later
sections refer to earlier ones by name.

Relative paths in lab.toml (kernel sources, patches, configs, image recipes,
workdir) are relative to the directory holding lab.toml, so a lab can be
loaded from any working directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from lab.errors import ConfigError
from lab.tomlcheck import (
    REQUIRED,
    Table,
    boolean,
    choice,
    did_you_mean,
    found,
    integer,
    join,
    list_of,
    named_tables,
    num,
    number,
    path_hint,
    pattern,
    q,
    ref,
    section,
    string,
    table,
)

T = TypeVar("T")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "lab.toml"
ENV_CONFIG = "LAB_CONFIG"

MAX_U32 = 2**32 - 1
IFNAME_MAX_BYTES = 15  # IFNAMSIZ (16) minus the NUL
MAX_VCPUS = 64
MIN_MEMORY_MIB = 128
MAX_RTT_MS = 60_000.0  # netem can do more; a delay over a minute is a typo here
MAX_REPEATS = 100
MAX_DURATION_S = 86_400
MAX_STREAMS = 128

BACKENDS = ("tap", "vhost")
# Root qdiscs a cell can put on the guest's tap after libvirt attached it;
# "default" is the lab host's default_qdisc (what the kernel picks).
QDISCS = ("default", "fq_codel", "pfifo_fast", "pfifo", "fq", "noqueue")
ORDERS = ("abba", "shuffle")  # how arms sharing a lab host boot alternate
# How a lab host boot moves from one arm's modules to another's
# (lab.session): destroy and boot the guest, hot-unplug and re-plug the
# guest's NIC around the swap, or boot a new lab host.
SWAPS = ("reboot-guest", "hot-unplug", "reboot-host")
MAX_QUEUES = 16
STRATEGIES = ("modules", "full")
PROVIDERS = ("nested", "local", "ssh")
DEBIAN_PREFIX = "debian:"

# Names become parts of other names, so each class is as narrow as its use:
LAB_NAME = re.compile(r"[a-z][a-z0-9]{0,5}")  # prefix of every domain and tap
NODE_NAME = re.compile(r"[a-z][a-z0-9-]{0,15}")  # hosts, guests: libvirt domains and hostnames
OBJECT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # kernels, images, matrices, profiles: paths, ids
# A kernel name ending in "-r<n>" would read as a cell id's repeat suffix (lab.measure.cells).
AMBIGUOUS_KERNEL = re.compile(r".*-r[0-9]+")
TAP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # ASCII only, so bytes == characters
# Debian version: [epoch:]upstream[-revision]
DEBIAN_VERSION = re.compile(r"(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*")
CONGESTION = re.compile(r"[a-z0-9_]{1,15}")  # TCP_CA_NAME_MAX is 16 with the NUL
LENGTH = re.compile(r"[0-9]+[KMG]?")  # iperf3 --length
# Loopback forward or remote SSH; no leading "-" so it can never become an ssh option.
ADDRESS = re.compile(r"[A-Za-z0-9_\[][A-Za-z0-9_.:\[\]-]*")
USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
LIBVIRT_URI = re.compile(r"[a-z][a-z0-9+]*://\S*")
# A path on a remote machine: absolute, no whitespace, quotes or shell/ssh specials
# (it becomes part of an `env PYTHONPATH=...` argument and of file names).
REMOTE_PATH = re.compile(r"/[A-Za-z0-9_.+@/-]*")
# The remote interpreter: an absolute path as above, or a bare command name found on the remote's PATH.
REMOTE_PYTHON = re.compile(r"/[A-Za-z0-9_.+@/-]*|[A-Za-z][A-Za-z0-9_.+-]*")
# A kernel command line word the lab may add: "name" or "name=value", no spaces or quotes.
CMDLINE_WORD = re.compile(r"[a-z][a-z0-9_.-]*(?:=[A-Za-z0-9_.,:-]*)?")
CMDLINE_WHAT = 'a kernel parameter like "tun.backpressure_all=1" (no spaces or quotes)'


# --------------------------------------------------------------------------
# The typed configuration (docs/CONTRACTS.md)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Seconds; every wait in the lab is bounded by one of these."""

    host_boot: float = 300.0
    guest_boot: float = 240.0
    command: float = 120.0
    cell_grace: float = 60.0
    build: float = 3600.0


@dataclass(frozen=True)
class KernelRecipe:
    """A lab host kernel: a source, patches and config fragments, a build strategy.

    `source` is "debian:<version>" or an absolute Path to a kernel tree or
    tarball; patch and config paths are absolute (resolved against lab.toml's dir).
    """

    name: str
    source: str | Path
    patches: tuple[Path, ...] = ()
    configs: tuple[Path, ...] = ()
    strategy: str = "modules"
    # Extra lab host kernel command line, e.g. "tun.backpressure_all=1". An entry
    # "<module>.<param>=<value>" for one of the lab's modules is also given to
    # insmod when a lab host swaps this recipe's modules in (lab.session).
    cmdline: tuple[str, ...] = ()

    @property
    def debian_version(self) -> str | None:
        """The Debian package version for a "debian:<version>" source, else None."""
        if isinstance(self.source, str) and self.source.startswith(DEBIAN_PREFIX):
            return self.source[len(DEBIAN_PREFIX) :]
        return None


@dataclass(frozen=True)
class ImageRef:
    """A guest image, built from a declarative recipe file."""

    name: str
    recipe: Path


@dataclass(frozen=True)
class HostSpec:
    """Where guests run. ssh_port 0 = choose a free loopback port (nested) or 22 (ssh).

    `python` and `lab_path` (ssh hosts only) say how the lab agent starts on a
    remote machine, which has no copy of this machine's files: `python` is the
    remote interpreter (with the lab's dependencies installed), `lab_path` a
    directory on the remote that holds the `lab` package ("" = installed in
    that interpreter).
    """

    name: str
    provider: str
    kernel: str | None
    vcpus: int
    memory_mib: int
    ssh_port: int
    uri: str
    address: str
    user: str
    python: str = "python3"
    lab_path: str = ""


@dataclass(frozen=True)
class GuestNet:
    """A guest's NIC: the tap on the host side and how QEMU drives it."""

    backend: str
    txqueuelen: int
    tap: str
    queues: int = 1  # > 1: a multiqueue tap and <driver queues='N'>; the guest enables N channels


@dataclass(frozen=True)
class GuestSpec:
    """A guest VM; `index` is 1-based in lab.toml order, stable for addressing."""

    name: str
    host: str
    image: str
    vcpus: int
    memory_mib: int
    net: GuestNet
    index: int


@dataclass(frozen=True)
class Iperf3Options:
    """iperf3 client options; "" means iperf3's (or the host's) default."""

    congestion: str = ""
    length: str = ""


@dataclass(frozen=True)
class MatrixProfile:
    """A named variant of a matrix: the matrix keys it overrides (PROFILE_KEYS), validated."""

    name: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """The keys this profile sets, ready for dataclasses.replace."""
        return dict(self.values)


@dataclass(frozen=True)
class MatrixSpec:
    """A measurement matrix: which kernels (arms), backends, queue lengths, RTTs, flows, qdiscs and queues.

    Cells are kernels x backends x queues x qdiscs x streams x (txqueuelens at
    RTT 0, plus rtts_ms at rtt_txqueuelen) x repeats, plus pktgen cells for
    each entry of pktgen_threads (lab.measure.cells.expand). `order`/`seed`
    decide how arms sharing a lab host boot interleave; `warmup_s` is a
    discarded iperf3 run after every guest boot or module swap.
    """

    name: str
    host: str
    guest: str
    kernels: tuple[str, ...]
    backends: tuple[str, ...]
    txqueuelens: tuple[int, ...]
    rtts_ms: tuple[float, ...]
    rtt_txqueuelen: int
    repeats: int
    duration_s: int
    netem_limit: int
    netem_split: bool
    iperf3: Iperf3Options
    streams: tuple[int, ...] = (1,)
    qdiscs: tuple[str, ...] = ("default",)
    queues: tuple[int, ...] = (1,)
    pktgen_threads: tuple[int, ...] = ()
    pktgen_count: int = 200_000
    pktgen_size: int = 64
    order: str = "abba"
    seed: int = 1
    warmup_s: float = 2.0
    retries: int = 2
    max_host_crashes: int = 3
    swap: str = "reboot-guest"
    aa: bool = False  # an A/A control: the first kernel against a copy of itself (lab.measure.cells.arms_of)
    profiles: dict[str, MatrixProfile] = field(default_factory=dict)
    profile: str | None = None  # which profile was applied by with_profile, if any
    # The hosts the cells are spread over (lab.measure.cells.assign_hosts), each
    # measuring whole points (every arm and repeat of a point on one host);
    # () = just `host`. `host` is always one of them.
    hosts: tuple[str, ...] = ()

    @property
    def run_hosts(self) -> tuple[str, ...]:
        """The hosts this matrix's cells run on: `hosts`, or just `host`."""
        return self.hosts or (self.host,)

    def with_profile(self, name: str) -> MatrixSpec:
        """This matrix with profile `name` applied (validated at load time)."""
        profile = self.profiles.get(name)
        if profile is None:
            known = sorted(self.profiles)
            found = f"defined: {', '.join(known)}" if known else "this matrix defines none"
            raise ConfigError(
                f"matrices.{self.name}.profiles",
                f"expected the name of a profile, got {q(name)} ({found})",
                did_you_mean(name, known),
            )
        return replace(self, profile=name, **profile.overrides())


def _ratio(default: float) -> Any:
    """An expectation that is a ratio or fraction in (0, 1]."""
    return field(default=default, metadata={"range": "ratio"})


def _positive(default: float) -> Any:
    """An expectation that is any finite number > 0."""
    return field(default=default, metadata={"range": "positive"})


@dataclass(frozen=True)
class Expectations:
    """Thresholds of the properties lab.verdicts.expect asserts over a matrix run.

    Each threshold's field says how lab.toml's value is checked ("range" metadata).
    """

    stock_kernel: str
    nodrop_kernel: str
    collapse_max_ratio: float = _ratio(0.05)
    nodrop_hold_min_ratio: float = _ratio(0.50)
    no_regression_min_ratio: float = _ratio(0.90)
    nodrop_retrans_max_fraction: float = _ratio(0.001)
    delay_min_ratio: float = _ratio(0.90)
    vhost_min_gbps: float = _positive(10.0)
    # Comparisons (lab.verdicts.stats): "same" when the ratio's CI lies within
    # 1 +- same_tolerance; CIs at `confidence`.
    same_tolerance: float = _ratio(0.10)
    confidence: float = _ratio(0.95)


@dataclass(frozen=True)
class ScenarioSpec:
    """[scenarios]: the failure scenarios (lab.measure.scenarios) run on `kernels`, with `host` and `guest` as templates."""

    host: str
    guest: str
    kernels: tuple[str, ...]


@dataclass(frozen=True)
class LabConfig:
    """The whole lab, resolved: `root` is lab.toml's directory, `source` the file."""

    name: str
    workdir: Path
    root: Path
    source: Path
    timeouts: Timeouts
    kernels: dict[str, KernelRecipe]
    images: dict[str, ImageRef]
    hosts: dict[str, HostSpec]
    guests: dict[str, GuestSpec]
    matrices: dict[str, MatrixSpec]
    expectations: Expectations
    scenarios: ScenarioSpec | None = None



# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def find_config(path: Path | str | None = None) -> tuple[Path, str]:
    """Which lab.toml to load, and why: (path, origin).

    Order: the explicit `path`, then $LAB_CONFIG, then ./lab.toml if present,
    then the repository's own lab.toml next to the package.
    """
    if path is not None:
        return Path(path), "given"
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env), f"${ENV_CONFIG}"
    here = Path.cwd() / "lab.toml"
    if here.is_file():
        return here, "./lab.toml"
    return DEFAULT_CONFIG, "the repository default"


def load_config(path: Path | str | None = None, *, mem_total_mib: int | None = None) -> LabConfig:
    """Load and validate a lab.toml (see `find_config` for which one).

    `mem_total_mib` overrides this machine's MemTotal for the memory checks
    (tests); None reads /proc/meminfo. Raises ConfigError.
    """
    chosen, origin = find_config(path)
    try:
        source = chosen.expanduser().resolve()
    except (OSError, RuntimeError) as e:
        raise ConfigError("", f"{chosen}: cannot resolve the path ({e})") from None
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        hint = f"unset ${ENV_CONFIG} or point it at a lab.toml" if origin.startswith("$") else None
        raise ConfigError("", f"{source}: no such file (config from {origin})", hint) from None
    except OSError as e:
        raise ConfigError("", f"{source}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{source}: not UTF-8 text (byte {e.start})") from None
    return loads_config(text, source.parent, source, mem_total_mib=mem_total_mib)


def loads_config(text: str, root: Path, source: Path, *, mem_total_mib: int | None = None) -> LabConfig:
    """Validate lab.toml text; `root` anchors relative paths, `source` names the file in errors.

    `mem_total_mib`: as in `load_config`.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line L, column C)"
        raise ConfigError("", f"{source}: not valid TOML: {e}") from None
    if mem_total_mib is None:
        mem_total_mib = read_mem_total_mib()
    ctx = _Context(root=Path(root).resolve(), source=Path(source), mem_total_mib=mem_total_mib)
    return _build(data, ctx)


def read_mem_total_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """This machine's MemTotal in MiB, or None when it cannot be read."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "MemTotal:" and parts[1].isdigit():
            return int(parts[1]) // 1024  # /proc/meminfo says kB, meaning KiB
    return None


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What validation needs beyond the TOML: where it lives, this machine's memory."""

    root: Path
    source: Path
    mem_total_mib: int | None

    def path(self, key_path: str, raw: str) -> Path:
        """A path from lab.toml: ~ expanded, relative to lab.toml's directory."""
        try:
            p = Path(raw).expanduser()
        except RuntimeError as e:  # "~" with no HOME
            raise ConfigError(key_path, f"cannot expand {q(raw)} ({e})") from None
        # normpath, not resolve(): keep the user's symlinked names, drop "a/../"
        return Path(os.path.normpath(p if p.is_absolute() else self.root / p))


def _existing(ctx: _Context, path: str, value: Any, *, kind: str) -> Path:
    """A path that exists: kind "file", "dir" or "any" (file or directory)."""
    what = {"file": "an existing file", "dir": "an existing directory", "any": "an existing file or directory"}[kind]
    expected = f"{what} (relative to {ctx.root})"
    raw = string(path, value, f"a path to {expected}")
    if not raw:
        raise ConfigError(path, f"expected {expected}, got an empty string")
    resolved = ctx.path(path, raw)
    ok = resolved.exists() and (kind == "any" or (resolved.is_file() if kind == "file" else resolved.is_dir()))
    if not ok:
        why = "no such path" if not resolved.exists() else "not a file" if kind == "file" else "not a directory"
        raise ConfigError(path, f"expected {expected}, got {q(raw)} ({why}: {resolved})", path_hint(raw, resolved))
    return resolved


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------

TOP_KEYS = ("lab", "timeouts", "kernels", "images", "hosts", "guests", "matrices", "expectations", "scenarios")
SCENARIO_KEYS = ("host", "guest", "kernels")
LAB_KEYS = ("name", "workdir")
TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(Timeouts))
KERNEL_KEYS = ("source", "patches", "configs", "strategy", "cmdline")
IMAGE_KEYS = ("recipe",)
HOST_KEYS = ("provider", "kernel", "vcpus", "memory_mib", "ssh_port", "uri", "address", "user", "python", "lab_path")
SSH_ONLY_KEYS = ("uri", "address", "python", "lab_path")
GUEST_KEYS = ("host", "image", "vcpus", "memory_mib", "net")
NET_KEYS = ("backend", "txqueuelen", "tap", "queues")
PROFILE_KEYS = (
    "kernels", "backends", "txqueuelens", "rtts_ms", "rtt_txqueuelen", "repeats", "duration_s",
    "streams", "qdiscs", "queues", "pktgen_threads", "pktgen_count", "pktgen_size", "order", "seed", "warmup_s", "swap",
    "aa",
)  # fmt: skip
MATRIX_KEYS = ("host", "hosts", "guest", *PROFILE_KEYS, "netem_limit", "netem_split", "iperf3", "retries", "max_host_crashes", "profiles")
IPERF3_KEYS = tuple(f.name for f in dataclasses.fields(Iperf3Options))
EXPECTATION_KEYS = tuple(f.name for f in dataclasses.fields(Expectations))

DEFAULT_WORKDIR = "~/.cache/vhost-lab"
# Read-only views, so no caller can change a default for everyone. Arrays are
# tuples here and become lists (as TOML gives them) where they are read.
HOST_DEFAULTS: Mapping[str, Any] = MappingProxyType({"vcpus": 2, "memory_mib": 4096, "ssh_port": 0, "user": "root"})
GUEST_DEFAULTS: Mapping[str, Any] = MappingProxyType({"vcpus": 1, "memory_mib": 1024})
NET_DEFAULTS: Mapping[str, Any] = MappingProxyType({"backend": "vhost", "txqueuelen": 1000, "queues": 1})
MATRIX_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "backends": BACKENDS,
        "txqueuelens": (1000,),
        "rtts_ms": (),
        "rtt_txqueuelen": 1000,
        "repeats": 1,
        "duration_s": 10,
        "netem_limit": 100_000,
        "netem_split": False,
        "streams": (1,),
        "qdiscs": ("default",),
        "queues": (1,),
        "pktgen_threads": (),
        "pktgen_count": 200_000,
        "pktgen_size": 64,
        "order": "abba",
        "seed": 1,
        "warmup_s": 2.0,
        "swap": "reboot-guest",
        "aa": False,
        "retries": 2,
        "max_host_crashes": 3,
    }
)


def _build(data: dict[str, Any], ctx: _Context) -> LabConfig:
    top = Table("", data, TOP_KEYS)

    lab = section(top, "lab", LAB_KEYS, required=True)
    name = pattern(
        lab.at("name"), lab.get("name", expected="a string"), LAB_NAME, f"a lab name matching {LAB_NAME.pattern}"
    )
    workdir_raw = string(lab.at("workdir"), lab.get("workdir", DEFAULT_WORKDIR), "a path")
    if not workdir_raw:
        raise ConfigError(lab.at("workdir"), "expected a path, got an empty string")
    workdir = ctx.path(lab.at("workdir"), workdir_raw)

    timeouts = _timeouts(section(top, "timeouts", TIMEOUT_KEYS, required=False))

    kernels = {
        k: _kernel(ctx, k, table(join("kernels", k), v, KERNEL_KEYS))
        for k, v in named_tables(top, "kernels", OBJECT_NAME, "kernel", required=True)
    }
    images = {
        k: _image(ctx, k, table(join("images", k), v, IMAGE_KEYS))
        for k, v in named_tables(top, "images", OBJECT_NAME, "image", required=True)
    }
    hosts = {
        k: _host(ctx, k, table(join("hosts", k), v, HOST_KEYS), kernels)
        for k, v in named_tables(top, "hosts", NODE_NAME, "host", required=True)
    }

    guests: dict[str, GuestSpec] = {}
    for index, (k, v) in enumerate(named_tables(top, "guests", NODE_NAME, "guest", required=True), start=1):
        guests[k] = _guest(ctx, name, k, index, table(join("guests", k), v, GUEST_KEYS), hosts, images, guests)

    matrices = {
        k: _matrix(k, table(join("matrices", k), v, MATRIX_KEYS), kernels, hosts, guests)
        for k, v in named_tables(top, "matrices", OBJECT_NAME, "matrix", required=False)
    }

    expectations = _expectations(section(top, "expectations", EXPECTATION_KEYS, required=True), kernels)
    scenarios = None
    if top.has("scenarios"):
        s = section(top, "scenarios", SCENARIO_KEYS, required=True)
        scenarios = ScenarioSpec(
            host=ref(s.at("host"), s.get("host", expected="the name of a host"), hosts, "hosts", "host"),
            guest=ref(s.at("guest"), s.get("guest", expected="the name of a guest"), guests, "guests", "guest"),
            kernels=_matrix_value("kernels", s.at("kernels"), s.get("kernels", expected="kernel names"), kernels),
        )

    return LabConfig(
        name=name,
        workdir=workdir,
        root=ctx.root,
        source=ctx.source,
        timeouts=timeouts,
        kernels=kernels,
        images=images,
        hosts=hosts,
        guests=guests,
        matrices=matrices,
        expectations=expectations,
        scenarios=scenarios,
    )


def _timeouts(t: Table) -> Timeouts:
    defaults = Timeouts()
    values = {key: number(t.at(key), t.get(key, getattr(defaults, key)), lo=0.0, lo_open=True) for key in TIMEOUT_KEYS}
    return Timeouts(**values)


def _kernel(ctx: _Context, name: str, t: Table) -> KernelRecipe:
    if AMBIGUOUS_KERNEL.fullmatch(name):
        raise ConfigError(
            t.path,
            f"expected a kernel name not ending in -r<number> (cell ids use that suffix for repeats), got {q(name)}",
        )
    src_path = t.at("source")
    src = string(
        src_path,
        t.get("source", expected='"debian:<version>" or a path'),
        '"debian:<version>" or a path to a kernel tree or tarball',
    )
    source: str | Path
    if src.startswith(DEBIAN_PREFIX):
        if not DEBIAN_VERSION.fullmatch(src[len(DEBIAN_PREFIX) :]):
            raise ConfigError(
                src_path,
                f'expected "debian:<version>" with a Debian package version like "6.12.117-1~deb12u1", got {q(src)}',
            )
        source = src
    else:
        source = _existing(ctx, src_path, src, kind="any")

    patches = list_of(
        t.at("patches"),
        t.get("patches", []),
        lambda p, v: _existing(ctx, p, v, kind="any"),
        what="patch files or directories",
    )
    configs = list_of(
        t.at("configs"),
        t.get("configs", []),
        lambda p, v: _existing(ctx, p, v, kind="file"),
        what="config fragment files",
    )
    strategy = choice(t.at("strategy"), t.get("strategy", "modules"), STRATEGIES)
    if strategy == "modules" and not isinstance(source, str):
        # "modules" boots Debian's prebuilt image and only rebuilds some modules,
        # so it needs the matching Debian package, not an arbitrary tree.
        raise ConfigError(
            t.at("strategy"),
            f'expected "full" for a source path ("modules" loads rebuilt modules into Debian\'s prebuilt image '
            f'and needs a "debian:<version>" source), got "modules" with source {q(src)}',
            f'set {t.at("strategy")} = "full" or {src_path} = "debian:<version>"',
        )
    cmdline = list_of(t.at("cmdline"), t.get("cmdline", []), lambda p, v: pattern(p, v, CMDLINE_WORD, CMDLINE_WHAT),
                      what="kernel command line words")
    return KernelRecipe(name=name, source=source, patches=patches, configs=configs, strategy=strategy, cmdline=cmdline)


def _image(ctx: _Context, name: str, t: Table) -> ImageRef:
    recipe = _existing(ctx, t.at("recipe"), t.get("recipe", expected="a path to a recipe file"), kind="file")
    return ImageRef(name=name, recipe=recipe)


def _memory(ctx: _Context, t: Table, default: int, *, local: bool, below: tuple[str, int] | None = None) -> int:
    """memory_mib: >= 128; at most this machine's MemTotal when it runs here (`local`);
    below a nested host's own memory when it runs inside one (`below`)."""
    path = t.at("memory_mib")
    value = t.get("memory_mib", default)
    hi = MAX_U32
    unit = " (MiB)"
    if local and ctx.mem_total_mib is not None:
        hi = ctx.mem_total_mib
        unit = " (MiB; this machine's MemTotal)"
    if below is not None and below[1] - 1 < hi:
        hi = below[1] - 1
        unit = f" (MiB; less than host {below[0]}'s memory_mib)"
    if (
        not isinstance(value, bool)
        and isinstance(value, int)
        and not t.has("memory_mib")
        and not MIN_MEMORY_MIB <= value <= hi
    ):
        # the default does not fit: say so, since the user never wrote this number
        raise ConfigError(
            path, f"expected an integer from {MIN_MEMORY_MIB} to {hi}{unit}, got {value} (the default)", f"set {path}"
        )
    return integer(path, value, MIN_MEMORY_MIB, hi, unit)


def _host(ctx: _Context, name: str, t: Table, kernels: Mapping[str, KernelRecipe]) -> HostSpec:
    provider = choice(t.at("provider"), t.get("provider", expected=" or ".join(map(q, PROVIDERS))), PROVIDERS)
    kernel: str | None = None
    if provider == "nested" or t.has("kernel"):
        # nested boots its kernel; for local/ssh it only labels what is running
        kernel = ref(t.at("kernel"), t.get("kernel", expected="the name of a kernel"), kernels, "kernels", "kernel")
    vcpus = integer(t.at("vcpus"), t.get("vcpus", HOST_DEFAULTS["vcpus"]), 1, MAX_VCPUS)
    # only a nested host's memory is taken from this machine; local/ssh ignore it
    memory = _memory(ctx, t, HOST_DEFAULTS["memory_mib"], local=provider == "nested")
    ssh_port = integer(t.at("ssh_port"), t.get("ssh_port", HOST_DEFAULTS["ssh_port"]), 0, 65535)
    user = pattern(t.at("user"), t.get("user", HOST_DEFAULTS["user"]), USER, f"a user name matching {USER.pattern}")
    uri = address = lab_path = ""
    python = "python3"
    if provider == "ssh":
        uri = pattern(
            t.at("uri"),
            t.get("uri", expected='a libvirt URI like "qemu+ssh://root@host/system"'),
            LIBVIRT_URI,
            'a libvirt URI like "qemu+ssh://root@host/system"',
        )
        address = pattern(
            t.at("address"),
            t.get("address", expected="a host name or IP address"),
            ADDRESS,
            "a host name or IP address (not starting with -)",
        )
        python = pattern(
            t.at("python"),
            t.get("python", "python3"),
            REMOTE_PYTHON,
            'the remote\'s Python: an absolute path like "/opt/vhost-lab/bin/python" or a command name like "python3"',
        )
        lab_path = string(t.at("lab_path"), t.get("lab_path", ""), "a directory on the remote holding the lab package")
        if lab_path and (not REMOTE_PATH.fullmatch(lab_path) or "/../" in f"{lab_path}/"):
            raise ConfigError(
                t.at("lab_path"),
                f'expected "" (the lab installed in the remote\'s Python) or an absolute path on the remote '
                f"matching {REMOTE_PATH.pattern} without '..', got {q(lab_path)}",
            )
    else:
        for key in SSH_ONLY_KEYS:
            if t.has(key):
                raise ConfigError(
                    t.at(key),
                    f'expected no {key} for a "{provider}" host (only "ssh" hosts have one), got {found(t.data[key])}',
                    f"remove {t.at(key)}",
                )
    return HostSpec(
        name=name,
        provider=provider,
        kernel=kernel,
        vcpus=vcpus,
        memory_mib=memory,
        ssh_port=ssh_port,
        uri=uri,
        address=address,
        user=user,
        python=python,
        lab_path=lab_path,
    )


def _guest(
    ctx: _Context,
    lab_name: str,
    name: str,
    index: int,
    t: Table,
    hosts: Mapping[str, HostSpec],
    images: Mapping[str, ImageRef],
    earlier: Mapping[str, GuestSpec],
) -> GuestSpec:
    if name in hosts:
        raise ConfigError(
            t.path,
            f"expected a guest name not used by a host (both become libvirt domain and host names), "
            f"got {q(name)}, also hosts.{name}",
        )
    host = hosts[ref(t.at("host"), t.get("host", expected="the name of a host"), hosts, "hosts", "host")]
    image = ref(t.at("image"), t.get("image", expected="the name of an image"), images, "images", "image")
    vcpus = integer(t.at("vcpus"), t.get("vcpus", GUEST_DEFAULTS["vcpus"]), 1, MAX_VCPUS)
    memory = _memory(
        ctx,
        t,
        GUEST_DEFAULTS["memory_mib"],
        local=host.provider in ("nested", "local"),
        below=(host.name, host.memory_mib) if host.provider == "nested" else None,
    )

    n = section(t, "net", NET_KEYS, required=False)
    backend = choice(n.at("backend"), n.get("backend", NET_DEFAULTS["backend"]), BACKENDS)
    txqueuelen = integer(n.at("txqueuelen"), n.get("txqueuelen", NET_DEFAULTS["txqueuelen"]), 1, MAX_U32)
    queues = integer(n.at("queues"), n.get("queues", NET_DEFAULTS["queues"]), 1, MAX_QUEUES)
    tap_what = f"an interface name of at most {IFNAME_MAX_BYTES} bytes matching {TAP_NAME.pattern}"
    if n.has("tap"):
        tap = pattern(n.at("tap"), n.data["tap"], TAP_NAME, tap_what)
        if len(tap.encode()) > IFNAME_MAX_BYTES:
            raise ConfigError(n.at("tap"), f"expected {tap_what}, got {q(tap)} ({len(tap.encode())} bytes)")
    else:
        tap = f"{lab_name}-{name}"
        if len(tap.encode()) > IFNAME_MAX_BYTES:
            raise ConfigError(
                n.at("tap"),
                f"expected the default tap name lab.name-guest to fit {IFNAME_MAX_BYTES} bytes, "
                f"got {q(tap)} ({len(tap.encode())} bytes)",
                f"set {n.at('tap')} to a name of at most {IFNAME_MAX_BYTES} bytes, or shorten the guest name",
            )
    for other in earlier.values():
        if other.net.tap == tap:
            raise ConfigError(
                n.at("tap"),
                f"expected a tap name no other guest uses, got {q(tap)}, also guests.{other.name}.net.tap",
                f"set {n.at('tap')} to a unique name",
            )
    return GuestSpec(
        name=name,
        host=host.name,
        image=image,
        vcpus=vcpus,
        memory_mib=memory,
        net=GuestNet(backend=backend, txqueuelen=txqueuelen, tap=tap, queues=queues),
        index=index,
    )


def _txqueuelen(path: str, value: Any) -> int:
    return integer(path, value, 1, MAX_U32)


def _rtt(path: str, value: Any) -> float:
    rtt = number(path, value, lo=0.0, hi=MAX_RTT_MS)
    # whole microseconds: netem's practical resolution, and it keeps cell ids
    # short ("rtt0.5", never a 300-digit spelling of 5e-324)
    if round(rtt, 3) != rtt:
        raise ConfigError(path, f"expected a delay in whole microseconds (at most 3 decimals), got {num(rtt)}")
    return rtt


def _matrix_value(key: str, path: str, value: Any, kernels: Collection[str]) -> Any:
    """One profile-overridable matrix key: the same rules in a matrix and in its profiles."""
    if key == "kernels":
        return list_of(
            path, value, lambda p, v: ref(p, v, kernels, "kernels", "kernel"), what="kernel names", non_empty=True
        )
    if key == "backends":
        return list_of(path, value, lambda p, v: choice(p, v, BACKENDS), what='"tap"/"vhost"', non_empty=True)
    if key == "txqueuelens":
        return list_of(path, value, _txqueuelen, what=f"integers from 1 to {MAX_U32}")
    if key == "rtts_ms":
        return list_of(path, value, _rtt, what=f"numbers from 0 to {num(MAX_RTT_MS)}")
    if key == "rtt_txqueuelen":
        return _txqueuelen(path, value)
    if key == "repeats":
        return integer(path, value, 1, MAX_REPEATS)
    if key == "duration_s":
        return integer(path, value, 1, MAX_DURATION_S, " (seconds)")
    if key == "streams":
        return list_of(path, value, lambda p, v: integer(p, v, 1, MAX_STREAMS), what=f"integers from 1 to {MAX_STREAMS}",
                       non_empty=True)
    if key == "qdiscs":
        return list_of(path, value, lambda p, v: choice(p, v, QDISCS), what="qdisc names", non_empty=True)
    if key == "queues":
        return list_of(path, value, lambda p, v: integer(p, v, 1, MAX_QUEUES), what=f"integers from 1 to {MAX_QUEUES}",
                       non_empty=True)
    if key == "pktgen_threads":
        return list_of(path, value, lambda p, v: integer(p, v, 1, MAX_VCPUS), what="pktgen thread counts")
    if key == "pktgen_count":
        return integer(path, value, 1, 10**9, " (packets per thread)")
    if key == "pktgen_size":
        return integer(path, value, 60, 9000, " (bytes)")
    if key == "order":
        return choice(path, value, ORDERS)
    if key == "seed":
        return integer(path, value, 0, MAX_U32)
    if key == "warmup_s":
        return number(path, value, lo=0.0, hi=600.0)
    if key == "swap":
        return choice(path, value, SWAPS)
    if key == "aa":
        return boolean(path, value)
    raise AssertionError(f"not a profile key: {key}")  # PROFILE_KEYS and this function disagree


def _check_has_cells(path: str, values: Mapping[str, Any]) -> None:
    if not values["txqueuelens"] and not values["rtts_ms"]:
        raise ConfigError(path, "expected txqueuelens or rtts_ms to be non-empty, got both empty (no cells to run)")


def _matrix(
    name: str,
    t: Table,
    kernels: Mapping[str, KernelRecipe],
    hosts: Mapping[str, HostSpec],
    guests: Mapping[str, GuestSpec],
) -> MatrixSpec:
    run_hosts: tuple[str, ...] = ()
    if t.has("hosts"):
        run_hosts = list_of(t.at("hosts"), t.data["hosts"], lambda p, v: ref(p, v, hosts, "hosts", "host"),
                            what="host names", non_empty=True)
        _check_run_hosts(t.at("hosts"), run_hosts, hosts)
    if t.has("host") or not run_hosts:
        host = ref(t.at("host"), t.get("host", expected="the name of a host"), hosts, "hosts", "host")
        if run_hosts and host not in run_hosts:
            raise ConfigError(
                t.at("host"),
                f"expected one of the matrix's hosts ({', '.join(run_hosts)}), got {q(host)}",
                f"add {q(host)} to {t.at('hosts')} or remove {t.at('host')}",
            )
    else:
        host = run_hosts[0]
    guest = ref(t.at("guest"), t.get("guest", expected="the name of a guest"), guests, "guests", "guest")
    values: dict[str, Any] = {}
    for key in PROFILE_KEYS:
        # "kernels" has no default: which kernels to compare is the point of a matrix
        default = MATRIX_DEFAULTS.get(key, REQUIRED)
        raw = t.get(
            key, list(default) if isinstance(default, tuple) else default, expected="a non-empty array of kernel names"
        )
        values[key] = _matrix_value(key, t.at(key), raw, kernels)
    _check_has_cells(t.at("txqueuelens"), values)
    netem_limit = integer(
        t.at("netem_limit"), t.get("netem_limit", MATRIX_DEFAULTS["netem_limit"]), 1, MAX_U32, " (packets)"
    )
    netem_split = boolean(t.at("netem_split"), t.get("netem_split", MATRIX_DEFAULTS["netem_split"]))
    retries = integer(t.at("retries"), t.get("retries", MATRIX_DEFAULTS["retries"]), 0, 10)
    max_host_crashes = integer(t.at("max_host_crashes"), t.get("max_host_crashes", MATRIX_DEFAULTS["max_host_crashes"]), 0, 100)

    i = section(t, "iperf3", IPERF3_KEYS, required=False)
    defaults = Iperf3Options()
    congestion = string(i.at("congestion"), i.get("congestion", defaults.congestion))
    if congestion and not CONGESTION.fullmatch(congestion):
        raise ConfigError(
            i.at("congestion"),
            f'expected "" or a congestion control name matching {CONGESTION.pattern}, got {q(congestion)}',
        )
    length = string(i.at("length"), i.get("length", defaults.length))
    if length and (not LENGTH.fullmatch(length) or int(length.rstrip("KMG")) == 0):
        raise ConfigError(
            i.at("length"), f'expected "" or a positive size matching {LENGTH.pattern} like "128K", got {q(length)}'
        )

    profiles: dict[str, MatrixProfile] = {}
    for pname, pvalue in named_tables(t, "profiles", OBJECT_NAME, "profile", required=False):
        p = table(join(t.at("profiles"), pname), pvalue, PROFILE_KEYS)
        overrides = {key: _matrix_value(key, p.at(key), p.data[key], kernels) for key in PROFILE_KEYS if p.has(key)}
        _check_has_cells(p.path, {**values, **overrides})
        profiles[pname] = MatrixProfile(name=pname, values=MappingProxyType(overrides))

    return MatrixSpec(
        name=name,
        host=host,
        guest=guest,
        **values,
        netem_limit=netem_limit,
        netem_split=netem_split,
        iperf3=Iperf3Options(congestion=congestion, length=length),
        retries=retries,
        max_host_crashes=max_host_crashes,
        profiles=profiles,
        hosts=run_hosts,
    )


def _check_run_hosts(path: str, names: tuple[str, ...], hosts: Mapping[str, HostSpec]) -> None:
    """A matrix's `hosts` (list_of refused duplicates): at most one "local" host (two would be the same machine)."""
    local = [n for n in names if hosts[n].provider == "local"]
    if len(local) > 1:
        raise ConfigError(
            path,
            f'expected at most one "local" host (every "local" host is this machine), got {", ".join(map(q, local))}',
        )


def _expectations(t: Table, kernels: Mapping[str, KernelRecipe]) -> Expectations:
    stock = ref(
        t.at("stock_kernel"), t.get("stock_kernel", expected="the name of a kernel"), kernels, "kernels", "kernel"
    )
    nodrop = ref(
        t.at("nodrop_kernel"), t.get("nodrop_kernel", expected="the name of a kernel"), kernels, "kernels", "kernel"
    )
    if stock == nodrop:
        raise ConfigError(
            t.at("nodrop_kernel"), f"expected a kernel other than stock_kernel, got {q(nodrop)} for both"
        )
    defaults = Expectations(stock, nodrop)
    values: dict[str, float] = {}
    for f in dataclasses.fields(Expectations):
        kind = f.metadata.get("range")
        if kind is None:
            continue  # the kernel names, checked above
        raw = t.get(f.name, getattr(defaults, f.name))
        hi = 1.0 if kind == "ratio" else None
        values[f.name] = number(t.at(f.name), raw, lo=0.0, hi=hi, lo_open=True)
    return Expectations(stock_kernel=stock, nodrop_kernel=nodrop, **values)
