"""The lab's hands on a host: `python -m lab.onhost.agent VERB [args]`.

Runs ON a host (the nested lab host shares this machine's root, so it is the
same code). Prints exactly one JSON object on stdout and exits 0; on any
error prints {"error": "...", "type": "..."} and exits 1, so the caller
(over SSH) never has to parse anything but one JSON line.

Verbs: tap-create, tap-delete, tap-list, txqueuelen, netem, qdisc, qdiscs,
counters, probe, tcp-counters, stream, modules, pktgen, udp-send,
bridge-create, bridge-delete, kmsg. Replies are the
dataclasses of lab.onhost (lab.onhost.wire); lab.hosts.agent_client turns them
back into those types. A global --netns NAME (before the verb) runs the verb
against that network namespace (tests use it; a lab host does not need it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from lab.onhost import net, traffic
from lab.onhost.wire import to_wire


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
    p.add_argument("--no-drops", action="store_true", help="do not count drops by reason (tracefs)")
    p.set_defaults(func=_stream)

    p = verbs.add_parser("qdisc", help="set a device's root qdisc (default, fq_codel, pfifo_fast, pfifo, fq, noqueue)")
    p.add_argument("--dev", type=devname, required=True)
    p.add_argument("--kind", type=_checked(_qdisc_kind, "kind"), required=True)
    p.set_defaults(func=_qdisc)

    p = verbs.add_parser("qdiscs", help="every qdisc of a device with its counters (root first)")
    p.add_argument("--dev", type=devname, required=True)
    p.set_defaults(func=_qdiscs)

    p = verbs.add_parser("modules", help="unload tun/tap/vhost/vhost_net and load those under --dir (verified by build-id)")
    p.add_argument("--dir", required=True, help="a lib/modules/<release> tree of a kernel artifact")
    p.add_argument("--param", action="append", default=[], help="<module>.<param>=<value> for insmod")
    p.set_defaults(func=_modules)

    p = verbs.add_parser("pktgen", help="drive a tap with the kernel's pktgen (queue_xmit, UDP)")
    p.add_argument("--dev", type=devname, required=True)
    p.add_argument("--dst-ip", required=True)
    p.add_argument("--dst-mac", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=_pktgen)

    p = verbs.add_parser("udp-send", help="a burst of UDP datagrams; how the kernel treated the sender")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, default=9)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--size", type=int, default=1400)
    p.add_argument("--nonblocking", action="store_true")
    p.add_argument("--send-timeout", type=float, default=5.0)
    p.add_argument("--total-timeout", type=float, default=60.0)
    p.add_argument("--multicast-if", default=None)
    p.set_defaults(func=_udp_send)

    p = verbs.add_parser("bridge-create", help="a bridge over lab taps (multicast floods; their addresses move to it)")
    p.add_argument("--name", type=ifname, required=True)
    p.add_argument("--port", type=ifname, action="append", required=True)
    p.set_defaults(func=_bridge_create)

    p = verbs.add_parser("bridge-delete", help="delete a bridge (absent is fine)")
    p.add_argument("--name", type=ifname, required=True)
    p.set_defaults(func=_bridge_delete)

    p = verbs.add_parser("kmsg", help="mark the kernel log, or read it since a mark")
    p.add_argument("--mark", default=None)
    p.add_argument("--since", default=None)
    p.set_defaults(func=_kmsg)
    return parser


def _qdisc_kind(value: str, field_name: str) -> str:
    from lab.config import QDISCS

    if value not in QDISCS:
        raise ValueError(f"{field_name}: {value!r} is not one of {', '.join(QDISCS)}")
    return value



def _tap_create(args: argparse.Namespace) -> Any:
    spec = net.TapDevice(
        name=args.name,
        txqueuelen=args.txqueuelen,
        vnet_hdr=args.vnet_hdr,
        multi_queue=args.multi_queue,
        owner=args.owner,
        netns=args.netns,
        address=args.address,
    )
    return net.create_tap(spec)


def _tap_delete(args: argparse.Namespace) -> Any:
    return {"name": args.name, "deleted": net.delete_tap(args.name, args.netns)}


def _tap_list(args: argparse.Namespace) -> Any:
    return {"taps": net.list_taps(args.prefix, args.netns)}


def _txqueuelen(args: argparse.Namespace) -> Any:
    return {"name": args.name, "txqueuelen": net.set_txqueuelen(args.name, args.value, args.netns)}


def _netem(args: argparse.Namespace) -> Any:
    if args.clear == (args.delay_ms is not None):
        raise UsageError("netem: give exactly one of --delay-ms or --clear")
    netem = None if args.clear else net.NetemDelay(args.delay_ms, limit=args.limit, jitter_ms=args.jitter_ms)
    net.set_netem(args.dev, netem, args.netns)
    return net.read_qdisc(args.dev, args.netns)


def _qdisc(args: argparse.Namespace) -> Any:
    return net.set_qdisc(args.dev, args.kind, args.netns)


def _qdiscs(args: argparse.Namespace) -> Any:
    return {"qdiscs": net.read_qdiscs(args.dev, args.netns)}


def _counters(args: argparse.Namespace) -> Any:
    return net.read_counters(args.dev, args.netns)


def _probe(args: argparse.Namespace) -> Any:
    from lab.onhost.probe import probe_kernel

    return probe_kernel()


def _tcp_counters(args: argparse.Namespace) -> Any:
    return traffic.read_tcp_counters(args.netns)


def _stream(args: argparse.Namespace) -> Any:
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
    return traffic.measure_stream(run, args.sample_dev, args.netns, args.sample_ms, args.timeout, count_drops=not args.no_drops)


def _modules(args: argparse.Namespace) -> Any:
    from lab.onhost import modules

    params: dict[str, list[str]] = {}
    for word in args.param:
        params.update({m: params.get(m, []) + v for m, v in modules.params_from_cmdline([word]).items()})
    return modules.swap(Path(args.dir), params)


def _pktgen(args: argparse.Namespace) -> Any:
    from lab.onhost import pktgen

    run = pktgen.PktgenRun(dev=args.dev, dst_ip=args.dst_ip, dst_mac=args.dst_mac, threads=args.threads,
                           count=args.count, size=args.size, timeout_s=args.timeout)
    return pktgen.measure_pktgen(run)


def _udp_send(args: argparse.Namespace) -> Any:
    from lab.onhost.udp import UdpSend, udp_send

    return udp_send(UdpSend(dst=args.dst, port=args.port, count=args.count, size=args.size, blocking=not args.nonblocking,
                            send_timeout_s=args.send_timeout, total_timeout_s=args.total_timeout, multicast_if=args.multicast_if))


def _bridge_create(args: argparse.Namespace) -> Any:
    return {"name": args.name, "moved": net.create_bridge(args.name, args.port, args.netns)}


def _bridge_delete(args: argparse.Namespace) -> Any:
    return {"name": args.name, "deleted": net.delete_bridge(args.name, args.netns)}


def _kmsg(args: argparse.Namespace) -> Any:
    from lab.onhost.udp import kernel_log_since, mark_kernel_log

    if args.mark:
        mark_kernel_log(args.mark)
    return {"lines": kernel_log_since(args.since) if args.since else []}


def run_verb(argv: list[str]) -> tuple[dict[str, Any], int]:
    """One verb's JSON reply and exit status (0 ok, 1 error)."""
    try:
        args = build_parser().parse_args(argv)
        return to_wire(args.func(args)), 0
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
