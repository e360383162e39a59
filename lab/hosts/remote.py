"""Running commands on lab hosts and guests over SSH.

Every command is an argument list; it is quoted with shlex.join exactly once,
here, on its way into the remote shell. Nothing else in the lab builds a
remote command line.
"""

from __future__ import annotations

import re
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import LabError
from lab.proc import Completed

# Values the lab is willing to pass to a shell-out at all. Quoting makes any
# string safe; this refuses what a config value has no business containing.
_SAFE_ARG = re.compile(r"^[^\x00-\x08\x0a-\x1f\x7f]*$")


# Seconds the watchdog of SshRunner.run leaves fabric's own timeout (which ends
# a running command cleanly) before it tears the connection down.
ABORT_GRACE_S = 2.0

# An SSH user or host name: no option look-alike, no whitespace, no "@" or quotes.
_SSH_WORD = re.compile(r"[A-Za-z0-9_\[][A-Za-z0-9_.:%\[\]-]*")  # fullmatch: "$" would let a trailing newline in


def ssh_escape(text: str) -> str:
    """`text` for an ssh option that expands %-tokens (IdentityFile, ProxyCommand, -L paths)."""
    return text.replace("%", "%%")


def ssh_config_quote(text: str) -> str:
    """`text` as one double-quoted argument of an ssh_config line (or -o option)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_argv(argv: list[str] | tuple[str, ...]) -> str:
    """One remote command line from an argument list, every element quoted."""
    if not argv:
        raise ValueError("empty command")
    for a in argv:
        if not isinstance(a, str):
            raise TypeError(f"command argument {a!r} is not a string")
        if not _SAFE_ARG.fullmatch(a):
            raise LabError(f"refusing to run a command with a control character in argument {a!r}")
    return shlex.join(list(argv))


# A remote command's result is the same type as a local one's.
CommandResult = Completed


@dataclass(frozen=True)
class SshEndpoint:
    """How to reach one machine over SSH, possibly through a jump host."""

    host: str
    port: int
    user: str
    key: Path
    jump: SshEndpoint | None = None
    connect_timeout: float = 30.0

    def __post_init__(self) -> None:
        # The destination goes on ssh's command line before "--": a user or host
        # starting with "-" would be read as an option (-oProxyCommand=...).
        for what, value in (("host", self.host), ("user", self.user)):
            if not isinstance(value, str) or not _SSH_WORD.fullmatch(value):
                raise LabError(f"refusing SSH {what} {value!r}: expected {_SSH_WORD.pattern}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise LabError(f"refusing SSH port {self.port!r}: expected an integer from 1 to 65535")
        key = str(self.key)
        # ssh expands "${VAR}" in an identity file path and has no escape for it.
        if "${" in key or not _SAFE_ARG.fullmatch(key):
            raise LabError(f"refusing SSH key path {key!r}: ssh would not read it as written", hint="use a workdir path without '${' or control characters")

    def ssh_options(self) -> list[str]:
        """OpenSSH -o options: key-only, no host key memory (lab hosts are new every boot)."""
        return [
            # Not -i: ssh checks -i's path before expanding %-tokens in it, so a
            # path with "%" cannot be given there. The option parser unquotes.
            "-o", "IdentityFile=" + ssh_config_quote(ssh_escape(str(self.key))),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={int(self.connect_timeout)}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=6",
        ]

    def ssh_argv(self, remote: list[str] | None = None, tty: bool = False) -> list[str]:
        """An `ssh` argument list reaching this endpoint (through its jump host)."""
        argv = ["ssh", *self.ssh_options(), "-p", str(self.port)]
        if self.jump is not None:
            # ProxyCommand is itself a command line: built from a list, quoted once,
            # then %-escaped, since ssh expands %-tokens in it before the shell runs it.
            proxy = ssh_escape(quote_argv(self.jump.ssh_argv())) + " -W %h:%p"
            argv += ["-o", f"ProxyCommand={proxy}"]
        if tty:
            argv.append("-t")
        argv.append(f"{self.user}@{self.host}")
        if remote:
            argv += ["--", quote_argv(remote)]
        return argv


@dataclass
class SshRunner:
    """Runs argument lists on an endpoint, with fabric, keeping the connection."""

    endpoint: SshEndpoint
    default_timeout: float = 120.0
    _conn: object | None = field(default=None, repr=False)

    def _connection(self):  # -> fabric.Connection
        if self._conn is None:
            from fabric import Connection

            gateway = None
            if self.endpoint.jump is not None:
                gateway = SshRunner(self.endpoint.jump, self.default_timeout)._connection()
            self._conn = Connection(
                host=self.endpoint.host,
                port=self.endpoint.port,
                user=self.endpoint.user,
                gateway=gateway,
                connect_timeout=self.endpoint.connect_timeout,
                connect_kwargs={
                    "key_filename": [str(self.endpoint.key)],
                    "look_for_keys": False,
                    "allow_agent": False,
                    "banner_timeout": self.endpoint.connect_timeout,
                    "auth_timeout": self.endpoint.connect_timeout,
                },
            )
        return self._conn

    def _chain(self) -> list:
        """This runner's fabric connection and its gateways, innermost first."""
        out = []
        conn = self._conn
        while conn is not None and not isinstance(conn, str):
            out.append(conn)
            conn = getattr(conn, "gateway", None)
        return out

    def _abort(self) -> None:
        """Close every transport of the chain; safe from another thread, and it
        wakes paramiko calls blocked on them (they raise)."""
        for conn in self._chain():
            try:
                conn.client.close()
            except Exception:
                pass

    @contextmanager
    def deadline(self, seconds: float, fired: threading.Event | None = None) -> Iterator[threading.Event]:
        """Abort this runner's connection if the block still runs after `seconds`.

        paramiko waits for a channel to open and for an exec request's reply
        without a bound of ours (fabric's timeout only starts once the command
        runs): a peer that hangs (a paused guest) holds them until TCP gives
        up, about 15 minutes. The event tells the block's caller it fired.
        """
        fired = fired if fired is not None else threading.Event()

        def abort() -> None:
            fired.set()
            self._abort()

        timer = threading.Timer(seconds, abort)
        timer.daemon = True
        timer.start()
        try:
            yield fired
        finally:
            timer.cancel()

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True, stdin: str | None = None) -> CommandResult:
        """Run `argv` remotely; bounded by `timeout` seconds (plus the endpoint's
        connect_timeout per hop when the connection has to be opened first)."""
        import io

        line = quote_argv(argv)
        t0 = time.monotonic()
        limit = timeout if timeout is not None else self.default_timeout
        hops = 1 + (self.endpoint.jump is not None)
        connected = bool(self._conn is not None and self._conn.is_connected)
        bound = limit + ABORT_GRACE_S + (0.0 if connected else hops * self.endpoint.connect_timeout)
        fired = threading.Event()
        try:
            with self.deadline(bound, fired):
                res = self._connection().run(
                    line, hide=True, warn=True, timeout=limit, in_stream=io.StringIO(stdin) if stdin is not None else False
                )
            result = CommandResult(tuple(argv), res.exited, res.stdout, res.stderr, time.monotonic() - t0)
        except Exception as exc:  # paramiko/invoke raise many kinds; all mean "no answer"
            self.close()
            name = type(exc).__name__
            if fired.is_set():
                waited = time.monotonic() - t0
                result = CommandResult(
                    tuple(argv), 124, "", f"timed out after {waited:.0f}s: no answer from {self.endpoint.host}:{self.endpoint.port}", waited
                )
            elif "Timeout" in name or "timed out" in str(exc):
                result = CommandResult(tuple(argv), 124, "", f"timed out after {limit:.0f}s", time.monotonic() - t0)
            elif name == "ChannelException" and self.endpoint.jump is not None:
                # The jump host answered but could not open a TCP connection onwards.
                jump = self.endpoint.jump
                why = f"{jump.host}:{jump.port} cannot connect to {self.endpoint.host}:{self.endpoint.port} ({exc})"
                result = CommandResult(tuple(argv), 255, "", f"ssh through {why}", time.monotonic() - t0)
            else:
                result = CommandResult(tuple(argv), 255, "", f"ssh to {self.endpoint.host}:{self.endpoint.port} failed: {name}: {exc}", time.monotonic() - t0)
        if check:
            result.check(f"{self.endpoint.user}@{self.endpoint.host}")
        return result

    def put(self, local: Path, remote: str, timeout: float | None = None) -> None:
        """Copy file `local` to path `remote` on the endpoint (SFTP over the kept connection), bounded by `timeout`.

        Written under a temporary name and renamed, so a copy cut short never
        passes for a whole file.
        """
        if not _SAFE_ARG.fullmatch(remote) or not remote.startswith("/"):
            raise LabError(f"refusing to upload to {remote!r}: expected an absolute path without control characters")
        limit = timeout if timeout is not None else max(self.default_timeout, 600.0)
        tmp = f"{remote}.part"
        fired = threading.Event()
        try:
            with self.deadline(limit + ABORT_GRACE_S + self.endpoint.connect_timeout, fired):
                conn = self._connection()
                conn.put(str(local), tmp)
        except Exception as exc:
            self.close()
            why = f"timed out after {limit:.0f}s" if fired.is_set() else f"{type(exc).__name__}: {exc}"
            raise LabError(f"upload of {local} to {self.endpoint.host}:{remote} failed: {why}") from None
        self.run(["mv", "-f", tmp, remote], timeout=60)

    def close(self) -> None:
        """Drop the connection and its gateway's (reopened on the next run).

        fabric's Connection.close leaves the gateway open: without closing the
        chain, every reconnect to a guest would leak a connection to its host.
        """
        for conn in self._chain():
            try:
                conn.close()
            except Exception:
                pass
        self._conn = None


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
