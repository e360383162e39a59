"""lab.onhost.agent's contract without touching devices: one JSON object, exit 0/1."""

from __future__ import annotations

import json

import pytest

from lab.onhost import agent


def run_agent(capsys, *argv: str) -> tuple[int, dict]:
    rc = agent.main(list(argv))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    return rc, json.loads(out[0])


@pytest.mark.parametrize("argv, fragment", [
    ([], "required: VERB"),
    (["frobnicate"], "invalid choice"),
    (["tap-create"], "--name"),
    (["tap-create", "--name", "x" * 16], "not an interface name"),
    (["tap-create", "--name", "vhl0", "--txqueuelen", "many"], "invalid int value"),
    (["tap-list", "--prefix", ""], "prefix"),
    (["--netns", "../../proc/1/ns/net", "tap-list", "--prefix", "vhl"], "netns"),
    (["netem", "--dev", "vhl0", "--delay-ms", "5", "--clear"], "exactly one of"),
    (["netem", "--dev", "vhl0", "--delay-ms", "-5"], "delay_ms"),
    (["stream", "--server", "10.0.0.2", "--streams", "0"], "streams"),
    (["stream", "--server", "10.0.0.2", "--congestion", "cubic;id"], "congestion"),
    (["stream", "--server", "10.0.0.2", "--sample-dev", "a b"], "dev"),
])
def test_usage_errors_are_json(capsys, argv, fragment):
    rc, out = run_agent(capsys, *argv)
    assert rc == 1
    assert fragment in out["error"]
    assert set(out) == {"error", "type"}


def test_tcp_counters_of_this_namespace(capsys):
    rc, out = run_agent(capsys, "tcp-counters")
    assert rc == 0
    assert set(out) == {"retrans_segs", "out_segs"}
    from lab.onhost.traffic import read_tcp_counters

    now = read_tcp_counters()
    # this namespace's counters, read twice: the agent's reading is not ahead of a later one
    assert 0 <= out["out_segs"] <= now.out_segs and 0 <= out["retrans_segs"] <= now.retrans_segs
