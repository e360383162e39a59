"""iperf3 runs and their parsing; host TCP counters (retransmits) from /proc/net/snmp.

Commands are built as argv lists from validated values, never as shell
strings: every element either is a fixed option or matched a strict pattern,
so nothing a config or a caller passes can become a second command or an
extra option.

iperf3 3.12 facts this module relies on (checked on this machine):
* with -J it exits 0 even when it failed ("unable to connect to server"):
  the JSON's "error" key is the only reliable failure signal;
* in reverse mode (-R) the client is the receiver: its streams' "sender"
  blocks carry mean_rtt 0 (the RTT is only known on the sending side) and
  cpu_utilization_percent.remote_total is the sender's CPU.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from lab import proc
from lab.errors import LabError
from lab.onhost.net import (
    IFNAME_RE,
    BacklogPeak,
    BacklogSampler,
    CountersDelta,
    DeviceCounters,
    QdiscCounters,
    delta,
    qdisc_delta,
    read_counters,
    read_qdiscs,
    validate_netns,
)

CONGESTION_RE = re.compile(r"^[a-z0-9_]+$")
LENGTH_RE = re.compile(r"^[0-9]+[KMG]?$")
# RFC 1123 host names; no leading "-" so a name can never read as an option.
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
MAX_STREAMS = 128
MAX_DURATION_S = 86_400
# Time given to iperf3 beyond the test itself: connect, exchange results, exit.
DEFAULT_GRACE_S = 30.0


class Iperf3Error(LabError):
    """iperf3 failed: its own "error" message, or output that is not a result."""


class Iperf3Timeout(Iperf3Error):
    """iperf3 did not finish within its bound; it was killed."""


# --------------------------------------------------------------------------
# argv builders


def _parse_ip(value: str) -> str | None:
    """Canonical text of an IP address, or None. An IPv6 scope ("fe80::1%tap0")
    must be an interface name: ipaddress accepts any text there, spaces and ";" too."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    scope = getattr(addr, "scope_id", None)
    if scope is not None and not IFNAME_RE.fullmatch(scope):
        return None
    return str(addr)


def _validate_host(value: object, field_name: str) -> str:
    if isinstance(value, str):
        ip = _parse_ip(value)
        if ip is not None:
            return ip
        if HOSTNAME_RE.fullmatch(value):
            return value
    raise ValueError(f"{field_name}: {value!r} is not an IP address or host name")


def _validate_int(value: object, field_name: str, lo: int, hi: int) -> int:
    # integral floats (10.0 from a TOML file) are fine; bools and strings are not
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field_name}: must be an integer, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{field_name}: must be a whole number, got {value!r}")
        value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{field_name}: must be in [{lo}, {hi}], got {value}")
    return value


def _validate_port(value: object, field_name: str = "port") -> int:
    return _validate_int(value, field_name, 1, 65535)


@dataclass(frozen=True)
class Iperf3Run:
    """One iperf3 client run. "" for congestion/length means iperf3's default.

    `reverse`: the server sends (-R). `bind`: local address (-B).
    `connect_timeout_ms`: bound on control connection setup (--connect-timeout).
    """

    server: str
    port: int = 5201
    duration_s: int = 10
    streams: int = 1
    congestion: str = ""
    length: str = ""
    reverse: bool = False
    bind: str | None = None
    json: bool = True
    connect_timeout_ms: int | None = None

    def __post_init__(self) -> None:
        # normalise here so every consumer sees canonical values
        object.__setattr__(self, "server", _validate_host(self.server, "server"))
        object.__setattr__(self, "port", _validate_port(self.port))
        object.__setattr__(self, "duration_s", _validate_int(self.duration_s, "duration_s", 1, MAX_DURATION_S))
        object.__setattr__(self, "streams", _validate_int(self.streams, "streams", 1, MAX_STREAMS))
        if not isinstance(self.congestion, str) or (self.congestion and not CONGESTION_RE.fullmatch(self.congestion)):
            raise ValueError(f"congestion: {self.congestion!r} must match ^[a-z0-9_]+$ (or be empty)")
        if len(self.congestion) > 15:  # TCP_CA_NAME_MAX 16
            raise ValueError(f"congestion: {self.congestion!r} is longer than 15 characters")
        if not isinstance(self.length, str) or (self.length and not LENGTH_RE.fullmatch(self.length)):
            raise ValueError(f"length: {self.length!r} must match ^[0-9]+[KMG]?$ (or be empty)")
        if self.length and int(self.length.rstrip("KMG")) == 0:
            raise ValueError("length: must be > 0")
        for flag in ("reverse", "json"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: must be a bool, got {getattr(self, flag)!r}")
        if self.bind is not None:
            object.__setattr__(self, "bind", _validate_ip(self.bind, "bind"))
        if self.connect_timeout_ms is not None:
            object.__setattr__(
                self, "connect_timeout_ms", _validate_int(self.connect_timeout_ms, "connect_timeout_ms", 1, 3_600_000)
            )


def _validate_ip(value: object, field_name: str) -> str:
    # str only: ip_address() would also take an int (5 -> "0.0.0.5")
    ip = _parse_ip(value) if isinstance(value, str) else None
    if ip is None:
        raise ValueError(f"{field_name}: {value!r} is not an IP address")
    return ip


def iperf3_client_argv(run: Iperf3Run, binary: str = "iperf3") -> list[str]:
    """The iperf3 client command for `run`, as an argv list."""
    argv = [binary, "-c", run.server, "-p", str(run.port), "-t", str(run.duration_s), "-P", str(run.streams)]
    if run.json:
        argv.append("-J")
    if run.congestion:
        argv += ["-C", run.congestion]
    if run.length:
        argv += ["-l", run.length]
    if run.reverse:
        argv.append("-R")
    if run.bind is not None:
        argv += ["-B", run.bind]
    if run.connect_timeout_ms is not None:
        argv += ["--connect-timeout", str(run.connect_timeout_ms)]
    return argv


def iperf3_server_argv(
    port: int = 5201,
    bind: str | None = None,
    one_off: bool = False,
    daemon: bool = False,
    idle_timeout_s: int | None = None,
    json: bool = False,
    binary: str = "iperf3",
) -> list[str]:
    """The iperf3 server command as an argv list.

    `one_off`: serve one client then exit (-1); `daemon`: fork to background
    (-D); `idle_timeout_s`: restart/exit after that long without a client.
    """
    argv = [binary, "-s", "-p", str(_validate_port(port))]
    if bind is not None:
        argv += ["-B", _validate_ip(bind, "bind")]
    for name, flag in (("one_off", one_off), ("daemon", daemon), ("json", json)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: must be a bool, got {flag!r}")
    if one_off:
        argv.append("-1")
    if daemon:
        argv.append("-D")
    if idle_timeout_s is not None:
        argv += ["--idle-timeout", str(_validate_int(idle_timeout_s, "idle_timeout_s", 1, MAX_DURATION_S))]
    if json:
        argv.append("-J")
    return argv


# --------------------------------------------------------------------------
# parsing iperf3 -J


@dataclass(frozen=True)
class Iperf3Result:
    """What the lab keeps from one iperf3 -J document. None: iperf3 did not report it.

    throughput_mbps is the receiver's rate (what arrived), sent_mbps the
    sender's; mean_rtt_ms and cpu_* refer to the sending side.
    """

    throughput_mbps: float | None
    sent_mbps: float | None
    retransmits: int | None
    mean_rtt_ms: float | None
    cpu_sender_pct: float | None
    cpu_receiver_pct: float | None
    bytes: int | None
    seconds: float | None
    reverse: bool
    streams: int | None
    congestion: str | None
    version: str | None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _whole(value: object) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def parse_iperf3(json_text: str) -> Iperf3Result:
    """Parse the client's `iperf3 -J` output.

    Raises Iperf3Error for iperf3's own "error" key and for output that is
    empty, truncated or not an iperf3 document. Missing fields become None.
    """
    if json_text is None or not json_text.strip():
        raise Iperf3Error("iperf3 printed no output (killed or crashed before writing its JSON)")
    try:
        doc = json.loads(json_text)
    except json.JSONDecodeError as exc:
        tail = json_text.strip()[-80:].replace("\n", " ")
        raise Iperf3Error(
            f"iperf3 output is not complete JSON (truncated?): {exc.msg} at char {exc.pos}; ends with {tail!r}"
        ) from None
    if not isinstance(doc, dict):
        raise Iperf3Error(f"iperf3 output is JSON but not an iperf3 document (a {type(doc).__name__})")
    if doc.get("error"):
        raise Iperf3Error(f"iperf3: {doc['error']}")
    if "start" not in doc and "end" not in doc:
        raise Iperf3Error("iperf3 output has neither 'start' nor 'end': not an iperf3 -J document")

    start = _dict(doc.get("start"))
    end = _dict(doc.get("end"))
    test_start = _dict(start.get("test_start"))
    sum_sent = _dict(end.get("sum_sent"))
    sum_received = _dict(end.get("sum_received"))
    cpu = _dict(end.get("cpu_utilization_percent"))

    if "reverse" in test_start:
        reverse = bool(test_start.get("reverse"))
    else:
        # sum_sent.sender says whether this side (the client) sent
        reverse = sum_sent.get("sender") is False

    rtts: list[float] = []
    if not reverse:
        streams = end.get("streams")
        for stream in streams if isinstance(streams, list) else []:
            sender = _dict(_dict(stream).get("sender"))
            rtt = _num(sender.get("mean_rtt"))
            if rtt is not None and sender.get("sender", True):
                rtts.append(rtt)

    def mbps(block: dict[str, Any]) -> float | None:
        bps = _num(block.get("bits_per_second"))
        return None if bps is None else bps / 1e6

    host_cpu, remote_cpu = _num(cpu.get("host_total")), _num(cpu.get("remote_total"))
    version = start.get("version")
    congestion = end.get("sender_tcp_congestion")
    return Iperf3Result(
        throughput_mbps=mbps(sum_received),
        sent_mbps=mbps(sum_sent),
        retransmits=_whole(sum_sent.get("retransmits")),
        # iperf3 reports RTTs in microseconds
        mean_rtt_ms=(sum(rtts) / len(rtts) / 1000.0) if rtts else None,
        cpu_sender_pct=remote_cpu if reverse else host_cpu,
        cpu_receiver_pct=host_cpu if reverse else remote_cpu,
        bytes=_whole(sum_received.get("bytes")),
        seconds=_num(sum_received.get("seconds")),
        reverse=reverse,
        streams=_whole(test_start.get("num_streams")),
        congestion=congestion if isinstance(congestion, str) else None,
        version=version if isinstance(version, str) else None,
    )


# --------------------------------------------------------------------------
# host TCP counters


@dataclass(frozen=True)
class TcpCounters:
    """The kernel's Tcp RetransSegs / OutSegs (per network namespace)."""

    retrans_segs: int
    out_segs: int


def tcp_delta(before: TcpCounters, after: TcpCounters) -> TcpCounters:
    """after - before; ValueError if a counter went backwards (different namespace?)."""
    diff = TcpCounters(after.retrans_segs - before.retrans_segs, after.out_segs - before.out_segs)
    if diff.retrans_segs < 0 or diff.out_segs < 0:
        raise ValueError(f"tcp counters went backwards: {before} -> {after}")
    return diff


def parse_proc_snmp(text: str) -> TcpCounters:
    """Parse the two "Tcp:" lines (names, then values) of /proc/net/snmp."""
    tcp = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    if len(tcp) < 2 or len(tcp[0]) != len(tcp[1]):
        raise ValueError("/proc/net/snmp has no Tcp: header/value pair")
    row = dict(zip(tcp[0], tcp[1], strict=False))
    try:
        return TcpCounters(retrans_segs=int(row["RetransSegs"]), out_segs=int(row["OutSegs"]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"/proc/net/snmp Tcp: line lacks {exc}") from None


def netns_exec_argv(netns: str | None, argv: list[str]) -> list[str]:
    """`argv` run inside `netns` (via `ip netns exec`), or unchanged for None."""
    name = validate_netns(netns)
    if name is None:
        return list(argv)
    return ["ip", "netns", "exec", name, *argv]


def read_tcp_counters(netns: str | None = None, timeout: float = 10.0) -> TcpCounters:
    """TCP counters of this namespace (or `netns`), read from /proc/net/snmp (no nstat state)."""
    if validate_netns(netns) is None:
        with open("/proc/net/snmp", encoding="ascii") as fh:
            return parse_proc_snmp(fh.read())
    # /proc/net follows the reader's namespace: read it from a process inside
    argv = netns_exec_argv(netns, ["cat", "/proc/net/snmp"])
    res = proc.run(argv, timeout=timeout, missing_hint="apt-get install iproute2")
    if res.rc != 0:
        raise LabError(f"reading /proc/net/snmp in netns {netns} failed: {res.stderr.strip()}")
    return parse_proc_snmp(res.stdout)


# --------------------------------------------------------------------------
# running the client here


def local_stream_argv(run: Iperf3Run, netns_client: str | None = None) -> list[str]:
    """The argv run_local_stream executes (recorded in results as the command used)."""
    if not run.json:
        raise ValueError("json: run_local_stream parses iperf3 -J output; json must be True")
    return netns_exec_argv(netns_client, iperf3_client_argv(run))


def run_local_stream(run: Iperf3Run, netns_client: str | None = None, timeout: float | None = None) -> Iperf3Result:
    """Run the iperf3 client here (optionally inside `netns_client`) and parse its result.

    Bounded: after `timeout` seconds (default duration + 30 s) the client's
    whole process group is killed and Iperf3Timeout raised. Any failure
    iperf3 reports raises Iperf3Error.
    """
    if timeout is None:
        timeout = run.duration_s + DEFAULT_GRACE_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout: must be a positive number of seconds, got {timeout!r}")
    argv = local_stream_argv(run, netns_client)
    # own session: on timeout the whole group (ip netns exec -> iperf3) goes
    res = proc.run(argv, timeout=timeout, missing_hint="apt-get install iperf3 iproute2")
    if res.timed_out:
        raise Iperf3Timeout(f"iperf3 to {run.server}:{run.port} did not finish within {timeout:g} s; killed")
    out = res.stdout
    if not out.strip() and res.rc != 0:
        tail = " | ".join(res.stderr.strip().splitlines()[-3:])
        raise Iperf3Error(f"iperf3 exited {res.rc} without output" + (f": {tail}" if tail else ""))
    return parse_iperf3(out)


# --------------------------------------------------------------------------
# one measured stream: iperf3 plus what the tap, its qdiscs and the kernel saw


@dataclass(frozen=True)
class StreamMeasurement:
    """iperf3's result and the device's counters around it (what the agent's `stream` verb replies).

    `qdiscs` are the per-qdisc deltas (root first, then per-queue children of
    a multiqueue tap's mq); `drops` the kernel's drop counts by reason during
    the run (lab.onhost.drops; None where the kernel cannot count them).
    """

    argv: list[str]
    iperf3: Iperf3Result
    dev: str | None
    before: DeviceCounters | None
    after: DeviceCounters | None
    delta: CountersDelta | None
    qdiscs: list[QdiscCounters]
    backlog_peak: BacklogPeak | None
    tcp: TcpCounters
    drops: dict[str, int] | None
    drops_error: str | None = None


def measure_stream(
    run: Iperf3Run,
    dev: str | None,
    netns: str | None = None,
    sample_ms: float = 10.0,
    timeout: float | None = None,
    count_drops: bool = True,
) -> StreamMeasurement:
    """Run the iperf3 client here with `dev`'s counters, qdisc backlog and drop reasons around it."""
    from lab.onhost import drops as drop_reasons

    argv = local_stream_argv(run, netns)
    sampler = BacklogSampler(dev, sample_ms, netns) if dev and sample_ms > 0 else None
    before = read_counters(dev, netns) if dev else None
    qd_before = read_qdiscs(dev, netns) if dev else []
    tcp_before = read_tcp_counters(netns)
    counter = drop_reasons.DropCounter() if count_drops and netns is None else None
    with counter if counter is not None else contextlib.nullcontext():
        if sampler is not None:
            sampler.start()
        try:
            result = run_local_stream(run, netns, timeout=timeout)
        finally:
            # the sampler thread must end whatever iperf3 did
            peak = sampler.stop() if sampler is not None else None
    tcp = tcp_delta(tcp_before, read_tcp_counters(netns))
    after = read_counters(dev, netns) if dev else None
    qd_after = read_qdiscs(dev, netns) if dev else []
    old = {(q.kind, q.handle, q.parent): q for q in qd_before}
    qdiscs = [qdisc_delta(old[(q.kind, q.handle, q.parent)], q) if (q.kind, q.handle, q.parent) in old else q for q in qd_after]
    return StreamMeasurement(
        argv=argv,
        iperf3=result,
        dev=dev,
        before=before,
        after=after,
        delta=delta(before, after) if before is not None and after is not None else None,
        qdiscs=qdiscs,
        backlog_peak=peak,
        tcp=tcp,
        drops=counter.counts if counter is not None else None,
        drops_error=counter.error if counter is not None else "not counted inside a network namespace",
    )
