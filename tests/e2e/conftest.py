"""End-to-end fixtures: a test lab (its own name prefix) on the real nested provider."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _need_root_and_libvirt() -> None:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests boot VMs with libvirt's system instance: run as root")
    for tool in ("qemu-system-x86_64", "virsh", "mmdebstrap"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin"]):
            pytest.skip(f"{tool} is not installed (nox -s tests installs it)")


def make_lab_toml(tmp: Path, name: str, extra: str = "") -> Path:
    """A copy of the repository's lab.toml under another lab name, paths absolute."""
    text = (REPO / "lab.toml").read_text()
    text = re.sub(r'(?m)^name = "vhl"', f'name = "{name}"', text, count=1)
    for rel in (
        "kernel/patches/nodrop",
        "kernel/patches/nodrop-v1",
        "kernel/patches/nodrop-optin",
        "kernel/configs/lab-host.config",
        "images/bookworm.toml",
    ):
        text = text.replace(f'"{rel}"', f'"{REPO / rel}"')
    path = tmp / f"{name}.toml"
    path.write_text(text + extra)
    return path


class LabCli:
    """Runs `lab` for one lab.toml, like a user would."""

    def __init__(self, config: Path) -> None:
        self.config = config

    def __call__(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
        p = subprocess.run([sys.executable, "-m", "lab.cli", "-c", str(self.config), *args], capture_output=True, text=True, timeout=timeout, env=env)
        if check and p.returncode != 0:
            raise AssertionError(f"lab {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p


@pytest.fixture(scope="session")
def e2e_ready() -> None:
    """Skip cleanly where the real components cannot run."""
    _need_root_and_libvirt()


@pytest.fixture(scope="module")
def test_lab(tmp_path_factory, e2e_ready):
    """A lab named "vht" (not the user's "vhl"): brought down after the module, whatever happened."""
    cfg = make_lab_toml(tmp_path_factory.mktemp("lab"), "vht")
    cli = LabCli(cfg)
    yield cli
    cli("down", check=False, timeout=300)
