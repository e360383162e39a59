"""lab.onhost.droptest's pure parts: frame parsing, sequence accounting, the command line."""

from __future__ import annotations

import struct

import pytest

from lab.onhost.droptest import (
    MAGIC,
    SeqCounter,
    build_parser,
    build_payload,
    parse_frame,
)


def frame(payload: bytes, dport: int = 9, ethertype: int = 0x0800, proto: int = 17, frag: int = 0, ihl: int = 5) -> bytes:
    """An Ethernet + IPv4 + UDP frame as the tap hands it to its reader (IFF_NO_PI)."""
    eth = bytes.fromhex("02005e005302") + bytes.fromhex("02005e005301") + struct.pack("!H", ethertype)
    options = bytes(4 * (ihl - 5))
    total = 4 * ihl + 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0,
                     bytes([10, 213, 0, 1]), bytes([10, 213, 0, 2])) + options
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0)
    return eth + ip + udp + payload


class TestParseFrame:
    def test_reads_the_sequence_number_back(self) -> None:
        assert parse_frame(frame(build_payload(123456789, 64))) == 123456789

    def test_payload_shorter_than_requested_size_still_has_the_header(self) -> None:
        payload = build_payload(7, 0)
        assert len(payload) == 12
        assert parse_frame(frame(payload)) == 7

    def test_ip_options_shift_the_udp_header(self) -> None:
        assert parse_frame(frame(build_payload(5, 64), ihl=7)) == 5

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"dport": 10},  # another port
            {"ethertype": 0x86DD},  # IPv6
            {"proto": 6},  # TCP
            {"frag": 0x2000},  # more fragments
            {"frag": 0x0001},  # a later fragment
        ],
    )
    def test_rejects_what_is_not_ours(self, kwargs: dict[str, int]) -> None:
        assert parse_frame(frame(build_payload(1, 64), **kwargs)) is None

    def test_rejects_wrong_magic(self) -> None:
        assert parse_frame(frame(struct.pack("!QI", 1, MAGIC ^ 1) + bytes(52))) is None

    def test_rejects_truncated_frames(self) -> None:
        full = frame(build_payload(1, 64))
        assert parse_frame(full[:40]) is None
        assert parse_frame(b"") is None

    def test_custom_port(self) -> None:
        assert parse_frame(frame(build_payload(3, 64), dport=5001), port=5001) == 3


class TestSeqCounter:
    def test_in_order_no_loss(self) -> None:
        c = SeqCounter()
        for s in range(100):
            c.add(s)
        assert (c.received, c.gap_events, c.duplicates, c.reordered) == (100, 0, 0, 0)
        assert c.lost(100) == 0

    def test_gaps_count_every_missing_number(self) -> None:
        c = SeqCounter()
        for s in [0, 1, 5, 6, 10]:  # 2,3,4 and 7,8,9 missing
            c.add(s)
        assert c.received == 5
        assert c.gap_events == 2
        assert c.lost(11) == 6

    def test_missing_head_and_tail(self) -> None:
        c = SeqCounter()
        for s in [3, 4]:
            c.add(s)
        assert c.gap_events == 1  # started at 3, not 0
        assert c.lost(10) == 8  # 0,1,2 and 5..9

    def test_duplicates_and_reordering(self) -> None:
        c = SeqCounter()
        for s in [0, 2, 1, 2, 3]:
            c.add(s)
        assert c.received == 4
        assert c.duplicates == 1
        assert c.reordered == 1
        assert c.lost(4) == 0

    def test_nothing_received(self) -> None:
        assert SeqCounter().lost(50) == 50
        assert SeqCounter().lost(0) == 0

    def test_numbers_beyond_sent_do_not_hide_losses(self) -> None:
        c = SeqCounter()
        c.add(0)
        c.add(9)
        assert c.lost(2) == 1


def test_cli_defaults_make_a_fast_sender_and_slow_reader() -> None:
    args = build_parser().parse_args(["--tap", "dt0", "--json"])
    assert (args.tap, args.txqueuelen, args.json, args.netns) == ("dt0", 1, True, None)
    assert args.qdisc == "pfifo_fast"  # a FIFO: its overflow is ENOBUFS to the sender, never a gap
    assert args.read_every > 0 and args.read_sleep > 0


def test_cli_iff_backpressure_is_off_unless_asked() -> None:
    assert build_parser().parse_args([]).iff_backpressure is False
    assert build_parser().parse_args(["--iff-backpressure"]).iff_backpressure is True
    assert build_parser().parse_args(["--qdisc", "noqueue"]).qdisc == "noqueue"
