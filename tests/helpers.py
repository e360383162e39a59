"""Test helpers shared across tests/: the cover letter's reference numbers as cell results,
lab.toml's default expectations, and measurements as the agent would reply them.

The reference numbers are shared/DESIGN.md's (the patch's cover letter, Mbit/s,
stock / nodrop); counters are made up to match their story ("default suffers
from many retransmits, while patched does not").
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from hypothesis import strategies as st

from lab.config import Expectations
from lab.onhost.net import BacklogPeak, CountersDelta, QdiscCounters, TapCounters
from lab.onhost.traffic import Iperf3Result, StreamMeasurement, TcpCounters
from lab.verdicts.results import CellResult

EXP = Expectations("stock", "nodrop")  # lab.toml's [expectations] defaults

# (txqueuelen, rtt_ms) -> (stock, nodrop) Mbit/s, from the cover letter.
REFERENCE: dict[str, dict[tuple[int, int], tuple[float, float]]] = {
    "tap": {
        (1000, 0): (2194, 2185),
        (100, 0): (1986, 2269),
        (10, 0): (625, 1989),
        (1, 0): (2.2, 1113),
        (1000, 60): (172, 341),
        (1000, 120): (98, 255),
    },
    "vhost": {
        (1000, 0): (23404, 23859),
        (100, 0): (23373, 23890),
        (10, 0): (25838, 23730),
        (1, 0): (0.7, 19245),
        (1000, 60): (397, 398),
        (1000, 120): (201, 200),
    },
}


def cid(backend: str, qlen: int, rtt: float, kernel: str, repeat: int = 1, repeats: int = 1) -> str:
    """A cell id as lab.measure.cells spells it (default axes)."""
    return f"{backend}-qlen{qlen}-rtt{rtt:g}-{kernel}" + (f"-r{repeat}" if repeats > 1 else "")


def reference_results(
    backends: Iterable[str] = ("tap", "vhost"),
    rtts: bool = True,
    accel: str = "kvm",
    repeats: int = 1,
    noise: float = 0.0,
    seed: int = 1,
    boot: str | None = "lab1@1",
    scale: float = 1.0,
) -> list[CellResult]:
    """Cell results carrying the reference numbers (each repeat jittered by `noise`, a relative SD)."""
    rng = random.Random(seed)
    out = []
    order = 0
    for backend in backends:
        for (qlen, rtt), pair in REFERENCE[backend].items():
            if rtt and not rtts:
                continue
            for kernel, mbps0 in zip(("stock", "nodrop"), pair, strict=True):
                for repeat in range(1, repeats + 1):
                    mbps = mbps0 * scale * (1 + rng.gauss(0, noise)) if noise else mbps0 * scale
                    segs = int(mbps * 1e6 * 10 / 8 / 1448)  # 10 s of full-size segments
                    stock_small_q = kernel == "stock" and qlen <= 10
                    out.append(
                        CellResult(
                            cell=cid(backend, qlen, rtt, kernel, repeat, repeats),
                            kernel=kernel,
                            backend=backend,
                            txqueuelen=qlen,
                            rtt_ms=rtt,
                            repeat=repeat,
                            throughput_mbps=float(mbps),
                            tcp_out_segs=segs,
                            retransmits=int(segs * 0.02) if stock_small_q else 0,
                            host_retrans_segs=int(segs * 0.02) if stock_small_q else 0,
                            tap_tx_dropped=int(segs * 0.02) if stock_small_q else 0,
                            ring_drops=int(segs * 0.02) if stock_small_q else 0,
                            qdisc_drops=0,
                            qdisc_requeues=0 if kernel == "stock" else 17,
                            measured_rtt_ms=float(rtt) + 0.1,
                            accel=accel,
                            host_accel=accel,
                            kernel_recipe=kernel,
                            duration_s=10.0,
                            host="lab1" if boot else None,
                            boot_id=boot,
                            order=order,
                        )
                    )
                    order += 1
    return out


def patch(results: list[CellResult], cell: str, **changes: object) -> list[CellResult]:
    """The results with one cell's fields changed (every repeat whose id starts with `cell`)."""
    import dataclasses

    return [dataclasses.replace(r, **changes) if r.cell == cell or r.cell.startswith(cell + "-r") else r for r in results]


def stream_measurement(
    throughput_mbps: float | None = 400.0,
    retransmits: int = 0,
    tx_dropped: int = 0,
    tx_packets: int = 100_000,
    qdisc_requeues: int = 0,
    drops: dict[str, int] | None = None,
    seconds: float = 10.0,
    out_segs: int = 100_000,
    argv: list[str] | None = None,
    qdiscs: list[QdiscCounters] | None = None,
) -> StreamMeasurement:
    """What the agent's `stream` verb replies, built by hand."""
    ip = Iperf3Result(throughput_mbps=throughput_mbps, sent_mbps=throughput_mbps, retransmits=retransmits, mean_rtt_ms=0.3,
                      cpu_sender_pct=50.0, cpu_receiver_pct=20.0, bytes=None, seconds=seconds, reverse=False, streams=1,
                      congestion="cubic", version="3.12")
    q = QdiscCounters(kind="fq_codel", requeues=qdisc_requeues)
    delta = CountersDelta(dev="vhl-guest1", seconds=seconds, tap=TapCounters(tx_packets=tx_packets, tx_dropped=tx_dropped), qdisc=q)
    return StreamMeasurement(
        argv=argv or ["iperf3", "-c", "10.99.1.2", "-J"],
        iperf3=ip,
        dev="vhl-guest1",
        before=None,
        after=None,
        delta=delta,
        qdiscs=qdiscs or [q],
        backlog_peak=BacklogPeak(0, 2, 100),
        tcp=TcpCounters(retrans_segs=retransmits, out_segs=out_segs),
        drops=drops,
    )


# Hostile strings for the quoting properties (shell, ssh, argv): tests/unit/test_shell_safety.py, tests/integration/test_real_ssh.py.
NASTY = [
    "",
    " ",
    "a b",
    "a;reboot",
    "$(reboot)",
    "`reboot`",
    "${HOME}",
    "$HOME",
    "'",
    '"',
    "\\",
    "a'b\"c",
    "*",
    "?",
    "[a]",
    "~",
    "~root",
    "#x",
    "a#b",
    "&",
    "|",
    ">x",
    "<x",
    "a\tb",
    "a\nb",
    "a\n",
    "\n",
    "a\rb",
    "a\x00b",
    "\x1b[31m",
    "-rf",
    "--",
    "-oProxyCommand=reboot",
    "--clear",
    "%h:%p",
    "100%",
    "caf\u00e9",
    "\u202etxt.exe",
    "\U0001f600",
    "a\u00a0b",
    "\u2028",
    "!",
    "{a,b}",
    "x=$(id)",
]
nasty = st.sampled_from(NASTY)
hostile = st.one_of(nasty, st.text(max_size=30), st.lists(nasty, min_size=1, max_size=4).map("".join))
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def fake_ko(path, build_id: bytes):
    """A minimal ELF64 .ko (xz-compressed as the kernel's are, when `path` ends in .xz) whose only
    SHT_NOTE section holds a GNU build-id: what lab.onhost.probe.module_file_build_id reads."""
    import lzma
    import struct

    namez = b"GNU\0"
    pad = b"\0" * ((4 - len(build_id) % 4) % 4)
    note = struct.pack("<III", len(namez), len(build_id), 3) + namez + build_id + pad
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, 64 + len(note))  # e_shoff: the section headers follow the note
    struct.pack_into("<HH", header, 0x3A, 64, 2)  # e_shentsize, e_shnum (a null section, then the note)
    sh = bytearray(64)
    struct.pack_into("<I", sh, 4, 7)  # SHT_NOTE
    struct.pack_into("<QQ", sh, 0x18, 64, len(note))  # sh_offset, sh_size
    data = bytes(header) + note + bytes(64) + bytes(sh)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data, check=lzma.CHECK_CRC32) if path.name.endswith(".xz") else data)
    return path
