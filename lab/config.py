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
import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from lab.errors import ConfigError

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
STRATEGIES = ("modules", "full")
PROVIDERS = ("nested", "local", "ssh")
DEBIAN_PREFIX = "debian:"

# Names become parts of other names, so each class is as narrow as its use:
LAB_NAME = re.compile(r"[a-z][a-z0-9]{0,5}")  # prefix of every domain and tap
NODE_NAME = re.compile(r"[a-z][a-z0-9-]{0,15}")  # hosts, guests: libvirt domains and hostnames
OBJECT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # kernels, images, matrices, profiles: paths, ids
# A kernel name ending in "-r<n>" would read as a cell id's repeat suffix.
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
    patches: tuple[Path, ...]
    configs: tuple[Path, ...]
    strategy: str

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
    """Where guests run. ssh_port 0 = choose a free loopback port (nested) or 22 (ssh)."""

    name: str
    provider: str
    kernel: str | None
    vcpus: int
    memory_mib: int
    ssh_port: int
    uri: str
    address: str
    user: str


@dataclass(frozen=True)
class GuestNet:
    """A guest's NIC: the tap on the host side and how QEMU drives it."""

    backend: str
    txqueuelen: int
    tap: str


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

    streams: int = 1
    congestion: str = ""
    length: str = ""


@dataclass(frozen=True)
class MatrixProfile:
    """A named variant of a matrix; None = not overridden."""

    name: str
    kernels: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    txqueuelens: tuple[int, ...] | None = None
    rtts_ms: tuple[float, ...] | None = None
    rtt_txqueuelen: int | None = None
    repeats: int | None = None
    duration_s: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The keys this profile sets, ready for dataclasses.replace."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class MatrixSpec:
    """A measurement matrix: which kernels, backends, queue lengths and RTTs."""

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
    profiles: dict[str, MatrixProfile] = field(default_factory=dict)
    profile: str | None = None  # which profile was applied by with_profile, if any

    def with_profile(self, name: str) -> MatrixSpec:
        """This matrix with profile `name` applied (validated at load time)."""
        profile = self.profiles.get(name)
        if profile is None:
            known = sorted(self.profiles)
            found = f"defined: {', '.join(known)}" if known else "this matrix defines none"
            raise ConfigError(
                f"matrices.{self.name}.profiles",
                f"expected the name of a profile, got {_q(name)} ({found})",
                _did_you_mean(name, known),
            )
        return replace(self, profile=name, **profile.overrides())


@dataclass(frozen=True)
class Expectations:
    """Thresholds of the properties lab.verdicts.expect asserts over a matrix run."""

    stock_kernel: str
    nodrop_kernel: str
    collapse_max_ratio: float = 0.05
    nodrop_hold_min_ratio: float = 0.50
    no_regression_min_ratio: float = 0.90
    nodrop_retrans_max_fraction: float = 0.001
    delay_min_ratio: float = 0.90
    # Under TCG the two kernels run in two different lab host boots, and
    # nodrop/stock at txqueuelen 1000 (where the patch is inert) was measured
    # anywhere from 0.46 to 1.83: cross-kernel ratios get this looser bound there.
    tcg_cross_kernel_min_ratio: float = 0.40
    vhost_min_gbps: float = 10.0


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

    def default_tap(self, guest: str) -> str:
        """The tap name a guest gets when lab.toml does not set one."""
        return f"{self.name}-{guest}"


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
# Value checks: each takes the key path and the raw TOML value
# --------------------------------------------------------------------------

_REQUIRED: Any = object()  # sentinel default: the key must be present


def _q(value: str) -> str:
    """A string as it would be written in TOML (double quotes, escapes)."""
    return json.dumps(value, ensure_ascii=False)


def _found(value: Any) -> str:
    """What was found, spelled for a message: its TOML type and value."""
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({_num(value)})"
    if isinstance(value, str):
        return f"a string ({_q(value)})"
    if isinstance(value, list):
        return "an array" if value else "an empty array"
    if isinstance(value, dict):
        return "a table"
    return f"a date/time ({value})"


def _num(value: float | int) -> str:
    """A number as TOML spells it (inf, nan, 60 rather than 60.0)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer():
            return str(int(value))
    return str(value)


def _did_you_mean(word: str, options: Collection[str]) -> str | None:
    """A fix hint naming the closest option, if one is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {_q(close[0])}?" if close else None


def _join(path: str, key: str) -> str:
    """Append a key to a key path, quoting it as TOML would if it is not bare."""
    part = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _q(key)
    return f"{path}.{part}" if path else part


def _type_error(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(path, f"expected {expected}, got {_found(value)}")


def _int(path: str, value: Any, lo: int, hi: int, unit: str = "") -> int:
    """An integer in [lo, hi]; a boolean is not an integer."""
    expected = f"an integer from {lo} to {hi}{unit}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(path, expected, value)
    if not lo <= value <= hi:
        raise ConfigError(path, f"expected {expected}, got {value}")
    return value


def _number(path: str, value: Any, *, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite number (int or float, not bool) above lo (or at it, unless lo_open), at most hi."""
    if lo_open and hi is not None:
        expected = f"a number in ({_num(lo)}, {_num(hi)}]"
    elif hi is not None:
        expected = f"a number from {_num(lo)} to {_num(hi)}"
    else:
        expected = f"a finite number {'>' if lo_open else '>='} {_num(lo)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(path, expected, value)
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise ConfigError(path, f"expected {expected}, got {_num(value)}")
    return float(value)


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(path, "true or false", value)
    return value


def _str(path: str, value: Any, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise _type_error(path, expected, value)
    return value


def _pattern(path: str, value: Any, pattern: re.Pattern[str], what: str) -> str:
    """A string matching `pattern` in full; `what` describes it for the message."""
    text = _str(path, value, what)
    if not pattern.fullmatch(text):
        raise ConfigError(path, f"expected {what}, got {_q(text)}")
    return text


def _choice(path: str, value: Any, choices: Sequence[str]) -> str:
    quoted = [_q(c) for c in choices]
    expected = " or ".join(quoted) if len(quoted) <= 2 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    if not isinstance(value, str):
        raise _type_error(path, expected, value)
    if value not in choices:
        raise ConfigError(path, f"expected {expected}, got {_q(value)}", _did_you_mean(value, choices))
    return value


def _ref(path: str, value: Any, known: Collection[str], section: str, kind: str) -> str:
    """The name of something defined under [section]."""
    expected = f"the name of a {kind} defined under [{section}]"
    name = _str(path, value, expected)
    if name not in known:
        listed = ", ".join(known) if known else "none defined"
        hint = _did_you_mean(name, known) or f"define [{section}.{name}] or use one of: {listed}"
        raise ConfigError(path, f"expected {expected} ({listed}), got {_q(name)}", hint)
    return name


def _list(
    path: str,
    value: Any,
    item: Callable[[str, Any], T],
    *,
    what: str,
    non_empty: bool = False,
) -> tuple[T, ...]:
    """An array of items, each checked by `item` at path[i]; no duplicates."""
    expected = f"an array of {what}"
    if not isinstance(value, list):
        raise _type_error(path, expected, value)
    if non_empty and not value:
        raise ConfigError(path, f"expected a non-empty array of {what}, got an empty array")
    items: list[T] = []
    for i, raw in enumerate(value):
        checked = item(f"{path}[{i}]", raw)
        if checked in items:
            j = items.index(checked)
            shown = _q(checked) if isinstance(checked, str) else _num(checked)  # type: ignore[arg-type]
            raise ConfigError(f"{path}[{i}]", f"expected no duplicates, got {shown} again (also {path}[{j}])")
        items.append(checked)
    return tuple(items)


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
            raise ConfigError(key_path, f"cannot expand {_q(raw)} ({e})") from None
        # normpath, not resolve(): keep the user's symlinked names, drop "a/../"
        return Path(os.path.normpath(p if p.is_absolute() else self.root / p))


@dataclass(frozen=True)
class _Table:
    """A TOML table under validation: its key path and its raw content.

    Construction checks for unknown keys, so a typo is reported before any
    "missing key" it causes.
    """

    path: str
    data: Mapping[str, Any]
    allowed: tuple[str, ...]

    def __post_init__(self) -> None:
        for key in self.data:
            if key not in self.allowed:
                raise ConfigError(
                    self.at(key),
                    f"unknown key; expected one of {', '.join(self.allowed)}",
                    _did_you_mean(key, self.allowed),
                )

    def at(self, key: str) -> str:
        """The key path of `key` in this table."""
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        """Whether lab.toml sets `key` here."""
        return key in self.data

    def get(self, key: str, default: Any = _REQUIRED, expected: str = "a value") -> Any:
        """The raw value of `key`, or `default`; a missing key without default is an error."""
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise ConfigError(self.at(key), f"required key is missing (expected {expected})")
        return default


def _table(path: str, value: Any, allowed: Sequence[str]) -> _Table:
    """A TOML table (section) at `path`, checked for unknown keys."""
    if not isinstance(value, dict):
        raise _type_error(path, "a table", value)
    return _Table(path, value, tuple(allowed))


def _section(parent: _Table, key: str, allowed: Sequence[str], *, required: bool) -> _Table:
    """A sub-table of `parent`; an absent optional one reads as empty."""
    if not parent.has(key):
        if required:
            raise ConfigError(parent.at(key), "required table is missing (expected a table)")
        return _Table(parent.at(key), {}, tuple(allowed))
    return _table(parent.at(key), parent.data[key], allowed)


def _named_tables(
    parent: _Table, key: str, name_pattern: re.Pattern[str], what: str, *, required: bool
) -> list[tuple[str, Any]]:
    """The entries of a [key.<name>] collection, names checked; non-empty if required."""
    if not parent.has(key):
        if required:
            raise ConfigError(parent.at(key), f"required table is missing (expected at least one [{key}.<name>])")
        return []
    coll = parent.data[key]
    if not isinstance(coll, dict):
        raise _type_error(parent.at(key), f"a table of {what}s", coll)
    if required and not coll:
        raise ConfigError(parent.at(key), f"expected at least one [{key}.<name>], got an empty table")
    for name in coll:
        if not name_pattern.fullmatch(name):
            raise ConfigError(
                _join(parent.at(key), name), f"expected a {what} name matching {name_pattern.pattern}, got {_q(name)}"
            )
    return list(coll.items())


def _existing(ctx: _Context, path: str, value: Any, *, kind: str) -> Path:
    """A path that exists: kind "file", "dir" or "any" (file or directory)."""
    what = {"file": "an existing file", "dir": "an existing directory", "any": "an existing file or directory"}[kind]
    expected = f"{what} (relative to {ctx.root})"
    raw = _str(path, value, f"a path to {expected}")
    if not raw:
        raise ConfigError(path, f"expected {expected}, got an empty string")
    resolved = ctx.path(path, raw)
    ok = resolved.exists() and (kind == "any" or (resolved.is_file() if kind == "file" else resolved.is_dir()))
    if not ok:
        why = "no such path" if not resolved.exists() else "not a file" if kind == "file" else "not a directory"
        raise ConfigError(path, f"expected {expected}, got {_q(raw)} ({why}: {resolved})", _path_hint(raw, resolved))
    return resolved


def _path_hint(raw: str, resolved: Path) -> str | None:
    """Did-you-mean for a path: the closest name in the same directory."""
    try:
        siblings = [p.name for p in resolved.parent.iterdir()]
    except OSError:
        return None
    close = difflib.get_close_matches(resolved.name, siblings, n=1, cutoff=0.6)
    if not close or close[0] == resolved.name:
        return None
    parent = Path(raw).parent
    return f"did you mean {_q(str(parent / close[0]) if str(parent) != '.' else close[0])}?"


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------

TOP_KEYS = ("lab", "timeouts", "kernels", "images", "hosts", "guests", "matrices", "expectations")
LAB_KEYS = ("name", "workdir")
TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(Timeouts))
KERNEL_KEYS = ("source", "patches", "configs", "strategy")
IMAGE_KEYS = ("recipe",)
HOST_KEYS = ("provider", "kernel", "vcpus", "memory_mib", "ssh_port", "uri", "address", "user")
GUEST_KEYS = ("host", "image", "vcpus", "memory_mib", "net")
NET_KEYS = ("backend", "txqueuelen", "tap")
PROFILE_KEYS = ("kernels", "backends", "txqueuelens", "rtts_ms", "rtt_txqueuelen", "repeats", "duration_s")
MATRIX_KEYS = ("host", "guest", *PROFILE_KEYS, "netem_limit", "netem_split", "iperf3", "profiles")
IPERF3_KEYS = tuple(f.name for f in dataclasses.fields(Iperf3Options))
EXPECTATION_KEYS = tuple(f.name for f in dataclasses.fields(Expectations))
RATIO_KEYS = EXPECTATION_KEYS[2:-1]  # everything between the kernels and vhost_min_gbps

DEFAULT_WORKDIR = "~/.cache/vhost-lab"
# Read-only views, so no caller can change a default for everyone. Arrays are
# tuples here and become lists (as TOML gives them) where they are read.
HOST_DEFAULTS: Mapping[str, Any] = MappingProxyType({"vcpus": 2, "memory_mib": 4096, "ssh_port": 0, "user": "root"})
GUEST_DEFAULTS: Mapping[str, Any] = MappingProxyType({"vcpus": 1, "memory_mib": 1024})
NET_DEFAULTS: Mapping[str, Any] = MappingProxyType({"backend": "vhost", "txqueuelen": 1000})
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
    }
)


def _build(data: dict[str, Any], ctx: _Context) -> LabConfig:
    top = _Table("", data, TOP_KEYS)

    lab = _section(top, "lab", LAB_KEYS, required=True)
    name = _pattern(
        lab.at("name"), lab.get("name", expected="a string"), LAB_NAME, f"a lab name matching {LAB_NAME.pattern}"
    )
    workdir_raw = _str(lab.at("workdir"), lab.get("workdir", DEFAULT_WORKDIR), "a path")
    if not workdir_raw:
        raise ConfigError(lab.at("workdir"), "expected a path, got an empty string")
    workdir = ctx.path(lab.at("workdir"), workdir_raw)

    timeouts = _timeouts(_section(top, "timeouts", TIMEOUT_KEYS, required=False))

    kernels = {
        k: _kernel(ctx, k, _table(_join("kernels", k), v, KERNEL_KEYS))
        for k, v in _named_tables(top, "kernels", OBJECT_NAME, "kernel", required=True)
    }
    images = {
        k: _image(ctx, k, _table(_join("images", k), v, IMAGE_KEYS))
        for k, v in _named_tables(top, "images", OBJECT_NAME, "image", required=True)
    }
    hosts = {
        k: _host(ctx, k, _table(_join("hosts", k), v, HOST_KEYS), kernels)
        for k, v in _named_tables(top, "hosts", NODE_NAME, "host", required=True)
    }

    guests: dict[str, GuestSpec] = {}
    for index, (k, v) in enumerate(_named_tables(top, "guests", NODE_NAME, "guest", required=True), start=1):
        guests[k] = _guest(ctx, name, k, index, _table(_join("guests", k), v, GUEST_KEYS), hosts, images, guests)

    matrices = {
        k: _matrix(k, _table(_join("matrices", k), v, MATRIX_KEYS), kernels, hosts, guests)
        for k, v in _named_tables(top, "matrices", OBJECT_NAME, "matrix", required=False)
    }

    expectations = _expectations(_section(top, "expectations", EXPECTATION_KEYS, required=True), kernels)

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
    )


def _timeouts(t: _Table) -> Timeouts:
    defaults = Timeouts()
    values = {key: _number(t.at(key), t.get(key, getattr(defaults, key)), lo=0.0, lo_open=True) for key in TIMEOUT_KEYS}
    return Timeouts(**values)


def _kernel(ctx: _Context, name: str, t: _Table) -> KernelRecipe:
    if AMBIGUOUS_KERNEL.fullmatch(name):
        raise ConfigError(
            t.path,
            f"expected a kernel name not ending in -r<number> (cell ids use that suffix for repeats), got {_q(name)}",
        )
    src_path = t.at("source")
    src = _str(
        src_path,
        t.get("source", expected='"debian:<version>" or a path'),
        '"debian:<version>" or a path to a kernel tree or tarball',
    )
    source: str | Path
    if src.startswith(DEBIAN_PREFIX):
        if not DEBIAN_VERSION.fullmatch(src[len(DEBIAN_PREFIX) :]):
            raise ConfigError(
                src_path,
                f'expected "debian:<version>" with a Debian package version like "6.12.117-1~deb12u1", got {_q(src)}',
            )
        source = src
    else:
        source = _existing(ctx, src_path, src, kind="any")

    patches = _list(
        t.at("patches"),
        t.get("patches", []),
        lambda p, v: _existing(ctx, p, v, kind="any"),
        what="patch files or directories",
    )
    configs = _list(
        t.at("configs"),
        t.get("configs", []),
        lambda p, v: _existing(ctx, p, v, kind="file"),
        what="config fragment files",
    )
    strategy = _choice(t.at("strategy"), t.get("strategy", "modules"), STRATEGIES)
    if strategy == "modules" and not isinstance(source, str):
        # "modules" boots Debian's prebuilt image and only rebuilds some modules,
        # so it needs the matching Debian package, not an arbitrary tree.
        raise ConfigError(
            t.at("strategy"),
            f'expected "full" for a source path ("modules" loads rebuilt modules into Debian\'s prebuilt image '
            f'and needs a "debian:<version>" source), got "modules" with source {_q(src)}',
            f'set {t.at("strategy")} = "full" or {src_path} = "debian:<version>"',
        )
    return KernelRecipe(name=name, source=source, patches=patches, configs=configs, strategy=strategy)


def _image(ctx: _Context, name: str, t: _Table) -> ImageRef:
    recipe = _existing(ctx, t.at("recipe"), t.get("recipe", expected="a path to a recipe file"), kind="file")
    return ImageRef(name=name, recipe=recipe)


def _memory(ctx: _Context, t: _Table, default: int, *, local: bool, below: tuple[str, int] | None = None) -> int:
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
    return _int(path, value, MIN_MEMORY_MIB, hi, unit)


def _host(ctx: _Context, name: str, t: _Table, kernels: Mapping[str, KernelRecipe]) -> HostSpec:
    provider = _choice(t.at("provider"), t.get("provider", expected=" or ".join(map(_q, PROVIDERS))), PROVIDERS)
    kernel: str | None = None
    if provider == "nested" or t.has("kernel"):
        # nested boots its kernel; for local/ssh it only labels what is running
        kernel = _ref(t.at("kernel"), t.get("kernel", expected="the name of a kernel"), kernels, "kernels", "kernel")
    vcpus = _int(t.at("vcpus"), t.get("vcpus", HOST_DEFAULTS["vcpus"]), 1, MAX_VCPUS)
    # only a nested host's memory is taken from this machine; local/ssh ignore it
    memory = _memory(ctx, t, HOST_DEFAULTS["memory_mib"], local=provider == "nested")
    ssh_port = _int(t.at("ssh_port"), t.get("ssh_port", HOST_DEFAULTS["ssh_port"]), 0, 65535)
    user = _pattern(t.at("user"), t.get("user", HOST_DEFAULTS["user"]), USER, f"a user name matching {USER.pattern}")
    uri = address = ""
    if provider == "ssh":
        uri = _pattern(
            t.at("uri"),
            t.get("uri", expected='a libvirt URI like "qemu+ssh://root@host/system"'),
            LIBVIRT_URI,
            'a libvirt URI like "qemu+ssh://root@host/system"',
        )
        address = _pattern(
            t.at("address"),
            t.get("address", expected="a host name or IP address"),
            ADDRESS,
            "a host name or IP address (not starting with -)",
        )
    else:
        for key in ("uri", "address"):
            if t.has(key):
                raise ConfigError(
                    t.at(key),
                    f'expected no {key} for a "{provider}" host (only "ssh" hosts have one), got {_found(t.data[key])}',
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
    )


def _guest(
    ctx: _Context,
    lab_name: str,
    name: str,
    index: int,
    t: _Table,
    hosts: Mapping[str, HostSpec],
    images: Mapping[str, ImageRef],
    earlier: Mapping[str, GuestSpec],
) -> GuestSpec:
    if name in hosts:
        raise ConfigError(
            t.path,
            f"expected a guest name not used by a host (both become libvirt domain and host names), "
            f"got {_q(name)}, also hosts.{name}",
        )
    host = hosts[_ref(t.at("host"), t.get("host", expected="the name of a host"), hosts, "hosts", "host")]
    image = _ref(t.at("image"), t.get("image", expected="the name of an image"), images, "images", "image")
    vcpus = _int(t.at("vcpus"), t.get("vcpus", GUEST_DEFAULTS["vcpus"]), 1, MAX_VCPUS)
    memory = _memory(
        ctx,
        t,
        GUEST_DEFAULTS["memory_mib"],
        local=host.provider in ("nested", "local"),
        below=(host.name, host.memory_mib) if host.provider == "nested" else None,
    )

    n = _section(t, "net", NET_KEYS, required=False)
    backend = _choice(n.at("backend"), n.get("backend", NET_DEFAULTS["backend"]), BACKENDS)
    txqueuelen = _int(n.at("txqueuelen"), n.get("txqueuelen", NET_DEFAULTS["txqueuelen"]), 1, MAX_U32)
    tap_what = f"an interface name of at most {IFNAME_MAX_BYTES} bytes matching {TAP_NAME.pattern}"
    if n.has("tap"):
        tap = _pattern(n.at("tap"), n.data["tap"], TAP_NAME, tap_what)
        if len(tap.encode()) > IFNAME_MAX_BYTES:
            raise ConfigError(n.at("tap"), f"expected {tap_what}, got {_q(tap)} ({len(tap.encode())} bytes)")
    else:
        tap = f"{lab_name}-{name}"
        if len(tap.encode()) > IFNAME_MAX_BYTES:
            raise ConfigError(
                n.at("tap"),
                f"expected the default tap name lab.name-guest to fit {IFNAME_MAX_BYTES} bytes, "
                f"got {_q(tap)} ({len(tap.encode())} bytes)",
                f"set {n.at('tap')} to a name of at most {IFNAME_MAX_BYTES} bytes, or shorten the guest name",
            )
    for other in earlier.values():
        if other.net.tap == tap:
            raise ConfigError(
                n.at("tap"),
                f"expected a tap name no other guest uses, got {_q(tap)}, also guests.{other.name}.net.tap",
                f"set {n.at('tap')} to a unique name",
            )
    return GuestSpec(
        name=name,
        host=host.name,
        image=image,
        vcpus=vcpus,
        memory_mib=memory,
        net=GuestNet(backend=backend, txqueuelen=txqueuelen, tap=tap),
        index=index,
    )


def _txqueuelen(path: str, value: Any) -> int:
    return _int(path, value, 1, MAX_U32)


def _rtt(path: str, value: Any) -> float:
    rtt = _number(path, value, lo=0.0, hi=MAX_RTT_MS)
    # whole microseconds: netem's practical resolution, and it keeps cell ids
    # short ("rtt0.5", never a 300-digit spelling of 5e-324)
    if round(rtt, 3) != rtt:
        raise ConfigError(path, f"expected a delay in whole microseconds (at most 3 decimals), got {_num(rtt)}")
    return rtt


def _matrix_value(key: str, path: str, value: Any, kernels: Collection[str]) -> Any:
    """One profile-overridable matrix key: the same rules in a matrix and in its profiles."""
    if key == "kernels":
        return _list(
            path, value, lambda p, v: _ref(p, v, kernels, "kernels", "kernel"), what="kernel names", non_empty=True
        )
    if key == "backends":
        return _list(path, value, lambda p, v: _choice(p, v, BACKENDS), what='"tap"/"vhost"', non_empty=True)
    if key == "txqueuelens":
        return _list(path, value, _txqueuelen, what=f"integers from 1 to {MAX_U32}")
    if key == "rtts_ms":
        return _list(path, value, _rtt, what=f"numbers from 0 to {_num(MAX_RTT_MS)}")
    if key == "rtt_txqueuelen":
        return _txqueuelen(path, value)
    if key == "repeats":
        return _int(path, value, 1, MAX_REPEATS)
    if key == "duration_s":
        return _int(path, value, 1, MAX_DURATION_S, " (seconds)")
    raise AssertionError(f"not a profile key: {key}")  # PROFILE_KEYS and this function disagree


def _check_has_cells(path: str, txqueuelens: Sequence[int], rtts_ms: Sequence[float]) -> None:
    if not txqueuelens and not rtts_ms:
        raise ConfigError(path, "expected txqueuelens or rtts_ms to be non-empty, got both empty (no cells to run)")


def _matrix(
    name: str,
    t: _Table,
    kernels: Mapping[str, KernelRecipe],
    hosts: Mapping[str, HostSpec],
    guests: Mapping[str, GuestSpec],
) -> MatrixSpec:
    host = _ref(t.at("host"), t.get("host", expected="the name of a host"), hosts, "hosts", "host")
    guest = _ref(t.at("guest"), t.get("guest", expected="the name of a guest"), guests, "guests", "guest")
    values: dict[str, Any] = {}
    for key in PROFILE_KEYS:
        # "kernels" has no default: which kernels to compare is the point of a matrix
        default = MATRIX_DEFAULTS.get(key, _REQUIRED)
        raw = t.get(
            key, list(default) if isinstance(default, tuple) else default, expected="a non-empty array of kernel names"
        )
        values[key] = _matrix_value(key, t.at(key), raw, kernels)
    _check_has_cells(t.at("txqueuelens"), values["txqueuelens"], values["rtts_ms"])
    netem_limit = _int(
        t.at("netem_limit"), t.get("netem_limit", MATRIX_DEFAULTS["netem_limit"]), 1, MAX_U32, " (packets)"
    )
    netem_split = _bool(t.at("netem_split"), t.get("netem_split", MATRIX_DEFAULTS["netem_split"]))

    i = _section(t, "iperf3", IPERF3_KEYS, required=False)
    defaults = Iperf3Options()
    streams = _int(i.at("streams"), i.get("streams", defaults.streams), 1, MAX_STREAMS)
    congestion = _str(i.at("congestion"), i.get("congestion", defaults.congestion))
    if congestion and not CONGESTION.fullmatch(congestion):
        raise ConfigError(
            i.at("congestion"),
            f'expected "" or a congestion control name matching {CONGESTION.pattern}, got {_q(congestion)}',
        )
    length = _str(i.at("length"), i.get("length", defaults.length))
    if length and (not LENGTH.fullmatch(length) or int(length.rstrip("KMG")) == 0):
        raise ConfigError(
            i.at("length"), f'expected "" or a positive size matching {LENGTH.pattern} like "128K", got {_q(length)}'
        )

    profiles: dict[str, MatrixProfile] = {}
    for pname, pvalue in _named_tables(t, "profiles", OBJECT_NAME, "profile", required=False):
        p = _table(_join(t.at("profiles"), pname), pvalue, PROFILE_KEYS)
        overrides = {key: _matrix_value(key, p.at(key), p.data[key], kernels) for key in PROFILE_KEYS if p.has(key)}
        merged = {**values, **overrides}
        _check_has_cells(p.path, merged["txqueuelens"], merged["rtts_ms"])
        profiles[pname] = MatrixProfile(name=pname, **overrides)

    return MatrixSpec(
        name=name,
        host=host,
        guest=guest,
        **values,
        netem_limit=netem_limit,
        netem_split=netem_split,
        iperf3=Iperf3Options(streams=streams, congestion=congestion, length=length),
        profiles=profiles,
    )


def _expectations(t: _Table, kernels: Mapping[str, KernelRecipe]) -> Expectations:
    stock = _ref(
        t.at("stock_kernel"), t.get("stock_kernel", expected="the name of a kernel"), kernels, "kernels", "kernel"
    )
    nodrop = _ref(
        t.at("nodrop_kernel"), t.get("nodrop_kernel", expected="the name of a kernel"), kernels, "kernels", "kernel"
    )
    if stock == nodrop:
        raise ConfigError(
            t.at("nodrop_kernel"), f"expected a kernel other than stock_kernel, got {_q(nodrop)} for both"
        )
    defaults = Expectations(stock, nodrop)
    ratios = {
        key: _number(t.at(key), t.get(key, getattr(defaults, key)), lo=0.0, hi=1.0, lo_open=True) for key in RATIO_KEYS
    }
    gbps = _number(t.at("vhost_min_gbps"), t.get("vhost_min_gbps", defaults.vhost_min_gbps), lo=0.0, lo_open=True)
    return Expectations(stock_kernel=stock, nodrop_kernel=nodrop, **ratios, vhost_min_gbps=gbps)


# --------------------------------------------------------------------------
# Presentation: `lab config` and `lab config --json`
# --------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Dataclasses, Paths and tuples as plain JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def config_to_dict(cfg: LabConfig) -> dict[str, Any]:
    """The resolved lab as JSON-safe data; matrices and profiles carry their cell counts."""
    from lab.measure.cells import expand  # lab.measure.cells imports this module's types

    out: dict[str, Any] = _jsonable(cfg)
    for name, matrix in cfg.matrices.items():
        m = out["matrices"][name]
        m["cells"] = len(expand(matrix))
        m["profiles"] = {
            pname: {**_jsonable(profile.overrides()), "cells": len(expand(matrix.with_profile(pname)))}
            for pname, profile in matrix.profiles.items()
        }
    return out


def render_config(cfg: LabConfig) -> Any:
    """A rich renderable of the resolved lab for `lab config`."""
    from rich.console import Group
    from rich.table import Table

    from lab.measure.cells import expand

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold")
        for c in columns:
            t.add_column(c)
        return t

    def shown(v: Any) -> str:
        # paths under lab.toml's dir read better as they were written
        if isinstance(v, Path):
            return str(v.relative_to(cfg.root)) if v.is_relative_to(cfg.root) else str(v)
        return _num(v) if isinstance(v, float) else str(v)

    def seq(values: Sequence[Any]) -> str:
        return ", ".join(shown(v) for v in values) or "-"

    lab = Table.grid(padding=(0, 2))
    lab.add_column(style="bold")
    lab.add_column()
    lab.add_row("lab", cfg.name)
    lab.add_row("config", str(cfg.source))
    lab.add_row("workdir", str(cfg.workdir))
    lab.add_row(
        "timeouts",
        ", ".join(f"{f.name} {_num(getattr(cfg.timeouts, f.name))}s" for f in dataclasses.fields(cfg.timeouts)),
    )

    kernels = table("kernels", "name", "source", "strategy", "patches", "configs")
    for k in cfg.kernels.values():
        kernels.add_row(k.name, shown(k.source), k.strategy, seq(k.patches), seq(k.configs))

    images = table("images", "name", "recipe")
    for i in cfg.images.values():
        images.add_row(i.name, shown(i.recipe))

    hosts = table("hosts", "name", "provider", "kernel", "vcpus", "memory", "ssh")
    for h in cfg.hosts.values():
        port = str(h.ssh_port) if h.ssh_port else "auto"
        ssh = (
            f"{h.user}@{h.address}:{port}"
            if h.provider == "ssh"
            else (f"{h.user}@localhost:{port}" if h.provider == "nested" else "-")
        )
        hosts.add_row(h.name, h.provider, h.kernel or "-", str(h.vcpus), f"{h.memory_mib} MiB", ssh)

    guests = table("guests", "#", "name", "host", "image", "vcpus", "memory", "backend", "txqueuelen", "tap")
    for g in cfg.guests.values():
        guests.add_row(
            str(g.index),
            g.name,
            g.host,
            g.image,
            str(g.vcpus),
            f"{g.memory_mib} MiB",
            g.net.backend,
            str(g.net.txqueuelen),
            g.net.tap,
        )

    matrices = table(
        "matrices",
        "name",
        "host/guest",
        "kernels",
        "backends",
        "txqueuelens",
        "rtts_ms",
        "repeats",
        "duration",
        "cells",
    )
    for m in cfg.matrices.values():
        for variant in [m, *(m.with_profile(p) for p in m.profiles)]:
            label = m.name if variant.profile is None else f"  profile {variant.profile}"
            matrices.add_row(
                label,
                f"{m.host}/{m.guest}",
                seq(variant.kernels),
                seq(variant.backends),
                seq(variant.txqueuelens),
                f"{seq(variant.rtts_ms)} @qlen {variant.rtt_txqueuelen}" if variant.rtts_ms else "-",
                str(variant.repeats),
                f"{variant.duration_s}s",
                str(len(expand(variant))),
            )

    expectations = table("expectations", "property", "value")
    for f in dataclasses.fields(cfg.expectations):
        value = getattr(cfg.expectations, f.name)
        expectations.add_row(f.name, _num(value) if isinstance(value, float) else str(value))

    return Group(lab, kernels, images, hosts, guests, matrices, expectations)
