"""Reading a kernel's serial console for the signs of its death.

A lab host under TCG sometimes dies of an int3 left by live text patching
(`Oops: int3`, then `Kernel panic - not syncing`); a test may kill one on
purpose (sysrq c). Either way its console log, written by this machine's QEMU,
says so. `find_oops` returns the head of the first crash: the line that
announced it and what follows, up to and including the RIP and the first
lines of the call trace, which is what a kernel developer reads first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The first line of a crash report, in the words of the kernel.
CRASH = re.compile(
    r"(Oops:|BUG: (?!.*soft lockup)|kernel BUG at|general protection fault|Kernel panic - not syncing"
    r"|Unable to handle kernel|stack segment:|double fault:)"
)
HEAD_LINES = 40
# Not crashes (a starved TCG vCPU can recover), but what a host that stopped
# answering without an oops usually printed last.
STALL = re.compile(r"(BUG: soft lockup|rcu: INFO: rcu_\w+ detected stalls|rcu: \w+ kthread starved|watchdog: BUG:)")


@dataclass(frozen=True)
class Oops:
    """The head of a crash report on a console."""

    first: str  # the announcing line, e.g. "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
    head: str  # up to HEAD_LINES lines: through the RIP and into the call trace
    rip: str | None  # "RIP: 0010:__schedule+0x428/0x1090", when the report has one


def _strip(line: str) -> str:
    # "[   27.123456] Oops: ..." -> "Oops: ..."
    return re.sub(r"^\[\s*\d+\.\d+\]\s*", "", line.rstrip())


def find_oops(text: str) -> Oops | None:
    """The first crash report in a console's text, or None."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if CRASH.search(line):
            head: list[str] = []
            rip = None
            trace_lines = 0
            for follow in lines[i : i + HEAD_LINES]:
                s = _strip(follow)
                head.append(s)
                if rip is None and s.startswith("RIP:"):
                    rip = s
                if "Call Trace" in s or trace_lines:
                    trace_lines += 1
                    if trace_lines > 8:
                        break
            return Oops(first=_strip(line)[:200], head="\n".join(head), rip=rip)
    return None


def find_stall(text: str) -> str | None:
    """The first soft-lockup or RCU-stall line in a console's text (timestamp stripped), or None."""
    for line in text.splitlines():
        if STALL.search(line):
            return _strip(line)[:200]
    return None
