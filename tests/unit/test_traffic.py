"""lab.onhost.traffic: iperf3 -J parsing, argv builders, nstat and /proc/net/snmp parsing."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.onhost import traffic
from lab.onhost.traffic import Iperf3Error, Iperf3Run, iperf3_client_argv, iperf3_server_argv, parse_iperf3

needs_iperf3 = pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")


# --------------------------------------------------------------------------
# real iperf3 documents, made on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as fh:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in fh.readlines()[1:])


def _loopback_run(**run_args) -> str:
    """One real iperf3 client run against a one-off server on 127.0.0.1; its -J text."""
    port = _free_port()
    server = subprocess.Popen(iperf3_server_argv(port, bind="127.0.0.1", one_off=True),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert time.monotonic() < deadline, "iperf3 server did not start listening"
            assert server.poll() is None, "iperf3 server exited"
            time.sleep(0.02)
        run = Iperf3Run(server="127.0.0.1", port=port, duration_s=1, **run_args)
        client = subprocess.run(iperf3_client_argv(run), check=False, capture_output=True, text=True, timeout=30)
        return client.stdout
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def forward_json() -> str:
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed")
    return _loopback_run()


@pytest.fixture(scope="module")
def reverse_json() -> str:
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed")
    return _loopback_run(reverse=True, streams=2)


def test_parse_real_forward_run(forward_json):
    doc = json.loads(forward_json)
    r = parse_iperf3(forward_json)
    assert r.throughput_mbps == pytest.approx(doc["end"]["sum_received"]["bits_per_second"] / 1e6)
    assert r.throughput_mbps > 0 and r.sent_mbps > 0
    assert r.retransmits == doc["end"]["sum_sent"]["retransmits"] and isinstance(r.retransmits, int)
    assert r.mean_rtt_ms == pytest.approx(doc["end"]["streams"][0]["sender"]["mean_rtt"] / 1000)
    assert r.mean_rtt_ms > 0
    assert r.cpu_sender_pct == doc["end"]["cpu_utilization_percent"]["host_total"]
    assert r.cpu_receiver_pct == doc["end"]["cpu_utilization_percent"]["remote_total"]
    assert r.bytes == doc["end"]["sum_received"]["bytes"] > 0
    assert r.seconds == pytest.approx(1, abs=0.5)
    assert (r.reverse, r.streams) == (False, 1)
    assert r.version and r.version.startswith("iperf 3")
    assert r.congestion == doc["end"].get("sender_tcp_congestion")


def test_parse_real_reverse_run(reverse_json):
    doc = json.loads(reverse_json)
    r = parse_iperf3(reverse_json)
    assert (r.reverse, r.streams) == (True, 2)
    assert r.throughput_mbps > 0
    # the client received: the sender's CPU is the remote one, and its RTT is unknown here
    assert r.cpu_sender_pct == doc["end"]["cpu_utilization_percent"]["remote_total"]
    assert r.cpu_receiver_pct == doc["end"]["cpu_utilization_percent"]["host_total"]
    assert r.mean_rtt_ms is None
    assert isinstance(r.retransmits, int)


def test_truncated_real_output_is_a_clear_error(forward_json):
    for cut in (1, len(forward_json) // 3, len(forward_json) // 2, len(forward_json) - 3):
        with pytest.raises(Iperf3Error, match="truncated"):
            parse_iperf3(forward_json[:cut])


@needs_iperf3
def test_real_connection_refused_document():
    port = _free_port()  # nothing listens there
    out = subprocess.run(iperf3_client_argv(Iperf3Run("127.0.0.1", port=port, duration_s=1)),
                         check=False, capture_output=True, text=True, timeout=30).stdout
    with pytest.raises(Iperf3Error, match="unable to connect to server"):
        parse_iperf3(out)


# --------------------------------------------------------------------------
# hand-written documents (iperf 3.12 shape)


def _stream(mean_rtt: int, bps: float, sender: bool = True) -> dict:
    return {
        "sender": {"socket": 5, "start": 0, "end": 10.0, "seconds": 10.0, "bytes": int(bps * 10 / 8),
                   "bits_per_second": bps, "retransmits": 3, "max_snd_cwnd": 100000, "max_rtt": mean_rtt + 50,
                   "min_rtt": mean_rtt - 50, "mean_rtt": mean_rtt, "sender": sender},
        "receiver": {"socket": 5, "start": 0, "end": 10.04, "seconds": 10.0, "bytes": int(bps * 10 / 8),
                     "bits_per_second": bps * 0.99, "sender": sender},
    }


DOC = {
    "start": {
        "version": "iperf 3.12",
        "test_start": {"protocol": "TCP", "num_streams": 2, "blksize": 131072, "duration": 10, "reverse": 0},
    },
    "intervals": [],
    "end": {
        "streams": [_stream(60_000, 1e8), _stream(62_000, 1e8)],
        "sum_sent": {"start": 0, "end": 10.0, "seconds": 10.0, "bytes": 250_000_000,
                     "bits_per_second": 200_000_000.0, "retransmits": 6, "sender": True},
        "sum_received": {"start": 0, "end": 10.04, "seconds": 10.04, "bytes": 249_000_000,
                         "bits_per_second": 198_400_000.0, "sender": True},
        "cpu_utilization_percent": {"host_total": 12.5, "host_user": 1.0, "host_system": 11.5,
                                    "remote_total": 40.0, "remote_user": 2.0, "remote_system": 38.0},
        "sender_tcp_congestion": "cubic",
        "receiver_tcp_congestion": "cubic",
    },
}


def test_parse_hand_written_document():
    r = parse_iperf3(json.dumps(DOC))
    assert r.throughput_mbps == pytest.approx(198.4)
    assert r.sent_mbps == pytest.approx(200.0)
    assert r.retransmits == 6
    assert r.mean_rtt_ms == pytest.approx(61.0)  # mean of 60 and 62 ms, from usec
    assert (r.cpu_sender_pct, r.cpu_receiver_pct) == (12.5, 40.0)
    assert (r.bytes, r.seconds) == (249_000_000, 10.04)
    assert (r.streams, r.congestion, r.version, r.reverse) == (2, "cubic", "iperf 3.12", False)


def test_reverse_detected_without_test_start():
    doc = copy.deepcopy(DOC)
    del doc["start"]["test_start"]
    doc["end"]["sum_sent"]["sender"] = False
    r = parse_iperf3(json.dumps(doc))
    assert r.reverse is True
    assert (r.cpu_sender_pct, r.cpu_receiver_pct) == (40.0, 12.5)
    assert r.mean_rtt_ms is None


def test_error_key_raises_with_the_message():
    doc = {"start": {"connected": [], "version": "iperf 3.12"}, "intervals": [], "end": {},
           "error": "unable to connect to server: Connection refused"}
    with pytest.raises(Iperf3Error, match="iperf3: unable to connect to server: Connection refused"):
        parse_iperf3(json.dumps(doc))
    partial = copy.deepcopy(DOC)
    partial["error"] = "control socket has closed unexpectedly"
    with pytest.raises(Iperf3Error, match="control socket"):
        parse_iperf3(json.dumps(partial))


@pytest.mark.parametrize("text", ["", "   \n", None])
def test_empty_output(text):
    with pytest.raises(Iperf3Error, match="no output"):
        parse_iperf3(text)


@pytest.mark.parametrize("text, fragment", [
    ('{"start": {"version": "iperf 3.12"}, "end": {"sum_sent"', "truncated"),
    ("iperf3: error - unable to connect", "truncated"),
    ("[1, 2]", "not an iperf3 document"),
    ('"text"', "not an iperf3 document"),
    ('{"foo": 1}', "neither 'start' nor 'end'"),
])
def test_garbage_output(text, fragment):
    with pytest.raises(Iperf3Error, match=fragment):
        parse_iperf3(text)


def test_missing_keys_are_none():
    r = parse_iperf3(json.dumps({"start": {}, "end": {}}))
    assert r == traffic.Iperf3Result(None, None, None, None, None, None, None, None, False, None, None, None)


def test_wrong_types_are_none():
    doc = copy.deepcopy(DOC)
    doc["end"]["sum_received"]["bits_per_second"] = "fast"
    doc["end"]["sum_sent"]["retransmits"] = True
    doc["end"]["streams"] = "nope"
    doc["end"]["cpu_utilization_percent"] = [1, 2]
    doc["start"]["version"] = 3
    r = parse_iperf3(json.dumps(doc))
    assert (r.throughput_mbps, r.retransmits, r.mean_rtt_ms, r.cpu_sender_pct, r.version) == (None,) * 5
    assert r.sent_mbps == pytest.approx(200.0)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["start", "end", "error", "streams", "sum_sent", "sum_received", "sender", "mean_rtt",
                         "bits_per_second", "retransmits", "test_start", "reverse", "cpu_utilization_percent",
                         "host_total", "x"]), inner, max_size=5),
    max_leaves=20,
)


@given(_json_values)
@settings(max_examples=300, deadline=None)
def test_parser_never_fails_with_anything_but_iperf3error(value):
    try:
        parse_iperf3(json.dumps(value))
    except Iperf3Error:
        pass


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_parser_on_arbitrary_text(text):
    try:
        parse_iperf3(text)
    except Iperf3Error:
        pass


# --------------------------------------------------------------------------
# argv builders


def test_client_argv_full():
    run = Iperf3Run(server="192.168.122.10", port=5202, duration_s=10.0, streams=4, congestion="bbr",
                    length="128K", reverse=True, bind="192.168.122.1", connect_timeout_ms=3000)
    assert iperf3_client_argv(run) == [
        "iperf3", "-c", "192.168.122.10", "-p", "5202", "-t", "10", "-P", "4", "-J", "-C", "bbr", "-l", "128K",
        "-R", "-B", "192.168.122.1", "--connect-timeout", "3000",
    ]


def test_client_argv_defaults_and_server_argv():
    assert iperf3_client_argv(Iperf3Run("guest1.lab")) == [
        "iperf3", "-c", "guest1.lab", "-p", "5201", "-t", "10", "-P", "1", "-J"]
    assert iperf3_server_argv() == ["iperf3", "-s", "-p", "5201"]
    assert iperf3_server_argv(5300, bind="::1", one_off=True, daemon=True, idle_timeout_s=60, json=True) == [
        "iperf3", "-s", "-p", "5300", "-B", "::1", "-1", "-D", "--idle-timeout", "60", "-J"]


@pytest.mark.parametrize("kwargs, field", [
    ({"port": 0}, "port"), ({"port": 65536}, "port"), ({"port": True}, "port"), ({"port": "5201"}, "port"),
    ({"streams": 0}, "streams"), ({"streams": 129}, "streams"), ({"streams": 1.5}, "streams"),
    ({"duration_s": 0}, "duration_s"), ({"duration_s": float("inf")}, "duration_s"),
    ({"congestion": "Cubic"}, "congestion"), ({"congestion": "cubic;rm"}, "congestion"),
    ({"congestion": "a" * 16}, "congestion"),
    ({"length": "10k"}, "length"), ({"length": "1K;"}, "length"), ({"length": "0"}, "length"),
    ({"length": 128}, "length"),
    ({"server": "-s"}, "server"), ({"server": "a b"}, "server"), ({"server": "$(reboot)"}, "server"),
    ({"server": "fe80::1%a b"}, "server"), ({"server": ""}, "server"),
    ({"bind": "host.example"}, "bind"), ({"bind": 5}, "bind"),
    ({"reverse": 1}, "reverse"), ({"connect_timeout_ms": 0}, "connect_timeout_ms"),
])
def test_client_rejects(kwargs, field):
    args = {"server": "10.0.0.2", **kwargs}
    with pytest.raises(ValueError, match=f"^{field}:"):
        Iperf3Run(**args)


def test_server_rejects():
    for kwargs in ({"port": -1}, {"bind": "0.0.0.0;x"}, {"idle_timeout_s": 0}, {"one_off": "yes"}):
        with pytest.raises(ValueError):
            iperf3_server_argv(**kwargs)


FIXED_OPTIONS = {"-c", "-s", "-p", "-t", "-P", "-J", "-C", "-l", "-R", "-B", "--connect-timeout", "-1", "-D",
                 "--idle-timeout"}
SAFE_VALUE = re.compile(r"^[A-Za-z0-9:][A-Za-z0-9._:%-]*$")  # never a leading "-"
HOSTILE = st.text(alphabet=st.sampled_from(list("ab1.:-%;$`\n \t'\"|&<>()\\/*?~K")), max_size=12)


@given(server=HOSTILE | st.text(max_size=12), congestion=HOSTILE, length=HOSTILE,
       bind=st.none() | HOSTILE, port=st.integers(-5, 70000), streams=st.integers(-2, 200))
@settings(max_examples=500, deadline=None)
def test_argv_elements_are_always_validated(server, congestion, length, bind, port, streams):
    try:
        run = Iperf3Run(server=server, port=port, streams=streams, congestion=congestion, length=length, bind=bind)
    except ValueError:
        return
    argv = iperf3_client_argv(run)
    assert argv[0] == "iperf3"
    for element in argv[1:]:
        assert element in FIXED_OPTIONS or SAFE_VALUE.match(element), element
        assert not any(c in element for c in ";$`\n \t'\"|&<>()\\")


@given(port=st.integers(1, 65535), bind=st.none() | st.ip_addresses().map(str))
def test_server_argv_elements_are_safe(port, bind):
    for element in iperf3_server_argv(port, bind=bind)[1:]:
        assert element in FIXED_OPTIONS or SAFE_VALUE.match(element)


def test_local_stream_argv_in_netns():
    run = Iperf3Run("10.0.0.2", duration_s=2)
    assert traffic.local_stream_argv(run, "vhltest-a")[:4] == ["ip", "netns", "exec", "vhltest-a"]
    assert traffic.local_stream_argv(run)[0] == "iperf3"
    with pytest.raises(ValueError, match="netns"):
        traffic.local_stream_argv(run, "../etc")
    with pytest.raises(ValueError, match="json"):
        traffic.local_stream_argv(Iperf3Run("10.0.0.2", json=False))


def test_run_local_stream_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout"):
        traffic.run_local_stream(Iperf3Run("10.0.0.2"), timeout=0)


# --------------------------------------------------------------------------
# TCP counters

SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 68007
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 45 9 2 0 2 67923 63956 26 0 28 0
Udp: InDatagrams NoPorts
Udp: 5 0
"""


def test_parse_proc_snmp():
    assert traffic.parse_proc_snmp(SNMP) == traffic.TcpCounters(retrans_segs=26, out_segs=63956)
    with pytest.raises(ValueError):
        traffic.parse_proc_snmp("Ip: a\nIp: 1\n")
    live = traffic.read_tcp_counters()
    snmp = pathlib.Path("/proc/net/snmp").read_text()
    again = traffic.parse_proc_snmp(snmp)
    assert live.out_segs <= again.out_segs and live.retrans_segs <= again.retrans_segs  # the same counters, read later


def test_tcp_delta():
    a, b = traffic.TcpCounters(10, 1000), traffic.TcpCounters(15, 3000)
    assert traffic.tcp_delta(a, b) == traffic.TcpCounters(5, 2000)
    with pytest.raises(ValueError, match="backwards"):
        traffic.tcp_delta(b, a)
