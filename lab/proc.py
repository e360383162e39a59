"""The one way the lab runs a process on this machine, and the one way it waits.

- `run()`: an argument list (never a shell line), in a session of its own, with
  a deadline. On timeout, Ctrl-C or any error the whole process group gets
  SIGTERM, a grace period, then SIGKILL, so nothing a tool started (make's
  children, `ip netns exec`'s child, mmdebstrap's apt) outlives it. Pipes are
  drained by threads (no deadlock on a chatty child); output can be streamed
  to a log file and to a per-line callback, and the last lines are kept for
  error messages.
- `spawn()` / `end()`: a long-lived child (an ssh forward, a local agent) in
  its own session, and the same TERM-then-KILL of its group.
- `wait_for()`: poll a condition with backoff until it holds, a deadline passes,
  or the condition itself raises (a boot that failed).
- `pids_named()`: processes by name from /proc, without starting `pgrep`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from lab.errors import CommandFailed, LabError, MissingPiece

T = TypeVar("T")

TAIL_LINES = 30
# For spawn(): a pipe to the child, or nothing.
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
Popen = subprocess.Popen
GRACE_S = 3.0  # between SIGTERM and SIGKILL of a group


@dataclass(frozen=True)
class Completed:
    """What a process did. `rc` is 124 when it was killed at its deadline (`timed_out`)."""

    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    tail: tuple[str, ...] = ()  # last lines of its output (stdout and stderr interleaved)

    @property
    def ok(self) -> bool:
        """Exited 0."""
        return self.rc == 0

    def check(self, where: str = "") -> Completed:
        """Raise CommandFailed unless it exited 0."""
        if self.rc != 0:
            raise CommandFailed(list(self.argv), self.rc, self.stdout, self.stderr or "\n".join(self.tail), where)
        return self


class WaitTimeout(LabError):
    """wait_for() gave up: the condition did not hold within its deadline."""


def _argv(argv: Sequence[str]) -> list[str]:
    out = [os.fspath(a) for a in argv]
    if not out:
        raise ValueError("empty command")
    for a in out:
        if not isinstance(a, str):
            raise TypeError(f"command argument {a!r} is not a string")
    return out


def end(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """Stop `proc`'s whole process group: SIGTERM, `grace` seconds, SIGKILL; then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # the leader may be gone while children it started still run in its group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def spawn(
    argv: Sequence[str],
    *,
    stdin: Any = subprocess.DEVNULL,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = subprocess.DEVNULL,
    text: bool = False,
    env: Mapping[str, str] | None = None,
    missing_hint: str | None = None,
) -> subprocess.Popen:
    """Start a long-lived child in its own session; stop it with `end()`."""
    args = _argv(argv)
    try:
        return subprocess.Popen(
            args, stdin=stdin, stdout=stdout, stderr=stderr, text=text, env=dict(env) if env is not None else None,
            start_new_session=True,
        )  # fmt: skip
    except FileNotFoundError:
        raise MissingPiece(f"{args[0]} is not installed", hint=missing_hint) from None


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    input: str | bytes | None = None,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    stdout_to: IO[bytes] | None = None,
    tail: int = TAIL_LINES,
    grace: float = GRACE_S,
    missing_hint: str | None = None,
) -> Completed:
    """Run `argv` to completion within `timeout` seconds and return what it did.

    `log`: the command line and every output line are appended there as they
    come. `on_line`: called with each output line (progress parsing).
    `stdout_to`: a binary file that gets stdout unchanged (then only stderr
    is captured). A missing program is MissingPiece (with `missing_hint`).
    """
    args = _argv(argv)
    t0 = time.monotonic()
    logf = open(log, "ab", buffering=0) if log is not None else None
    try:
        if logf is not None:
            logf.write(("$ " + " ".join(args) + "\n").encode())
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=stdout_to if stdout_to is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # our group: we end all of it, a terminal's Ctrl-C does not race us
            )
        except FileNotFoundError:
            raise MissingPiece(f"{args[0]} is not installed", hint=missing_hint) from None
        chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        last: deque[str] = deque(maxlen=max(1, tail))
        lock = threading.Lock()
        # on_line runs in a pump thread: what it raises (a Ctrl-C delivered
        # through a progress callback, a parser's error) is carried back to
        # the caller's thread, after the process group has been ended.
        raised: list[BaseException] = []

        def pump(name: str, stream: IO[bytes]) -> None:
            for raw in iter(stream.readline, b""):
                chunks[name].append(raw)
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with lock:
                    last.append(line)
                    if logf is not None:
                        logf.write(raw if raw.endswith(b"\n") else raw + b"\n")
                if on_line is not None and not raised:
                    try:
                        on_line(line)
                    except BaseException as exc:
                        raised.append(exc)
                        end(proc, grace)
            stream.close()

        threads = []
        for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if stream is not None:
                th = threading.Thread(target=pump, args=(name, stream), daemon=True)
                th.start()
                threads.append(th)
        if input is not None:
            data = input.encode() if isinstance(input, str) else input

            def feed() -> None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    assert proc.stdin is not None
                    proc.stdin.write(data)
                    proc.stdin.close()

            threading.Thread(target=feed, daemon=True).start()
        timed_out = False
        try:
            proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            end(proc, grace)
        except BaseException:
            end(proc, grace)
            raise
        for th in threads:
            th.join(timeout=10)
        if raised:
            raise raised[0]
        rc = 124 if timed_out else proc.returncode
        if timed_out and logf is not None:
            logf.write(f"# killed after {timeout:g} s\n".encode())
        out = b"".join(chunks["stdout"]).decode("utf-8", "replace")
        err = b"".join(chunks["stderr"]).decode("utf-8", "replace")
        if timed_out:
            err = (err + f"\ntimed out after {timeout:g}s").lstrip("\n")
        return Completed(tuple(args), rc, out, err, time.monotonic() - t0, timed_out, tuple(last))
    finally:
        if logf is not None:
            logf.close()


def wait_for(
    ready: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.5,
    max_interval: float = 5.0,
    backoff: float = 1.5,
    on_wait: Callable[[float], None] | None = None,
) -> T:
    """Call `ready()` until it returns something truthy (returned); intervals grow by `backoff`.

    `ready` may raise to give up early (a boot that failed). After `timeout`
    seconds: WaitTimeout naming `what`. `on_wait(elapsed)` runs between polls.
    """
    t0 = time.monotonic()
    pause = interval
    while True:
        value = ready()
        if value:
            return value
        elapsed = time.monotonic() - t0
        if elapsed >= timeout:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        if on_wait is not None:
            on_wait(elapsed)
        time.sleep(min(pause, max(0.0, timeout - elapsed)))
        pause = min(max_interval, pause * backoff)


def pids_named(name: str) -> list[int]:
    """PIDs of processes whose command name (/proc/PID/comm) is `name`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name[:15]:
                out.append(int(entry.name))
        except OSError:
            continue
    return sorted(out)
