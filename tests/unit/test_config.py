"""lab.config: loading, defaults, and one test per class of invalid lab.toml.

Most tests build a lab as a Python dict, change one key, write it as TOML
into a temporary directory holding small patch/config/recipe files of their
own, and check the ConfigError: its message must start with the key path.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lab import config as config_module
from lab.config import (
    DEFAULT_CONFIG,
    MAX_U32,
    ConfigError,
    LabConfig,
    find_config,
    load_config,
    loads_config,
    read_mem_total_mib,
)
from lab.configview import config_to_dict, render_config

KNOWN_KEYS = frozenset().union(*(getattr(config_module, name) for name in dir(config_module) if name.endswith("_KEYS")))
MEM = 8192  # MiB: the pretend MemTotal of "this machine" in these tests
DELETE = object()  # a value for `changed`: remove the key


# ---------------------------------------------------------------- helpers


def to_toml(data: dict[str, Any]) -> str:
    """Enough of a TOML writer for these tests (tables, arrays, inline tables)."""

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            if math.isnan(v):
                return "nan"
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return repr(v)
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (scalars or not subs):
            lines.append(f"[{prefix}]")
        lines.extend(f"{key(k)} = {value(v)}" for k, v in scalars.items())
        for k, v in subs.items():
            table(f"{prefix}.{key(k)}" if prefix else key(k), v)

    table("", data)
    return "\n".join(lines) + "\n"


def base_lab() -> dict[str, Any]:
    """A small valid lab; the files it names are made by the `lab_dir` fixture."""
    return {
        "lab": {"name": "t", "workdir": "work"},
        "timeouts": {"host_boot": 30, "command": 5.5},
        "kernels": {
            "stock": {"source": "debian:6.12.117-1~deb12u1"},
            "nodrop": {
                "source": "debian:6.12.117-1~deb12u1",
                "patches": ["patches/nodrop", "patches/extra.patch"],
                "configs": ["configs/host.config"],
                "strategy": "modules",
            },
        },
        "images": {"img": {"recipe": "images/img.toml"}},
        "hosts": {"h1": {"provider": "nested", "kernel": "stock", "vcpus": 2, "memory_mib": 2048}},
        "guests": {
            "g1": {"host": "h1", "image": "img", "net": {"backend": "vhost", "txqueuelen": 1000}},
            "g2": {
                "host": "h1",
                "image": "img",
                "vcpus": 2,
                "memory_mib": 512,
                "net": {"backend": "tap", "tap": "custom0"},
            },
        },
        "matrices": {
            "m": {
                "host": "h1",
                "guest": "g1",
                "kernels": ["stock", "nodrop"],
                "backends": ["tap", "vhost"],
                "txqueuelens": [1000, 1],
                "rtts_ms": [60],
                "iperf3": {"congestion": "", "length": ""},
                "profiles": {"quick": {"txqueuelens": [1], "rtts_ms": [], "duration_s": 3}},
            }
        },
        "expectations": {"stock_kernel": "stock", "nodrop_kernel": "nodrop"},
    }


def changed(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of `data` with one key set (or removed, for DELETE).

    `dotted` splits on "."; a segment may not itself contain a dot.
    """
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lab directory with the files base_lab() names (module scope: hypothesis-safe)."""
    root = tmp_path_factory.mktemp("lab")
    (root / "patches" / "nodrop").mkdir(parents=True)
    (root / "patches" / "nodrop" / "0001-tun-stop-queue.patch").write_text("")
    (root / "patches" / "extra.patch").write_text("")
    (root / "configs").mkdir()
    (root / "configs" / "host.config").write_text("CONFIG_TUN=m\n")
    (root / "images").mkdir()
    (root / "images" / "img.toml").write_text("")
    (root / "linux-src").mkdir()
    return root


def load(lab_dir: Path, data: dict[str, Any], mem: int | None = MEM) -> LabConfig:
    """Write `data` as lab.toml in lab_dir and load it."""
    path = lab_dir / "lab.toml"
    path.write_text(to_toml(data))
    return load_config(path, mem_total_mib=mem)


def error(lab_dir: Path, data: dict[str, Any], mem: int | None = MEM) -> ConfigError:
    """The ConfigError loading `data` raises (the test fails if it loads)."""
    with pytest.raises(ConfigError) as info:
        load(lab_dir, data, mem)
    return info.value


def assert_error(err: ConfigError, key_path: str, *fragments: str) -> None:
    """The message starts with the key path and contains every fragment."""
    msg = str(err)
    assert msg.startswith(f"{key_path}: "), msg
    assert err.key_path == key_path
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


# ---------------------------------------------------------------- the repo's lab.toml


def test_repo_lab_toml_loads_cleanly() -> None:
    cfg = load_config(DEFAULT_CONFIG, mem_total_mib=64 * 1024)
    assert cfg.name == "vhl"
    assert cfg.source == DEFAULT_CONFIG
    assert cfg.root == DEFAULT_CONFIG.parent
    assert cfg.workdir == Path("~/.cache/vhost-lab").expanduser()
    assert list(cfg.kernels) == ["stock", "nodrop", "nodrop-v1", "nodrop-optin", "nodrop-optin-on", "nodrop-full"]
    assert cfg.kernels["nodrop-optin-on"].cmdline == ("tun.backpressure_all=1",)
    assert cfg.scenarios is not None and "nodrop-optin-on" in cfg.scenarios.kernels
    assert cfg.kernels["nodrop"].patches == (cfg.root / "kernel/patches/nodrop",)
    assert cfg.kernels["nodrop-v1"].patches == (cfg.root / "kernel/patches/nodrop-v1",)
    assert cfg.kernels["nodrop-optin"].patches == (cfg.root / "kernel/patches/nodrop-optin",)
    assert cfg.kernels["nodrop-full"].strategy == "full"
    assert cfg.kernels["stock"].debian_version == "6.12.117-1~deb12u1"
    assert cfg.images["bookworm"].recipe == cfg.root / "images/bookworm.toml"
    assert cfg.hosts["lab1"].provider == "nested" and cfg.hosts["lab1"].kernel == "stock"
    guest = cfg.guests["guest1"]
    assert (guest.host, guest.image, guest.index) == ("lab1", "bookworm", 1)
    assert guest.net.tap == "vhl-guest1" and guest.net.backend == "vhost"
    matrix = cfg.matrices["vhost-matrix"]
    assert matrix.kernels == ("stock", "nodrop")
    assert matrix.txqueuelens == (1000, 100, 10, 1) and matrix.rtts_ms == (60.0, 120.0)
    assert {"smoke", "aa"} <= set(matrix.profiles) and matrix.with_profile("aa").aa is True
    assert "upstream-review" in cfg.matrices
    assert (cfg.expectations.stock_kernel, cfg.expectations.nodrop_kernel) == ("stock", "nodrop")
    assert cfg.timeouts.build == 3600.0


# ---------------------------------------------------------------- a valid lab and its defaults


def test_base_lab_loads_with_resolved_paths_and_defaults(lab_dir: Path) -> None:
    cfg = load(lab_dir, base_lab())
    assert cfg.root == lab_dir and cfg.source == lab_dir / "lab.toml"
    assert cfg.workdir == lab_dir / "work"  # relative workdir: against lab.toml's dir
    assert cfg.timeouts.host_boot == 30.0 and cfg.timeouts.command == 5.5
    assert cfg.timeouts.guest_boot == 240.0  # default
    nodrop = cfg.kernels["nodrop"]
    assert nodrop.patches == (lab_dir / "patches/nodrop", lab_dir / "patches/extra.patch")
    assert nodrop.configs == (lab_dir / "configs/host.config",)
    assert cfg.kernels["stock"].strategy == "modules" and cfg.kernels["stock"].patches == ()
    host = cfg.hosts["h1"]
    assert (host.ssh_port, host.user, host.uri, host.address) == (0, "root", "", "")
    g1, g2 = cfg.guests["g1"], cfg.guests["g2"]
    assert (g1.index, g2.index) == (1, 2)
    assert (g1.vcpus, g1.memory_mib, g1.net.tap) == (1, 1024, "t-g1")
    assert (g2.net.tap, g2.net.backend, g2.net.txqueuelen) == ("custom0", "tap", 1000)
    m = cfg.matrices["m"]
    assert (m.rtt_txqueuelen, m.repeats, m.duration_s, m.netem_limit, m.netem_split) == (1000, 1, 10, 100_000, False)
    assert m.streams == (1,) and m.profile is None


def test_optional_sections_default(lab_dir: Path) -> None:
    data = base_lab()
    del data["timeouts"], data["matrices"], data["guests"]["g1"]["net"]
    data["lab"] = {"name": "t"}
    cfg = load(lab_dir, data)
    assert cfg.timeouts.host_boot == 300.0
    assert cfg.matrices == {}
    assert cfg.workdir == Path("~/.cache/vhost-lab").expanduser()
    assert (cfg.guests["g1"].net.backend, cfg.guests["g1"].net.txqueuelen) == ("vhost", 1000)


def test_matrix_defaults(lab_dir: Path) -> None:
    data = base_lab()
    data["matrices"]["m"] = {"host": "h1", "guest": "g1", "kernels": ["stock"]}
    m = load(lab_dir, data).matrices["m"]
    assert m.backends == ("tap", "vhost") and m.txqueuelens == (1000,) and m.rtts_ms == ()
    assert m.profiles == {}


def test_config_is_frozen(lab_dir: Path) -> None:
    cfg = load(lab_dir, base_lab())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.guests["g1"].net.txqueuelen = 1  # type: ignore[misc]


def test_workdir_expands_user(lab_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load(lab_dir, changed(base_lab(), "lab.workdir", "~/labwork"))
    assert cfg.workdir == tmp_path / "labwork"


def test_absolute_workdir_kept(lab_dir: Path, tmp_path: Path) -> None:
    assert load(lab_dir, changed(base_lab(), "lab.workdir", str(tmp_path / "w"))).workdir == tmp_path / "w"


def test_kernel_source_path_and_full_strategy(lab_dir: Path) -> None:
    data = changed(base_lab(), "kernels.nodrop.source", "linux-src")
    data = changed(data, "kernels.nodrop.strategy", "full")
    kernel = load(lab_dir, data).kernels["nodrop"]
    assert kernel.source == lab_dir / "linux-src" and kernel.debian_version is None


def test_ssh_host(lab_dir: Path) -> None:
    data = changed(
        base_lab(),
        "hosts.far",
        {
            "provider": "ssh",
            "uri": "qemu+ssh://root@far/system",
            "address": "192.0.2.7",
            "ssh_port": 2222,
            "user": "lab",
        },
    )
    host = load(lab_dir, data).hosts["far"]
    assert (host.uri, host.address, host.ssh_port, host.user, host.kernel) == (
        "qemu+ssh://root@far/system",
        "192.0.2.7",
        2222,
        "lab",
        None,
    )


def test_guest_on_ssh_host_is_not_bounded_by_this_machine(lab_dir: Path) -> None:
    data = changed(base_lab(), "hosts.far", {"provider": "ssh", "uri": "qemu+ssh://far/system", "address": "far"})
    data = changed(data, "guests.big", {"host": "far", "image": "img", "memory_mib": MEM * 4})
    assert load(lab_dir, data).guests["big"].memory_mib == MEM * 4


def test_with_profile_applies_overrides(lab_dir: Path) -> None:
    m = load(lab_dir, base_lab()).matrices["m"]
    quick = m.with_profile("quick")
    assert quick.profile == "quick"
    assert (quick.txqueuelens, quick.rtts_ms, quick.duration_s) == ((1,), (), 3)
    assert quick.kernels == m.kernels and quick.backends == m.backends  # not overridden


def test_with_profile_unknown_names_the_key_and_suggests(lab_dir: Path) -> None:
    m = load(lab_dir, base_lab()).matrices["m"]
    with pytest.raises(ConfigError) as info:
        m.with_profile("quik")
    assert_error(info.value, "matrices.m.profiles", '"quik"', "quick", 'did you mean "quick"?')


# ---------------------------------------------------------------- finding the file


def test_not_toml_names_file_and_position(lab_dir: Path) -> None:
    path = lab_dir / "broken.toml"
    path.write_text('[lab]\nname = "t"\nworkdir = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path, mem_total_mib=MEM)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not valid TOML")
    assert "line 3" in msg and "column" in msg


def test_loads_config_not_toml() -> None:
    with pytest.raises(ConfigError) as info:
        loads_config("[lab\n", Path("/nowhere"), Path("/nowhere/x.toml"), mem_total_mib=MEM)
    assert str(info.value).startswith("/nowhere/x.toml: not valid TOML") and "line 1" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert str(info.value).startswith(f"{tmp_path / 'nope.toml'}: no such file")


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "lab.toml").write_bytes(b'[lab]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "lab.toml")


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAB_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_config() == (DEFAULT_CONFIG, "the repository default")
    (tmp_path / "lab.toml").write_text("")
    assert find_config()[0] == tmp_path / "lab.toml"
    monkeypatch.setenv("LAB_CONFIG", str(tmp_path / "env.toml"))
    assert find_config() == (tmp_path / "env.toml", "$LAB_CONFIG")
    assert find_config(tmp_path / "given.toml") == (tmp_path / "given.toml", "given")


def test_load_config_uses_env(lab_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (lab_dir / "env.toml").write_text(to_toml(changed(base_lab(), "lab.name", "envlab")))
    monkeypatch.setenv("LAB_CONFIG", str(lab_dir / "env.toml"))
    assert load_config(mem_total_mib=MEM).name == "envlab"


def test_load_config_env_missing_file_hints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError) as info:
        load_config()
    assert "$LAB_CONFIG" in str(info.value) and info.value.hint


def test_empty_file_reports_missing_lab_table(tmp_path: Path) -> None:
    (tmp_path / "lab.toml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "lab.toml", mem_total_mib=MEM)
    assert_error(info.value, "lab", "required table is missing")


# ---------------------------------------------------------------- unknown keys

UNKNOWN_KEYS = [
    ("labs", "labs", 'did you mean "lab"?'),
    ("lab.nmae", "lab.nmae", 'did you mean "name"?'),
    ("timeouts.host_bot", "timeouts.host_bot", 'did you mean "host_boot"?'),
    ("kernels.stock.patch", "kernels.stock.patch", 'did you mean "patches"?'),
    ("images.img.recipes", "images.img.recipes", 'did you mean "recipe"?'),
    ("hosts.h1.provder", "hosts.h1.provder", 'did you mean "provider"?'),
    ("guests.g1.nett", "guests.g1.nett", 'did you mean "net"?'),
    ("guests.g1.net.txqueuelength", "guests.g1.net.txqueuelength", 'did you mean "txqueuelen"?'),
    ("matrices.m.rtt_ms", "matrices.m.rtt_ms", 'did you mean "rtts_ms"?'),
    ("matrices.m.iperf3.lenght", "matrices.m.iperf3.lenght", 'did you mean "length"?'),
    ("matrices.m.stream", "matrices.m.stream", 'did you mean "streams"?'),
    ("matrices.m.profiles.quick.repeat", "matrices.m.profiles.quick.repeat", 'did you mean "repeats"?'),
    ("expectations.collapse_ratio", "expectations.collapse_ratio", 'did you mean "collapse_max_ratio"?'),
]


@pytest.mark.parametrize(("dotted", "key_path", "hint"), UNKNOWN_KEYS)
def test_unknown_key(lab_dir: Path, dotted: str, key_path: str, hint: str) -> None:
    err = error(lab_dir, changed(base_lab(), dotted, 1))
    assert_error(err, key_path, "unknown key; expected one of", hint)


def test_unknown_key_without_close_match_has_no_hint(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "lab.zzzzzz", 1))
    assert_error(err, "lab.zzzzzz", "unknown key")
    assert err.hint is None


def test_profile_cannot_override_host(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "matrices.m.profiles.quick.host", "h1"))
    assert_error(err, "matrices.m.profiles.quick.host", "unknown key; expected one of kernels, backends")


def test_unknown_key_with_odd_characters_is_quoted(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "lab.a b", 1))
    assert_error(err, 'lab."a b"', "unknown key")


# ---------------------------------------------------------------- wrong types

WRONG_TYPES = [
    ("hosts.h1.vcpus", True, "hosts.h1.vcpus", "expected an integer from 1 to 64, got a boolean (true)"),
    ("hosts.h1.memory_mib", "2048", "hosts.h1.memory_mib", 'got a string ("2048")'),
    ("guests.g1.net.txqueuelen", 1.5, "guests.g1.net.txqueuelen", "got a float (1.5)"),
    ("guests.g1.net.txqueuelen", False, "guests.g1.net.txqueuelen", "got a boolean (false)"),
    ("guests.g1.net.backend", 1, "guests.g1.net.backend", 'expected "tap" or "vhost", got an integer (1)'),
    ("guests.g1.net", "vhost", "guests.g1.net", "expected a table, got a string"),
    ("lab.name", ["t"], "lab.name", "got an array"),
    ("lab", "t", "lab", "expected a table"),
    ("kernels", [], "kernels", "expected a table of kernels, got an empty array"),
    ("kernels.stock", "debian:6.12", "kernels.stock", "expected a table"),
    ("kernels.nodrop.patches", "patches/nodrop", "kernels.nodrop.patches", "expected an array of"),
    ("matrices.m.txqueuelens", [1000, "1"], "matrices.m.txqueuelens[1]", 'got a string ("1")'),
    ("matrices.m.rtts_ms", [60, True], "matrices.m.rtts_ms[1]", "got a boolean (true)"),
    ("matrices.m.txqueuelens", 1000, "matrices.m.txqueuelens", "expected an array of integers"),
    ("matrices.m.netem_split", 1, "matrices.m.netem_split", "expected true or false, got an integer (1)"),
    ("matrices.m.duration_s", 2.5, "matrices.m.duration_s", "got a float (2.5)"),
    ("matrices.m.iperf3.congestion", 0, "matrices.m.iperf3.congestion", "expected a string"),
    ("timeouts.build", "1h", "timeouts.build", "expected a finite number > 0, got a string"),
    ("timeouts.build", True, "timeouts.build", "got a boolean"),
    ("expectations.delay_min_ratio", "0.9", "expectations.delay_min_ratio", "expected a number in (0, 1]"),
    ("hosts.h1.kernel", 3, "hosts.h1.kernel", "expected the name of a kernel defined under [kernels], got an integer"),
]


@pytest.mark.parametrize(("dotted", "value", "key_path", "fragment"), WRONG_TYPES)
def test_wrong_type(lab_dir: Path, dotted: str, value: Any, key_path: str, fragment: str) -> None:
    assert_error(error(lab_dir, changed(base_lab(), dotted, value)), key_path, fragment)


def test_toml_datetime_is_named(lab_dir: Path) -> None:
    text = to_toml(base_lab()).replace('name = "t"', "name = 1979-05-27")
    with pytest.raises(ConfigError) as info:
        loads_config(text, lab_dir, lab_dir / "lab.toml", mem_total_mib=MEM)
    assert_error(info.value, "lab.name", "got a date/time (1979-05-27)")


# ---------------------------------------------------------------- missing required keys

MISSING = [
    ("lab", "lab", "required table is missing"),
    ("lab.name", "lab.name", "required key is missing"),
    ("kernels", "kernels", "required table is missing"),
    ("images", "images", "required table is missing"),
    ("hosts", "hosts", "required table is missing"),
    ("guests", "guests", "required table is missing"),
    ("expectations", "expectations", "required table is missing"),
    ("kernels.stock.source", "kernels.stock.source", 'required key is missing (expected "debian:<version>"'),
    ("images.img.recipe", "images.img.recipe", "required key is missing"),
    ("hosts.h1.provider", "hosts.h1.provider", 'required key is missing (expected "nested" or "local" or "ssh")'),
    ("hosts.h1.kernel", "hosts.h1.kernel", "required key is missing"),  # nested needs a kernel
    ("guests.g1.host", "guests.g1.host", "required key is missing"),
    ("guests.g1.image", "guests.g1.image", "required key is missing"),
    ("matrices.m.host", "matrices.m.host", "required key is missing"),
    ("matrices.m.guest", "matrices.m.guest", "required key is missing"),
    ("matrices.m.kernels", "matrices.m.kernels", "required key is missing"),
    ("expectations.stock_kernel", "expectations.stock_kernel", "required key is missing"),
    ("expectations.nodrop_kernel", "expectations.nodrop_kernel", "required key is missing"),
]


@pytest.mark.parametrize(("dotted", "key_path", "fragment"), MISSING)
def test_missing_required(lab_dir: Path, dotted: str, key_path: str, fragment: str) -> None:
    assert_error(error(lab_dir, changed(base_lab(), dotted, DELETE)), key_path, fragment)


@pytest.mark.parametrize("section", ["kernels", "images", "hosts", "guests"])
def test_empty_required_collection(lab_dir: Path, section: str) -> None:
    assert_error(error(lab_dir, changed(base_lab(), section, {})), section, "expected at least one")


def test_local_host_needs_no_kernel(lab_dir: Path) -> None:
    data = changed(base_lab(), "hosts.here", {"provider": "local"})
    assert load(lab_dir, data).hosts["here"].kernel is None


def test_ssh_host_requires_uri_and_address(lab_dir: Path) -> None:
    data = changed(base_lab(), "hosts.far", {"provider": "ssh", "address": "far"})
    assert_error(error(lab_dir, data), "hosts.far.uri", "required key is missing")
    data = changed(base_lab(), "hosts.far", {"provider": "ssh", "uri": "qemu+ssh://far/system"})
    assert_error(error(lab_dir, data), "hosts.far.address", "required key is missing")


# ---------------------------------------------------------------- out of range

OUT_OF_RANGE = [
    ("guests.g1.net.txqueuelen", 0, "guests.g1.net.txqueuelen", f"expected an integer from 1 to {MAX_U32}, got 0"),
    ("guests.g1.net.txqueuelen", 2**32, "guests.g1.net.txqueuelen", f"got {2**32}"),
    ("matrices.m.txqueuelens", [1000, 0], "matrices.m.txqueuelens[1]", "got 0"),
    ("matrices.m.rtt_txqueuelen", 2**32, "matrices.m.rtt_txqueuelen", f"to {MAX_U32}"),
    ("matrices.m.rtts_ms", [60, -1], "matrices.m.rtts_ms[1]", "expected a number from 0 to 60000, got -1"),
    ("matrices.m.rtts_ms", [math.inf], "matrices.m.rtts_ms[0]", "got inf"),
    ("matrices.m.rtts_ms", [math.nan], "matrices.m.rtts_ms[0]", "got nan"),
    ("matrices.m.duration_s", 0, "matrices.m.duration_s", "expected an integer from 1"),
    ("matrices.m.duration_s", -5, "matrices.m.duration_s", "got -5"),
    ("matrices.m.repeats", 0, "matrices.m.repeats", "expected an integer from 1 to 100, got 0"),
    ("matrices.m.netem_limit", 0, "matrices.m.netem_limit", "got 0"),
    ("hosts.h1.vcpus", 0, "hosts.h1.vcpus", "expected an integer from 1 to 64, got 0"),
    ("guests.g1.vcpus", 65, "guests.g1.vcpus", "got 65"),
    ("hosts.h1.memory_mib", 127, "hosts.h1.memory_mib", "expected an integer from 128 to"),
    (
        "hosts.h1.memory_mib",
        MEM + 1,
        "hosts.h1.memory_mib",
        f"from 128 to {MEM} (MiB; this machine's MemTotal), got {MEM + 1}",
    ),
    ("hosts.h1.ssh_port", 65536, "hosts.h1.ssh_port", "from 0 to 65535"),
    ("matrices.m.streams", [0], "matrices.m.streams[0]", "expected an integer from 1 to 128"),
    ("matrices.m.streams", [1, 129], "matrices.m.streams[1]", "got 129"),
    ("matrices.m.queues", [17], "matrices.m.queues[0]", "expected an integer from 1 to 16"),
    ("matrices.m.retries", 11, "matrices.m.retries", "expected an integer from 0 to 10"),
    ("timeouts.command", 0, "timeouts.command", "expected a finite number > 0, got 0"),
    ("timeouts.command", -1.5, "timeouts.command", "got -1.5"),
    ("timeouts.cell_grace", math.inf, "timeouts.cell_grace", "got inf"),
    ("timeouts.guest_boot", math.nan, "timeouts.guest_boot", "got nan"),
    ("expectations.collapse_max_ratio", 0, "expectations.collapse_max_ratio", "expected a number in (0, 1], got 0"),
    ("expectations.nodrop_hold_min_ratio", 1.01, "expectations.nodrop_hold_min_ratio", "got 1.01"),
    ("expectations.nodrop_retrans_max_fraction", -0.1, "expectations.nodrop_retrans_max_fraction", "got -0.1"),
    ("expectations.vhost_min_gbps", 0, "expectations.vhost_min_gbps", "expected a finite number > 0, got 0"),
    ("expectations.vhost_min_gbps", math.inf, "expectations.vhost_min_gbps", "got inf"),
]


@pytest.mark.parametrize(("dotted", "value", "key_path", "fragment"), OUT_OF_RANGE)
def test_out_of_range(lab_dir: Path, dotted: str, value: Any, key_path: str, fragment: str) -> None:
    assert_error(error(lab_dir, changed(base_lab(), dotted, value)), key_path, fragment)


def test_boundaries_accepted(lab_dir: Path) -> None:
    data = changed(base_lab(), "guests.g1.net.txqueuelen", MAX_U32)
    data = changed(data, "hosts.h1.memory_mib", MEM)
    data = changed(data, "hosts.h1.vcpus", 64)
    data = changed(data, "matrices.m.rtts_ms", [0, 0.5, 60000])
    data = changed(data, "expectations.collapse_max_ratio", 1)
    cfg = load(lab_dir, data)
    assert cfg.guests["g1"].net.txqueuelen == MAX_U32
    assert cfg.matrices["m"].rtts_ms == (0.0, 0.5, 60000.0)
    assert cfg.expectations.collapse_max_ratio == 1.0


def test_default_memory_over_memtotal_says_default(lab_dir: Path) -> None:
    data = changed(base_lab(), "hosts.h1.memory_mib", DELETE)  # default 4096
    err = error(lab_dir, data, mem=2048)
    assert_error(err, "hosts.h1.memory_mib", "got 4096 (the default)")
    assert err.hint == "set hosts.h1.memory_mib"


def test_guest_memory_must_fit_in_nested_host(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "guests.g1.memory_mib", 2048))
    assert_error(err, "guests.g1.memory_mib", "less than host h1's memory_mib", "got 2048")


def test_no_meminfo_means_no_upper_memory_check(lab_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lab.config.read_mem_total_mib", lambda: None)
    cfg = load(lab_dir, changed(base_lab(), "hosts.h1.memory_mib", 10**7), mem=None)
    assert cfg.hosts["h1"].memory_mib == 10**7


def test_read_mem_total_mib(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemFree: 1 kB\nMemTotal:       24684092 kB\n")
    assert read_mem_total_mib(tmp_path / "meminfo") == 24684092 // 1024
    (tmp_path / "bad").write_text("nothing\n")
    assert read_mem_total_mib(tmp_path / "bad") is None
    assert read_mem_total_mib(tmp_path / "absent") is None


# ---------------------------------------------------------------- references

REFERENCES = [
    (
        "hosts.h1.kernel",
        "stok",
        "hosts.h1.kernel",
        'defined under [kernels] (stock, nodrop), got "stok"',
        'did you mean "stock"?',
    ),
    ("guests.g1.host", "h11", "guests.g1.host", 'defined under [hosts] (h1), got "h11"', 'did you mean "h1"?'),
    ("guests.g1.image", "imag", "guests.g1.image", 'got "imag"', 'did you mean "img"?'),
    ("matrices.m.host", "hx", "matrices.m.host", 'got "hx"', None),
    ("matrices.m.guest", "g3", "matrices.m.guest", 'got "g3"', None),
    ("matrices.m.kernels", ["stock", "nodorp"], "matrices.m.kernels[1]", 'got "nodorp"', 'did you mean "nodrop"?'),
    ("matrices.m.profiles.quick.kernels", ["nodrp"], "matrices.m.profiles.quick.kernels[0]", 'got "nodrp"', None),
    ("expectations.stock_kernel", "default", "expectations.stock_kernel", 'got "default"', None),
    ("expectations.nodrop_kernel", "patched", "expectations.nodrop_kernel", 'got "patched"', None),
]


@pytest.mark.parametrize(("dotted", "value", "key_path", "fragment", "hint"), REFERENCES)
def test_unknown_reference(
    lab_dir: Path, dotted: str, value: Any, key_path: str, fragment: str, hint: str | None
) -> None:
    err = error(lab_dir, changed(base_lab(), dotted, value))
    assert_error(err, key_path, fragment)
    assert err.hint is not None  # either a did-you-mean or "define ... or use one of ..."
    if hint:
        assert err.hint == hint
    else:
        assert "use one of:" in err.hint or "did you mean" in err.hint


def test_reference_without_close_match_suggests_defining_it(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "guests.g1.image", "zzzz"))
    assert err.hint == "define [images.zzzz] or use one of: img"


def test_stock_and_nodrop_kernels_differ(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "expectations.nodrop_kernel", "stock"))
    assert_error(err, "expectations.nodrop_kernel", "expected a kernel other than stock_kernel")


# ---------------------------------------------------------------- names and taps

BAD_NAMES = [
    ("lab.name", "Vhl", "lab.name", "expected a lab name matching [a-z][a-z0-9]{0,5}"),
    ("lab.name", "vhostlab", "lab.name", 'got "vhostlab"'),
    ("lab.name", "v-l", "lab.name", 'got "v-l"'),
    ("lab.name", "", "lab.name", 'got ""'),
]


@pytest.mark.parametrize(("dotted", "value", "key_path", "fragment"), BAD_NAMES)
def test_bad_lab_name(lab_dir: Path, dotted: str, value: Any, key_path: str, fragment: str) -> None:
    assert_error(error(lab_dir, changed(base_lab(), dotted, value)), key_path, fragment)


@pytest.mark.parametrize("name", ["Guest", "1guest", "guest_1", "g" * 17, "gü"])
def test_bad_guest_name(lab_dir: Path, name: str) -> None:
    data = changed(base_lab(), f"guests.{name}", {"host": "h1", "image": "img", "net": {"tap": "x0"}})
    err = error(lab_dir, data)
    assert err.key_path.startswith("guests.")
    assert "expected a guest name matching [a-z][a-z0-9-]{0,15}" in str(err)


@pytest.mark.parametrize("name", ["Host", "-h", "h" * 17, "h_1"])
def test_bad_host_name(lab_dir: Path, name: str) -> None:
    data = changed(base_lab(), f"hosts.{name}", {"provider": "local"})
    assert "expected a host name matching [a-z][a-z0-9-]{0,15}" in str(error(lab_dir, data))


def test_guest_and_host_names_share_a_namespace(lab_dir: Path) -> None:
    data = changed(base_lab(), "guests.h1", {"host": "h1", "image": "img", "net": {"tap": "x0"}})
    assert_error(error(lab_dir, data), "guests.h1", "not used by a host", "also hosts.h1")


def test_kernel_name_cannot_end_like_a_repeat_suffix(lab_dir: Path) -> None:
    data = changed(base_lab(), "kernels.patched-r2", {"source": "debian:6.12.117-1~deb12u1"})
    assert_error(error(lab_dir, data), "kernels.patched-r2", "not ending in -r<number>")


def test_duplicate_tap_names(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "guests.g2.net.tap", "t-g1"))  # g1's default
    assert_error(err, "guests.g2.net.tap", 'got "t-g1", also guests.g1.net.tap')


@pytest.mark.parametrize(
    ("tap", "fragment"),
    [
        ("a" * 16, "(16 bytes)"),
        ("tap 0", 'got "tap 0"'),
        ("-tap0", 'got "-tap0"'),
        ("tap/0", 'got "tap/0"'),
        ("täp0", 'got "täp0"'),
        ("", 'got ""'),
    ],
)
def test_bad_tap_name(lab_dir: Path, tap: str, fragment: str) -> None:
    err = error(lab_dir, changed(base_lab(), "guests.g2.net.tap", tap))
    assert_error(err, "guests.g2.net.tap", "expected an interface name of at most 15 bytes", fragment)


def test_tap_name_of_15_bytes_accepted(lab_dir: Path) -> None:
    assert load(lab_dir, changed(base_lab(), "guests.g2.net.tap", "a" * 15)).guests["g2"].net.tap == "a" * 15


def test_default_tap_too_long_tells_to_set_tap(lab_dir: Path) -> None:
    data = changed(base_lab(), "lab.name", "vhostl")
    data = changed(data, "guests.longguestname", {"host": "h1", "image": "img", "memory_mib": 256})
    err = error(lab_dir, data)
    assert_error(err, "guests.longguestname.net.tap", '"vhostl-longguestname" (20 bytes)')
    assert err.hint is not None and "set guests.longguestname.net.tap" in err.hint


# ---------------------------------------------------------------- kernels and files


@pytest.mark.parametrize(
    ("dotted", "value", "key_path", "fragment"),
    [
        ("kernels.stock.strategy", "modlues", "kernels.stock.strategy", 'expected "modules" or "full", got "modlues"'),
        ("kernels.stock.source", "debian:", "kernels.stock.source", "with a Debian package version"),
        ("kernels.stock.source", "debian:six", "kernels.stock.source", 'got "debian:six"'),
        ("kernels.stock.source", "debian:6.12 rc", "kernels.stock.source", 'got "debian:6.12 rc"'),
        ("kernels.stock.source", "no/such/tree", "kernels.stock.source", "(no such path: "),
        ("kernels.nodrop.patches", ["patches/nodrpo"], "kernels.nodrop.patches[0]", "no such path"),
        (
            "kernels.nodrop.patches",
            ["patches/nodrop", "patches/gone.patch"],
            "kernels.nodrop.patches[1]",
            "no such path",
        ),
        ("kernels.nodrop.configs", ["configs/host.cfg"], "kernels.nodrop.configs[0]", "expected an existing file"),
        ("kernels.nodrop.configs", ["configs"], "kernels.nodrop.configs[0]", "(not a file: "),
        ("kernels.nodrop.patches", [""], "kernels.nodrop.patches[0]", "got an empty string"),
        ("images.img.recipe", "images/im.toml", "images.img.recipe", "no such path"),
        ("images.img.recipe", "images", "images.img.recipe", "not a file"),
    ],
)
def test_kernel_and_file_problems(lab_dir: Path, dotted: str, value: Any, key_path: str, fragment: str) -> None:
    assert_error(error(lab_dir, changed(base_lab(), dotted, value)), key_path, fragment)


def test_missing_path_suggests_a_sibling(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "kernels.nodrop.patches", ["patches/nodrpo"]))
    assert err.hint == 'did you mean "patches/nodrop"?'
    err = error(lab_dir, changed(base_lab(), "images.img.recipe", "images/im.toml"))
    assert err.hint == 'did you mean "images/img.toml"?'


def test_duplicate_patch(lab_dir: Path) -> None:
    err = error(
        lab_dir, changed(base_lab(), "kernels.nodrop.patches", ["patches/extra.patch", "./patches/extra.patch"])
    )
    assert_error(err, "kernels.nodrop.patches[1]", "expected no duplicates", "also kernels.nodrop.patches[0]")


def test_debian_version_with_epoch_accepted(lab_dir: Path) -> None:
    cfg = load(lab_dir, changed(base_lab(), "kernels.stock.source", "debian:1:6.12.117-1~deb12u1+b1"))
    assert cfg.kernels["stock"].debian_version == "1:6.12.117-1~deb12u1+b1"


def test_modules_strategy_needs_debian_source(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "kernels.stock.source", "linux-src"))
    assert_error(err, "kernels.stock.strategy", 'expected "full" for a source path')
    assert err.hint is not None and 'kernels.stock.strategy = "full"' in err.hint


# ---------------------------------------------------------------- hosts


@pytest.mark.parametrize(
    ("host", "key_path", "fragment"),
    [
        (
            {"provider": "nestd", "kernel": "stock"},
            "hosts.x.provider",
            'expected "nested", "local" or "ssh", got "nestd"',
        ),
        ({"provider": "local", "uri": "qemu:///system"}, "hosts.x.uri", 'expected no uri for a "local" host'),
        (
            {"provider": "nested", "kernel": "stock", "address": "1.2.3.4"},
            "hosts.x.address",
            'no address for a "nested" host',
        ),
        ({"provider": "ssh", "uri": "far", "address": "far"}, "hosts.x.uri", "expected a libvirt URI"),
        (
            {"provider": "ssh", "uri": "qemu+ssh://far/system", "address": "-oProxyCommand=x"},
            "hosts.x.address",
            "not starting with -",
        ),
        (
            {"provider": "ssh", "uri": "qemu+ssh://far/system", "address": "far", "user": "Ro ot"},
            "hosts.x.user",
            'got "Ro ot"',
        ),
    ],
)
def test_host_problems(lab_dir: Path, host: dict[str, Any], key_path: str, fragment: str) -> None:
    assert_error(error(lab_dir, changed(base_lab(), "hosts.x", host)), key_path, fragment)


def test_provider_typo_hint(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "hosts.h1.provider", "nestd"))
    assert err.hint == 'did you mean "nested"?'


def test_backend_typo_message_exactly(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "guests.g1.net.backend", "vhots"))
    assert str(err) == 'guests.g1.net.backend: expected "tap" or "vhost", got "vhots" (fix: did you mean "vhost"?)'


# ---------------------------------------------------------------- matrices and profiles

MATRIX_PROBLEMS = [
    ("matrices.m.backends", ["tap", "virtio"], "matrices.m.backends[1]", 'expected "tap" or "vhost", got "virtio"'),
    ("matrices.m.backends", [], "matrices.m.backends", "expected a non-empty array"),
    (
        "matrices.m.backends",
        ["tap", "tap"],
        "matrices.m.backends[1]",
        'expected no duplicates, got "tap" again (also matrices.m.backends[0])',
    ),
    ("matrices.m.kernels", [], "matrices.m.kernels", "expected a non-empty array of kernel names, got an empty array"),
    ("matrices.m.kernels", ["stock", "stock"], "matrices.m.kernels[1]", "expected no duplicates"),
    ("matrices.m.txqueuelens", [1, 10, 1], "matrices.m.txqueuelens[2]", "got 1 again"),
    ("matrices.m.rtts_ms", [60, 60.0], "matrices.m.rtts_ms[1]", "got 60 again"),
    ("matrices.m.iperf3.congestion", "BBR", "matrices.m.iperf3.congestion", 'expected "" or a congestion control name'),
    ("matrices.m.iperf3.congestion", "bbr;rm", "matrices.m.iperf3.congestion", 'got "bbr;rm"'),
    ("matrices.m.iperf3.length", "128k", "matrices.m.iperf3.length", 'got "128k"'),
    ("matrices.m.iperf3.length", "0", "matrices.m.iperf3.length", 'expected "" or a positive size'),
    ("matrices.m.iperf3.length", "1T", "matrices.m.iperf3.length", 'got "1T"'),
    ("matrices.m.profiles.quick.txqueuelens", [0], "matrices.m.profiles.quick.txqueuelens[0]", "got 0"),
    ("matrices.m.profiles.quick.rtts_ms", [-60], "matrices.m.profiles.quick.rtts_ms[0]", "got -60"),
    ("matrices.m.profiles.quick.repeats", 0, "matrices.m.profiles.quick.repeats", "got 0"),
    ("matrices.m.profiles.quick.duration_s", 0, "matrices.m.profiles.quick.duration_s", "got 0"),
    ("matrices.m.profiles.quick.backends", ["vhots"], "matrices.m.profiles.quick.backends[0]", 'got "vhots"'),
    ("matrices.m.profiles.quick.rtt_txqueuelen", True, "matrices.m.profiles.quick.rtt_txqueuelen", "got a boolean"),
    ("matrices.m.profiles.quick", 3, "matrices.m.profiles.quick", "expected a table"),
    ("matrices.m.profiles.Quick", {}, "matrices.m.profiles.Quick", "expected a profile name"),
]


@pytest.mark.parametrize(("dotted", "value", "key_path", "fragment"), MATRIX_PROBLEMS)
def test_matrix_problem(lab_dir: Path, dotted: str, value: Any, key_path: str, fragment: str) -> None:
    assert_error(error(lab_dir, changed(base_lab(), dotted, value)), key_path, fragment)


def test_matrix_without_cells(lab_dir: Path) -> None:
    data = changed(changed(base_lab(), "matrices.m.txqueuelens", []), "matrices.m.rtts_ms", [])
    assert_error(error(lab_dir, data), "matrices.m.txqueuelens", "got both empty")


def test_profile_without_cells(lab_dir: Path) -> None:
    data = changed(base_lab(), "matrices.m.profiles.quick.txqueuelens", [])
    assert_error(error(lab_dir, data), "matrices.m.profiles.quick", "got both empty")


def test_iperf3_valid_options(lab_dir: Path) -> None:
    data = changed(base_lab(), "matrices.m.iperf3", {"congestion": "bbr", "length": "128K"})
    data = changed(data, "matrices.m.streams", [1, 128])
    m = load(lab_dir, data).matrices["m"]
    assert (m.streams, m.iperf3.congestion, m.iperf3.length) == ((1, 128), "bbr", "128K")


# ---------------------------------------------------------------- presentation


def test_config_to_dict_is_json_safe(lab_dir: Path) -> None:
    cfg = load(lab_dir, base_lab())
    out = json.loads(json.dumps(config_to_dict(cfg)))
    assert out["name"] == "t" and out["workdir"] == str(lab_dir / "work")
    assert out["kernels"]["nodrop"]["patches"] == [
        str(lab_dir / "patches/nodrop"),
        str(lab_dir / "patches/extra.patch"),
    ]
    assert out["guests"]["g1"]["net"] == {"backend": "vhost", "txqueuelen": 1000, "tap": "t-g1", "queues": 1}
    # 2 kernels x 2 backends x (2 txqueuelens + 1 rtt); quick: 2 x 2 x 1
    assert out["matrices"]["m"]["cells"] == 12
    assert out["matrices"]["m"]["profiles"]["quick"] == {"txqueuelens": [1], "rtts_ms": [], "duration_s": 3, "cells": 4}
    assert out["expectations"]["stock_kernel"] == "stock"


def test_render_config_shows_the_resolved_lab(lab_dir: Path) -> None:
    from rich.console import Console

    cfg = load(lab_dir, base_lab())
    console = Console(record=True, width=200, color_system=None)
    console.print(render_config(cfg))
    text = console.export_text()
    for expected in (
        "t-g1",
        "custom0",
        "debian:6.12.117-1~deb12u1",
        "patches/nodrop",
        "images/img.toml",
        "profile quick",
        "collapse_max_ratio",
        str(lab_dir / "work"),
    ):
        assert expected in text, expected
    row = next(line for line in text.splitlines() if line.startswith("│ m "))
    assert row.split("│")[-2].strip() == "12"  # the cells column


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-(2**40), max_value=2**40))
def test_txqueuelen_accepted_iff_in_range(lab_dir: Path, value: int) -> None:
    data = changed(base_lab(), "guests.g1.net.txqueuelen", value)
    text = to_toml(data)
    if 1 <= value <= MAX_U32:
        cfg = loads_config(text, lab_dir, lab_dir / "lab.toml", mem_total_mib=MEM)
        assert cfg.guests["g1"].net.txqueuelen == value
    else:
        with pytest.raises(ConfigError) as info:
            loads_config(text, lab_dir, lab_dir / "lab.toml", mem_total_mib=MEM)
        assert_error(info.value, "guests.g1.net.txqueuelen", f"got {value}")


@settings(max_examples=60, deadline=None)
@given(
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.integers(min_value=0, max_value=60_000_000).map(lambda us: us / 1000)
)
def test_rtt_accepted_iff_finite_in_range_and_whole_microseconds(lab_dir: Path, value: float) -> None:
    text = to_toml(changed(base_lab(), "matrices.m.rtts_ms", [value]))
    in_range = math.isfinite(value) and 0 <= value <= 60_000
    if in_range and round(value, 3) == value:
        cfg = loads_config(text, lab_dir, lab_dir / "lab.toml", mem_total_mib=MEM)
        assert cfg.matrices["m"].rtts_ms == (float(value),)
    else:
        with pytest.raises(ConfigError) as info:
            loads_config(text, lab_dir, lab_dir / "lab.toml", mem_total_mib=MEM)
        expected = "expected a number from 0 to 60000" if not in_range else "whole microseconds"
        assert_error(info.value, "matrices.m.rtts_ms[0]", expected)


def test_rtt_sub_microsecond_refused(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "matrices.m.rtts_ms", [60, 0.0005]))
    assert_error(err, "matrices.m.rtts_ms[1]", "expected a delay in whole microseconds", "got 0.0005")


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["lab", "hosts.h1", "guests.g1", "guests.g1.net", "matrices.m", "expectations"]),
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
)
def test_any_unknown_key_is_named(lab_dir: Path, table: str, key: str) -> None:
    data = base_lab()
    assume(key not in KNOWN_KEYS)  # a known key is not what this property is about
    text = to_toml(changed(data, f"{table}.{key}", 1))
    with pytest.raises(ConfigError) as info:
        loads_config(text, lab_dir, lab_dir / "lab.toml", mem_total_mib=MEM)
    assert_error(info.value, f"{table}.{key}", "unknown key")


@pytest.mark.parametrize("swap", ["reboot-guest", "hot-unplug", "reboot-host"])
def test_swap_policies_are_accepted(lab_dir: Path, swap: str) -> None:
    assert load(lab_dir, changed(base_lab(), "matrices.m.swap", swap)).matrices["m"].swap == swap


def test_unknown_swap_policy_names_the_key_and_the_choices(lab_dir: Path) -> None:
    err = error(lab_dir, changed(base_lab(), "matrices.m.swap", "hotplug"))
    assert_error(err, "matrices.m.swap", "hot-unplug")
