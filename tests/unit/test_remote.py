"""lab.hosts.remote: quoting once, ssh argv (with a jump host), bounded waits, loopback ports."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from lab.errors import CommandFailed, LabError
from lab.hosts.remote import (
    CommandResult,
    SshEndpoint,
    free_loopback_port,
    quote_argv,
    ssh_config_quote,
    ssh_escape,
)

# What quote_argv accepts: anything but C0 controls other than tab, and DEL.
_ok_char = st.characters(blacklist_categories=("Cs",)).filter(lambda c: c == "\t" or not (ord(c) < 0x20 or ord(c) == 0x7F))
safe_arg = st.text(alphabet=_ok_char, max_size=40)
HOSTILE = ["", " ", "'", '"', "a b", "$(reboot)", "`id`", "; rm -rf /", "a'b\"c", "\\", "*", "~root", "-rf", "--", "%h%%p", "${IFS}", "\t", "é ñ 中"]


# --------------------------------------------------------------------------
# quote_argv
# --------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.lists(safe_arg, min_size=1, max_size=8))
@example(HOSTILE)
def test_quote_argv_round_trips_through_shlex(argv: list[str]) -> None:
    assert shlex.split(quote_argv(argv)) == argv


def test_quote_argv_round_trips_through_a_real_shell() -> None:
    line = quote_argv(["printf", "%s\\0", *HOSTILE])
    out = subprocess.run(["sh", "-c", line], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [a.encode() for a in HOSTILE]


@pytest.mark.parametrize("bad", ["a\nb", "\x00", "x\r", "\x1b[31m", "\x7f", "tail\x08"])
def test_quote_argv_refuses_control_characters(bad: str) -> None:
    with pytest.raises(LabError) as ei:
        quote_argv(["echo", "fine", bad])
    assert repr(bad) in str(ei.value)


_CONTROL = [chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]]


@given(st.lists(safe_arg, max_size=3), st.sampled_from(_CONTROL), safe_arg)
def test_quote_argv_refuses_any_control_character(prefix: list[str], ctl: str, rest: str) -> None:
    arg = rest + ctl + rest
    assume(not (arg.endswith("\n") and _SAFE_BUT_FOR_END.match(arg[:-1])))
    with pytest.raises(LabError):
        quote_argv([*prefix, arg])


_SAFE_BUT_FOR_END = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*\Z")


@pytest.mark.parametrize("arg", ["\n", "echo hi\n"])
def test_quote_argv_refuses_a_trailing_newline(arg: str, tmp_path: Path) -> None:
    refused = 0
    try:
        quote_argv(["echo", arg])
    except LabError:
        refused += 1
    try:
        SshEndpoint("127.0.0.1", 22, "root", tmp_path / f"key{arg}")
    except LabError:
        refused += 1
    assert refused == 2


def test_quote_argv_empty_and_non_strings() -> None:
    with pytest.raises(ValueError, match="empty"):
        quote_argv([])
    with pytest.raises(ValueError):
        quote_argv(())
    with pytest.raises(TypeError):
        quote_argv(["ls", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        quote_argv(["ls", Path("/tmp")])  # type: ignore[list-item]


def test_quote_argv_accepts_tuple() -> None:
    assert shlex.split(quote_argv(("a b", "c"))) == ["a b", "c"]


# --------------------------------------------------------------------------
# ssh escaping helpers
# --------------------------------------------------------------------------


def test_ssh_escape_doubles_percent() -> None:
    assert ssh_escape("/k/%h/%%") == "/k/%%h/%%%%"
    assert ssh_escape("plain") == "plain"


def test_ssh_config_quote() -> None:
    assert ssh_config_quote('a "b" \\c') == '"a \\"b\\" \\\\c"'


# --------------------------------------------------------------------------
# SshEndpoint
# --------------------------------------------------------------------------


def _expand_ssh_tokens(text: str, host: str, port: int) -> str:
    """What ssh does to a ProxyCommand before the shell sees it (%%, %h, %p)."""
    table = {"%": "%", "h": host, "p": str(port)}
    return re.sub(r"%(.)", lambda m: table[m.group(1)], text)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return tmp_path / "keys dir" / "id 50%" / "lab_ed25519"


def test_ssh_argv_direct(key: Path) -> None:
    ep = SshEndpoint("127.0.0.1", 42022, "root", key, connect_timeout=7.9)
    argv = ep.ssh_argv(["ip", "-j", "link", "show", "dev", "vhl g1; reboot"])
    assert argv[0] == "ssh"
    assert argv[argv.index("-p") + 1] == "42022"
    assert "ConnectTimeout=7" in argv
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=no" in argv and "UserKnownHostsFile=/dev/null" in argv
    assert "IdentitiesOnly=yes" in argv and "-i" not in argv
    ident = [a for a in argv if a.startswith("IdentityFile=")]
    assert ident == ["IdentityFile=" + ssh_config_quote(ssh_escape(str(key)))]
    # destination, then "--", then the one remote command line
    dash = argv.index("--")
    assert argv[dash - 1] == "root@127.0.0.1"
    assert argv[dash + 1:] == [quote_argv(["ip", "-j", "link", "show", "dev", "vhl g1; reboot"])]
    assert not any(a.startswith("ProxyCommand") for a in argv)


def test_ssh_argv_without_remote_ends_at_destination(key: Path) -> None:
    argv = SshEndpoint("10.0.0.5", 22, "lab_user", key).ssh_argv(tty=True)
    assert argv[-2:] == ["-t", "lab_user@10.0.0.5"]
    assert "--" not in argv


def test_ssh_argv_with_jump_host(key: Path) -> None:
    jump = SshEndpoint("127.0.0.1", 42022, "root", key)
    guest = SshEndpoint("10.77.1.2", 22, "root", key, jump=jump)
    argv = guest.ssh_argv(["uname", "-r"])
    proxies = [argv[i + 1] for i, a in enumerate(argv) if a == "-o" and argv[i + 1].startswith("ProxyCommand=")]
    assert len(proxies) == 1
    proxy = proxies[0].removeprefix("ProxyCommand=")

    # its own shlex.split: an ssh argv ending in "-W %h:%p"
    words = shlex.split(proxy)
    assert words[0] == "ssh"
    assert words[-2:] == ["-W", "%h:%p"]
    assert "root@127.0.0.1" in words

    # after ssh's own %-expansion, exactly the jump host's argv plus -W host:port
    expanded = shlex.split(_expand_ssh_tokens(proxy, guest.host, guest.port))
    assert expanded == [*jump.ssh_argv(), "-W", "10.77.1.2:22"]
    # the guest's destination is the guest, not the jump host
    assert argv[argv.index("--") - 1] == "root@10.77.1.2"


def test_ssh_argv_two_jumps(key: Path) -> None:
    outer = SshEndpoint("127.0.0.1", 2200, "root", key)
    middle = SshEndpoint("192.168.1.10", 22, "lab", key, jump=outer)
    inner = SshEndpoint("10.0.0.9", 22, "root", key, jump=middle)
    proxy = next(a for a in inner.ssh_argv() if a.startswith("ProxyCommand=")).removeprefix("ProxyCommand=")
    assert shlex.split(_expand_ssh_tokens(proxy, "10.0.0.9", 22)) == [*middle.ssh_argv(), "-W", "10.0.0.9:22"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "-oProxyCommand=touch /tmp/pwned"),
        ("host", "evil host"),
        ("host", "a@b"),
        ("host", ""),
        ("user", "root@evil"),
        ("user", "-l"),
        ("user", "x'y"),
        ("port", 0),
        ("port", 65536),
        ("port", True),
        ("port", "22"),
        ("key", Path("/keys/${HOME}/k")),
        ("key", Path("/keys/a\nb")),
    ],
)
def test_endpoint_refuses(field: str, value, key: Path) -> None:
    kw = {"host": "127.0.0.1", "port": 22, "user": "root", "key": key}
    kw[field] = value
    with pytest.raises(LabError, match="refusing SSH"):
        SshEndpoint(**kw)


@pytest.mark.parametrize("host", ["127.0.0.1", "lab-host.example", "[::1]", "fe80::1%eth0", "h_1"])
def test_endpoint_accepts(host: str, key: Path) -> None:
    assert SshEndpoint(host, 22, "root", key).ssh_argv()[-1] == f"root@{host}"


# --------------------------------------------------------------------------
# CommandResult
# --------------------------------------------------------------------------


def test_command_result_check() -> None:
    ok = CommandResult(("true",), 0, "", "", 0.01)
    assert ok.check() is ok
    bad = CommandResult(("ls", "/no such"), 2, "", "ls: cannot access\n", 0.01)
    with pytest.raises(CommandFailed) as ei:
        bad.check("root@10.0.0.2")
    assert ei.value.rc == 2 and ei.value.argv == ["ls", "/no such"]
    assert str(ei.value) == "root@10.0.0.2: `ls '/no such'` exited 2: ls: cannot access"


# --------------------------------------------------------------------------
# free_loopback_port
# --------------------------------------------------------------------------


def test_free_loopback_port_is_bindable() -> None:
    port = free_loopback_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


def test_free_loopback_port_varies() -> None:
    ports = {free_loopback_port() for _ in range(20)}
    assert len(ports) > 1


def test_real_ssh_parses_the_argv(key: Path) -> None:
    """`ssh -G` (no connection) reads our options as meant: destination, port, jump."""
    import shutil

    if shutil.which("ssh") is None:
        pytest.skip("ssh is not installed (apt-get install openssh-client)")
    jump = SshEndpoint("127.0.0.1", 42022, "root", key)
    guest = SshEndpoint("10.77.1.2", 2022, "lab_user", key, jump=jump)
    argv = guest.ssh_argv()
    proc = subprocess.run(["ssh", "-G", *argv[1:]], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    conf = {}
    for line in proc.stdout.splitlines():
        k, _, v = line.partition(" ")
        conf.setdefault(k, v)
    assert (conf["hostname"], conf["port"], conf["user"]) == ("10.77.1.2", "2022", "lab_user")
    assert conf["batchmode"] == "yes" and conf["identitiesonly"] == "yes"
    proxy = next(a for a in argv if a.startswith("ProxyCommand=")).removeprefix("ProxyCommand=")
    assert conf["proxycommand"] == proxy
