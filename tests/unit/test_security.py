"""Secrets: the lab's key pair is an ed25519 key kept private, and never leaves the key directory.

- lab.hosts.sshkeys: ed25519, private key 0600, its directory 0700 (also under a
  careless umask, also when they existed with looser modes), an existing key
  is never replaced, an interrupted generation leaves nothing half-written.
- lab.verdicts.results: a run directory written the way a matrix run writes it (meta,
  cell results with the commands run, errors from failed SSH commands) holds
  no private key material and no "PRIVATE KEY".
- lab.toml: no credential keys are accepted anywhere, and the repository's
  own lab.toml and git tree hold none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lab.config import ConfigError, load_config, loads_config
from lab.errors import CommandFailed
from lab.hosts.sshkeys import KEY_NAME, ensure_keypair, key_dir

REPO = Path(__file__).resolve().parents[2]
LAB = "vhs"

needs_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _private_body_lines(private: Path) -> list[str]:
    """The base64 lines of an OpenSSH private key: what must never be copied anywhere."""
    lines = private.read_text().splitlines()
    assert lines[0] == "-----BEGIN OPENSSH PRIVATE KEY-----" and lines[-1] == "-----END OPENSSH PRIVATE KEY-----"
    body = [ln for ln in lines[1:-1] if ln.strip()]
    assert body
    return body


# --------------------------------------------------------------------------- the key pair


@needs_keygen
def test_keypair_is_ed25519_private_0600_dir_0700(tmp_path):
    kp = ensure_keypair(tmp_path, LAB)
    d = key_dir(tmp_path, LAB)
    assert kp.private == d / KEY_NAME and kp.public == d / f"{KEY_NAME}.pub"
    assert d.is_relative_to(tmp_path)  # under the workdir, never in the repository
    assert _mode(d) == 0o700
    assert _mode(kp.private) == 0o600
    assert _mode(kp.public) == 0o644
    assert kp.private.stat().st_uid == os.geteuid()
    fp = subprocess.run(["ssh-keygen", "-l", "-f", str(kp.public)], capture_output=True, text=True, check=True).stdout
    assert fp.rstrip().endswith("(ED25519)"), fp
    assert kp.public_key_text().startswith("ssh-ed25519 ") and kp.public_key_text().endswith(f"vhost-lab-{LAB}")
    # the public half is the private key's (ssh-keygen -y derives it)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(kp.private)], capture_output=True, text=True, check=True).stdout
    assert derived.split()[:2] == kp.public_key_text().split()[:2]
    assert "PRIVATE KEY" not in kp.public.read_text()
    # unencrypted on purpose (BatchMode), so the modes are the protection
    assert sorted(p.name for p in d.iterdir()) == [KEY_NAME, f"{KEY_NAME}.pub"]


@needs_keygen
def test_keypair_modes_hold_under_umask_0(tmp_path):
    code = f"import os; os.umask(0); from lab.hosts.sshkeys import ensure_keypair; ensure_keypair({str(tmp_path)!r}, {LAB!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    d = key_dir(tmp_path, LAB)
    assert _mode(d) == 0o700 and _mode(d / KEY_NAME) == 0o600


@needs_keygen
def test_existing_key_is_kept_and_loose_modes_are_tightened(tmp_path):
    kp = ensure_keypair(tmp_path, LAB)
    before, public = kp.private.read_bytes(), kp.public_key_text()
    os.chmod(kp.private, 0o644)
    os.chmod(kp.private.parent, 0o755)
    kp.public.unlink()  # a lost public half is re-derived, the private key stays
    again = ensure_keypair(tmp_path, LAB)
    assert again.private.read_bytes() == before
    assert _mode(again.private) == 0o600 and _mode(again.private.parent) == 0o700
    assert again.public_key_text().split()[:2] == public.split()[:2]


@needs_keygen
def test_interrupted_generation_leaves_no_key(tmp_path):
    """A kill -9 during ssh-keygen: no half-written key that later runs would trust."""
    code = (
        "import os, signal, lab.hosts.sshkeys as k\n"
        "real = k._run\n"
        "def run(argv):\n"
        "    real(argv)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # right after ssh-keygen wrote its temporary files\n"
        "k._run = run\n"
        f"k.ensure_keypair({str(tmp_path)!r}, {LAB!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert p.returncode == -9
    d = key_dir(tmp_path, LAB)
    assert not (d / KEY_NAME).exists() and not (d / f"{KEY_NAME}.pub").exists()
    leftovers = sorted(p.name for p in d.iterdir())
    print(f"\n[keygen kill -9] left in the key dir: {leftovers}")
    kp = ensure_keypair(tmp_path, LAB)  # the next run makes a whole key
    assert _mode(kp.private) == 0o600
    # temporary halves of the killed run are private too (0600 from ssh-keygen) and named per pid
    for name in leftovers:
        assert _mode(d / name) & 0o077 == 0 or name.endswith(".pub"), name


# --------------------------------------------------------------------------- results never carry the key


@needs_keygen
def test_run_directory_holds_no_private_key_material(tmp_path):
    """A run written the way lab.measure.matrix writes one, by a lab whose key pair exists."""
    from lab.hosts.remote import SshEndpoint
    from lab.measure.cells import expand
    from lab.measure.matrix import Where, cell_result_from_stream, describe_error, error_result, open_run
    from lab.session import LabContext
    from lab.verdicts.results import RunStore
    from tests.helpers import stream_measurement

    recipe = tmp_path / "recipe.toml"
    recipe.write_text("")
    cfg_text = f"""
[lab]
name = "{LAB}"
workdir = "{tmp_path / 'work'}"
[kernels.stock]
source = "debian:6.12.117-1~deb12u1"
[kernels.nodrop]
source = "debian:6.12.117-1~deb12u1"
[images.bookworm]
recipe = "{recipe}"
[hosts.lab1]
provider = "nested"
kernel = "stock"
memory_mib = 512
[guests.guest1]
host = "lab1"
image = "bookworm"
memory_mib = 256
[matrices.m]
host = "lab1"
guest = "guest1"
kernels = ["stock", "nodrop"]
txqueuelens = [1000, 1]
duration_s = 5
[expectations]
stock_kernel = "stock"
nodrop_kernel = "nodrop"
"""
    cfg_path = tmp_path / "lab.toml"
    cfg_path.write_text(cfg_text)
    ctx = LabContext.open(load_config(cfg_path))
    body = _private_body_lines(ctx.key.private)

    spec, store = open_run(ctx, "m", argv=["lab", "-c", str(cfg_path), "run", "m"])
    meta = store.read_meta()
    meta.hosts["lab1/stock"] = {"kernel_recipe": "stock", "kernel_release": "6.12.117+deb12-amd64", "accel": "tcg"}
    store.write_meta(meta)
    host_ep = SshEndpoint("127.0.0.1", 40000, "root", ctx.key.private)
    guest_ep = SshEndpoint("10.99.1.2", 22, "root", ctx.key.private, jump=host_ep)
    cells = expand(spec)
    where = Where(host="lab1", boot_id="lab1@1", host_accel="tcg", kernel_recipe="stock", kernel_release="6.12.117+deb12-amd64")
    for i, cell in enumerate(cells):
        commands = [guest_ep.ssh_argv(["iperf3", "-s", "-D"]), host_ep.ssh_argv(["tc", "qdisc", "show"])]
        if i % 2:
            exc = CommandFailed(["iperf3", "-s"], 255, "", "Permission denied (publickey).\nssh: connect failed", "root@10.99.1.2")
            r = error_result(cell, describe_error(exc, "guest"), where, started_at="x", finished_at="y", commands=commands)
        else:
            m = stream_measurement(400.0, retransmits=3, seconds=5.0)
            r = cell_result_from_stream(cell, m, where, started_at="x", finished_at="y", commands=commands)
        store.append(r)

    files = [p for p in store.run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"meta.json", "results.jsonl"}
    for f in files:
        text = f.read_text(errors="replace")
        assert "PRIVATE KEY" not in text, f
        for line in body:
            assert line not in text, f"{f} holds a line of the lab's private key"
        # the key is named by path (ssh -o IdentityFile=...), and only that
        assert re.sub(r"\s", "", "".join(body))[:40] not in re.sub(r"\s", "", text), f
    data = RunStore(store.run_dir).load()
    assert len(data.results) == len(cells) and data.warnings == []
    assert any(str(ctx.key.private) in json.dumps(r.commands) for r in data.results)  # by path


# --------------------------------------------------------------------------- no credentials in lab.toml

CREDENTIAL_KEYS = ("password", "passphrase", "private_key", "key", "key_file", "identity_file", "token", "secret", "api_key")

BASE = """
[lab]
name = "vhs"
workdir = "/nonexistent/vhs-work"
[kernels.stock]
source = "debian:6.12.117-1~deb12u1"
[kernels.nodrop]
source = "debian:6.12.117-1~deb12u1"
[images.bookworm]
recipe = "{recipe}"
[hosts.lab1]
provider = "ssh"
uri = "qemu+ssh://root@example.org/system"
address = "example.org"
kernel = "stock"
[guests.guest1]
host = "lab1"
image = "bookworm"
[guests.guest1.net]
txqueuelen = 1000
[matrices.m]
host = "lab1"
guest = "guest1"
kernels = ["stock", "nodrop"]
[expectations]
stock_kernel = "stock"
nodrop_kernel = "nodrop"
"""

TABLES = ("lab", "hosts.lab1", "guests.guest1", "guests.guest1.net", "matrices.m", "kernels.stock", "expectations")


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("key", CREDENTIAL_KEYS)
def test_config_refuses_credential_keys(tmp_path, table, key):
    recipe = tmp_path / "r.toml"
    recipe.touch()
    text = BASE.format(recipe=recipe)
    loads_config(text, tmp_path, tmp_path / "lab.toml", mem_total_mib=8192)  # the base is valid
    text = text.replace(f"[{table}]\n", f'[{table}]\n{key} = "hunter2"\n', 1)
    with pytest.raises(ConfigError) as err:
        loads_config(text, tmp_path, tmp_path / "lab.toml", mem_total_mib=8192)
    assert err.value.key_path == f"{table}.{key}" and "unknown key" in str(err.value)
    assert "hunter2" not in str(err.value)  # the refused value is not echoed back


def test_ssh_hosts_take_no_credentials_in_uri_or_address(tmp_path):
    """A password smuggled into the libvirt URI or the address is not accepted as a host name."""
    recipe = tmp_path / "r.toml"
    recipe.touch()
    text = BASE.format(recipe=recipe)
    bad = text.replace('address = "example.org"', 'address = "root:hunter2@example.org"')
    with pytest.raises(ConfigError) as err:
        loads_config(bad, tmp_path, tmp_path / "lab.toml", mem_total_mib=8192)
    assert err.value.key_path == "hosts.lab1.address"


def _walk(data, path=""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield f"{path}.{k}" if path else k, v
            yield from _walk(v, f"{path}.{k}" if path else k)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _walk(v, f"{path}[{i}]")


def test_repository_lab_toml_and_tree_hold_no_credentials():
    data = tomllib.loads((REPO / "lab.toml").read_text())
    words = re.compile(r"pass(word|phrase)?|secret|token|credential|private|api_?key|^key$", re.IGNORECASE)
    for path, value in _walk(data):
        assert not words.search(path.rsplit(".", 1)[-1]), path
        if isinstance(value, str):
            assert "PRIVATE KEY" not in value and not value.startswith(("ssh-ed25519 ", "ssh-rsa ")), path
    load_config(REPO / "lab.toml")  # and it is a valid lab
    if shutil.which("git") and (REPO / ".git").exists():
        tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout.split()
        keyish = [f for f in tracked if re.search(r"(^|/)(id_(rsa|ed25519|ecdsa)|.*\.pem|.*\.key)$", f)]
        assert keyish == []
        grep = subprocess.run(["git", "-C", str(REPO), "grep", "-l", "-I", "BEGIN OPENSSH PRIVATE KEY"], capture_output=True, text=True)
        # only tests that look for the marker may spell it
        assert [f for f in grep.stdout.split() if not f.startswith("tests/")] == []
