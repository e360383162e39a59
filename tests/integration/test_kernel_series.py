"""Every patch series builds at every step (the series bisects, as far as the compiler can tell).

For each series in kernel/patches/, `git am` its patches one at a time onto a git
repo holding the Debian 6.12.117 source files the lab modules are built from
(MODULE_BUILD_FILES, from /usr/src/linux-source-6.12.tar.xz), and after each
patch build tun, tap, vhost and vhost_net as external modules against
linux-headers-6.12.117+deb12-amd64, the way the "modules" strategy does
(lab.artifacts.kernel.write_module_build_dir / module_build_argv). A build that
fails or warns at any step fails the test, naming the patch.

The unpatched tree is built once; each series starts from a copy of that build,
so make recompiles only what a patch changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.artifacts.kernel import (
    LAB_MODULES,
    MODULE_BUILD_FILES,
    USR_SRC,
    debian_release,
    expand_patches,
    module_build_argv,
    write_module_build_dir,
)
from lab.config import DEFAULT_CONFIG, load_config

REPO = Path(__file__).resolve().parents[2]
SERIES = ("nodrop", "nodrop-v1", "nodrop-optin")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "vhost-lab test",
    "GIT_AUTHOR_EMAIL": "test@vhost-lab.invalid",
    "GIT_COMMITTER_NAME": "vhost-lab test",
    "GIT_COMMITTER_EMAIL": "test@vhost-lab.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}
# Written by this project: each commit credits the proposal it reimplements.
CREDITED = ("nodrop", "nodrop-optin")
CREDIT = ("Simon Schippers", "https://lkml.iu.edu/2603.1/09161.html", "Gebauer")
AUTHOR = "vhost-lab <vhost-lab@users.noreply.invalid>"

pytestmark = [pytest.mark.integration]


def _run(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV, "LC_ALL": "C"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _make(headers: Path, build: Path, what: str) -> None:
    argv = ["nice", *module_build_argv(headers, build)]
    p = _run(argv, build)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{what}: module build failed:\n{out[-4000:]}"
    warnings = [line for line in out.splitlines() if re.search(r"\bwarning:", line)]
    assert not warnings, f"{what}: the build warns:\n" + "\n".join(warnings[:20])
    for name in LAB_MODULES:
        assert (build / f"{name}.ko").is_file(), f"{what}: no {name}.ko"


@pytest.fixture(scope="module")
def toolchain() -> tuple[Path, Path]:
    """(source tarball, headers dir) of the stock recipe; skip where they are absent."""
    version = load_config(DEFAULT_CONFIG, mem_total_mib=64 * 1024).kernels["stock"].debian_version
    assert version
    release = debian_release(version)
    headers = USR_SRC / f"linux-headers-{release}"
    tarball = USR_SRC / "linux-source-6.12.tar.xz"
    for tool in ("git", "make", "gcc", "tar", "xz"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not tarball.is_file() or not (headers / "Module.symvers").is_file():
        pytest.skip(f"needs {tarball} and {headers} (apt-get install linux-source-6.12 linux-headers-{release})")
    have = _run(["dpkg-query", "-W", "-f", "${Version}", "linux-source-6.12"], REPO).stdout.strip()
    if have != version:
        pytest.skip(f"linux-source-6.12 is {have or 'absent'}, the series are against {version}")
    return tarball, headers


@pytest.fixture(scope="module")
def base(tmp_path_factory, toolchain) -> Path:
    """A git repo (tree/) with the unpatched files, and a build of them (build/)."""
    tarball, headers = toolchain
    root = tmp_path_factory.mktemp("series-base")
    tree = root / "tree"
    tree.mkdir()
    top = tarball.name.split(".tar")[0]
    p = _run(
        ["tar", "-x", "-f", str(tarball), "-I", "xz -T0", "--strip-components=1", *(f"{top}/{m}" for m in sorted(MODULE_BUILD_FILES))],
        tree,
    )
    assert p.returncode == 0, p.stderr
    for argv in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "linux-source-6.12 (lab module files)"]):
        p = _run(argv, tree)
        assert p.returncode == 0, p.stderr
    write_module_build_dir(tree, root / "build")
    _make(headers, root / "build", "unpatched 6.12.117")
    return root


@pytest.mark.parametrize("series", SERIES)
def test_series_builds_after_every_patch(base, toolchain, tmp_path, series):
    _, headers = toolchain
    patches = expand_patches([REPO / "kernel" / "patches" / series])
    assert patches, series
    tree, build = tmp_path / "tree", tmp_path / "build"
    p = _run(["git", "clone", "-q", str(base / "tree"), str(tree)], tmp_path)
    assert p.returncode == 0, p.stderr
    shutil.copytree(base / "build", build, symlinks=True)  # copy2: mtimes kept, make stays incremental
    for i, patch in enumerate(patches, 1):
        what = f"{series} {i}/{len(patches)} {patch.name}"
        p = _run(["git", "am", "-q", str(patch)], tree)
        assert p.returncode == 0, f"{what}: git am failed:\n{p.stdout}{p.stderr}"
        write_module_build_dir(tree, build)
        _make(headers, build, what)
    log = _run(["git", "log", "--format=%an <%ae>%x00%B%x01", f"-{len(patches)}"], tree).stdout
    commits = [c for c in log.split("\x01") if c.strip()]
    assert len(commits) == len(patches)
    if series in CREDITED:
        for commit in commits:
            author, _, body = commit.strip().partition("\0")
            assert author == AUTHOR, (series, author)
            for needle in CREDIT:
                assert needle in body, f"{series}: a commit does not credit {needle!r}:\n{body[:300]}"
