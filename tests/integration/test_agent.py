"""`python -m lab.onhost.agent` as a subprocess inside test namespaces: one JSON object, exit 0/1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns_helpers import REPO, in_ns, ip_json, iperf3_server, needs_iperf3, needs_root, netns, veth_link

pytestmark = [pytest.mark.integration, needs_root]


def agent(*args: str, ns: str | None = None, timeout: float = 60) -> tuple[int, dict]:
    """Run the agent (inside `ns` via ip netns exec when given); return (rc, the one JSON object)."""
    argv = [sys.executable, "-m", "lab.onhost.agent", *args]
    if ns is not None:
        argv = in_ns(ns, *argv)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"agent printed {proc.stdout!r} (stderr {proc.stderr!r})"
    return proc.returncode, json.loads(lines[0])


@pytest.fixture
def ns():
    with netns("agent") as name:
        yield name


def test_tap_create_counters_delete_inside_namespace(ns):
    rc, out = agent("tap-create", "--name", "vhlag0", "--txqueuelen", "1", "--vnet-hdr", "--address",
                    "10.213.90.1/24", ns=ns)
    assert rc == 0, out
    assert out == {"name": "vhlag0", "txqueuelen": 1, "vnet_hdr": True, "multi_queue": False,
                          "owner": None, "netns": None, "address": "10.213.90.1/24"}
    (link,) = ip_json(ns, "-d", "link", "show", "vhlag0")
    assert link["txqlen"] == 1 and link["linkinfo"]["info_data"]["vnet_hdr"] is True

    rc, out = agent("counters", "--dev", "vhlag0", ns=ns)
    assert rc == 0, out
    assert out["dev"] == "vhlag0" and isinstance(out["ifindex"], int) and isinstance(out["at"], float)
    assert set(out["tap"]) >= {"tx_packets", "tx_dropped", "rx_packets", "rx_dropped", "tx_bytes"}
    assert set(out["qdisc"]) >= {"kind", "drops", "requeues", "overlimits", "backlog_bytes", "backlog_packets",
                                 "qlen", "sent_packets"}
    assert all(isinstance(v, int) for k, v in out["tap"].items())

    rc, out = agent("txqueuelen", "--name", "vhlag0", "--value", "10", ns=ns)
    assert (rc, out) == (0, {"name": "vhlag0", "txqueuelen": 10})

    rc, out = agent("tap-list", "--prefix", "vhlag", ns=ns)
    assert rc == 0 and [t["name"] for t in out["taps"]] == ["vhlag0"]

    rc, out = agent("tap-delete", "--name", "vhlag0", ns=ns)
    assert (rc, out) == (0, {"name": "vhlag0", "deleted": True})
    assert ip_json(ns, "link", "show") and all(link["ifname"] != "vhlag0" for link in ip_json(ns, "link", "show"))
    rc, out = agent("tap-delete", "--name", "vhlag0", ns=ns)
    assert (rc, out) == (0, {"name": "vhlag0", "deleted": False})


def test_global_netns_option(ns):
    rc, out = agent("--netns", ns, "tap-create", "--name", "vhlag1", "--no-vnet-hdr")
    assert rc == 0, out
    assert out["netns"] == ns and out["vnet_hdr"] is False
    rc, out = agent("--netns", ns, "tcp-counters")
    assert rc == 0 and out == {"retrans_segs": 0, "out_segs": 0}  # a fresh namespace
    rc, out = agent("--netns", ns, "netem", "--dev", "vhlag1", "--clear")
    assert rc == 0 and out["kind"] and out["kind"] != "netem"  # the root qdisc left after clearing
    rc, out = agent("--netns", ns, "tap-delete", "--name", "vhlag1")
    assert (rc, out["deleted"]) == (0, True)


def test_netem_verb(ns):
    assert agent("tap-create", "--name", "vhlag2", ns=ns)[0] == 0
    rc, out = agent("netem", "--dev", "vhlag2", "--delay-ms", "60", "--limit", "100000", ns=ns)
    if rc == 1:  # this machine: no sch_netem; the lab hosts have it
        assert out["type"] == "MissingPiece" and "netem" in out["error"]
    else:
        assert rc == 0 and out["kind"] == "netem"  # the root qdisc read back


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["tap-create", "--name", "a;b"], "not an interface name"),
        (["tap-create", "--name", "vhlag3", "--txqueuelen", "-1"], "txqueuelen"),
        (["tap-create", "--name", "vhlag3", "--address", "10.1.2.3"], "prefix length"),
        (["netem", "--dev", "vhlag3", "--delay-ms", "nan"], "delay_ms"),
        (["netem", "--dev", "vhlag3"], "exactly one of"),
        (["counters", "--dev", "vhlnone"], "no device vhlnone"),
        (["stream", "--server", "$(reboot)"], "server"),
        (["no-such-verb"], "invalid choice"),
    ],
)
def test_errors_are_one_json_object_exit_1(ns, args, fragment):
    rc, out = agent(*args, ns=ns)
    assert rc == 1
    assert fragment in out["error"]


@needs_iperf3
def test_stream_verb_measures_counters_and_backlog():
    with veth_link() as link, iperf3_server(link.ns_b, link.addr_b):
        rc, out = agent("stream", "--server", link.addr_b, "--duration", "1", "--sample-dev", link.dev_a,
                        "--sample-ms", "5", ns=link.ns_a)
    assert rc == 0, out
    assert out["argv"][:3] == ["iperf3", "-c", link.addr_b] and "-J" in out["argv"]
    assert out["iperf3"]["throughput_mbps"] > 0
    assert out["dev"] == link.dev_a
    assert out["delta"]["tap"]["tx_packets"] > 0  # the veth carried the stream
    assert out["after"]["tap"]["tx_packets"] - out["before"]["tap"]["tx_packets"] == out["delta"]["tap"]["tx_packets"]
    assert out["backlog_peak"]["samples"] >= 2 and out["backlog_peak"]["error"] is None
    assert out["tcp"]["out_segs"] > 0  # the namespace's TCP counters over the run
    assert isinstance(out["iperf3"]["retransmits"], int)
    assert out["qdiscs"] and out["qdiscs"][0]["kind"]
    # Either the kernel counts drops by reason, or the reply says why not.
    assert (out["drops"] is None) == (out["drops_error"] is not None)


@needs_iperf3
def test_stream_verb_failure_is_a_json_error():
    with veth_link() as link:
        rc, out = agent("stream", "--server", link.addr_b, "--port", "5299", "--duration", "1", ns=link.ns_a)
    assert rc == 1 and out["type"] == "Iperf3Error" and "unable to connect" in out["error"]
