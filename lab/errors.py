"""Errors the lab reports to its user as one line, without a traceback."""

from __future__ import annotations


class LabError(Exception):
    """A problem the user can fix; the CLI prints it on one line and exits 2.

    `hint` is the exact command or change that fixes it, when there is one.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (fix: {self.hint})"
        return self.message


class ConfigError(LabError):
    """lab.toml is invalid; the message starts with the key path."""

    def __init__(self, key_path: str, problem: str, hint: str | None = None) -> None:
        super().__init__(f"{key_path}: {problem}" if key_path else problem, hint)
        self.key_path = key_path
        self.problem = problem


class MissingPiece(LabError):
    """A package, daemon or device the lab needs is absent."""


class HostGone(LabError):
    """The lab host stopped answering; the matrix must stop cleanly (or reboot it and retry)."""


class HostCrashed(HostGone):
    """The lab host's kernel died: `oops` is the first crash line on its console, `head` the
    report up to the RIP and the call trace, `console_log` where the whole console was kept, `stall`
    (when there is no oops) the soft lockup or RCU stall a starved host printed."""

    def __init__(
        self, host: str, oops: str | None, head: str = "", console_log: str | None = None, stall: str | None = None
    ) -> None:
        what = f"lab host {host} crashed: {oops}" if oops else f"lab host {host} died (no crash report on its console)"
        super().__init__(what + (f" (console: {console_log})" if console_log else ""))
        self.host = host
        self.oops = oops
        self.head = head
        self.console_log = console_log
        self.stall = stall  # without an oops: the first soft-lockup / RCU-stall line it printed


class AgentFailed(LabError):
    """A lab agent verb replied with an error; `kind` is the error's type on the host (e.g. "Iperf3Timeout")."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class AgentTimeout(AgentFailed):
    """A lab agent verb did not answer within its bound (the session is closed; the host may still be fine)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="AgentTimeout")


class CommandFailed(LabError):
    """A command on a host exited non-zero."""

    def __init__(self, argv: list[str], rc: int, stdout: str = "", stderr: str = "", where: str = "") -> None:
        import shlex

        tail = (stderr or stdout).strip().splitlines()[-5:]
        msg = f"{where + ': ' if where else ''}`{shlex.join(argv)}` exited {rc}"
        if tail:
            msg += ": " + " | ".join(tail)
        super().__init__(msg)
        self.argv = argv
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
