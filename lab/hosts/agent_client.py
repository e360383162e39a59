"""The typed client of the lab agent: one method per verb, replies as lab.onhost's dataclasses.

    host.agent.tap_create(TapDevice("vhl-guest1", txqueuelen=1000, address="10.99.1.1/24"))
    m = host.agent.stream(Iperf3Run("10.99.1.2", duration_s=10), dev="vhl-guest1")   # StreamMeasurement

Every method builds the verb's argument list (validated values only; the
transport quotes it once) and rebuilds the reply with lab.onhost.wire, so the
agent and its callers share one definition of every reply. The transport is
Host.call (one long-lived `python -m lab.onhost.agent serve` per host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab.onhost.modules import ModulesLoaded
from lab.onhost.net import DeviceCounters, NetemDelay, QdiscCounters, TapDevice
from lab.onhost.pktgen import PktgenMeasurement, PktgenRun
from lab.onhost.probe import KernelFacts
from lab.onhost.traffic import Iperf3Run, StreamMeasurement, TcpCounters
from lab.onhost.udp import SendReport, UdpSend
from lab.onhost.wire import from_wire

AGENT_SLACK_S = 30.0  # a verb that runs traffic may take this long beyond its own bound

Call = Callable[[list[str], float | None], dict[str, Any]]


def _ms(value: float) -> str:
    return f"{value:g}"


class AgentClient:
    """The lab agent on one host (see the module doc). `call` is the host's transport."""

    def __init__(self, call: Call) -> None:
        self._call = call

    def _verb(self, args: list[str], timeout: float | None = None) -> dict[str, Any]:
        return self._call(args, timeout)

    # ---- taps ------------------------------------------------------------------
    def tap_create(self, tap: TapDevice) -> TapDevice:
        """Create (or replace) a persistent tap, up; the tap as the kernel has it."""
        args = ["tap-create", "--name", tap.name, "--txqueuelen", str(tap.txqueuelen),
                "--vnet-hdr" if tap.vnet_hdr else "--no-vnet-hdr", "--multi-queue" if tap.multi_queue else "--no-multi-queue"]
        if tap.owner is not None:
            args += ["--owner", str(tap.owner)]
        if tap.address is not None:
            args += ["--address", tap.address]
        return from_wire(TapDevice, self._verb(args))

    def tap_delete(self, name: str) -> bool:
        """Delete a tap; False when there was none."""
        return bool(self._verb(["tap-delete", "--name", name]).get("deleted"))

    def tap_list(self, prefix: str) -> list[TapDevice]:
        """The taps whose name starts with `prefix`."""
        return [from_wire(TapDevice, t) for t in self._verb(["tap-list", "--prefix", prefix]).get("taps", [])]

    def set_txqueuelen(self, dev: str, value: int) -> int:
        """Set a device's txqueuelen (a tap's ptr_ring size); the value read back."""
        return int(self._verb(["txqueuelen", "--name", dev, "--value", str(value)])["txqueuelen"])

    # ---- qdiscs and counters ----------------------------------------------------
    def set_netem(self, dev: str, netem: NetemDelay | None) -> QdiscCounters:
        """netem delay as the root qdisc, or None for the kernel's default root; the root read back."""
        if netem is None:
            args = ["netem", "--dev", dev, "--clear"]
        else:
            args = ["netem", "--dev", dev, "--delay-ms", _ms(netem.delay_ms), "--limit", str(netem.limit)]
            if netem.jitter_ms:
                args += ["--jitter-ms", _ms(netem.jitter_ms)]
        return from_wire(QdiscCounters, self._verb(args))

    def set_qdisc(self, dev: str, kind: str) -> QdiscCounters:
        """Root qdisc `kind` ("default": the kernel's own); the root read back."""
        return from_wire(QdiscCounters, self._verb(["qdisc", "--dev", dev, "--kind", kind]))

    def qdiscs(self, dev: str) -> list[QdiscCounters]:
        """Every qdisc of `dev`, root first."""
        return [from_wire(QdiscCounters, q) for q in self._verb(["qdiscs", "--dev", dev]).get("qdiscs", [])]

    def counters(self, dev: str) -> DeviceCounters:
        """Device and root qdisc counters."""
        return from_wire(DeviceCounters, self._verb(["counters", "--dev", dev]))

    def tcp_counters(self) -> TcpCounters:
        """The host's Tcp RetransSegs/OutSegs."""
        return from_wire(TcpCounters, self._verb(["tcp-counters"]))

    # ---- the kernel -------------------------------------------------------------
    def probe(self) -> KernelFacts:
        """What the host's kernel offers the lab."""
        return from_wire(KernelFacts, self._verb(["probe"]))

    def swap_modules(self, moddir: Path, params: Sequence[str] = (), timeout: float | None = None) -> ModulesLoaded:
        """Unload tun/tap/vhost/vhost_net and load the ones under `moddir` (a lib/modules/<release> tree)."""
        args = ["modules", "--dir", str(moddir)]
        for p in params:
            args += ["--param", p]
        return from_wire(ModulesLoaded, self._verb(args, timeout))

    # ---- traffic ------------------------------------------------------------------
    def stream(
        self, run: Iperf3Run, dev: str | None, *, grace_s: float = 60.0, sample_ms: float = 10.0, count_drops: bool = True
    ) -> StreamMeasurement:
        """iperf3 from the host with `dev`'s counters, qdiscs, backlog and drop reasons around it.

        iperf3 is killed after duration + grace_s; the whole call is bounded a little later.
        """
        args = stream_args(run, dev, grace_s=grace_s, sample_ms=sample_ms, count_drops=count_drops)
        return from_wire(StreamMeasurement, self._verb(args, run.duration_s + grace_s + AGENT_SLACK_S))

    def pktgen(self, run: PktgenRun) -> PktgenMeasurement:
        """The kernel's pktgen through `run.dev`'s qdisc, with the tap's counters and drop reasons (lab.onhost.pktgen)."""
        args = ["pktgen", "--dev", run.dev, "--dst-ip", run.dst_ip, "--dst-mac", run.dst_mac, "--threads", str(run.threads),
                "--count", str(run.count), "--size", str(run.size), "--timeout", _ms(run.timeout_s)]
        return from_wire(PktgenMeasurement, self._verb(args, run.timeout_s + AGENT_SLACK_S + 30))

    # ---- scenarios ----------------------------------------------------------------
    def udp_send(self, spec: UdpSend) -> SendReport:
        """A UDP burst from the host (lab.onhost.udp): what the sender saw."""
        args = ["udp-send", "--dst", spec.dst, "--port", str(spec.port), "--count", str(spec.count), "--size", str(spec.size),
                "--send-timeout", _ms(spec.send_timeout_s), "--total-timeout", _ms(spec.total_timeout_s)]
        if not spec.blocking:
            args.append("--nonblocking")
        if spec.multicast_if:
            args += ["--multicast-if", spec.multicast_if]
        return from_wire(SendReport, self._verb(args, spec.total_timeout_s + AGENT_SLACK_S))

    def bridge_create(self, name: str, ports: Sequence[str]) -> list[str]:
        """A bridge over lab taps; the IPv4 addresses moved onto it."""
        args = ["bridge-create", "--name", name]
        for p in ports:
            args += ["--port", p]
        return list(self._verb(args).get("moved", []))

    def bridge_delete(self, name: str) -> bool:
        """Delete a bridge; False when there was none."""
        return bool(self._verb(["bridge-delete", "--name", name]).get("deleted"))

    def kmsg_mark(self, marker: str) -> None:
        """Write a marker line into the host's kernel log."""
        self._verb(["kmsg", "--mark", marker])

    def kmsg_since(self, marker: str) -> list[str]:
        """The host's kernel log lines after a marker."""
        return list(self._verb(["kmsg", "--since", marker]).get("lines", []))


def stream_args(run: Iperf3Run, dev: str | None, *, grace_s: float, sample_ms: float = 10.0, count_drops: bool = True) -> list[str]:
    """The agent's `stream` verb for `run` (what results record as the command used)."""
    args = ["stream", "--server", run.server, "--port", str(run.port), "--duration", str(run.duration_s), "--streams", str(run.streams)]
    if run.congestion:
        args += ["--congestion", run.congestion]
    if run.length:
        args += ["--length", run.length]
    if run.reverse:
        args.append("--reverse")
    if dev is not None:
        args += ["--sample-dev", dev, "--sample-ms", _ms(sample_ms)]
    if not count_drops:
        args.append("--no-drops")
    return [*args, "--timeout", _ms(run.duration_s + grace_s)]
