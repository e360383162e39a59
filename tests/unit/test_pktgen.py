"""lab.onhost.pktgen's pure parts: the device file it reads back, sender names, run checks, frame recognition.

The device files are what a Debian 6.12.117 lab host's pktgen wrote after a
run (two senders on one tap, txqueuelen 1; the second had 1117 refusals).
"""

from __future__ import annotations

import struct

import pytest

from lab.onhost.pktgen import PKTGEN_MAGIC, PktgenRun, is_pktgen_frame, parse_device_file, sender_names

SENDER_0 = """\
Params: count 3000  min_pkt_size: 64  max_pkt_size: 64
     frags: 0  delay: 0  clone_skb: 0  ifname: vhlpg0@0
     flows: 0 flowlen: 0
     queue_map_min: 0  queue_map_max: 0
     dst_min: 10.213.0.2  dst_max:
     src_min:   src_max:
     src_mac: 52:dd:e2:76:2f:c0 dst_mac: 02:00:5e:00:53:02
     udp_src_min: 9  udp_src_max: 9  udp_dst_min: 9  udp_dst_max: 9
     src_mac_count: 0  dst_mac_count: 0
     xmit_mode: xmit_queue
     Flags: SHARED
Current:
     pkts-sofar: 3000  errors: 0
     started: 53296377us  stopped: 53321940us idle: 14us
     seq_num: 3001  cur_dst_mac_offset: 0  cur_src_mac_offset: 0
     cur_saddr: 10.213.0.1  cur_daddr: 10.213.0.2
     cur_udp_dst: 9  cur_udp_src: 9
     cur_queue_map: 0
     flows: 0
Result: OK: 25562(c25548+d14) usec, 3000 (64byte,0frags)
  117357pps 60Mb/sec (60086784bps) errors: 0
"""

SENDER_1 = """\
Params: count 3000  min_pkt_size: 64  max_pkt_size: 64
     frags: 0  delay: 0  clone_skb: 0  ifname: vhlpg0@1
     flows: 0 flowlen: 0
     queue_map_min: 0  queue_map_max: 0
     dst_min: 10.213.0.2  dst_max:
     src_min:   src_max:
     src_mac: 52:dd:e2:76:2f:c0 dst_mac: 02:00:5e:00:53:02
     udp_src_min: 9  udp_src_max: 9  udp_dst_min: 9  udp_dst_max: 9
     src_mac_count: 0  dst_mac_count: 0
     xmit_mode: xmit_queue
     Flags: SHARED
Current:
     pkts-sofar: 3000  errors: 1117
     started: 53314618us  stopped: 53337597us idle: 633us
     seq_num: 3001  cur_dst_mac_offset: 0  cur_src_mac_offset: 0
     cur_saddr: 10.213.0.1  cur_daddr: 10.213.0.2
     cur_udp_dst: 9  cur_udp_src: 9
     cur_queue_map: 0
     flows: 0
Result: OK: 22979(c22345+d633) usec, 3000 (64byte,0frags)
  130551pps 66Mb/sec (66842112bps) errors: 1117
"""

# The same device while it still runs: no Result line yet.
RUNNING = SENDER_0.split("Result:")[0].replace("pkts-sofar: 3000", "pkts-sofar: 1234")


def test_parse_a_finished_sender():
    r = parse_device_file("vhlpg0@0", SENDER_0)
    assert (r.name, r.sent, r.errors, r.usec, r.pps, r.ok) == ("vhlpg0@0", 3000, 0, 25562, 117357, True)


def test_parse_counts_refusals_as_errors():
    r = parse_device_file("vhlpg0@1", SENDER_1)
    assert (r.sent, r.errors, r.usec, r.pps, r.ok) == (3000, 1117, 22979, 130551, True)


def test_parse_a_sender_without_a_result_is_not_ok_but_keeps_what_it_sent():
    r = parse_device_file("vhlpg0@0", RUNNING)
    assert (r.sent, r.errors, r.usec, r.pps, r.ok) == (1234, 0, 0, 0, False)
    assert parse_device_file("x", "").sent == 0


def test_sender_names_put_one_device_on_several_senders():
    assert sender_names("vhl-guest1", 3) == ["vhl-guest1@0", "vhl-guest1@1", "vhl-guest1@2"]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("dst_mac", "52:54:00:12:34", "dst_mac"),
        ("dst_ip", "10.0.0", "dst_ip"),
        ("threads", 0, "threads"),
        ("threads", True, "threads"),
        ("size", 59, "size"),
        ("count", 0, "count"),
        ("udp_port", 70000, "udp_port"),
    ],
)
def test_run_refuses_what_pktgen_would_misread(field, value, says):
    ok = {"dev": "tap0", "dst_ip": "10.0.0.2", "dst_mac": "52:54:00:12:34:56"}
    with pytest.raises(ValueError, match=says):
        PktgenRun(**{**ok, field: value})


def test_run_refuses_a_device_name_that_is_not_one():
    with pytest.raises(Exception, match="dev"):
        PktgenRun(dev="tap0; reboot", dst_ip="10.0.0.2", dst_mac="52:54:00:12:34:56")


def _frame(*, ethertype: int = 0x0800, proto: int = 17, port: int = 9, magic: int = PKTGEN_MAGIC) -> bytes:
    eth = bytes(6) + bytes(6) + struct.pack("!H", ethertype)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 16, 0, 0, 64, proto, 0, bytes(4), bytes(4))
    udp = struct.pack("!HHHH", 9, port, 8 + 16, 0)
    return eth + ip + udp + struct.pack("!IIII", magic, 1, 0, 0)


def test_pktgen_frames_are_told_from_others():
    assert is_pktgen_frame(_frame())
    assert not is_pktgen_frame(_frame(port=5201))
    assert not is_pktgen_frame(_frame(magic=0x6E6F6472))
    assert not is_pktgen_frame(_frame(ethertype=0x86DD))
    assert not is_pktgen_frame(_frame(proto=6))
    assert not is_pktgen_frame(_frame()[:40])
