"""lab.onhost.net without touching any device: validation, netem encoding, counter arithmetic."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.onhost import net
from lab.onhost.net import DeviceCounters, NetemDelay, QdiscCounters, TapCounters, TapDevice


@pytest.mark.parametrize("name", ["", "-x", "a;b", "a b", "a/b", "x" * 16, "tap\n0", "ümlaut", None, 3])
def test_bad_interface_names(name):
    with pytest.raises(ValueError, match="^name:"):
        TapDevice(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, field", [
    ({"txqueuelen": -1}, "txqueuelen"), ({"txqueuelen": 2**32}, "txqueuelen"), ({"txqueuelen": True}, "txqueuelen"),
    ({"txqueuelen": 1.0}, "txqueuelen"), ({"vnet_hdr": 1}, "vnet_hdr"), ({"multi_queue": "no"}, "multi_queue"),
    ({"owner": -1}, "owner"), ({"netns": "../x"}, "netns"), ({"netns": "/proc/1/ns/net"}, "netns"),
    ({"address": "10.0.0.1"}, "address"), ({"address": "10.0.0.300/24"}, "address"), ({"address": "x/24"}, "address"),
])
def test_bad_tap_specs(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TapDevice("vhl0", **kwargs)


def test_good_tap_spec():
    tap = TapDevice("vhl-guest1", txqueuelen=1, vnet_hdr=False, multi_queue=True, owner=1000, netns="t1",
                    address="fd00::1/64")
    assert tap.txqueuelen == 1


@given(st.text(max_size=20))
def test_ifname_validation_never_lets_unsafe_text_through(name):
    try:
        net.validate_ifname(name)
    except ValueError:
        return
    assert 1 <= len(name) <= 15 and not name.startswith("-") and "/" not in name
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)


@pytest.mark.parametrize("kwargs, field", [
    ({"delay_ms": -1}, "delay_ms"), ({"delay_ms": math.nan}, "delay_ms"), ({"delay_ms": math.inf}, "delay_ms"),
    ({"delay_ms": "60"}, "delay_ms"), ({"delay_ms": True}, "delay_ms"), ({"delay_ms": 300_000}, "delay_ms"),
    ({"delay_ms": 1, "jitter_ms": -0.5}, "jitter_ms"), ({"delay_ms": 1, "jitter_ms": math.nan}, "jitter_ms"),
    ({"delay_ms": 1, "limit": 0}, "limit"), ({"delay_ms": 1, "limit": -5}, "limit"),
    ({"delay_ms": 1, "limit": 1.5}, "limit"),
])
def test_bad_netem(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        NetemDelay(**kwargs)


def test_netem_kwargs_are_microseconds():
    assert net.netem_tc_kwargs(NetemDelay(60, limit=100000)) == {"delay": 60000, "jitter": 0, "limit": 100000}
    assert net.netem_tc_kwargs(NetemDelay(0.5, jitter_ms=1.25)) == {"delay": 500, "jitter": 1250, "limit": 1000}


def test_netem_message_as_pyroute2_encodes_it():
    """The netlink request pyroute2 builds for netem carries the delay in 64 ns psched ticks,
    as the kernel reads tc_netem_qopt.latency (checked here: this machine has no sch_netem)."""
    pyroute2 = pytest.importorskip("pyroute2")
    from pyroute2.netlink.rtnl.tcmsg import tcmsg

    try:
        batch = pyroute2.IPBatch()
    except OSError as exc:  # no netlink socket in this sandbox
        pytest.skip(f"no netlink: {exc}")
    try:
        batch.tc("replace", "netem", 7, **net.netem_tc_kwargs(NetemDelay(60, limit=100000, jitter_ms=1.5)))
        msg = tcmsg(bytes(batch.batch))
        msg.decode()
    finally:
        batch.close()
    assert msg.get_attr("TCA_KIND") == "netem"
    assert msg["parent"] == net.TC_H_ROOT and msg["index"] == 7
    opts = msg.get_attr("TCA_OPTIONS")
    with open("/proc/net/psched", encoding="ascii") as fh:
        t2us, us2t = (int(x, 16) for x in fh.read().split()[:2])
    ns_per_tick = 1000 * us2t / t2us  # the kernel's PSCHED_TICKS2NS
    assert opts["delay"] * ns_per_tick == pytest.approx(60e6, rel=1e-6)
    assert opts["jitter"] * ns_per_tick == pytest.approx(1.5e6, rel=1e-4)
    assert opts["limit"] == 100000


def test_set_root_qdisc_validates_before_touching_anything():
    with pytest.raises(ValueError, match="kind"):
        net.set_root_qdisc("vhl0", "pfifo; reboot")
    with pytest.raises(ValueError, match="limit"):
        net.set_root_qdisc("vhl0", "pfifo", limit=-1)
    with pytest.raises(ValueError, match="rate"):
        net.set_root_qdisc("vhl0", "tbf", rate="10mbit; x")
    with pytest.raises(ValueError, match="dev"):
        net.set_root_qdisc("../x", "pfifo")
    with pytest.raises(ValueError, match="netem"):
        net.set_netem("vhl0", 60)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval_ms"):
        net.BacklogSampler("vhl0", interval_ms=0)


def _counters(ifindex=3, at=10.0, tx_packets=0, tx_dropped=0, kind="pfifo_fast", handle=0, drops=0,
              backlog=0, sent=0, sent_bytes=0) -> DeviceCounters:
    return DeviceCounters(
        dev="vhl0", ifindex=ifindex, at=at,
        tap=TapCounters(tx_packets=tx_packets, tx_dropped=tx_dropped),
        qdisc=QdiscCounters(kind=kind, handle=handle, drops=drops, backlog_bytes=backlog * 1500,
                            backlog_packets=backlog, qlen=backlog, sent_packets=sent, sent_bytes=sent_bytes),
    )


def test_delta_differences_and_gauges():
    d = net.delta(_counters(tx_packets=100, tx_dropped=5, drops=1, backlog=7, sent=200, sent_bytes=10),
                  _counters(at=12.5, tx_packets=150, tx_dropped=9, drops=4, backlog=2, sent=260, sent_bytes=99))
    assert d.seconds == 2.5
    assert (d.tap.tx_packets, d.tap.tx_dropped) == (50, 4)
    assert (d.qdisc.drops, d.qdisc.sent_packets, d.qdisc.sent_bytes) == (3, 60, 89)
    assert (d.qdisc.backlog_packets, d.qdisc.qlen) == (2, 2)  # gauges: the after value


def test_delta_qdisc_replaced_counts_from_zero():
    d = net.delta(_counters(drops=50, sent=1000), _counters(kind="netem", handle=0x80010000, drops=2, sent=30))
    assert (d.qdisc.kind, d.qdisc.drops, d.qdisc.sent_packets) == ("netem", 2, 30)


def test_delta_u32_wrap_and_device_changes():
    d = net.delta(_counters(sent=2**32 - 10), _counters(sent=5))
    assert d.qdisc.sent_packets == 15
    with pytest.raises(ValueError, match="not the same device"):
        net.delta(_counters(ifindex=3), _counters(ifindex=4))
    with pytest.raises(ValueError, match="backwards"):
        net.delta(_counters(tx_packets=10), _counters(tx_packets=3))


def test_qdisc_spec_as_tc_would_be_told_it() -> None:
    from lab.onhost.net import parse_qdisc_spec

    assert parse_qdisc_spec("pfifo limit 1000") == ("pfifo", {"limit": 1000})
    assert parse_qdisc_spec("noqueue") == ("noqueue", {})
    assert parse_qdisc_spec("fq_codel target 5ms") == ("fq_codel", {"target": "5ms"})
    with pytest.raises(ValueError, match="pairs"):
        parse_qdisc_spec("pfifo limit")
    with pytest.raises(ValueError, match="empty"):
        parse_qdisc_spec("  ")
