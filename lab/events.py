"""Typed progress events: long work emits them, the CLI and the report render them.

Nothing that does the work prints. A builder, a boot or the matrix runner takes
an `emit` callable and hands it small frozen objects; `lab.cli` shows them as
a live status line (or one line per new step when not on a terminal), the
matrix view (lab.verdicts.report.MatrixProgress) as its progress bar and log.
A renderer tells a new step from a tick of the same one by `Step.key`, never
by parsing text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """A long piece of work began or moved on.

    `subject`: what it is about (a host, a guest, a kernel recipe, an image);
    `action`: what is happening to it. `elapsed_s` / `fraction` change from one
    tick of the same step to the next; `warning` marks something the user
    should read even when ticks are hidden.
    """

    subject: str
    action: str
    elapsed_s: float | None = None
    fraction: float | None = None
    warning: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """Same key, same step: a renderer shows one line per key."""
        return (self.subject, self.action)

    def text(self) -> str:
        """One line: "lab1: booting (12s)", "nodrop: building kernel (40%)"."""
        line = f"{self.subject}: {self.action}" if self.subject else self.action
        if self.elapsed_s is not None:
            line += f" ({self.elapsed_s:.0f}s)"
        elif self.fraction is not None:
            line += f" ({self.fraction:.0%})"
        return ("warning: " + line) if self.warning else line


Progress = Callable[[Step], None]  # what long work takes to report its steps


def quiet(event: object) -> None:
    """An emit that drops every event."""


# ---------------------------------------------------------------------------- runs and sessions
# A matrix run and the lab session under it emit these besides Steps; a
# renderer that does not know an event ignores it.


@dataclass(frozen=True)
class HostBooted:
    """A lab host came up on `recipe` (power on -> SSH answers)."""

    host: str
    recipe: str
    seconds: float
    boot_id: str


@dataclass(frozen=True)
class GuestBooted:
    """A guest came up (define -> SSH answers)."""

    guest: str
    host: str
    backend: str
    queues: int
    seconds: float


@dataclass(frozen=True)
class ModulesSwapped:
    """One lab host boot moved from one recipe's tun/tap/vhost/vhost_net to another's."""

    host: str
    from_recipe: str
    to_recipe: str
    seconds: float  # rmmod + insmod + build-id check
    build_ids: dict[str, str]


@dataclass(frozen=True)
class HostCrash:
    """A lab host died; `oops` is its console's first crash line (None: it died without one)."""

    host: str
    at: str
    oops: str | None
    console_log: str | None


@dataclass(frozen=True)
class CellStarted:
    """Cell `cell` (the `index`-th of `total` in run order) began its `attempt`-th attempt."""

    cell: str
    index: int
    total: int
    attempt: int = 1


@dataclass(frozen=True)
class CellFinished:
    """A cell ended: status "ok"|"error", its throughput (Mbit/s, or pktgen kpps the guest received) and attempts."""

    cell: str
    status: str
    value: float | None
    unit: str
    attempts: int
    seconds: float


Event = Step | HostBooted | GuestBooted | ModulesSwapped | HostCrash | CellStarted | CellFinished
Emit = Callable[[Event], None]  # what a run and a session take to report what happens
