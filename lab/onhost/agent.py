"""The lab's hands on a host: `python -m lab.onhost.agent VERB [args]`.

Runs ON a host (the nested lab host shares this machine's root, so it is the
same code). Prints exactly one JSON object on stdout and exits 0; on any
error prints {"error": "...", "type": "..."} and exits 1, so the caller
(over SSH) never has to parse anything but one JSON line.

Verbs: tap-create, tap-delete, tap-list, txqueuelen, netem, counters,
tcp-counters, stream. A global --netns NAME (before the verb) runs the verb
against that network namespace (tests use it; a lab host does not need it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any, NoReturn

from lab.onhost import net, traffic


class UsageError(Exception):
    """argparse's complaint, reported as JSON like every other error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _checked(validator: Any, field_name: str) -> Any:
    def convert(value: str) -> Any:
        try:
            return validator(value, field_name)
        except ValueError as exc:
            # ArgumentTypeError keeps our message; a ValueError would be replaced by argparse
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = field_name
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The agent's argparse parser (one subcommand per verb)."""
    ifname = _checked(net.validate_ifname, "name")
    devname = _checked(net.validate_ifname, "dev")
    parser = _Parser(prog="python -m lab.onhost.agent", description="The lab's hands on a host: one verb, one JSON object.")
    parser.add_argument("--netns", type=_checked(net.validate_netns, "netns"), default=None,
                        help="act inside this network namespace (/run/netns name)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("tap-create", help="create (or replace) a persistent tap, up")
    p.add_argument("--name", type=ifname, required=True)
    p.add_argument("--txqueuelen", type=int, default=1000)
    p.add_argument("--vnet-hdr", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--multi-queue", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--owner", type=int, default=None, help="uid allowed to open the tap")
    p.add_argument("--address", default=None, help="CIDR for the host side, e.g. 10.0.0.1/24")
    p.set_defaults(func=_tap_create)

    p = verbs.add_parser("tap-delete", help="delete a tap (absent is fine)")
    p.add_argument("--name", type=ifname, required=True)
    p.set_defaults(func=_tap_delete)

    p = verbs.add_parser("tap-list", help="taps whose name starts with a prefix")
    p.add_argument("--prefix", type=_checked(net.validate_ifname, "prefix"), required=True)
    p.set_defaults(func=_tap_list)

    p = verbs.add_parser("txqueuelen", help="set a device's txqueuelen")
    p.add_argument("--name", type=ifname, required=True)
    p.add_argument("--value", type=int, required=True)
    p.set_defaults(func=_txqueuelen)

    p = verbs.add_parser("netem", help="netem delay as root qdisc, or --clear back to the default")
    p.add_argument("--dev", type=devname, required=True)
    p.add_argument("--delay-ms", type=float, default=None)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--clear", action="store_true")
    p.set_defaults(func=_netem)

    p = verbs.add_parser("counters", help="device + root qdisc counters")
    p.add_argument("--dev", type=devname, required=True)
    p.set_defaults(func=_counters)

    p = verbs.add_parser("probe", help="what this kernel offers the lab (lab.onhost.probe)")
    p.set_defaults(func=_probe)

    p = verbs.add_parser("tcp-counters", help="Tcp RetransSegs/OutSegs of the namespace")
    p.set_defaults(func=_tcp_counters)

    p = verbs.add_parser("stream", help="run the iperf3 client here, with counters and backlog sampling")
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=5201)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--congestion", default="")
    p.add_argument("--length", default="")
    p.add_argument("--reverse", action="store_true")
    p.add_argument("--bind", default=None)
    p.add_argument("--connect-timeout-ms", type=int, default=None)
    p.add_argument("--sample-dev", type=devname, default=None,
                   help="device whose counters and root qdisc backlog are measured")
    p.add_argument("--sample-ms", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=None, help="seconds; default duration + 30")
    p.set_defaults(func=_stream)
    return parser


def _tap_create(args: argparse.Namespace) -> dict[str, Any]:
    spec = net.TapDevice(
        name=args.name,
        txqueuelen=args.txqueuelen,
        vnet_hdr=args.vnet_hdr,
        multi_queue=args.multi_queue,
        owner=args.owner,
        netns=args.netns,
        address=args.address,
    )
    return {"tap": asdict(net.create_tap(spec))}


def _tap_delete(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": args.name, "deleted": net.delete_tap(args.name, args.netns)}


def _tap_list(args: argparse.Namespace) -> dict[str, Any]:
    return {"taps": [asdict(t) for t in net.list_taps(args.prefix, args.netns)]}


def _txqueuelen(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": args.name, "txqueuelen": net.set_txqueuelen(args.name, args.value, args.netns)}


def _netem(args: argparse.Namespace) -> dict[str, Any]:
    if args.clear == (args.delay_ms is not None):
        raise UsageError("netem: give exactly one of --delay-ms or --clear")
    netem = None if args.clear else net.NetemDelay(args.delay_ms, limit=args.limit, jitter_ms=args.jitter_ms)
    net.set_netem(args.dev, netem, args.netns)
    return {
        "dev": args.dev,
        "netem": None if netem is None else asdict(netem),
        "qdisc": asdict(net.read_qdisc(args.dev, args.netns)),
    }


def _counters(args: argparse.Namespace) -> dict[str, Any]:
    return asdict(net.read_counters(args.dev, args.netns))


def _probe(args: argparse.Namespace) -> dict[str, Any]:
    from lab.onhost.probe import probe_kernel

    return probe_kernel().to_dict()


def _tcp_counters(args: argparse.Namespace) -> dict[str, Any]:
    return asdict(traffic.read_tcp_counters(args.netns))


def _stream(args: argparse.Namespace) -> dict[str, Any]:
    run = traffic.Iperf3Run(
        server=args.server,
        port=args.port,
        duration_s=args.duration,
        streams=args.streams,
        congestion=args.congestion,
        length=args.length,
        reverse=args.reverse,
        bind=args.bind,
        connect_timeout_ms=args.connect_timeout_ms,
    )
    argv = traffic.local_stream_argv(run, args.netns)
    dev = args.sample_dev
    sampler = net.BacklogSampler(dev, args.sample_ms, args.netns) if dev else None
    before = net.read_counters(dev, args.netns) if dev else None
    tcp_before = traffic.read_tcp_counters(args.netns)
    if sampler is not None:
        sampler.start()
    try:
        result = traffic.run_local_stream(run, args.netns, timeout=args.timeout)
    finally:
        # the sampler thread must end whatever iperf3 did
        peak = sampler.stop() if sampler is not None else None
    tcp_after = traffic.read_tcp_counters(args.netns)
    tcp = traffic.tcp_delta(tcp_before, tcp_after)
    after = net.read_counters(dev, args.netns) if dev else None
    d = net.delta(before, after) if before is not None and after is not None else None
    counters = None
    if before is not None and after is not None and d is not None:
        counters = {"before": asdict(before), "after": asdict(after), "delta": asdict(d)}
    return {
        "argv": argv,
        "iperf3": asdict(result),
        "dev": dev,
        "counters": counters,
        "backlog_peak": None if peak is None else asdict(peak),
        "tcp": {"before": asdict(tcp_before), "after": asdict(tcp_after), "delta": asdict(tcp)},
        # the results.jsonl keys this run measures (docs/CONTRACTS.md)
        "fields": {
            "throughput_mbps": result.throughput_mbps,
            "retransmits": result.retransmits,
            "host_retrans_segs": tcp.retrans_segs,
            "tcp_out_segs": tcp.out_segs,
            "tap_tx_dropped": None if d is None else d.tap.tx_dropped,
            "tap_tx_packets": None if d is None else d.tap.tx_packets,
            "qdisc_drops": None if d is None else d.qdisc.drops,
            "qdisc_requeues": None if d is None else d.qdisc.requeues,
            "qdisc_overlimits": None if d is None else d.qdisc.overlimits,
            # packets: txqueuelen and qdisc limits are in packets too
            "qdisc_backlog_peak": None if peak is None else peak.backlog_packets,
            "measured_rtt_ms": result.mean_rtt_ms,
            "cpu_sender_pct": result.cpu_sender_pct,
            "cpu_receiver_pct": result.cpu_receiver_pct,
        },
    }


def run_verb(argv: list[str]) -> tuple[dict[str, Any], int]:
    """One verb's JSON reply and exit status (0 ok, 1 error)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args), 0
    except Exception as exc:
        return {"error": str(exc) or type(exc).__name__, "type": type(exc).__name__}, 1


def serve(stdin: Any = None, stdout: Any = None) -> int:
    """`python -m lab.onhost.agent serve`: one verb per input line (a JSON argv list), one JSON reply per line.

    Under TCG, starting Python and importing pyroute2 on a lab host costs
    seconds; a session keeps one agent per host for all of a run's calls.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        try:
            argv = json.loads(line)
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("a request is a JSON list of strings")
            if argv[:1] == ["serve"]:
                raise ValueError("serve cannot be nested")
            reply, _ = run_verb(argv)
        except ValueError as exc:
            reply = {"error": f"bad request: {exc}", "type": "UsageError"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one verb; print one JSON object; 0 on success, 1 on any error."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve()
    out, rc = run_verb(argv)
    print(json.dumps(out))
    return rc


if __name__ == "__main__":
    sys.exit(main())
