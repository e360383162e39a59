"""lab.artifacts.kernel without the long build: cache key, patch series, touched paths,
Debian release names, the artifact cache, and patch failures.

A patch that does not apply is exercised through the public `build_kernel` on
a tiny kernel "tree" in tmp (strategy "full" with a directory source copies the
tree and patches it before anything is compiled). The real Debian path
(`debian:6.12.117-1~deb12u1`, strategy "modules") runs too when the source
tarball and the image .deb are already on this machine.
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

from lab.artifacts import kernel
from lab.artifacts.kernel import (
    MANIFEST,
    KernelArtifact,
    artifact_key,
    build_kernel,
    cached_artifact,
    debian_release,
    expand_patches,
    load_artifact,
    touched_paths,
)
from lab.config import KernelRecipe
from lab.errors import LabError
from lab.hosts.host import HostRuntime
from lab.hosts.nested import KernelBoot, artifact_build_ids
from lab.onhost.probe import module_file_build_id

DEBIAN_VERSION = "6.12.117-1~deb12u1"
DEBIAN_RELEASE = "6.12.117+deb12-amd64"
DEBIAN_SOURCE = f"debian:{DEBIAN_VERSION}"
SYSTEM_MODULES = Path("/lib/modules") / DEBIAN_RELEASE

TUN_PATCH = """\
From: Lab Test <lab@example.invalid>
Subject: [PATCH] tun: a test change

---
 drivers/net/tun.c | 2 +-
 1 file changed, 1 insertion(+), 1 deletion(-)

diff --git a/drivers/net/tun.c b/drivers/net/tun.c
index 1111111..2222222 100644
--- a/drivers/net/tun.c\t2024-11-17 00:00:00.000000000 +0000
+++ b/drivers/net/tun.c\t2024-11-18 00:00:00.000000000 +0000
@@ -1,3 +1,3 @@
 line one
-line two
+line two, patched
 line three
"""

VHOST_PATCH = """\
--- a/drivers/vhost/net.c
+++ b/drivers/vhost/net.c
@@ -1,2 +1,2 @@
 first
-second
+second, patched
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _tiny_tree(root: Path) -> Path:
    """A "kernel tree" of three files: enough for patch(1), not for make."""
    _write(root / "Makefile", "# not a kernel\n")
    _write(root / "drivers" / "net" / "tun.c", "line one\nline two\nline three\n")
    _write(root / "drivers" / "vhost" / "net.c", "first\nsecond\n")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _tiny_tree(tmp_path / "linux")


@pytest.fixture
def series_dir(tmp_path: Path) -> Path:
    d = tmp_path / "patches" / "nodrop"
    _write(d / "0001-tun.patch", TUN_PATCH)
    _write(d / "0002-vhost.patch", VHOST_PATCH)
    _write(d / "series", "# the nodrop series\n\n0001-tun.patch\n0002-vhost.patch  # vhost side\n")
    return d


def _full(tree: Path, name: str = "t", patches=(), configs=()) -> KernelRecipe:
    return KernelRecipe(name=name, source=tree, patches=tuple(patches), configs=tuple(configs), strategy="full")


# --------------------------------------------------------------------------
# expand_patches
# --------------------------------------------------------------------------


def test_expand_patches_series_dir_in_series_order(series_dir: Path) -> None:
    got = expand_patches([series_dir])
    assert got == (series_dir.resolve() / "0001-tun.patch", series_dir.resolve() / "0002-vhost.patch")
    assert all(p.is_absolute() for p in got)


def test_expand_patches_series_order_not_name_order(series_dir: Path) -> None:
    (series_dir / "series").write_text("0002-vhost.patch\n0001-tun.patch\n")
    assert [p.name for p in expand_patches([series_dir])] == ["0002-vhost.patch", "0001-tun.patch"]


def test_expand_patches_single_file_and_mix(series_dir: Path, tmp_path: Path) -> None:
    single = _write(tmp_path / "extra.patch", VHOST_PATCH)
    got = expand_patches([single, series_dir])
    assert [p.name for p in got] == ["extra.patch", "0001-tun.patch", "0002-vhost.patch"]


def test_expand_patches_relative_entry_is_resolved(series_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(series_dir.parent)
    got = expand_patches([Path("nodrop")])
    assert got[0] == series_dir.resolve() / "0001-tun.patch"


def test_expand_patches_missing_entry_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.patch"
    with pytest.raises(LabError) as ei:
        expand_patches([missing])
    assert str(missing) in str(ei.value)


def test_expand_patches_dir_without_series(tmp_path: Path) -> None:
    d = tmp_path / "loose"
    _write(d / "a.patch", VHOST_PATCH)
    with pytest.raises(LabError) as ei:
        expand_patches([d])
    assert "series" in ei.value.message and str(d) in ei.value.message
    assert ei.value.hint and "series" in ei.value.hint


def test_expand_patches_series_lists_missing_patch(series_dir: Path) -> None:
    (series_dir / "series").write_text("0001-tun.patch\n0003-gone.patch\n")
    with pytest.raises(LabError) as ei:
        expand_patches([series_dir])
    assert "0003-gone.patch" in str(ei.value)
    assert str(series_dir.resolve() / "series") in str(ei.value)


def test_expand_patches_empty_series(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    _write(d / "series", "# nothing yet\n\n")
    assert expand_patches([d]) == ()


# --------------------------------------------------------------------------
# touched_paths
# --------------------------------------------------------------------------


def test_touched_paths_modify_create_delete_rename(tmp_path: Path) -> None:
    patch = _write(
        tmp_path / "multi.patch",
        TUN_PATCH
        + """\
diff --git a/drivers/net/new.c b/drivers/net/new.c
new file mode 100644
--- /dev/null
+++ b/drivers/net/new.c
@@ -0,0 +1 @@
+int x;
diff --git a/drivers/net/old.c b/drivers/net/old.c
deleted file mode 100644
--- a/drivers/net/old.c
+++ /dev/null
@@ -1 +0,0 @@
-int y;
--- a/include/linux/if_tun.h
+++ b/include/linux/if_tun_new.h
@@ -1 +1 @@
-a
+b
""",
    )
    existing, created = touched_paths(patch)
    assert existing == {"drivers/net/tun.c", "drivers/net/old.c", "include/linux/if_tun.h"}
    assert created == {"drivers/net/new.c", "include/linux/if_tun_new.h"}


def test_touched_paths_ignores_mail_headers_and_diffstat(tmp_path: Path) -> None:
    existing, created = touched_paths(_write(tmp_path / "t.patch", TUN_PATCH))
    assert existing == {"drivers/net/tun.c"}  # timestamps after the tab are dropped
    assert created == set()


def test_touched_paths_empty_patch(tmp_path: Path) -> None:
    assert touched_paths(_write(tmp_path / "e.patch", "just a commit message\n")) == (set(), set())


# --------------------------------------------------------------------------
# debian_release
# --------------------------------------------------------------------------


def _installed_headers() -> dict[str, str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", "linux-headers-*-amd64"],
        capture_output=True, text=True, check=False,
    )
    out = {}
    for line in proc.stdout.splitlines():
        pkg, _, ver = line.partition("\t")
        if ver:
            out[ver] = pkg.removeprefix("linux-headers-")
    return out


def test_debian_release_of_installed_headers() -> None:
    installed = _installed_headers()
    if DEBIAN_VERSION not in installed:
        pytest.skip(f"linux-headers-{DEBIAN_RELEASE} ({DEBIAN_VERSION}) is not installed")
    assert debian_release(DEBIAN_VERSION) == installed[DEBIAN_VERSION] == DEBIAN_RELEASE


@pytest.mark.parametrize(
    ("version", "release"),
    [
        ("6.12.999-1~deb12u1", "6.12.999+deb12-amd64"),
        ("6.12.998-3+deb13u2", "6.12.998+deb13-amd64"),
        ("1:6.12.997-1~deb12u4", "6.12.997+deb12-amd64"),  # an epoch is not part of the release
    ],
)
def test_debian_release_derived_when_not_installed(version: str, release: str) -> None:
    assert version not in _installed_headers()
    assert debian_release(version) == release


@pytest.mark.parametrize("version", ["6.12.999-1", "garbage", ""])
def test_debian_release_without_deb_suffix_is_an_error(version: str) -> None:
    with pytest.raises(LabError) as ei:
        debian_release(version)
    assert repr(version) in str(ei.value)


# --------------------------------------------------------------------------
# artifact_key
# --------------------------------------------------------------------------


def test_key_is_stable(tree: Path, series_dir: Path) -> None:
    r = _full(tree, patches=[series_dir])
    k = artifact_key(r)
    assert k == artifact_key(r)
    assert re.fullmatch(r"[0-9a-f]{64}", k), k


def test_key_changes_with_patch_content(tree: Path, series_dir: Path) -> None:
    r = _full(tree, patches=[series_dir])
    before = artifact_key(r)
    p = series_dir / "0002-vhost.patch"
    p.write_text(p.read_text().replace("second, patched", "second, patched again"))
    assert artifact_key(r) != before


def test_key_changes_with_patch_order_and_set(tree: Path, series_dir: Path) -> None:
    base = artifact_key(_full(tree, patches=[series_dir]))
    (series_dir / "series").write_text("0002-vhost.patch\n0001-tun.patch\n")
    swapped = artifact_key(_full(tree, patches=[series_dir]))
    (series_dir / "series").write_text("0001-tun.patch\n")
    fewer = artifact_key(_full(tree, patches=[series_dir]))
    assert len({base, swapped, fewer}) == 3
    assert artifact_key(_full(tree)) not in {base, swapped, fewer}


def test_key_changes_with_config_fragment(tree: Path, tmp_path: Path) -> None:
    frag = _write(tmp_path / "lab.config", "CONFIG_TUN=m\n")
    r = _full(tree, configs=[frag])
    before = artifact_key(r)
    assert artifact_key(_full(tree)) != before
    frag.write_text("CONFIG_TUN=y\n")
    assert artifact_key(r) != before


def test_key_changes_with_strategy() -> None:
    modules = KernelRecipe("k", DEBIAN_SOURCE, strategy="modules")
    full = KernelRecipe("k", DEBIAN_SOURCE, strategy="full")
    assert artifact_key(modules) != artifact_key(full)


def test_key_changes_with_source(tree: Path, tmp_path: Path) -> None:
    keys = {
        artifact_key(KernelRecipe("k", DEBIAN_SOURCE, strategy="full")),
        artifact_key(KernelRecipe("k", "debian:6.12.999-1~deb12u1", strategy="full")),
        artifact_key(_full(tree)),
        artifact_key(_full(_tiny_tree(tmp_path / "other-linux"))),
    }
    assert len(keys) == 4


def test_key_changes_when_the_tree_changes(tree: Path) -> None:
    before = artifact_key(_full(tree))
    st = (tree / "Makefile").stat()
    os.utime(tree / "Makefile", (st.st_atime, st.st_mtime + 10))
    assert artifact_key(_full(tree)) != before


def test_key_ignores_unrelated_things(tree: Path, series_dir: Path, tmp_path: Path) -> None:
    frag = _write(tmp_path / "a" / "lab.config", "CONFIG_TUN=m\n")
    base = artifact_key(_full(tree, name="one", patches=[series_dir], configs=[frag]))

    # the recipe's name (it only names the cache directory)
    assert artifact_key(_full(tree, name="two", patches=[series_dir], configs=[frag])) == base
    # comments and blank lines in the series file
    (series_dir / "series").write_text("# reworded comment\n0001-tun.patch\n\n\n0002-vhost.patch\n")
    # the patches' mtimes, and where the series and the fragment live
    for p in series_dir.iterdir():
        os.utime(p, (1, 1))
    moved = tmp_path / "elsewhere" / "nodrop"
    shutil.copytree(series_dir, moved)
    frag2 = _write(tmp_path / "b" / "renamed.config", frag.read_text())
    assert artifact_key(_full(tree, name="one", patches=[moved], configs=[frag2])) == base
    # the same patches given one by one instead of as a series directory
    singles = [moved / "0001-tun.patch", moved / "0002-vhost.patch"]
    assert artifact_key(_full(tree, name="one", patches=singles, configs=[frag])) == base


def test_plan_errors_name_the_problem(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"kernels\.t\.strategy"):
        artifact_key(KernelRecipe("t", tree, strategy="quick"))
    with pytest.raises(LabError, match="debian:<version>") as ei:
        artifact_key(KernelRecipe("t", tree, strategy="modules"))
    assert ei.value.hint and '"full"' in ei.value.hint
    missing = tmp_path / "missing.config"
    with pytest.raises(LabError, match=str(missing)):
        artifact_key(_full(tree, configs=[missing]))
    with pytest.raises(LabError, match=str(tmp_path / "no-tree")):
        artifact_key(_full(tmp_path / "no-tree"))


# --------------------------------------------------------------------------
# The artifact cache
# --------------------------------------------------------------------------


def _fake_artifact(dir_: Path, recipe: str, key: str, release: str = "6.12.0-lab") -> Path:
    root = dir_ / "root"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{release}").write_bytes(b"MZ not really a kernel")
    (root / "lib" / "modules" / release).mkdir(parents=True)
    manifest = {
        "format": kernel.BUILDER_FORMAT,
        "recipe": recipe,
        "key": key,
        "strategy": "full",
        "release": release,
        "vmlinuz": f"root/boot/vmlinuz-{release}",
        "modules_root": "root",
        "module_srcversions": {"tun": "ABC123", "tap": "", "vhost": "builtin", "vhost_net": "absent"},
    }
    (dir_ / MANIFEST).write_text(json.dumps(manifest))
    return dir_


def test_cached_artifact_round_trip(tree: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    r = _full(tree, name="rt")
    assert cached_artifact(r, workdir) is None
    key = artifact_key(r)
    final = _fake_artifact(workdir / "kernels" / f"rt-{key[:12]}", "rt", key)

    art = cached_artifact(r, workdir)
    assert isinstance(art, KernelArtifact)
    assert art == load_artifact(final)
    assert (art.recipe, art.key, art.path, art.release, art.strategy) == ("rt", key, final, "6.12.0-lab", "full")
    assert art.vmlinuz == final / "root" / "boot" / "vmlinuz-6.12.0-lab" and art.vmlinuz.is_file()
    assert art.modules_root == final / "root"
    assert art.manifest == final / MANIFEST

    # build_kernel finds it too, without building anything (make would fail on this tree)
    t0 = time.monotonic()
    assert build_kernel(r, workdir) == art
    assert time.monotonic() - t0 < 5


def test_cached_artifact_other_key_is_not_found(tree: Path, series_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    stock = _full(tree, name="k")
    _fake_artifact(workdir / "kernels" / f"k-{artifact_key(stock)[:12]}", "k", artifact_key(stock))
    assert cached_artifact(stock, workdir) is not None
    assert cached_artifact(_full(tree, name="k", patches=[series_dir]), workdir) is None


def test_half_built_staging_dir_is_never_an_artifact(tree: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    r = _full(tree, name="half")
    key = artifact_key(r)
    final = workdir / "kernels" / f"half-{key[:12]}"
    # a staging dir of a live process (ours) that even has a manifest already
    _fake_artifact(final.with_name(f"{final.name}.tmp-{os.getpid()}"), "half", key)
    # and a final dir without its manifest (what a crash inside a rename-less copy would leave)
    (final / "root").mkdir(parents=True)
    assert cached_artifact(r, workdir) is None


def test_stale_staging_of_dead_process_is_removed(tree: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    r = _full(tree, name="stale")
    final = workdir / "kernels" / f"stale-{artifact_key(r)[:12]}"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = _fake_artifact(final.with_name(f"{final.name}.tmp-{dead.pid}"), "stale", "x")
    live = final.with_name(f"{final.name}.tmp-1")  # pid 1 always exists
    live.mkdir()
    kernel._remove_stale_staging(final)
    assert not stale.exists()
    assert live.is_dir()


@pytest.mark.parametrize(
    "content",
    ["", "{not json", json.dumps({"recipe": "x"}), json.dumps(["a", "list"])],
    ids=["empty", "bad-json", "missing-keys", "not-an-object"],
)
def test_load_artifact_unreadable_manifest(tmp_path: Path, content: str) -> None:
    d = tmp_path / "k-123456789abc"
    d.mkdir()
    (d / MANIFEST).write_text(content)
    with pytest.raises(LabError) as ei:
        load_artifact(d)
    assert str(d) in ei.value.message
    assert ei.value.hint == f"rm -rf {d}"


def test_load_artifact_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="unreadable"):
        load_artifact(tmp_path)


# --------------------------------------------------------------------------
# A patch that does not apply, and a build that fails
# --------------------------------------------------------------------------

CONFLICTING_PATCH = """\
Subject: [PATCH] tun: written against another tree

--- a/drivers/net/tun.c
+++ b/drivers/net/tun.c
@@ -1,3 +1,3 @@
 line one
-line 2 as it was somewhere else
+line two, conflicting
 line three
"""


def _kernels_leftovers(workdir: Path) -> list[str]:
    """What a failed build left in <workdir>/kernels, besides logs/ and lock files."""
    kernels = workdir / "kernels"
    return sorted(
        p.name for p in kernels.iterdir() if p.name != "logs" and not (p.name.startswith(".") and p.name.endswith(".lock"))
    )


def test_conflicting_patch_names_patch_and_shows_hunk(tree: Path, series_dir: Path, tmp_path: Path) -> None:
    bad_dir = tmp_path / "bad"
    _write(bad_dir / "0002-conflict.patch", CONFLICTING_PATCH)
    _write(bad_dir / "series", "0002-conflict.patch\n")
    workdir = tmp_path / "work"
    r = _full(tree, name="bad", patches=[series_dir / "0002-vhost.patch", bad_dir])
    t0 = time.monotonic()
    with pytest.raises(LabError) as ei:
        build_kernel(r, workdir, timeout=120)
    assert time.monotonic() - t0 < 60
    err = ei.value
    assert "patch 0002-conflict.patch does not apply" in err.message
    assert "rejected hunk:" in err.message
    assert "-line 2 as it was somewhere else" in err.message
    assert "+line two, conflicting" in err.message
    assert err.hint and str(bad_dir.resolve() / "0002-conflict.patch") in err.hint
    # nothing cached, the user's tree untouched, the log kept
    assert cached_artifact(r, workdir) is None
    assert _kernels_leftovers(workdir) == []
    assert (tree / "drivers" / "net" / "tun.c").read_text() == "line one\nline two\nline three\n"
    assert (tree / "drivers" / "vhost" / "net.c").read_text() == "first\nsecond\n"
    logs = list((workdir / "kernels" / "logs").iterdir())
    assert len(logs) == 1 and logs[0].name.startswith(f"bad-{artifact_key(r)[:12]}-")
    assert "0002-conflict.patch" in logs[0].read_text()


def test_already_applied_patch_is_refused_not_reversed(tree: Path, tmp_path: Path) -> None:
    (tree / "drivers" / "net" / "tun.c").write_text("line one\nline two, patched\nline three\n")
    p = _write(tmp_path / "0001-tun.patch", TUN_PATCH)
    workdir = tmp_path / "work"
    with pytest.raises(LabError, match="patch 0001-tun.patch does not apply"):
        build_kernel(_full(tree, name="twice", patches=[p]), workdir, timeout=120)
    assert _kernels_leftovers(workdir) == []


def test_failed_build_after_patching_leaves_only_a_log(tree: Path, series_dir: Path, tmp_path: Path) -> None:
    """The patches apply; `make defconfig` then fails (this is no kernel): the tail is in the error."""
    workdir = tmp_path / "work"
    steps: list[str] = []
    r = _full(tree, name="nomake", patches=[series_dir])
    with pytest.raises(LabError) as ei:
        build_kernel(r, workdir, progress=lambda s: steps.append(s.text()), timeout=120)
    assert "make defconfig failed" in ei.value.message
    assert "last " in ei.value.message
    assert any("applying 0001-tun.patch (1/2)" in s for s in steps)
    assert any("applying 0002-vhost.patch (2/2)" in s for s in steps)
    assert cached_artifact(r, workdir) is None
    assert _kernels_leftovers(workdir) == []
    (log,) = (workdir / "kernels" / "logs").iterdir()
    assert "make -C" in log.read_text()


def test_modules_patch_outside_lab_modules_is_refused_early(tmp_path: Path) -> None:
    if not Path("/usr/src/linux-source-6.12.tar.xz").is_file():
        pytest.skip("/usr/src/linux-source-6.12.tar.xz is missing")
    p = _write(tmp_path / "0001-core.patch", "--- a/net/core/dev.c\n+++ b/net/core/dev.c\n@@ -1 +1 @@\n-a\n+b\n")
    workdir = tmp_path / "work"
    with pytest.raises(LabError) as ei:
        build_kernel(KernelRecipe("core", DEBIAN_SOURCE, patches=(p,), strategy="modules"), workdir, timeout=60)
    assert "net/core/dev.c" in ei.value.message
    assert ei.value.hint and '"full"' in ei.value.hint
    assert _kernels_leftovers(workdir) == []


# --------------------------------------------------------------------------
# From an artifact to what a lab host boots (lab.hosts.nested) and remembers (lab.hosts.host)
# --------------------------------------------------------------------------


def _need_system_modules() -> None:
    if not (SYSTEM_MODULES / "modules.dep").is_file():
        pytest.skip(f"{SYSTEM_MODULES} is absent (apt-get install linux-image-{DEBIAN_RELEASE})")


def test_kernel_boot_from_artifact(tmp_path: Path) -> None:
    _need_system_modules()
    art_dir = tmp_path / "kernels" / "stock-0123456789ab"
    _fake_artifact(art_dir, "stock", "0123456789ab" * 5, release=DEBIAN_RELEASE)
    moddir = art_dir / "root" / "lib" / "modules"
    (moddir / DEBIAN_RELEASE).rmdir()
    (moddir / DEBIAN_RELEASE).symlink_to(SYSTEM_MODULES)

    boot = KernelBoot.from_artifact(load_artifact(art_dir))
    assert (boot.recipe, boot.release) == ("stock", DEBIAN_RELEASE)
    assert boot.vmlinuz == art_dir / "root" / "boot" / f"vmlinuz-{DEBIAN_RELEASE}"
    assert boot.modules_root == art_dir / "root"
    assert set(boot.module_build_ids) == {"tun", "tap", "vhost", "vhost_net"}
    for bid in boot.module_build_ids.values():
        assert re.fullmatch(r"[0-9a-f]{40}", bid), bid
    tun = SYSTEM_MODULES / "kernel" / "drivers" / "net" / "tun.ko.xz"
    assert boot.module_build_ids["tun"] == module_file_build_id(tun)


def test_artifact_build_ids_without_modules_dep(tmp_path: Path) -> None:
    assert artifact_build_ids(tmp_path) == {}


def test_host_runtime_round_trip(tmp_path: Path) -> None:
    rt = HostRuntime(
        name="h1", provider="nested", domain="vhl-h1", ssh_port=2222, kernel_recipe="nodrop",
        kernel_key="ab" * 32, kernel_release=DEBIAN_RELEASE, accel="tcg", started_at=1700000000.5,
        module_build_ids={"tun": "00" * 20},
    )
    path = tmp_path / "host.json"
    rt.save(path)
    assert HostRuntime.load(path) == rt
    assert not path.with_name("host.json.tmp").exists()
    assert HostRuntime.load(tmp_path / "absent.json") is None
    path.write_text("{broken")
    assert HostRuntime.load(path) is None
    path.write_text(json.dumps({"name": "h1"}))
    assert HostRuntime.load(path) is None


# --------------------------------------------------------------------------
# Known gaps, recorded as strict xfails: they flip to XPASS (and fail) when fixed
# --------------------------------------------------------------------------


def test_key_changes_when_a_source_file_in_a_plain_tree_changes(tree: Path) -> None:
    before = artifact_key(_full(tree))
    (tree / "drivers" / "net" / "tun.c").write_text("line one\nline two, edited in place\nline three\n")
    assert artifact_key(_full(tree)) != before


def test_key_changes_with_an_untracked_file_in_a_git_tree(tree: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "base"], check=True)
    before = artifact_key(_full(tree))
    _write(tree / "drivers" / "net" / "Kconfig.extra", "config LAB_EXTRA\n\tbool\n")
    assert artifact_key(_full(tree)) != before


def test_key_follows_tracked_edits_in_a_git_tree(tree: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "base"], check=True)
    clean = artifact_key(_full(tree))
    (tree / "drivers" / "net" / "tun.c").write_text("line one\nline two, dirty\nline three\n")
    dirty = artifact_key(_full(tree))
    subprocess.run([*git, "commit", "-q", "-am", "edit"], check=True)
    committed = artifact_key(_full(tree))
    assert len({clean, dirty, committed}) == 3


def test_touched_paths_not_fooled_by_hunk_content(tmp_path: Path) -> None:
    patch = _write(
        tmp_path / "doc.patch",
        "--- a/drivers/net/tun.c\n+++ b/drivers/net/tun.c\n@@ -1,3 +1,3 @@\n a\n"
        "--- a/Documentation/x.txt\n+++ b/Documentation/y.txt\n b\n",
    )
    assert touched_paths(patch) == ({"drivers/net/tun.c"}, set())
