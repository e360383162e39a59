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
