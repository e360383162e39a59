"""`python -m lab.onhost.agent serve`: one JSON argv per line in, one JSON reply per line out.

In-process with StringIO, then as a real subprocess through hosts.AgentSession
and hosts.LocalHost (the path every lab host call takes).
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.errors import AgentTimeout, CommandFailed, LabError
from lab.hosts.host import REPO_ROOT, AgentSession, LocalHost
from lab.onhost import agent

REPO = Path(__file__).resolve().parents[2]
AGENT_ARGV = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "lab.onhost.agent", "serve"]


def serve_lines(*lines: str) -> list[dict]:
    out = io.StringIO()
    assert agent.serve(io.StringIO("".join(line + "\n" for line in lines)), out) == 0
    text = out.getvalue()
    assert text.endswith("\n") or text == ""
    return [json.loads(line) for line in text.splitlines()]


def _children_running(fragment: str) -> list[int]:
    """pids of this process's live (non-zombie) children whose command line contains `fragment`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == os.getpid() and fragment in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def _gone(pids: list[int]) -> bool:
    """None of `pids` is still our child, running or as an unreaped zombie."""
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            return False
    return True


# --------------------------------------------------------------------------
# serve() in-process
# --------------------------------------------------------------------------


def test_serve_several_requests_in_one_session() -> None:
    replies = serve_lines('["probe"]', '["tcp-counters"]', '["probe"]')
    assert len(replies) == 3
    assert replies[0]["release"] == platform.release() == replies[2]["release"]
    assert set(replies[1]) == {"retrans_segs", "out_segs"}


def test_serve_bad_lines_get_error_replies_and_session_continues() -> None:
    replies = serve_lines(
        '["probe"]',
        "{not json",
        '{"verb": "probe"}',
        '"probe"',
        "[1, 2]",
        '["serve"]',
        "[]",
        '["frobnicate"]',
        '["probe"]',
    )
    assert len(replies) == 9
    assert replies[0]["release"] == platform.release()
    for r in replies[1:6]:
        assert r["type"] == "UsageError" and r["error"].startswith("bad request: "), r
    assert "JSON list of strings" in replies[2]["error"] and "JSON list of strings" in replies[3]["error"]
    assert "JSON list of strings" in replies[4]["error"]
    assert "nested" in replies[5]["error"]
    assert "required: VERB" in replies[6]["error"]
    assert "invalid choice" in replies[7]["error"]
    assert replies[8]["release"] == platform.release()
    for r in replies[1:8]:
        assert set(r) == {"error", "type"}


def test_serve_skips_blank_lines_and_ends_at_eof() -> None:
    assert serve_lines("", "   ", "\t") == []
    assert len(serve_lines("", '["probe"]', "")) == 1


def test_serve_flushes_each_reply() -> None:
    """A caller reads each reply before sending the next request: no reply may sit in a buffer."""

    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.flushed_at: list[int] = []

        def flush(self) -> None:
            self.flushed_at.append(len(self.getvalue().splitlines()))
            super().flush()

    out = Recorder()
    agent.serve(io.StringIO('["probe"]\n["nope"]\n'), out)
    assert out.flushed_at == [1, 2]


def test_run_verb_probe() -> None:
    reply, rc = agent.run_verb(["probe"])
    assert rc == 0 and reply["release"] == platform.release()
    reply, rc = agent.run_verb(["probe", "--extra"])
    assert rc == 1 and "unrecognized arguments" in reply["error"]


# --------------------------------------------------------------------------
# A real `python -m lab.onhost.agent serve` process
# --------------------------------------------------------------------------


def test_serve_subprocess_ends_when_stdin_closes() -> None:
    proc = subprocess.run(
        AGENT_ARGV, input='["probe"]\n[oops\n["probe"]\n', capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [("error" in r) for r in replies] == [False, True, False]


def _some_tcp_segments() -> None:
    """Send a few TCP segments over loopback (this namespace's counters must move)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname(), timeout=5) as c:
        peer, _ = srv.accept()
        with peer:
            c.sendall(b"x" * 4096)
            peer.recv(4096)


def test_agent_session_local_calls_and_close() -> None:
    session = AgentSession.local(AGENT_ARGV)
    try:
        assert session.alive()
        pids = _children_running("lab.onhost.agent serve")
        assert len(pids) == 1
        first = session.call(["probe"], timeout=60)
        assert first["release"] == platform.release()
        err = session.call(["tap-create"], timeout=60)
        assert "--name" in err["error"] and err["type"]
        before = session.call(["tcp-counters"], timeout=60)
        _some_tcp_segments()
        after = session.call(["tcp-counters"], timeout=60)
        assert after["out_segs"] > before["out_segs"], (before, after)
        assert session.alive()
    finally:
        session.close()
    assert not session.alive()
    assert _gone(pids), "the agent process is gone and reaped"
    assert _children_running("lab.onhost.agent serve") == []
    session.close()  # idempotent


def test_agent_session_timeout_is_bounded() -> None:
    session = AgentSession.local(["sleep", "60"])  # never answers
    pids = _children_running("sleep 60")
    assert len(pids) == 1
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            session.call(["probe"], timeout=0.5)
        assert 0.4 <= time.monotonic() - t0 < 3
    finally:
        session.close()
    assert _gone(pids)


def test_agent_session_eof_when_agent_exits() -> None:
    session = AgentSession.local([sys.executable, "-c", "import sys; sys.stdin.readline()"])
    try:
        with pytest.raises(EOFError):
            session.call(["probe"], timeout=30)
        deadline = time.monotonic() + 10
        while session.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not session.alive()
    finally:
        session.close()


# --------------------------------------------------------------------------
# LocalHost
# --------------------------------------------------------------------------


def test_local_host_agent_probe_reuses_one_session() -> None:
    host = LocalHost(name="local")
    assert host.python()[:2] == ["env", f"PYTHONPATH={REPO_ROOT}"]
    try:
        assert host.agent.probe().release == platform.release()
        pids = _children_running("lab.onhost.agent serve")
        assert len(pids) == 1
        before = host.agent.tcp_counters()
        _some_tcp_segments()
        assert host.agent.tcp_counters().out_segs > before.out_segs
        assert _children_running("lab.onhost.agent serve") == pids, "the same agent answered both calls"
        p = host.probe()
        assert (p.name, p.provider, p.release) == ("local", "local", platform.release())
        assert p.tun == Path("/dev/net/tun").exists()
        with pytest.raises(LabError) as ei:
            host.call(["frobnicate"])
        assert ei.value.message.startswith("local: lab agent frobnicate: ")
        assert _children_running("lab.onhost.agent serve") == pids, "an error reply does not cost the session"
    finally:
        host.close()
    assert _gone(pids)


@dataclass
class _DeafLocalHost(LocalHost):
    """This machine, with an agent command that never answers or dies after one line."""

    agent_argv: tuple[str, ...] = ("sleep", "60")

    def _open_agent(self) -> AgentSession:
        return AgentSession.local(list(self.agent_argv))


def test_local_host_agent_timeout_replaces_session() -> None:
    host = _DeafLocalHost(name="deaf")
    try:
        t0 = time.monotonic()
        with pytest.raises(AgentTimeout, match=r"deaf: lab agent probe did not answer in 1s"):  # typed: the matrix retries it
            host.call(["probe"], timeout=1.0)
        assert time.monotonic() - t0 < 4
        assert _children_running("sleep 60") == [], "the hung agent was killed"
        assert host._agent_session is None  # replaced on the next call
    finally:
        host.close()


def test_local_host_agent_that_exits_is_an_error_not_host_gone() -> None:
    host = _DeafLocalHost(name="flaky", agent_argv=(sys.executable, "-c", "import sys; sys.stdin.readline()"))
    try:
        with pytest.raises(LabError, match=r"flaky: lab agent probe: EOFError") as ei:
            host.call(["probe"], timeout=30)
        assert type(ei.value) is LabError  # the host itself answers `true`: not HostGone
    finally:
        host.close()


def test_local_host_run() -> None:
    host = LocalHost(name="local")
    res = host.run(["sh", "-c", "printf out; printf err >&2; exit 3"], check=False)
    assert (res.rc, res.stdout, res.stderr) == (3, "out", "err")
    assert res.argv == ("sh", "-c", "printf out; printf err >&2; exit 3")
    assert host.run(["cat"], stdin="fed through stdin").stdout == "fed through stdin"
    with pytest.raises(CommandFailed) as ei:
        host.run(["false"])
    assert ei.value.rc == 1 and "local" in str(ei.value)
    missing = host.run(["/no/such/tool-xyz"], check=False)
    assert missing.rc == 127


def test_local_host_run_timeout_returns_124_within_bound() -> None:
    host = LocalHost(name="local")
    t0 = time.monotonic()
    res = host.run(["sleep", "30"], timeout=0.5, check=False)
    took = time.monotonic() - t0
    assert res.rc == 124
    assert "timed out" in res.stderr
    assert 0.5 <= took < 3 and res.seconds < 3
    assert _children_running("sleep 30") == []
    with pytest.raises(CommandFailed) as ei:
        host.run(["sleep", "30"], timeout=0.2)
    assert ei.value.rc == 124


def test_agent_session_reads_a_reply_already_buffered() -> None:
    # an agent that answers the first request with two lines at once
    session = AgentSession.local(["sh", "-c", "read x; printf '{\"a\": 1}\\n{\"b\": 2}\\n'; read y; sleep 30"])
    try:
        assert session.call(["first"], timeout=10) == {"a": 1}
        assert session.call(["second"], timeout=2) == {"b": 2}
    finally:
        session.close()
