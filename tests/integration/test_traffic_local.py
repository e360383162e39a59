"""run_local_stream and TCP counters over a veth pair between two test namespaces."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns_helpers import ip, iperf3_server, needs_iperf3, needs_root, ns_pids, veth_link

from lab.onhost import traffic

pytestmark = [pytest.mark.integration, needs_root, needs_iperf3]


@pytest.fixture
def link():
    with veth_link() as pair:
        yield pair


def test_stream_between_namespaces(link):
    run = traffic.Iperf3Run(server=link.addr_b, duration_s=2)
    with iperf3_server(link.ns_b, link.addr_b):
        before = traffic.read_tcp_counters(link.ns_a)
        started = time.monotonic()
        result = traffic.run_local_stream(run, netns_client=link.ns_a, timeout=30)
        elapsed = time.monotonic() - started
        after = traffic.read_tcp_counters(link.ns_a)
    assert result.throughput_mbps is not None and result.throughput_mbps > 0
    assert result.sent_mbps is not None and result.sent_mbps > 0
    assert isinstance(result.retransmits, int)
    assert result.mean_rtt_ms is not None and result.mean_rtt_ms > 0
    assert result.reverse is False and result.streams == 1
    assert result.seconds == pytest.approx(2, abs=0.5)
    assert 1.5 < elapsed < 30
    tcp = traffic.tcp_delta(before, after)
    assert tcp.out_segs > 1000  # 2 s of a stream is thousands of segments
    # A veth pair at tens of Gbit/s does lose segments (the receiving CPU's
    # backlog overflows on 2 cores: 685 of ~2M on 2026-12-01, and 26633 of
    # 2.58M, 1.03 %, on 2026-12-02's machine, outer kernel 6.18), but a path
    # that works retransmits a few per cent at most.
    assert result.retransmits < 0.05 * tcp.out_segs
    # the namespace's own retransmits match what iperf3 counted for its stream (within a few control packets)
    assert abs(tcp.retrans_segs - result.retransmits) <= 5
    # a fresh namespace's counters start at zero: they are its own, not this machine's
    assert before == traffic.TcpCounters(0, 0)


def test_reverse_stream_measures_the_server_as_sender(link):
    run = traffic.Iperf3Run(server=link.addr_b, duration_s=1, reverse=True, streams=2)
    with iperf3_server(link.ns_b, link.addr_b):
        result = traffic.run_local_stream(run, netns_client=link.ns_a, timeout=30)
    assert result.reverse is True and result.streams == 2
    assert result.throughput_mbps and result.throughput_mbps > 0
    assert result.mean_rtt_ms is None  # only the sending side knows the RTT


def test_blackholed_server_times_out_and_leaves_no_process(link):
    # SYNs go to a MAC nobody has: the peer namespace drops them silently, so
    # the client hangs in connect() until we kill it
    ip(link.ns_a, "neigh", "add", _sibling(link.addr_b, 9), "lladdr", "02:00:00:00:00:09", "dev", link.dev_a,
       "nud", "permanent")
    run = traffic.Iperf3Run(server=_sibling(link.addr_b, 9), duration_s=1)
    started = time.monotonic()
    with pytest.raises(traffic.Iperf3Timeout, match="did not finish within 2 s"):
        traffic.run_local_stream(run, netns_client=link.ns_a, timeout=2)
    assert time.monotonic() - started < 2 + 10
    assert ns_pids(link.ns_a) == []  # the client (and ip netns exec) are gone


def test_absent_server_is_an_iperf3_error(link):
    run = traffic.Iperf3Run(server=link.addr_b, port=5299, duration_s=1)
    started = time.monotonic()
    with pytest.raises(traffic.Iperf3Error, match="unable to connect") as info:
        traffic.run_local_stream(run, netns_client=link.ns_a, timeout=20)
    assert not isinstance(info.value, traffic.Iperf3Timeout)
    assert time.monotonic() - started < 20
    assert ns_pids(link.ns_a) == []


def test_connect_timeout_bounds_a_blackholed_connect(link):
    ip(link.ns_a, "neigh", "add", _sibling(link.addr_b, 10), "lladdr", "02:00:00:00:00:0a", "dev", link.dev_a,
       "nud", "permanent")
    run = traffic.Iperf3Run(server=_sibling(link.addr_b, 10), duration_s=1, connect_timeout_ms=500)
    started = time.monotonic()
    with pytest.raises(traffic.Iperf3Error) as info:
        traffic.run_local_stream(run, netns_client=link.ns_a, timeout=20)
    assert not isinstance(info.value, traffic.Iperf3Timeout)
    assert time.monotonic() - started < 10


def _sibling(addr: str, last: int) -> str:
    """Another host address in addr's /24 (inside the test namespaces only)."""
    return ".".join(addr.split(".")[:3] + [str(last)])
