"""Where the lab keeps things outside git: one workdir, one subtree per lab name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LabPaths:
    """The workdir layout. Artifacts are shared between labs; state is per lab."""

    workdir: Path
    lab: str

    @property
    def lab_dir(self) -> Path:
        """Per-lab state: keys, hosts, guests."""
        return self.workdir / self.lab

    def host_dir(self, host: str) -> Path:
        """A lab host's state directory (shared read-write into the lab host)."""
        return self.lab_dir / "hosts" / host

    def host_runtime(self, host: str) -> Path:
        """The running host's facts (port, kernel) for later CLI calls."""
        return self.host_dir(host) / "host.json"

    def host_console(self, host: str) -> Path:
        """A lab host's serial console log (written by this machine's QEMU)."""
        return self.host_dir(host) / "console.log"

    @property
    def initrd_dir(self) -> Path:
        """Small initramfs images, cached by content."""
        return self.workdir / "initramfs"

    @property
    def runs_dir(self) -> Path:
        """Matrix runs: results.jsonl + meta.json + logs per run."""
        return self.workdir / "runs"

    def domain_name(self, host: str, guest: str | None = None) -> str:
        """libvirt domain names carry the lab name, so two labs never collide."""
        return f"{self.lab}-{host}" if guest is None else f"{self.lab}-{guest}"
