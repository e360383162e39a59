"""A "modules" build whose patch does not apply fails after unpacking the real Debian tarballs, naming the hunk.

Unpacks linux-source-6.12 and the cached linux-image .deb (about 20 s): an
integration test, not a unit one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.artifacts.kernel import build_kernel
from lab.config import KernelRecipe
from lab.errors import LabError
from tests.unit.test_kernel import DEBIAN_RELEASE, DEBIAN_SOURCE, DEBIAN_VERSION, _kernels_leftovers, _write

pytestmark = [pytest.mark.integration]


def _cached_image_deb() -> Path | None:
    name = f"linux-image-{DEBIAN_RELEASE}-unsigned_{DEBIAN_VERSION}_amd64.deb"
    for d in (Path.home() / ".cache" / "vhost-lab" / "downloads", Path("/var/cache/apt/archives")):
        if (d / name).is_file():
            return d / name
    return None


def test_debian_modules_build_with_bogus_patch_fails_after_extracting(tmp_path: Path) -> None:
    tarball = Path("/usr/src/linux-source-6.12.tar.xz")
    if not tarball.is_file():
        pytest.skip(f"{tarball} is missing (apt-get install linux-source-6.12)")
    if not (Path("/usr/src") / f"linux-headers-{DEBIAN_RELEASE}" / "Module.symvers").is_file():
        pytest.skip(f"linux-headers-{DEBIAN_RELEASE} is not installed")
    deb = _cached_image_deb()
    if deb is None:
        pytest.skip("linux-image-*-unsigned .deb is not cached here; this test does not download 100 MB")
    workdir = tmp_path / "work"
    (workdir / "downloads").mkdir(parents=True)
    (workdir / "downloads" / deb.name).symlink_to(deb)
    bogus = _write(
        tmp_path / "bogus" / "0001-bogus-tun.patch",
        """\
--- a/drivers/net/tun.c
+++ b/drivers/net/tun.c
@@ -1,3 +1,3 @@
 this line is not in tun.c
-neither is this one
+vhost-lab bogus hunk
 nor this
""",
    )
    steps: list[str] = []
    r = KernelRecipe("bogus", DEBIAN_SOURCE, patches=(bogus,), strategy="modules")
    with pytest.raises(LabError) as ei:
        build_kernel(r, workdir, progress=lambda s: steps.append(s.text()), timeout=900)
    msg = ei.value.message
    assert f"patch 0001-bogus-tun.patch does not apply to debian:{DEBIAN_VERSION}" in msg
    assert "rejected hunk:" in msg and "+vhost-lab bogus hunk" in msg
    assert any("extracting" in s for s in steps)
    assert _kernels_leftovers(workdir) == []
    assert [p.name for p in (workdir / "kernels" / "logs").iterdir()][0].startswith("bogus-")
    assert (workdir / "downloads" / deb.name).is_symlink()  # the cached .deb was used, not fetched
