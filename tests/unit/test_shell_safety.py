"""Hostile names and values through every command and XML builder of the lab.

The property everywhere: a value is either refused with a clear error, or it
reaches the command line as exactly one word (shlex.split round-trips to the
original argv; a real /bin/sh and a real sshd agree) and the domain XML parses
with the value intact. No module in lab/ runs a shell of its own.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lab.config import ConfigError, loads_config
from lab.errors import LabError
from lab.hosts.agent_client import AgentClient
from lab.hosts.domains import GuestDomain, LabHostDomain, SharedDir, guest_xml, labhost_xml
from lab.hosts.remote import SshEndpoint, quote_argv
from lab.measure.matrix import guest_netem_argv
from lab.onhost import agent, traffic
from lab.onhost.net import NetemDelay
from tests.helpers import CONTROL, NASTY, hostile, nasty

REPO = Path(__file__).resolve().parents[2]
LAB_SRC = REPO / "lab"

# Things a hostile value tries: word splitting, command separators and
# substitutions, quotes, globbing, comments, options, escapes, non-ASCII.


# --------------------------------------------------------------------------- quote_argv


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile, min_size=1, max_size=6))
@example(NASTY)  # all at once
def test_quote_argv_round_trips_or_refuses(argv):
    if any(CONTROL.search(a) for a in argv):
        with pytest.raises(LabError, match="control character"):
            quote_argv(argv)
        return
    line = quote_argv(argv)
    assert shlex.split(line) == argv
    assert "\n" not in line and "\x00" not in line


def _sh_argv(line: str) -> list[str]:
    """What a real /bin/sh makes of `<python> -c <print argv> <line's words>`."""
    prog = "import sys, json; print(json.dumps(sys.argv[1:]))"
    full = quote_argv([sys.executable, "-c", prog]) + " " + line
    p = subprocess.run(["/bin/sh", "-c", full], capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile, min_size=1, max_size=5))
@example(NASTY)
def test_quote_argv_survives_a_real_shell(argv):
    assume(not any(CONTROL.search(a) for a in argv))
    assert _sh_argv(quote_argv(argv)) == argv


def test_quote_argv_refuses_empty_and_non_strings():
    with pytest.raises(ValueError):
        quote_argv([])
    with pytest.raises(TypeError):
        quote_argv(["ls", 5])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        quote_argv(["ls", b"x"])  # type: ignore[list-item]


# --------------------------------------------------------------------------- ssh argv


def _unescape_ssh_tokens(text: str, host: str, port: int) -> str:
    """ssh's %-token expansion (the subset the lab meets): %% %h %p; anything else is a bug."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        assert nxt in ("%", "h", "p"), f"unescaped % token %{nxt} in {text!r}"
        out.append({"%": "%", "h": host, "p": str(port)}[nxt])
        i += 2
    return "".join(out)


def _ssh_config_unquote(value: str) -> str:
    """One double-quoted ssh_config argument back to its text."""
    assert value.startswith('"') and value.endswith('"'), value
    return re.sub(r"\\(.)", r"\1", value[1:-1])


def _identity_file(argv: list[str], host: str, port: int) -> str:
    """The key path ssh will read, from an ssh argv the lab built."""
    opts = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o" and argv[i + 1].startswith("IdentityFile=")]
    assert len(opts) == 1, argv
    assert "-i" not in argv  # -i is stat()ed before %-expansion: unusable for paths with "%"
    return _unescape_ssh_tokens(_ssh_config_unquote(opts[0].split("=", 1)[1]), host, port)


def _destination(argv: list[str]) -> str:
    dest = argv[argv.index("--") - 1] if "--" in argv else argv[-1]
    return dest


@settings(max_examples=300, deadline=None)
@given(key=hostile, remote=st.lists(hostile, min_size=1, max_size=4), jump_key=hostile)
def test_ssh_argv_quotes_once_and_keys_stay_literal(key, remote, jump_key):
    try:
        jump = SshEndpoint("127.0.0.1", 2222, "root", Path("/w") / jump_key)
        ep = SshEndpoint("10.99.1.2", 22, "root", Path("/w") / key, jump=jump)
    except LabError as e:
        assert "${" in key + jump_key or CONTROL.search(key + jump_key), e
        assert "refusing SSH key path" in str(e)
        return
    if any(CONTROL.search(a) for a in remote):
        with pytest.raises(LabError, match="control character"):
            ep.ssh_argv(remote)
        return
    argv = ep.ssh_argv(remote)
    # the remote command is one argument after "--", and the remote shell gets argv back
    assert argv[-2] == "--"
    assert shlex.split(argv[-1]) == remote
    assert _destination(argv) == "root@10.99.1.2"
    assert _identity_file(argv, "10.99.1.2", 22) == str(Path("/w") / key)
    # the jump: ProxyCommand expands to a shell line that is the jump's own argv
    proxy = next(a.split("=", 1)[1] for a in argv if a.startswith("ProxyCommand="))
    inner = shlex.split(_unescape_ssh_tokens(proxy, "10.99.1.2", 22))
    assert inner[-2:] == ["-W", "10.99.1.2:22"]
    assert inner[:-2] == jump.ssh_argv()
    assert _identity_file(inner, "127.0.0.1", 2222) == str(Path("/w") / jump_key)


@settings(max_examples=200, deadline=None)
@given(user=hostile, host=hostile, port=st.one_of(st.integers(-5, 70000), st.booleans()))
def test_ssh_destination_cannot_become_an_option(user, host, port):
    try:
        ep = SshEndpoint(host, port, user, Path("/k"))
    except LabError as e:
        assert "refusing SSH" in str(e)
        return
    assert not user.startswith("-") and not host.startswith("-")
    assert 1 <= port <= 65535 and not isinstance(port, bool)
    argv = ep.ssh_argv(["true"])
    dest = _destination(argv)
    assert dest == f"{user}@{host}" and not dest.startswith("-")
    assert shlex.split(quote_argv([dest])) == [dest]
    assert all(ch not in dest for ch in " \t\n'\"$`;&|<>*?\\")


@settings(max_examples=300, deadline=None)
@given(server=hostile, congestion=hostile,
       length=hostile, bind=st.one_of(st.none(), hostile))
@example(server="-oX", congestion="", length="", bind=None)
@example(server="10.0.0.1", congestion="--x", length="-5", bind="--help")
@example(server="fe80::1%eth0;reboot", congestion="", length="", bind=None)
def test_iperf3_argv_values_are_single_safe_words(server, congestion, length, bind):
    try:
        run = traffic.Iperf3Run(server=server, congestion=congestion, length=length, bind=bind)
    except ValueError as e:
        assert str(e).split(":")[0] in ("server", "congestion", "length", "bind"), e
        return
    argv = traffic.iperf3_client_argv(run)
    assert shlex.split(quote_argv(argv)) == argv
    # every value is one argv element, and never one that reads as an option
    for flag, value in (("-c", run.server), ("-C", run.congestion or None), ("-l", run.length or None), ("-B", run.bind)):
        if value is None:
            assert flag not in argv
            continue
        assert argv[argv.index(flag) + 1] == value
        assert not value.startswith("-") and shlex.quote(value) == value, value


@settings(max_examples=200, deadline=None)
@given(netns=hostile, inner=st.lists(hostile, min_size=1, max_size=3))
def test_netns_exec_argv(netns, inner):
    try:
        argv = traffic.netns_exec_argv(netns, inner)
    except ValueError as e:
        assert "netns" in str(e)
        return
    assert argv[:4] == ["ip", "netns", "exec", netns] and argv[4:] == inner
    assert not netns.startswith("-") and shlex.quote(netns) == netns


@settings(max_examples=100, deadline=None)
@given(port=st.one_of(st.integers(-10, 70000), st.booleans(), st.text(max_size=5)), bind=st.one_of(st.none(), hostile))
def test_iperf3_server_argv(port, bind):
    try:
        argv = traffic.iperf3_server_argv(port=port, bind=bind, one_off=True)
    except ValueError:
        return
    assert argv[:4] == ["iperf3", "-s", "-p", str(port)] and shlex.split(quote_argv(argv)) == argv


# --------------------------------------------------------------------------- agent verbs (JSON, then argparse)


@functools.cache
def _agent_parser():
    return agent.build_parser()  # dozens of sub-parsers: build once, not per example


def _agent_parse(args: list[str]):
    try:
        return _agent_parser().parse_args(args)
    except agent.UsageError:
        return None


@settings(max_examples=300, deadline=None)
@given(tap=hostile, delay=st.one_of(st.none(), st.floats(0, 1000, allow_nan=False)))
@example(tap="--clear", delay=60.0)
@example(tap="--netns=evil", delay=None)
@example(tap="-5", delay=None)
def test_agent_netem_args_deliver_the_tap_or_are_refused(tap, delay):
    sent: list[list[str]] = []

    def record(args, timeout):
        sent.append(list(args))
        return {"kind": "netem"}

    AgentClient(record).set_netem(tap, None if delay is None else NetemDelay(delay, limit=1000))
    (args,) = sent
    # the agent request travels as one JSON line: nothing can end it early
    line = json.dumps(args)
    assert "\n" not in line and json.loads(line) == args
    parsed = _agent_parse(args)
    if parsed is None:
        return  # refused by the agent, nothing done
    assert parsed.dev == tap and parsed.netns is None
    assert parsed.clear is (delay is None)


@settings(max_examples=200, deadline=None)
@given(name=hostile, prefix=hostile)
def test_agent_tap_verbs_refuse_or_deliver(name, prefix):
    for verb, key, value in (("tap-delete", "--name", name), ("tap-list", "--prefix", prefix), ("counters", "--dev", name)):
        reply, rc = agent.run_verb([verb, key, value]) if _agent_parse([verb, key, value]) is None else (None, None)
        if reply is not None:
            assert rc == 1 and reply["type"] == "UsageError", reply
            continue
        parsed = _agent_parse([verb, key, value])
        assert getattr(parsed, key[2:]) == value
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", value), value


TRAILING_NL = [
    ("lab.onhost.net.validate_ifname", lambda v: __import__("lab.onhost.net").onhost.net.validate_ifname(v), "tap0\n"),
    ("lab.onhost.net.validate_netns", lambda v: __import__("lab.onhost.net").onhost.net.validate_netns(v), "ns\n"),
    ("lab.onhost.traffic Iperf3Run.congestion", lambda v: traffic.Iperf3Run(server="10.0.0.1", congestion=v), "cubic\n"),
    ("lab.onhost.traffic Iperf3Run.length", lambda v: traffic.Iperf3Run(server="10.0.0.1", length=v), "128K\n"),
    ("lab.onhost.traffic Iperf3Run.server", lambda v: traffic.Iperf3Run(server=v), "host\n"),
    ("lab.hosts.sshkeys.key_dir", lambda v: __import__("lab.hosts.sshkeys").hosts.sshkeys.key_dir(Path("/w"), v), "vhr\n"),
]


@pytest.mark.parametrize("what,check,value", TRAILING_NL, ids=[t[0] for t in TRAILING_NL])
def test_validators_refuse_a_trailing_newline(what, check, value):
    """`^...$` with re.match lets one trailing newline through ("$" matches before it):
    every validator uses fullmatch, and says which field it refused."""
    field = what.split(".")[-1].split("_")[-1]
    with pytest.raises((ValueError, LabError), match=field if "Iperf3Run" in what else None):
        check(value)


def test_remote_validators_refuse_a_trailing_newline():
    for bad in ("a\n", "root\n"):
        with pytest.raises(LabError, match="control character"):
            quote_argv(["echo", bad])
        with pytest.raises(LabError, match="refusing SSH"):
            SshEndpoint("10.0.0.1", 22, bad, Path("/k"))
        with pytest.raises(LabError, match="refusing SSH"):
            SshEndpoint(bad, 22, "root", Path("/k"))
    with pytest.raises(LabError, match="refusing SSH key path"):
        SshEndpoint("10.0.0.1", 22, "root", Path("/k\n"))


def test_agent_serve_refuses_non_argv_requests():
    import io

    out = io.StringIO()
    agent.serve(io.StringIO('"tap-list --prefix x; reboot"\n{"a": 1}\n["serve"]\n'), out)
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(replies) == 3 and all(r["type"] == "UsageError" for r in replies), replies


@settings(max_examples=100, deadline=None)
@given(dev=hostile, delay=st.one_of(st.none(), st.floats(0.001, 1000, allow_nan=False)))
def test_guest_netem_argv_is_one_word_per_value(dev, delay):
    try:
        argv = guest_netem_argv(delay, 1000, dev=dev)
        line = quote_argv(argv)
    except LabError:
        assert CONTROL.search(dev)
        return
    assert shlex.split(line) == argv
    assert argv[argv.index("dev") + 1] == dev


# --------------------------------------------------------------------------- domain XML

# XML 1.0 can carry these characters; \r is left out of text (an XML parser
# turns it into \n by the spec) and is tested on its own below.
xml_char = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\ufffe\uffff",
                         min_codepoint=0x20) | st.sampled_from(["\t", "\n"])
xml_text = st.one_of(nasty.filter(lambda s: not CONTROL.search(s.replace("\t", "").replace("\n", ""))),
                     st.text(xml_char, max_size=30))


@settings(max_examples=200, deadline=None)
@given(name=xml_text, tap=xml_text, path=xml_text, cmdline=xml_text, backend=st.sampled_from(["vhost", "tap"]))
@example(name="x</name><devices><hostdev/></devices><name>", tap="t' a='b", path='"/><disk', cmdline="]]><!--", backend="vhost")
def test_guest_xml_carries_values_intact(name, tap, path, cmdline, backend):
    p = Path("/w") / path
    d = GuestDomain(name=name, vcpus=1, memory_mib=256, kernel=p, initrd=p, cmdline=cmdline, disk=p, tap=tap,
                    mac="52:54:00:00:00:01", backend=backend, console_log=p)
    root = ET.fromstring(guest_xml(d))
    assert root.findtext("name") == name
    assert root.findtext("os/kernel") == str(p) and root.findtext("os/initrd") == str(p)
    assert root.findtext("os/cmdline") == cmdline
    assert root.find("devices/disk/source").get("file") == str(p)
    assert root.find("devices/interface/target").get("dev") == tap
    assert root.find("devices/serial/source").get("path") == str(p)
    # structure unchanged by any value: one disk, one interface, no extra devices
    assert [c.tag for c in root.find("devices")] == ["disk", "interface", "serial", "console", "memballoon"]
    assert len(root.findall(".//hostdev")) == 0


@settings(max_examples=100, deadline=None)
@given(name=xml_text, path=xml_text, cmdline=xml_text, port=st.integers(1, 65535))
def test_labhost_xml_carries_values_intact(name, path, cmdline, port):
    p = Path("/w") / path
    d = LabHostDomain(name=name, vcpus=1, memory_mib=512, kernel=p, initrd=p, cmdline=cmdline, console_log=p,
                      ssh_port=port, shares=(SharedDir(p, "labroot"), SharedDir(p, "labstate", readonly=False)))
    root = ET.fromstring(labhost_xml(d))
    assert root.findtext("name") == name and root.findtext("os/cmdline") == cmdline
    assert [fs.find("source").get("dir") for fs in root.findall("devices/filesystem")] == [str(p), str(p)]
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    # the loopback forward is built from an int: nothing else reaches QEMU's command line
    assert args[1] == f"user,id=labnet,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"


@pytest.mark.parametrize("bad", ["a\x01b", "a\x00b", "a\ufffeb", "a\rb", "a\x1bb"])
def test_domain_xml_refuses_what_xml_cannot_carry(bad):
    """Control characters and U+FFFE would make malformed XML; a \r in element text
    (kernel/initrd paths, cmdline) would read back as \n: refused, naming the element."""
    p = Path("/w") / bad
    guest = dict(name="vhr-guest1", vcpus=1, memory_mib=256, kernel=Path("/k"), initrd=Path("/i"), cmdline="x",
                 disk=Path("/d"), tap="vhr-guest1", mac="52:54:00:00:00:01", backend="vhost", console_log=Path("/c"))
    for key in ("name", "kernel", "cmdline", "disk", "tap", "console_log"):
        value = bad if key in ("name", "cmdline", "tap") else p
        with pytest.raises(ValueError, match="cannot carry"):
            guest_xml(GuestDomain(**{**guest, key: value}))
    host = dict(name="vhr-lab1", vcpus=1, memory_mib=512, kernel=Path("/k"), initrd=Path("/i"), cmdline="x",
                console_log=Path("/c"), ssh_port=2222, shares=(SharedDir(Path("/"), "labroot"),))
    for key, value in (("kernel", p), ("cmdline", bad), ("shares", (SharedDir(p, "labroot"),))):
        with pytest.raises(ValueError, match="cannot carry"):
            labhost_xml(LabHostDomain(**{**host, key: value}))


# --------------------------------------------------------------------------- lab.config names


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


CONFIG = """
[lab]
name = {lab}
workdir = "/nonexistent/vhr-work"
[kernels.stock]
source = "debian:6.12.117-1~deb12u1"
[kernels.nodrop]
source = "debian:6.12.117-1~deb12u1"
[images.bookworm]
recipe = "{recipe}"
[hosts.{host}]
provider = "nested"
kernel = "stock"
memory_mib = 512
[guests.{guest}]
host = {host}
image = "bookworm"
memory_mib = 256
[guests.{guest}.net]
tap = {tap}
[expectations]
stock_kernel = "stock"
nodrop_kernel = "nodrop"
"""

SAFE_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@settings(max_examples=300, deadline=None)
@given(lab=st.one_of(st.just("vhr"), hostile), host=st.one_of(st.just("lab1"), hostile),
       guest=st.one_of(st.just("guest1"), hostile), tap=st.one_of(st.just("vhr-guest1"), hostile))
def test_config_refuses_or_accepts_only_safe_names(tmp_path_factory, lab, host, guest, tap):
    root = tmp_path_factory.getbasetemp()
    recipe = root / "recipe.toml"
    recipe.touch()
    text = CONFIG.format(lab=_toml_str(lab), host=_toml_str(host), guest=_toml_str(guest), tap=_toml_str(tap), recipe=recipe)
    try:
        cfg = loads_config(text, root, root / "lab.toml", mem_total_mib=8192)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and e.key_path, msg
        assert e.key_path.split(".")[0] in ("lab", "hosts", "guests"), msg
        return
    names = [cfg.name, *cfg.hosts, *cfg.guests, *(g.net.tap for g in cfg.guests.values())]
    for n in names:
        # an accepted name is one shell word as it stands, never an option, an ifname or domain name part
        assert SAFE_WORD.fullmatch(n) and shlex.quote(n) == n, n
    for g in cfg.guests.values():
        assert len(g.net.tap.encode()) <= 15


# --------------------------------------------------------------------------- no shell anywhere in lab/


def _sources() -> list[Path]:
    files = sorted(LAB_SRC.rglob("*.py"))
    assert len(files) > 10, files
    return files


def test_no_shell_true_or_os_system_in_lab_sources():
    offenders = []
    for path in _sources():
        text = path.read_text()
        for pattern in (r"shell\s*=\s*True", r"\bos\.system\s*\(", r"\bos\.popen\s*\(", r"create_subprocess_shell",
                        r"\bcommands\.getoutput", r"\bos\.spawn"):
            for m in re.finditer(pattern, text):
                offenders.append(f"{path.relative_to(REPO)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0)}")
    assert offenders == []


def test_subprocess_calls_take_argv_lists():
    """Every subprocess call's command is a list (or a name bound to one), never a string."""
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if base == "subprocess" and name in ("run", "Popen", "call", "check_call", "check_output", "getoutput",
                                                 "getstatusoutput"):
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        offenders.append(f"{path.name}:{node.lineno}: shell=")
                if name in ("getoutput", "getstatusoutput"):
                    offenders.append(f"{path.name}:{node.lineno}: subprocess.{name} runs a shell")
                arg = node.args[0] if node.args else None
                if isinstance(arg, (ast.Constant, ast.JoinedStr, ast.BinOp)) and not isinstance(arg, ast.List):
                    offenders.append(f"{path.name}:{node.lineno}: a string command")
            if base == "os" and (name.startswith("exec") or name.startswith("spawn")):
                # exec*p with a list is fine; a string would be one program name with spaces
                arg = node.args[1] if len(node.args) > 1 else None
                if isinstance(arg, (ast.Constant, ast.JoinedStr)):
                    offenders.append(f"{path.name}:{node.lineno}: os.{name} with a string")
    assert offenders == []


def test_remote_command_lines_come_from_quote_argv():
    """The only ways a line reaches a remote shell (fabric run, paramiko exec_command) quote with quote_argv."""
    seen = 0
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exec_command":
                seen += 1
                arg = node.args[0]
                ok = isinstance(arg, ast.Call) and getattr(arg.func, "id", "") == "quote_argv"
                assert ok, f"{path.name}:{node.lineno}: exec_command without quote_argv"
    assert seen >= 1
    remote = (LAB_SRC / "hosts" / "remote.py").read_text()
    # SshRunner.run hands fabric the quoted line and nothing else
    assert re.search(r"line = quote_argv\(argv\)", remote) and re.search(r"\.run\(\s*line,", remote)
