"""Bad lab.toml files through the real CLI: refused on one line, exit 2, nothing started.

Each case writes a lab.toml that differs from a valid one in one place, runs
`python -m lab.cli -c BAD.toml config` and `... up` as a user would, and
checks: exit code 2, exactly one line on stderr, that line names the key path
(or, for a file that is not TOML, the file and the position), no traceback,
no libvirt domain of the lab, and no workdir created (validation happens
before anything is written or started).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = "vhs"  # this suite's lab name: never "vhl" (the user's), "vht" or "vhm"; "vhs" never boots anything

BASE = """\
[lab]
name = "{lab}"
workdir = "{workdir}"

[kernels.stock]
source = "debian:6.12.117-1~deb12u1"
strategy = "modules"

[kernels.nodrop]
source = "debian:6.12.117-1~deb12u1"
patches = ["{patch}"]
strategy = "modules"

[images.bookworm]
recipe = "{recipe}"

[hosts.lab1]
provider = "nested"
kernel = "stock"
vcpus = 1
memory_mib = 512

[guests.guest1]
host = "lab1"
image = "bookworm"
memory_mib = 256

[guests.guest1.net]
backend = "vhost"
txqueuelen = 1000

[matrices.m]
host = "lab1"
guest = "guest1"
kernels = ["stock", "nodrop"]
txqueuelens = [1000, 1]
rtts_ms = [60]
duration_s = 5

[expectations]
stock_kernel = "stock"
nodrop_kernel = "nodrop"
"""

GUEST2 = """
[guests.guest2]
host = "lab1"
image = "bookworm"
memory_mib = 256

[guests.guest2.net]
tap = "{tap}"
"""

# (id, edit, what the one stderr line must contain). An edit is either
# ("replace", old, new) on the valid text, ("append", text) or ("raw", text).
CASES: list[tuple[str, tuple[str, ...], str]] = [
    ("not-toml", ("raw", "[lab\nname = 'vhs'\n"), "not valid TOML"),
    ("not-toml-binary", ("raw", "\x00\x01\x02 = = ="), "not valid TOML"),
    ("unknown-top-key", ("append", "\n[colour]\nred = 1\n"), "colour: unknown key"),
    ("unknown-lab-key", ("replace", 'name = "vhs"', 'name = "vhs"\ncolour = "red"'), "lab.colour: unknown key"),
    ("unknown-net-key", ("replace", "txqueuelen = 1000", "txqueuelen = 1000\nqlen = 5"), "guests.guest1.net.qlen: unknown key"),
    ("wrong-type-vcpus", ("replace", "vcpus = 1", 'vcpus = "one"'), "hosts.lab1.vcpus: expected an integer"),
    ("wrong-type-bool", ("replace", "vcpus = 1", "vcpus = true"), "hosts.lab1.vcpus: expected an integer"),
    ("wrong-type-table", ("replace", "[guests.guest1.net]\n", "[guests.guest1.net.x]\n"), "guests.guest1.net.x: unknown key"),
    ("wrong-type-string", ("replace", "txqueuelen = 1000", "txqueuelen = \"1000\""), "guests.guest1.net.txqueuelen: expected an integer"),
    ("txqueuelen-0", ("replace", "txqueuelen = 1000", "txqueuelen = 0"), "guests.guest1.net.txqueuelen:"),
    ("txqueuelen-2**32", ("replace", "txqueuelen = 1000", f"txqueuelen = {2**32}"), "guests.guest1.net.txqueuelen:"),
    ("txqueuelen-negative", ("replace", "txqueuelen = 1000", "txqueuelen = -1"), "guests.guest1.net.txqueuelen:"),
    ("matrix-txqueuelen-0", ("replace", "txqueuelens = [1000, 1]", "txqueuelens = [1000, 0]"), "matrices.m.txqueuelens[1]:"),
    ("negative-rtt", ("replace", "rtts_ms = [60]", "rtts_ms = [-60]"), "matrices.m.rtts_ms[0]:"),
    ("nan-rtt", ("replace", "rtts_ms = [60]", "rtts_ms = [nan]"), "matrices.m.rtts_ms[0]:"),
    ("duration-0", ("replace", "duration_s = 5", "duration_s = 0"), "matrices.m.duration_s:"),
    ("memory-too-big", ("replace", "memory_mib = 512", f"memory_mib = {2**31}"), "hosts.lab1.memory_mib:"),
    ("guest-memory-over-host", ("replace", "memory_mib = 256", "memory_mib = 4096"), "guests.guest1.memory_mib:"),
    ("missing-kernel", ("replace", 'kernel = "stock"', 'kernel = "stok"'), "hosts.lab1.kernel:"),
    ("missing-kernel-in-matrix", ("replace", '"stock", "nodrop"]', '"stock", "patched"]'), "matrices.m.kernels[1]:"),
    ("missing-image", ("replace", 'image = "bookworm"', 'image = "trixie"'), "guests.guest1.image:"),
    ("missing-image-recipe", ("replace", "{recipe}", "/nonexistent/vhr-recipe.toml"), "images.bookworm.recipe:"),
    ("missing-patch", ("replace", "{patch}", "/nonexistent/vhr-patches"), "kernels.nodrop.patches[0]:"),
    ("missing-host", ("replace", 'host = "lab1"\nimage', 'host = "lab9"\nimage'), "guests.guest1.host:"),
    ("duplicate-tap", ("append", GUEST2.replace("{tap}", "vhs-guest1")), "guests.guest2.net.tap:"),
    ("tap-over-15-bytes", ("append", GUEST2.replace("{tap}", "a" * 16)), "guests.guest2.net.tap:"),
    ("tap-15-bytes-unicode", ("append", GUEST2.replace("{tap}", "t\u00e4p" * 4)), "guests.guest2.net.tap:"),
    ("tap-semicolon", ("append", GUEST2.replace("{tap}", "tap;reboot")), "guests.guest2.net.tap:"),
    ("tap-space", ("append", GUEST2.replace("{tap}", "tap 0")), "guests.guest2.net.tap:"),
    ("tap-slash", ("append", GUEST2.replace("{tap}", "tap/0")), "guests.guest2.net.tap:"),
    ("tap-leading-dash", ("append", GUEST2.replace("{tap}", "-tap0")), "guests.guest2.net.tap:"),
    ("tap-subst", ("append", GUEST2.replace("{tap}", "$(reboot)")), "guests.guest2.net.tap:"),
    ("tap-newline", ("append", GUEST2.replace("{tap}", "tap\\nx")), "guests.guest2.net.tap:"),
    ("tap-empty", ("append", GUEST2.replace("{tap}", "")), "guests.guest2.net.tap:"),
    ("lab-name-odd", ("replace", 'name = "vhs"', 'name = "v;hs"'), "lab.name:"),
    ("password-key", ("replace", 'provider = "nested"', 'provider = "nested"\npassword = "hunter2"'), "hosts.lab1.password: unknown key"),
    ("missing-required", ("replace", 'provider = "nested"\n', ""), "hosts.lab1.provider:"),
]


def _virsh() -> str | None:
    return shutil.which("virsh") or next((p for p in ("/usr/bin/virsh", "/usr/sbin/virsh") if Path(p).exists()), None)


def lab_domains(prefix: str = LAB) -> list[str] | None:
    """This machine's libvirt domains of lab `prefix`; None when virsh cannot tell."""
    virsh = _virsh()
    if virsh is None:
        return None
    p = subprocess.run([virsh, "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        return None
    return [n for n in p.stdout.split() if n.startswith(prefix + "-")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("assets")
    (d / "patches").mkdir()
    (d / "patches" / "0001-x.patch").write_text("")
    (d / "recipe.toml").write_text("# a recipe file only has to exist for lab.config\n")
    return {"patch": d / "patches", "recipe": d / "recipe.toml"}


def valid_text(assets: dict[str, Path], workdir: Path) -> str:
    return BASE.format(lab=LAB, workdir=workdir, patch="{patch}", recipe="{recipe}")


def _finish(text: str, assets: dict[str, Path]) -> str:
    return text.replace("{patch}", str(assets["patch"])).replace("{recipe}", str(assets["recipe"]))


def run_cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`lab -c CONFIG ARGS...` in this process (lab.cli.main), its exit code and output captured.

    In-process keeps these tests fast; the CLI's own subprocess behaviour (exit
    codes, one line on stderr) is the same code path. COLUMNS is small on
    purpose: a long message must still be one line.
    """
    import contextlib
    import io
    import signal

    from rich.console import Console

    import lab.cli

    out, err = io.StringIO(), io.StringIO()
    old_term = signal.getsignal(signal.SIGTERM)
    env = {k: v for k, v in os.environ.items() if k != "LAB_CONFIG"}
    env.update(COLUMNS="60", TERM="dumb")
    saved_env, saved_err, cwd = dict(os.environ), lab.cli.err_console, os.getcwd()
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(config.parent)
        lab.cli.err_console = Console(stderr=True, width=60, soft_wrap=False)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = lab.cli.main(["-c", str(config), *args])
    finally:
        lab.cli.err_console = saved_err
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        signal.signal(signal.SIGTERM, old_term)
    return subprocess.CompletedProcess(["lab", "-c", str(config), *args], rc, out.getvalue(), err.getvalue())


def test_the_base_config_is_valid(assets, tmp_path):
    """The cases below differ from a valid lab in one place only."""
    workdir = tmp_path / "work"
    cfg = tmp_path / "ok.toml"
    cfg.write_text(_finish(valid_text(assets, workdir), assets))
    p = run_cli(cfg, "config", "--json")
    assert p.returncode == 0, p.stderr
    assert f'"name": "{LAB}"' in p.stdout
    assert not workdir.exists()  # `lab config` only reads


@pytest.fixture(scope="module")
def domains_before() -> list[str] | None:
    return lab_domains()


@pytest.mark.parametrize("command", ["config", "up"])
@pytest.mark.parametrize("case_id,edit,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_on_one_line(assets, tmp_path, domains_before, command, case_id, edit, expect):
    workdir = tmp_path / "work"
    text = valid_text(assets, workdir)
    kind = edit[0]
    if kind == "replace":
        assert edit[1] in text, f"case {case_id}: {edit[1]!r} is not in the base config"
        text = text.replace(edit[1], edit[2], 1)
    elif kind == "append":
        text += edit[1]
    else:
        text = edit[1]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(_finish(text, assets), encoding="utf-8", errors="surrogateescape")

    p = run_cli(cfg, command)

    lines = p.stderr.splitlines()
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr + p.stdout
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{p.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert expect in line, f"{expect!r} not in {line!r}"
    if kind == "raw":
        # no key path in a file that does not parse: the file and where in it
        assert str(cfg) in line and ("line" in line or "end of document" in line), line
    assert p.stdout == "", p.stdout
    # nothing started, nothing written
    assert not workdir.exists(), f"{command} created {workdir} for an invalid config"
    now = lab_domains()
    if now is not None and domains_before is not None:
        assert now == domains_before, f"libvirt domains of lab {LAB}: before {domains_before}, now {now}"


def test_missing_config_file(tmp_path):
    p = run_cli(tmp_path / "absent.toml", "up")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "no such file" in p.stderr and "Traceback" not in p.stderr


def test_config_is_a_directory(tmp_path):
    d = tmp_path / "dir.toml"
    d.mkdir()
    p = run_cli(d, "config")
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and str(d) in p.stderr and "Traceback" not in p.stderr


def test_unknown_guest_name_for_up(assets, tmp_path):
    """A valid lab, but `up` is asked for a guest it does not define: one line, nothing started."""
    workdir = tmp_path / "work"
    cfg = tmp_path / "ok.toml"
    cfg.write_text(_finish(valid_text(assets, workdir), assets))
    p = run_cli(cfg, "up", "guest9")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "guest9" in lines[0] and "Traceback" not in p.stderr, p.stderr
    now = lab_domains()
    assert not now, f"libvirt domains of lab {LAB}: {now}"
