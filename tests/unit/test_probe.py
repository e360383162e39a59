"""lab.onhost.probe: GNU build-ids from note blobs and module files, and this machine's kernel facts."""

from __future__ import annotations

import json
import lzma
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lab.hosts.nested import artifact_build_ids
from lab.onhost import probe
from lab.onhost.probe import LAB_MODULES, KernelFacts, build_id_from_notes, module_file_build_id, probe_kernel
from tests.helpers import fake_ko

REPO = Path(__file__).resolve().parents[2]
RELEASE = "6.12.117+deb12-amd64"
MODULES = Path("/lib/modules") / RELEASE
TUN_KO = MODULES / "kernel" / "drivers" / "net" / "tun.ko.xz"

needs_modules = pytest.mark.skipif(not TUN_KO.is_file(), reason=f"{TUN_KO} is absent (apt-get install linux-image-{RELEASE})")


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note: header, name and descriptor each padded to 4 bytes."""
    namez = name + b"\0"
    pad = lambda b: b + b"\0" * ((4 - len(b) % 4) % 4)  # noqa: E731
    return struct.pack("<III", len(namez), len(desc), ntype) + pad(namez) + pad(desc)


BID = bytes(range(0xA0, 0xB4))  # 20 bytes, like a SHA-1 build-id


# --------------------------------------------------------------------------
# build_id_from_notes
# --------------------------------------------------------------------------


def test_build_id_single_note() -> None:
    assert build_id_from_notes(note(b"GNU", 3, BID)) == BID.hex()


def test_build_id_after_other_notes() -> None:
    blob = (
        note(b"Linux", 1, b"6.12.117+deb12-amd64\0")  # odd sizes exercise the padding
        + note(b"GNU", 5, b"\x02\x00\x00\xc0\x04\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00")  # NT_GNU_PROPERTY_TYPE_0
        + note(b"Xen", 3, b"\xff" * 8)  # type 3, but not a GNU note
        + note(b"GNU", 1, b"\0" * 16)  # NT_GNU_ABI_TAG
        + note(b"GNU", 3, BID)
    )
    assert build_id_from_notes(blob) == BID.hex()


def test_build_id_of_other_lengths() -> None:
    assert build_id_from_notes(note(b"GNU", 3, b"\x01\x02\x03")) == "010203"
    sha256_id = bytes(range(32))
    assert build_id_from_notes(note(b"GNU", 3, sha256_id)) == sha256_id.hex()


@pytest.mark.parametrize(
    "blob",
    [b"", b"\0" * 11, note(b"Linux", 3, BID), note(b"GNU", 1, BID), note(b"GNU", 3, BID)[:10]],
    ids=["empty", "short", "not-gnu", "abi-tag", "truncated-header"],
)
def test_no_build_id(blob: bytes) -> None:
    assert build_id_from_notes(blob) is None


def test_build_id_of_the_running_kernel_notes() -> None:
    notes = Path("/sys/kernel/notes")
    if not notes.exists():
        pytest.skip("/sys/kernel/notes is absent")
    data = notes.read_bytes()
    bid = build_id_from_notes(data)
    if bid is None:
        pytest.skip("this kernel was built without a GNU build-id")
    assert bytes.fromhex(bid) in data
    assert len(bid) in (40, 64)


# --------------------------------------------------------------------------
# module_file_build_id
# --------------------------------------------------------------------------


def _readelf_build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    ids = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("Build ID:")]
    assert len(ids) == 1, out
    return ids[0]


@needs_modules
def test_module_build_id_matches_readelf(tmp_path: Path) -> None:
    if shutil.which("readelf") is None:
        pytest.skip("readelf is not installed (apt-get install binutils)")
    plain = tmp_path / "tun.ko"
    plain.write_bytes(lzma.decompress(TUN_KO.read_bytes()))
    want = _readelf_build_id(plain)
    assert module_file_build_id(TUN_KO) == want  # from the .ko.xz
    assert module_file_build_id(plain) == want  # and from the plain .ko


@needs_modules
def test_lab_modules_have_distinct_build_ids() -> None:
    ids = artifact_build_ids(MODULES)
    assert set(ids) == set(LAB_MODULES)
    assert len(set(ids.values())) == len(LAB_MODULES)
    assert ids["tun"] == module_file_build_id(TUN_KO)


def test_module_build_id_of_non_elf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"#!/bin/sh\necho not a module\n")
    assert module_file_build_id(junk) is None
    elf32 = tmp_path / "elf32.ko"
    elf32.write_bytes(b"\x7fELF\x01" + b"\0" * 60)
    assert module_file_build_id(elf32) is None


def test_module_build_id_of_elf_without_notes(tmp_path: Path) -> None:
    """A minimal ELF64 with one non-note section header."""
    shoff = 64
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HH", header, 0x3A, 64, 1)
    section = bytearray(64)
    struct.pack_into("<I", section, 4, 1)  # SHT_PROGBITS
    path = tmp_path / "nonotes.ko"
    path.write_bytes(bytes(header + section))
    assert module_file_build_id(path) is None


def test_module_build_id_of_handmade_elf(tmp_path: Path) -> None:
    """A minimal ELF64 whose only SHT_NOTE section holds a GNU build-id, plain and xz-compressed."""
    assert module_file_build_id(fake_ko(tmp_path / "made.ko", BID)) == BID.hex()
    assert module_file_build_id(fake_ko(tmp_path / "made.ko.xz", BID)) == BID.hex()


# --------------------------------------------------------------------------
# probe_kernel on this machine
# --------------------------------------------------------------------------


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = None, None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if model is None and line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if flags is None and line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    return model or "?", flags or set()


def test_probe_kernel_matches_this_machine() -> None:
    facts = probe_kernel()
    model, flags = _cpuinfo()
    assert isinstance(facts, KernelFacts)
    assert facts.release == platform.release() == os.uname().release
    assert facts.cpu_model == model
    assert facts.tun == Path("/dev/net/tun").exists()
    assert facts.vhost_net == Path("/dev/vhost-net").exists()
    hw_virt = bool(flags & {"vmx", "svm"})
    if not hw_virt:
        # /dev/kvm may exist (PVM-only here), but it cannot run an ordinary guest
        assert facts.kvm is False
    else:
        assert facts.kvm == (Path("/dev/kvm").exists() and os.access("/dev/kvm", os.R_OK | os.W_OK))
    if "QEMU TCG" in model:
        assert facts.accel == "tcg"
    else:
        assert facts.accel == ("kvm" if "hypervisor" in flags else "metal")


def test_probe_kernel_modules_and_nodrop_consistent() -> None:
    facts = probe_kernel()
    assert set(facts.modules) <= set(LAB_MODULES)
    for name, bid in facts.modules.items():
        assert (Path("/sys/module") / name / "notes" / ".note.gnu.build-id").exists()
        assert re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", bid), bid
        # the loaded module's notes and the module file on disk carry the same id
        assert bid == probe.loaded_module_build_id(name)
    for name in set(LAB_MODULES) - set(facts.modules):
        assert not (Path("/sys/module") / name / "notes" / ".note.gnu.build-id").exists()
    if not Path("/sys/module/tun").exists():
        assert facts.nodrop is None
    else:
        assert facts.nodrop in (True, False)
    if Path("/sys/module/sch_netem").exists():
        assert facts.netem is True


def test_probe_kernel_is_json() -> None:
    d = probe_kernel().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"release", "accel", "cpu_model", "kvm", "vhost_net", "tun", "netem", "modules", "nodrop"}


def test_probe_main_prints_one_json_object() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lab.onhost.probe"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["release"] == platform.release()


def test_netem_available_from_module_tree() -> None:
    """netem counts as available when the release's modules.dep lists sch_netem."""
    if not (MODULES / "modules.dep").is_file():
        pytest.skip(f"{MODULES} is absent")
    assert "sch_netem.ko" in (MODULES / "modules.dep").read_text()
    if not Path("/sys/module/sch_netem").exists():
        assert probe._netem_available(RELEASE) is True
        assert probe._netem_available("0.0.0-no-such-release") is False
