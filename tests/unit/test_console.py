"""lab.hosts.console: the head of a crash on a lab host's console, and the stall a starved host printed."""

from __future__ import annotations

from lab.hosts.console import find_oops, find_stall

INT3 = """[   27.101000] 9pnet: Installing 9P2000 support
[   27.578960] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[   27.579366] CPU: 1 UID: 0 PID: 333 Comm: qemu-system-x86 Not tainted 6.12.117+deb12-amd64 #1
[   27.579596] RIP: 0010:__schedule+0x428/0x1090
[   27.580930] Call Trace:
[   27.580930]  <TASK>
[   27.580931]  schedule+0x27/0xf0
[   27.599000] Kernel panic - not syncing: Fatal exception in interrupt
"""

# What a lab host printed before it stopped answering, with no oops (2026-12-02,
# two lab hosts and a benchmark on the 2 cores).
STARVED = """[  859.847073] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
[  961.048719] watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [python:253]
[ 1175.015070] rcu: rcu_preempt kthread starved for 84044 jiffies! g58393 f0x2 RCU_GP_WAIT_FQS(5) ->state=0x200 ->cpu=0
"""


def test_the_head_of_an_oops_runs_through_the_rip_into_the_call_trace():
    o = find_oops(INT3)
    assert o is not None and o.first == "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
    assert o.rip == "RIP: 0010:__schedule+0x428/0x1090"
    assert o.head.splitlines()[0] == o.first and "schedule+0x27/0xf0" in o.head


def test_a_soft_lockup_is_not_a_crash_but_is_the_stall_that_is_reported():
    assert find_oops(STARVED) is None
    assert find_stall(STARVED) == "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"
    assert find_stall(STARVED.splitlines()[1]) == "watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [python:253]"
    assert find_stall(INT3) is None and find_stall("") is None
