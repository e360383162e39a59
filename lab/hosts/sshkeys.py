"""The lab's SSH key pair: one ed25519 key per lab, kept in the workdir.

The public half is baked into guest images (/root/.ssh/authorized_keys) and
the private half is what the lab uses to reach guests and lab hosts. Keys
live under <workdir>/<lab>/ssh/ only: never in the repository or in results.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lab import proc
from lab.errors import LabError, MissingPiece

KEY_NAME = "id_ed25519"
_LAB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SshKeyPair:
    private: Path
    public: Path

    def public_key_text(self) -> str:
        """The public key line ("ssh-ed25519 AAAA... vhost-lab-<lab>"), no newline."""
        return self.public.read_text(encoding="ascii").strip()


def _ssh_keygen() -> str:
    exe = shutil.which("ssh-keygen")
    if not exe:
        raise MissingPiece("ssh-keygen is not installed", hint="apt-get install openssh-client")
    return exe


def _run(argv: list[str]) -> proc.Completed:
    res = proc.run(argv, timeout=60)
    if res.rc != 0:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
        raise LabError(f"`{' '.join(argv)}` exited {res.rc}: {tail}")
    return res


def key_dir(workdir: Path, lab_name: str) -> Path:
    if not _LAB_NAME.fullmatch(lab_name):
        raise LabError(f"lab name {lab_name!r} cannot name a key directory", hint="use letters, digits, '.', '_', '-'")
    return Path(workdir).expanduser() / lab_name / "ssh"


def ensure_keypair(workdir: Path, lab_name: str) -> SshKeyPair:
    """Return the lab's key pair, creating it on first use (idempotent).

    <workdir>/<lab>/ssh/ is mode 0700 and the private key 0600. A missing
    public half is re-derived from the private key; an existing key is never
    replaced (images baked with it would stop admitting the lab).
    """
    d = key_dir(workdir, lab_name)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    private = d / KEY_NAME
    public = d / f"{KEY_NAME}.pub"
    comment = f"vhost-lab-{lab_name}"

    if private.exists():
        os.chmod(private, 0o600)
        if not public.exists() or not public.read_text(encoding="ascii", errors="replace").strip():
            out = _run([_ssh_keygen(), "-y", "-f", str(private)]).stdout.strip()
            tmp = d / f".{KEY_NAME}.pub.tmp"
            tmp.write_text(f"{out} {comment}\n", encoding="ascii")
            os.chmod(tmp, 0o644)
            os.replace(tmp, public)
        return SshKeyPair(private=private, public=public)

    # Generate under temporary names and rename into place, so an interrupted
    # ssh-keygen never leaves a half-written key that later runs would trust.
    tmp_private = d / f".{KEY_NAME}.tmp{os.getpid()}"
    tmp_public = Path(f"{tmp_private}.pub")
    for p in (tmp_private, tmp_public):
        p.unlink(missing_ok=True)
    try:
        _run([_ssh_keygen(), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(tmp_private)])
        os.chmod(tmp_private, 0o600)
        os.chmod(tmp_public, 0o644)
        os.replace(tmp_public, public)
        os.replace(tmp_private, private)
    finally:
        for p in (tmp_private, tmp_public):
            p.unlink(missing_ok=True)
    return SshKeyPair(private=private, public=public)
