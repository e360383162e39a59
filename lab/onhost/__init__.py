"""What runs on a host (a lab host, or this machine): the agent and the code behind its verbs.

Taps, qdiscs and counters (net), iperf3 (traffic), kernel facts (probe), the
kernel-level drop test, pktgen and drop reasons. Only the standard library,
pyroute2 and lab's foundation: it starts in seconds on a TCG lab host.
"""
