"""Running commands on lab hosts and guests over SSH.

Every command is an argument list; it is quoted with shlex.join exactly once,
here, on its way into the remote shell. Nothing else in the lab builds a
remote command line.
"""

from __future__ import annotations

import re
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import CommandFailed, LabError

# Values the lab is willing to pass to a shell-out at all. Quoting makes any
# string safe; this refuses what a config value has no business containing.
_SAFE_ARG = re.compile(r"^[^\x00-\x08\x0a-\x1f\x7f]*$")


def quote_argv(argv: list[str] | tuple[str, ...]) -> str:
    """One remote command line from an argument list, every element quoted."""
    if not argv:
        raise ValueError("empty command")
    for a in argv:
        if not isinstance(a, str):
            raise TypeError(f"command argument {a!r} is not a string")
        if not _SAFE_ARG.match(a):
            raise LabError(f"refusing to run a command with a control character in argument {a!r}")
    return shlex.join(list(argv))


@dataclass(frozen=True)
class CommandResult:
    """What a command did on a host."""

    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def check(self, where: str = "") -> "CommandResult":
        """Raise CommandFailed unless rc == 0."""
        if self.rc != 0:
            raise CommandFailed(list(self.argv), self.rc, self.stdout, self.stderr, where)
        return self


@dataclass(frozen=True)
class SshEndpoint:
    """How to reach one machine over SSH, possibly through a jump host."""

    host: str
    port: int
    user: str
    key: Path
    jump: "SshEndpoint | None" = None
    connect_timeout: float = 30.0

    def ssh_options(self) -> list[str]:
        """OpenSSH -o options: key-only, no host key memory (lab hosts are new every boot)."""
        return [
            "-i", str(self.key),
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
            # ProxyCommand is itself a command line: built from a list, quoted once.
            proxy = quote_argv(self.jump.ssh_argv() + ["-W", "%h:%p"]).replace("'%h:%p'", "%h:%p")
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

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True, stdin: str | None = None) -> CommandResult:
        """Run `argv` remotely; bounded by `timeout` seconds."""
        import io

        line = quote_argv(argv)
        t0 = time.monotonic()
        limit = timeout if timeout is not None else self.default_timeout
        try:
            res = self._connection().run(
                line, hide=True, warn=True, timeout=limit, in_stream=io.StringIO(stdin) if stdin is not None else False
            )
            result = CommandResult(tuple(argv), res.exited, res.stdout, res.stderr, time.monotonic() - t0)
        except Exception as exc:  # paramiko/invoke raise many kinds; all mean "no answer"
            self.close()
            name = type(exc).__name__
            if "Timeout" in name or "timed out" in str(exc):
                result = CommandResult(tuple(argv), 124, "", f"timed out after {limit:.0f}s", time.monotonic() - t0)
            else:
                result = CommandResult(tuple(argv), 255, "", f"ssh to {self.endpoint.host}:{self.endpoint.port} failed: {name}: {exc}", time.monotonic() - t0)
        if check:
            result.check(f"{self.endpoint.user}@{self.endpoint.host}")
        return result

    def close(self) -> None:
        """Drop the connection (it is reopened on the next run)."""
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition") -> float:
    """Poll `predicate` until it returns truthy; return seconds waited or raise LabError."""
    t0 = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
