"""lab.onhost.net against the real kernel, inside network namespaces the tests create."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns_helpers import (
    in_ns,
    ip,
    ip_json,
    needs_root,
    netem_available,
    netns,
    run,
    send_udp,
    tap_reader_holder,
)

from lab.errors import MissingPiece
from lab.onhost import net

pytestmark = [pytest.mark.integration, needs_root]


@pytest.fixture
def ns():
    with netns("net") as name:
        yield name


def tc_qdiscs(ns: str, dev: str) -> list[dict]:
    return json.loads(run(["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev]).stdout)


def root_qdisc(ns: str, dev: str) -> dict:
    (root,) = [q for q in tc_qdiscs(ns, dev) if q.get("root")]
    return root


def test_tap_with_vnet_hdr_and_txqueuelen_1(ns):
    tap = net.create_tap(net.TapDevice("vhltap0", txqueuelen=1, vnet_hdr=True, netns=ns))
    assert (tap.name, tap.txqueuelen, tap.vnet_hdr, tap.multi_queue, tap.netns) == ("vhltap0", 1, True, False, ns)

    flags = int(run(in_ns(ns, "cat", "/sys/class/net/vhltap0/tun_flags")).stdout, 16)
    assert flags & net.IFF_TAP
    assert flags & net.IFF_VNET_HDR
    assert flags & net.IFF_NO_PI
    assert flags & net.IFF_PERSIST
    assert not flags & net.IFF_MULTI_QUEUE

    (link,) = ip_json(ns, "-d", "link", "show", "vhltap0")
    assert link["txqlen"] == 1
    assert "UP" in link["flags"]
    assert link["linkinfo"]["info_kind"] == "tun"
    assert link["linkinfo"]["info_data"]["type"] == "tap"
    assert link["linkinfo"]["info_data"]["vnet_hdr"] is True


def test_tap_without_vnet_hdr_multi_queue_owner_address(ns):
    spec = net.TapDevice("vhltap1", txqueuelen=10, vnet_hdr=False, multi_queue=True, owner=1000, netns=ns,
                         address="10.213.77.1/24")
    tap = net.create_tap(spec)
    assert (tap.vnet_hdr, tap.multi_queue, tap.owner, tap.txqueuelen) == (False, True, 1000, 10)
    flags = int(run(in_ns(ns, "cat", "/sys/class/net/vhltap1/tun_flags")).stdout, 16)
    assert not flags & net.IFF_VNET_HDR
    assert flags & net.IFF_MULTI_QUEUE
    (addr,) = ip_json(ns, "addr", "show", "dev", "vhltap1")
    assert {"local": "10.213.77.1", "prefixlen": 24} .items() <= next(
        a for a in addr["addr_info"] if a["family"] == "inet"
    ).items()


def test_create_replaces_leftover_and_refuses_non_tap(ns):
    net.create_tap(net.TapDevice("vhltap2", txqueuelen=1000, netns=ns))
    again = net.create_tap(net.TapDevice("vhltap2", txqueuelen=5, vnet_hdr=False, netns=ns))
    assert (again.txqueuelen, again.vnet_hdr) == (5, False)
    assert len(net.list_taps("vhltap2", ns)) == 1

    ip(ns, "link", "add", "vhlveth0", "type", "veth", "peer", "name", "vhlveth1")
    with pytest.raises(net.NetError, match="not a tap"):
        net.create_tap(net.TapDevice("vhlveth0", netns=ns))
    with pytest.raises(net.NetError, match="not a tap"):
        net.delete_tap("vhlveth0", ns)
    assert ip(ns, "link", "show", "vhlveth0", check=False).returncode == 0


def test_txqueuelen_qdiscs_counters_and_delete(ns):
    net.create_tap(net.TapDevice("vhltap3", txqueuelen=1000, netns=ns))
    assert net.set_txqueuelen("vhltap3", 1, ns) == 1
    assert ip_json(ns, "link", "show", "vhltap3")[0]["txqlen"] == 1

    net.set_root_qdisc("vhltap3", "pfifo", ns, limit=5)
    root = root_qdisc(ns, "vhltap3")
    assert root["kind"] == "pfifo"
    assert root["options"]["limit"] == 5
    assert net.read_qdisc("vhltap3", ns).kind == "pfifo"

    net.set_root_qdisc("vhltap3", "tbf", ns, rate="10mbit", burst=10000, latency="50ms")
    root = root_qdisc(ns, "vhltap3")
    assert root["kind"] == "tbf"
    assert root["options"]["rate"] == 1250000  # bytes/s, as tc -j prints it

    counters = net.read_counters("vhltap3", ns)
    assert counters.dev == "vhltap3"
    assert counters.qdisc.kind == "tbf"
    # nothing was sent through the tap: every transmit counter is exactly zero
    assert (counters.tap.tx_packets, counters.tap.tx_dropped, counters.qdisc.drops, counters.qdisc.sent_packets) == (0, 0, 0, 0)
    assert counters.at <= time.monotonic()

    assert net.clear_root_qdisc("vhltap3", ns) is True
    assert root_qdisc(ns, "vhltap3")["kind"] != "tbf"
    assert net.clear_root_qdisc("vhltap3", ns) is False  # already the default: nothing to do
    net.set_netem("vhltap3", None, ns)  # same, through set_netem

    assert net.delete_tap("vhltap3", ns) is True
    assert ip(ns, "link", "show", "vhltap3", check=False).returncode != 0
    assert net.delete_tap("vhltap3", ns) is False
    with pytest.raises(net.DeviceNotFound):
        net.read_counters("vhltap3", ns)


def test_list_taps_only_returns_the_prefix(ns):
    for name in ("vhla0", "vhla1", "vhlb0", "zzz0"):
        net.create_tap(net.TapDevice(name, netns=ns))
    ip(ns, "link", "add", "vhla9", "type", "veth", "peer", "name", "vhla8")  # prefix, but not taps
    assert [t.name for t in net.list_taps("vhla", ns)] == ["vhla0", "vhla1"]
    assert [t.name for t in net.list_taps("vhl", ns)] == ["vhla0", "vhla1", "vhlb0"]
    assert net.list_taps("nomatch", ns) == []


def test_unread_ring_drops_show_in_counters(ns):
    """A tap whose queue is attached but never read: with txqueuelen 1 the packets
    must be dropped somewhere we count: the tap's ptr_ring (stock: tx_dropped)
    or, with the nodrop patch, the qdisc above it (qdisc drops)."""
    net.create_tap(net.TapDevice("vhltap4", txqueuelen=1, netns=ns, address="10.213.78.1/24"))
    ip(ns, "neigh", "add", "10.213.78.2", "lladdr", "02:00:00:00:00:02", "dev", "vhltap4", "nud", "permanent")
    with tap_reader_holder(ns, "vhltap4"):
        before = net.read_counters("vhltap4", ns)
        send_udp(ns, "10.213.78.2", 50)
        after = net.read_counters("vhltap4", ns)
    d = net.delta(before, after)
    assert d.qdisc.sent_packets + d.qdisc.drops >= 50
    assert d.tap.tx_dropped + d.qdisc.drops >= 45
    assert d.seconds > 0


def test_backlog_sampler_sees_a_shaped_queue(ns):
    net.create_tap(net.TapDevice("vhltap5", txqueuelen=1000, netns=ns, address="10.213.79.1/24"))
    ip(ns, "neigh", "add", "10.213.79.2", "lladdr", "02:00:00:00:00:02", "dev", "vhltap5", "nud", "permanent")
    # 8 kbit/s: a few packets pass, the rest wait in tbf (limit ~ 10 s of latency)
    net.set_root_qdisc("vhltap5", "tbf", ns, rate="8kbit", burst=1600, latency="10s")
    with tap_reader_holder(ns, "vhltap5"):
        sampler = net.BacklogSampler("vhltap5", interval_ms=5, netns=ns).start()
        send_udp(ns, "10.213.79.2", 40, size=200)
        time.sleep(0.1)
        peak = sampler.stop()
        now = net.read_qdisc("vhltap5", ns)
    assert peak.error is None
    assert peak.samples >= 2
    assert peak.backlog_packets >= 20
    assert peak.backlog_bytes >= peak.backlog_packets * 200
    assert now.backlog_packets <= peak.backlog_packets


def test_backlog_sampler_reports_a_missing_device(ns):
    sampler = net.BacklogSampler("vhlnone", interval_ms=5, netns=ns).start()
    peak = sampler.stop()
    assert peak.samples == 0 and "vhlnone" in (peak.error or "")


def test_missing_namespace_is_an_error_not_created():
    name = "vhltest-absent-ns"
    with pytest.raises(net.NetError, match="does not exist"):
        net.list_taps("vhl", name)
    assert not Path("/run/netns", name).exists()


def test_netem_absent_is_reported_as_missing_piece(ns):
    if netem_available():
        pytest.skip("this kernel has netem")
    net.create_tap(net.TapDevice("vhltap6", netns=ns))
    with pytest.raises(MissingPiece, match="netem"):
        net.set_netem("vhltap6", net.NetemDelay(60, limit=100000), ns)


def test_netem_delay_applied_and_cleared(ns):
    if not netem_available():
        pytest.skip("this kernel has no netem (the lab hosts' 6.12 does)")
    net.create_tap(net.TapDevice("vhltap6", netns=ns))
    net.set_netem("vhltap6", net.NetemDelay(60, limit=100000, jitter_ms=1.5), ns)
    root = root_qdisc(ns, "vhltap6")
    assert root["kind"] == "netem"
    assert root["options"]["limit"] == 100000
    delay = root["options"]["delay"]
    assert delay["delay"] == pytest.approx(0.060, rel=1e-3)  # tc -j prints seconds
    assert delay["jitter"] == pytest.approx(0.0015, rel=1e-2)
    assert net.read_qdisc("vhltap6", ns).kind == "netem"
    # replace, not add: a second call changes the delay in place
    net.set_netem("vhltap6", net.NetemDelay(120, limit=1000), ns)
    assert root_qdisc(ns, "vhltap6")["options"]["delay"]["delay"] == pytest.approx(0.120, rel=1e-3)
    net.set_netem("vhltap6", None, ns)
    assert root_qdisc(ns, "vhltap6")["kind"] != "netem"
