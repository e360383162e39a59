"""Taps, txqueuelen, root qdiscs (netem) and counters, through pyroute2.

Runs on the host that owns the tap (the lab host, or this machine in tests).
Every public function takes an optional ``netns``: the name of a network
namespace under /run/netns, so tests can work inside namespaces they create
and never touch the machine's own links.

pyroute2 (0.9.x) details this module relies on, found by trying them:

* ``IPRoute(netns=NAME)`` *creates* the namespace when it is missing (its
  default ``flags=os.O_CREAT``); we pass ``flags=0`` so a typo is an error
  instead of a stray namespace.
* taps are created with ``kind="tuntap"`` and an ``ifr`` dict of flags
  (``{"no_pi": 1, "vnet_hdr": 1, "multi_queue": 0}``): pyroute2 turns that
  into the TUNSETIFF/TUNSETPERSIST ioctls (in a forked child for a netns).
  Top-level ``vnet_hdr=``/``multi_queue=`` keywords are not understood.
  Without ``ifr`` the tap gets no IFF_NO_PI. The kernel then reports the
  link's kind as ``"tun"`` (not ``"tuntap"``) with IFLA_TUN_* info data.
* ``link("set", txqueuelen=N)`` is silently ignored: the keyword is ``txqlen``.
* netem's ``delay``/``jitter`` are microseconds (integers), not tc's "60ms".
* An unknown qdisc kind (no sch_netem) is NetlinkError ENOENT, the same code
  as "no such qdisc" when deleting the default root qdisc.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Self

from lab.errors import LabError, MissingPiece

# Linux IFNAMSIZ is 16 including the NUL: 15 visible bytes. No "/" (sysfs
# paths) and no leading "-" (would read as an option to ip/tc).
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
# Names under /run/netns. pyroute2 also accepts paths, which we never want.
NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
QDISC_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,15}$")

TC_H_ROOT = 0xFFFFFFFF
U32_MAX = 2**32 - 1
# tun_flags bits (include/uapi/linux/if_tun.h)
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# netem's tc_netem_qopt.latency is a u32 in psched ticks (64 ns): ~274 s.
NETEM_MAX_MS = 274_000.0


class NetError(LabError):
    """A netlink operation on a device failed; the message names device and step."""


class DeviceNotFound(NetError):
    """The named device does not exist (in the given namespace)."""


# --------------------------------------------------------------------------
# validation


def validate_ifname(name: object, field_name: str = "name") -> str:
    """Return `name` if it is a safe Linux interface name, else ValueError naming the field."""
    if not isinstance(name, str) or not IFNAME_RE.fullmatch(name):
        raise ValueError(
            f"{field_name}: {name!r} is not an interface name "
            "(1-15 characters [A-Za-z0-9_.-], starting with a letter or digit)"
        )
    return name


def validate_netns(netns: object, field_name: str = "netns") -> str | None:
    """Return `netns` (a /run/netns name) or None; ValueError naming the field otherwise."""
    if netns is None:
        return None
    if not isinstance(netns, str) or not NETNS_RE.fullmatch(netns):
        raise ValueError(f"{field_name}: {netns!r} is not a network namespace name")
    return netns


def _validate_uint(value: object, field_name: str, minimum: int = 0, maximum: int = U32_MAX) -> int:
    # bool is an int subclass; True as a txqueuelen is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field_name}: must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{field_name}: must be in [{minimum}, {maximum}], got {value}")
    return value


def _validate_ms(value: object, field_name: str, maximum: float = NETEM_MAX_MS) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field_name}: must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field_name}: must be finite and >= 0, got {value}")
    if value > maximum:
        raise ValueError(f"{field_name}: must be <= {maximum:g}, got {value}")
    return float(value)


# --------------------------------------------------------------------------
# netlink plumbing


@contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    """An IPRoute bound to `netns` (None: this process's namespace)."""
    from pyroute2 import IPRoute  # imported late: unit tests of pure helpers need no netlink

    validate_netns(netns)
    if netns is None:
        ipr = IPRoute()
    else:
        try:
            # flags=0: do not create a missing namespace (pyroute2's default does).
            ipr = IPRoute(netns=netns, flags=0)
        except FileNotFoundError:
            raise NetError(f"network namespace {netns!r} does not exist", hint=f"ip netns add {netns}") from None
    try:
        yield ipr
    finally:
        ipr.close()


def _where(name: str, netns: str | None) -> str:
    return f"{name} (netns {netns})" if netns else name


def _lookup(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _index(ipr: Any, name: str, netns: str | None) -> int:
    idx = _lookup(ipr, name)
    if idx is None:
        raise DeviceNotFound(f"no device {_where(name, netns)}")
    return idx


def _get_link(ipr: Any, idx: int) -> Any:
    return ipr.get_links(idx)[0]


def _tun_info(link: Any) -> dict[str, Any] | None:
    """IFLA_TUN_* attributes of a tun/tap link, or None for other kinds."""
    linkinfo = link.get_attr("IFLA_LINKINFO")
    if linkinfo is None or linkinfo.get_attr("IFLA_INFO_KIND") != "tun":
        return None
    data = linkinfo.get_attr("IFLA_INFO_DATA")
    if data is None:
        return {}
    return {name: value for name, value in data["attrs"]}


def _netlink_errno(exc: BaseException) -> int | None:
    from pyroute2.netlink.exceptions import NetlinkError

    if isinstance(exc, NetlinkError):
        return exc.code
    if isinstance(exc, OSError):
        return exc.errno
    return None


# --------------------------------------------------------------------------
# taps


@dataclass(frozen=True)
class TapDevice:
    """A persistent tap as the lab wants it (or as read back from the kernel).

    `owner` is the uid allowed to open it without CAP_NET_ADMIN (None: root
    only); `address` an optional CIDR ("10.0.0.1/24") put on the host side.
    """

    name: str
    txqueuelen: int = 1000
    vnet_hdr: bool = True
    multi_queue: bool = False
    owner: int | None = None
    netns: str | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        validate_ifname(self.name, "name")
        _validate_uint(self.txqueuelen, "txqueuelen")
        for flag in ("vnet_hdr", "multi_queue"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: must be a bool, got {getattr(self, flag)!r}")
        if self.owner is not None:
            _validate_uint(self.owner, "owner", 0, U32_MAX - 1)
        validate_netns(self.netns)
        if self.address is not None:
            try:
                iface = ipaddress.ip_interface(self.address)
            except ValueError:
                raise ValueError(f"address: {self.address!r} is not an address/prefix (CIDR)") from None
            if "/" not in self.address:
                raise ValueError(f"address: {self.address!r} needs a prefix length, e.g. {iface.ip}/24")


def _tap_from_link(link: Any, netns: str | None) -> TapDevice | None:
    info = _tun_info(link)
    if info is None or info.get("IFLA_TUN_TYPE") != 2:  # 1 = tun, 2 = tap
        return None
    return TapDevice(
        name=link.get_attr("IFLA_IFNAME"),
        txqueuelen=link.get_attr("IFLA_TXQLEN"),
        vnet_hdr=bool(info.get("IFLA_TUN_VNET_HDR")),
        multi_queue=bool(info.get("IFLA_TUN_MULTI_QUEUE")),
        owner=info.get("IFLA_TUN_OWNER"),
        netns=netns,
    )


def read_tun_flags(name: str) -> int | None:
    """The tap's /sys/class/net/NAME/tun_flags in *this* process's namespace, or None.

    sysfs shows the namespace it was mounted in, so this is only meaningful
    for netns=None; create_tap checks the same bits over netlink everywhere.
    """
    validate_ifname(name)
    try:
        with open(f"/sys/class/net/{name}/tun_flags", encoding="ascii") as fh:
            return int(fh.read().strip(), 16)
    except (FileNotFoundError, ValueError):
        return None


def create_tap(spec: TapDevice) -> TapDevice:
    """Create the persistent tap `spec` (replacing a leftover tap of that name), up.

    Sets txqueuelen, brings the link up, adds `spec.address`, then reads the
    tap back and checks that the kernel really has the requested flags.
    Returns the tap as read back (with `address` as requested).
    Refuses (NetError) to replace a device of that name that is not a tap.
    """
    netns = spec.netns
    where = _where(spec.name, netns)
    with _ipr(netns) as ipr:
        old = _lookup(ipr, spec.name)
        if old is not None:
            if _tap_from_link(_get_link(ipr, old), netns) is None:
                raise NetError(f"{where} exists and is not a tap; not replacing it")
            ipr.link("del", index=old)
        ifr = {"no_pi": 1, "vnet_hdr": int(spec.vnet_hdr), "multi_queue": int(spec.multi_queue)}
        extra: dict[str, Any] = {} if spec.owner is None else {"uid": spec.owner}
        try:
            ipr.link("add", ifname=spec.name, kind="tuntap", mode="tap", ifr=ifr, **extra)
        except Exception as exc:
            code = _netlink_errno(exc)
            if code == errno.ENOENT:
                raise MissingPiece("cannot create a tap: /dev/net/tun is missing", hint="modprobe tun") from exc
            raise NetError(f"creating tap {where} failed: {exc}") from exc
        try:
            idx = _index(ipr, spec.name, netns)
            ipr.link("set", index=idx, txqlen=spec.txqueuelen)
            ipr.link("set", index=idx, state="up")
            if spec.address is not None:
                iface = ipaddress.ip_interface(spec.address)
                ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            got = _tap_from_link(_get_link(ipr, idx), netns)
            _check_tap(spec, got)
        except BaseException:
            # never leave a half-configured tap behind
            try:
                ipr.link("del", ifname=spec.name)
            except Exception:
                pass
            raise
    if netns is None:
        flags = read_tun_flags(spec.name)
        if flags is not None and bool(flags & IFF_VNET_HDR) != spec.vnet_hdr:
            delete_tap(spec.name)
            raise NetError(f"tap {where}: tun_flags {flags:#x} disagree with vnet_hdr={spec.vnet_hdr}")
    assert got is not None
    return TapDevice(
        name=got.name,
        txqueuelen=got.txqueuelen,
        vnet_hdr=got.vnet_hdr,
        multi_queue=got.multi_queue,
        owner=got.owner,
        netns=netns,
        address=spec.address,
    )


def _check_tap(spec: TapDevice, got: TapDevice | None) -> None:
    where = _where(spec.name, spec.netns)
    if got is None:
        raise NetError(f"{where} was created but does not read back as a tap")
    wrong = [
        f"{key}={getattr(got, key)!r} (wanted {getattr(spec, key)!r})"
        for key in ("txqueuelen", "vnet_hdr", "multi_queue")
        if getattr(got, key) != getattr(spec, key)
    ]
    if spec.owner is not None and got.owner != spec.owner:
        wrong.append(f"owner={got.owner!r} (wanted {spec.owner!r})")
    if wrong:
        raise NetError(f"tap {where} came out wrong: " + ", ".join(wrong))


def delete_tap(name: str, netns: str | None = None) -> bool:
    """Delete the tap `name`; True if one was deleted, False if there was none.

    Refuses (NetError) to delete a device that is not a tap.
    """
    validate_ifname(name)
    with _ipr(netns) as ipr:
        idx = _lookup(ipr, name)
        if idx is None:
            return False
        if _tap_from_link(_get_link(ipr, idx), netns) is None:
            raise NetError(f"{_where(name, netns)} is not a tap; not deleting it")
        try:
            ipr.link("del", index=idx)
        except Exception as exc:
            if _netlink_errno(exc) == errno.ENODEV:  # raced with another deleter
                return False
            raise NetError(f"deleting tap {_where(name, netns)} failed: {exc}") from exc
    return True


def set_txqueuelen(name: str, n: int, netns: str | None = None) -> int:
    """Set the device's txqueuelen (for a tap: also its ptr_ring size); returns it as read back."""
    validate_ifname(name)
    _validate_uint(n, "txqueuelen")
    with _ipr(netns) as ipr:
        idx = _index(ipr, name, netns)
        ipr.link("set", index=idx, txqlen=n)
        got = _get_link(ipr, idx).get_attr("IFLA_TXQLEN")
    if got != n:
        raise NetError(f"{_where(name, netns)}: txqueuelen reads back {got}, wanted {n}")
    return got


def list_taps(prefix: str, netns: str | None = None) -> list[TapDevice]:
    """The taps whose names start with `prefix` (a lab's name), sorted by name.

    The prefix must be a non-empty interface-name prefix, so a cleanup built
    on this can never sweep every tap on the machine.
    """
    validate_ifname(prefix, "prefix")
    taps: list[TapDevice] = []
    with _ipr(netns) as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if not name or not name.startswith(prefix):
                continue
            tap = _tap_from_link(link, netns)
            if tap is not None:
                taps.append(tap)
    return sorted(taps, key=lambda t: t.name)


# --------------------------------------------------------------------------
# qdiscs


@dataclass(frozen=True)
class NetemDelay:
    """`tc qdisc replace dev X root netem delay <delay_ms>ms [<jitter_ms>ms] limit <limit>`."""

    delay_ms: float
    limit: int = 1000
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        _validate_ms(self.delay_ms, "delay_ms")
        _validate_ms(self.jitter_ms, "jitter_ms")
        # limit 0 would make netem drop every packet: never what a delay wants.
        _validate_uint(self.limit, "limit", 1)


def netem_tc_kwargs(netem: NetemDelay) -> dict[str, int]:
    """pyroute2 tc() keywords for `netem`: delay/jitter in integer microseconds."""
    return {
        "delay": round(netem.delay_ms * 1000),
        "jitter": round(netem.jitter_ms * 1000),
        "limit": netem.limit,
    }


def set_netem(dev: str, netem: NetemDelay | None, netns: str | None = None) -> None:
    """Put a netem delay as `dev`'s root qdisc; None restores the default root qdisc.

    Raises MissingPiece when the kernel has no netem (CONFIG_NET_SCH_NETEM).
    """
    if netem is None:
        clear_root_qdisc(dev, netns)
        return
    if not isinstance(netem, NetemDelay):
        raise ValueError(f"netem: expected NetemDelay or None, got {netem!r}")
    try:
        set_root_qdisc(dev, "netem", netns, **netem_tc_kwargs(netem))
    except NetError as exc:
        if isinstance(exc.__cause__, BaseException) and _netlink_errno(exc.__cause__) == errno.ENOENT:
            raise MissingPiece(
                f"{_where(dev, netns)}: this kernel has no netem qdisc", hint="modprobe sch_netem"
            ) from exc
        raise


def _check_tc_param(key: str, value: object) -> None:
    if not re.fullmatch(r"^[a-z_][a-z0-9_]*$", key):
        raise ValueError(f"{key!r}: not a qdisc parameter name")
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{key}: must be finite and >= 0, got {value}")
        return
    if isinstance(value, str):
        # tc-style quantities: "10mbit", "50ms", "1500", "1.5kb"
        if not re.fullmatch(r"^[0-9]+(\.[0-9]+)?[A-Za-z]{0,5}$", value):
            raise ValueError(f"{key}: {value!r} is not a tc quantity")
        return
    raise ValueError(f"{key}: unsupported value {value!r}")


def set_root_qdisc(dev: str, kind: str, netns: str | None = None, **params: Any) -> None:
    """`tc qdisc replace dev DEV root KIND params...` (e.g. pfifo limit=5; tbf rate=, burst=, latency=).

    Parameters are pyroute2's for that kind (netem: delay/jitter in µs).
    """
    validate_ifname(dev, "dev")
    if not isinstance(kind, str) or not QDISC_KIND_RE.fullmatch(kind):
        raise ValueError(f"kind: {kind!r} is not a qdisc kind")
    for key, value in params.items():
        _check_tc_param(key, value)
    with _ipr(netns) as ipr:
        idx = _index(ipr, dev, netns)
        try:
            ipr.tc("replace", kind, idx, **params)
        except Exception as exc:
            raise NetError(f"{_where(dev, netns)}: setting root qdisc {kind} failed: {exc}") from exc


def clear_root_qdisc(dev: str, netns: str | None = None) -> bool:
    """Delete `dev`'s root qdisc (the kernel puts its default back); False if it already was the default."""
    validate_ifname(dev, "dev")
    with _ipr(netns) as ipr:
        idx = _index(ipr, dev, netns)
        try:
            ipr.tc("del", index=idx, parent=TC_H_ROOT)
        except Exception as exc:
            # ENOENT: the default root qdisc (handle 0) cannot be deleted: nothing to undo.
            if _netlink_errno(exc) == errno.ENOENT:
                return False
            raise NetError(f"{_where(dev, netns)}: deleting the root qdisc failed: {exc}") from exc
    return True


# --------------------------------------------------------------------------
# counters


@dataclass(frozen=True)
class TapCounters:
    """The device's rtnl_link_stats64 (for a tap: tx = toward the guest)."""

    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    tx_fifo_errors: int = 0


@dataclass(frozen=True)
class QdiscCounters:
    """The root qdisc's gnet stats (`tc -s qdisc show dev X root`).

    `backlog_packets` and `qlen` are the same kernel number (tc prints it as
    "backlog Nb Mp"); both names are kept because callers think in either.
    """

    kind: str = ""
    handle: int = 0
    parent: int = TC_H_ROOT  # a multiqueue device's mq root has one child per tx queue
    drops: int = 0
    requeues: int = 0
    overlimits: int = 0
    backlog_bytes: int = 0
    backlog_packets: int = 0
    qlen: int = 0
    sent_packets: int = 0
    sent_bytes: int = 0


@dataclass(frozen=True)
class DeviceCounters:
    """Device and root-qdisc counters read together; `at` is time.monotonic()."""

    dev: str
    ifindex: int
    tap: TapCounters
    qdisc: QdiscCounters
    at: float


@dataclass(frozen=True)
class CountersDelta:
    """after - before. Qdisc gauges (backlog, qlen) are the `after` values, not differences."""

    dev: str
    seconds: float
    tap: TapCounters
    qdisc: QdiscCounters


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _tap_counters(link: Any) -> TapCounters:
    stats = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS") or {}
    return TapCounters(**{f.name: _int(stats.get(f.name)) for f in TapCounters.__dataclass_fields__.values()})


def _qdisc_counters(msg: Any) -> QdiscCounters:
    """One tc message's counters."""
    basic: dict[str, Any] = {}
    queue: dict[str, Any] = {}
    stats2 = msg.get_attr("TCA_STATS2")
    if stats2 is not None:
        basic = stats2.get_attr("TCA_STATS_BASIC") or {}
        queue = stats2.get_attr("TCA_STATS_QUEUE") or {}
    if not queue:
        # old-style TCA_STATS carries the same numbers
        legacy = msg.get_attr("TCA_STATS") or {}
        basic = basic or legacy
        queue = {"qlen": legacy.get("qlen"), "backlog": legacy.get("backlog"), "drops": legacy.get("drop"),
                 "overlimits": legacy.get("overlimits")}
    qlen = _int(queue.get("qlen"))
    return QdiscCounters(
        kind=msg.get_attr("TCA_KIND") or "",
        handle=msg["handle"],
        parent=msg["parent"],
        drops=_int(queue.get("drops")),
        requeues=_int(queue.get("requeues")),
        overlimits=_int(queue.get("overlimits")),
        backlog_bytes=_int(queue.get("backlog")),
        backlog_packets=qlen,
        qlen=qlen,
        sent_packets=_int(basic.get("packets")),
        sent_bytes=_int(basic.get("bytes")),
    )


def _root_qdisc_counters(msgs: Any) -> QdiscCounters | None:
    for msg in msgs:
        if msg["parent"] == TC_H_ROOT:
            return _qdisc_counters(msg)
    return None


def _read_root_qdisc(ipr: Any, idx: int, dev: str, netns: str | None) -> QdiscCounters:
    # pyroute2 may filter a dump client-side; keep only this device's messages.
    msgs = [m for m in ipr.tc("dump", index=idx) if m["index"] == idx]
    counters = _root_qdisc_counters(msgs)
    if counters is None:
        raise NetError(f"{_where(dev, netns)} has no root qdisc")
    return counters


def read_qdisc(dev: str, netns: str | None = None) -> QdiscCounters:
    """Counters of `dev`'s root qdisc."""
    validate_ifname(dev, "dev")
    with _ipr(netns) as ipr:
        return _read_root_qdisc(ipr, _index(ipr, dev, netns), dev, netns)


def read_qdiscs(dev: str, netns: str | None = None) -> list[QdiscCounters]:
    """Every qdisc of `dev`: the root first, then its children (per tx queue under mq), by handle."""
    validate_ifname(dev, "dev")
    with _ipr(netns) as ipr:
        idx = _index(ipr, dev, netns)
        msgs = [m for m in ipr.tc("dump", index=idx) if m["index"] == idx]
    out = [_qdisc_counters(m) for m in msgs]
    return sorted(out, key=lambda q: (q.parent != TC_H_ROOT, q.parent, q.handle))


def set_qdisc(dev: str, kind: str, netns: str | None = None) -> QdiscCounters:
    """Make `kind` the root qdisc of `dev` ("default": the kernel's own choice); returns it as read back.

    "noqueue" is what libvirt gives the taps it manages: no queue at all, so a
    stopped tx queue cannot hold a backlog there.
    """
    if kind == "default":
        clear_root_qdisc(dev, netns)
    else:
        try:
            set_root_qdisc(dev, kind, netns)
        except NetError as exc:
            if isinstance(exc.__cause__, BaseException) and _netlink_errno(exc.__cause__) == errno.ENOENT:
                raise MissingPiece(f"{_where(dev, netns)}: this kernel has no {kind} qdisc", hint=f"modprobe sch_{kind}") from exc
            raise
    got = read_qdisc(dev, netns)
    if kind != "default" and got.kind != kind:
        raise NetError(f"{_where(dev, netns)}: root qdisc reads back as {got.kind!r}, wanted {kind!r}")
    return got


def read_counters(dev: str, netns: str | None = None) -> DeviceCounters:
    """Device counters (stats64) and root qdisc counters of `dev`, read back to back."""
    validate_ifname(dev, "dev")
    with _ipr(netns) as ipr:
        idx = _index(ipr, dev, netns)
        tap = _tap_counters(_get_link(ipr, idx))
        qdisc = _read_root_qdisc(ipr, idx, dev, netns)
    return DeviceCounters(dev=dev, ifindex=idx, tap=tap, qdisc=qdisc, at=time.monotonic())


_QDISC_GAUGES = ("backlog_bytes", "backlog_packets", "qlen")
_QDISC_IDENTITY = ("kind", "handle", "parent")


def qdisc_delta(bq: QdiscCounters, aq: QdiscCounters) -> QdiscCounters:
    """after - before for one qdisc; gauges are `after`'s. A qdisc replaced in between
    (kind or handle changed) restarted its counters, so `after` is the change."""
    if (bq.kind, bq.handle) != (aq.kind, aq.handle):
        return aq
    q_diff: dict[str, Any] = {k: getattr(aq, k) for k in _QDISC_IDENTITY}
    for name in QdiscCounters.__dataclass_fields__:
        if name in q_diff:
            continue
        if name in _QDISC_GAUGES:
            q_diff[name] = getattr(aq, name)
        else:
            # a u32 kernel counter may wrap during a long run
            q_diff[name] = (getattr(aq, name) - getattr(bq, name)) % (2**32 if name != "sent_bytes" else 2**64)
    return QdiscCounters(**q_diff)


def delta(before: DeviceCounters, after: DeviceCounters) -> CountersDelta:
    """The counters' change from `before` to `after` (same device).

    If the root qdisc was replaced in between (kind or handle changed), its
    counters restarted from zero, so the `after` values are the change.
    Raises ValueError if the device itself was recreated or counters went backwards.
    """
    if before.dev != after.dev or before.ifindex != after.ifindex:
        raise ValueError(
            f"delta: {before.dev}#{before.ifindex} and {after.dev}#{after.ifindex} are not the same device"
        )
    tap_diff = {}
    for name in TapCounters.__dataclass_fields__:
        d = getattr(after.tap, name) - getattr(before.tap, name)
        if d < 0:
            raise ValueError(f"delta: {after.dev} {name} went backwards ({getattr(before.tap, name)} -> "
                             f"{getattr(after.tap, name)})")
        tap_diff[name] = d
    qdisc = qdisc_delta(before.qdisc, after.qdisc)
    return CountersDelta(dev=after.dev, seconds=after.at - before.at, tap=TapCounters(**tap_diff), qdisc=qdisc)


# --------------------------------------------------------------------------
# backlog sampling


@dataclass(frozen=True)
class BacklogPeak:
    """Largest root-qdisc backlog seen while sampling; `error` if sampling stopped early."""

    backlog_bytes: int
    backlog_packets: int
    samples: int
    error: str | None = None


def _become_idle_thread() -> None:
    # sched_setscheduler(0, ...) sets the calling thread's policy on Linux;
    # where it is refused, sampling just goes on at normal priority.
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


@dataclass
class BacklogSampler:
    """Samples `dev`'s root qdisc backlog every `interval_ms` in a thread.

    ``start()`` begins, ``stop()`` returns the BacklogPeak. Also a context
    manager (``with BacklogSampler("tap0") as s: ...; s.peak``). The thread
    owns its own netlink socket (pyroute2 sockets are not shared across threads).
    """

    dev: str
    interval_ms: float = 10.0
    netns: str | None = None
    # Sample only when a CPU would otherwise idle (SCHED_IDLE). Under TCG one
    # pyroute2 qdisc dump costs ~50 ms of a lab host vCPU; at normal priority
    # the sampler took 35 % of the tap path's throughput (10 ms) or 18 %
    # (100 ms), measured (benchmarks/datapath_bench.py, README).
    idle_priority: bool = True
    peak: BacklogPeak | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _bytes: int = field(default=0, init=False, repr=False)
    _packets: int = field(default=0, init=False, repr=False)
    _samples: int = field(default=0, init=False, repr=False)
    _error: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        validate_ifname(self.dev, "dev")
        validate_netns(self.netns)
        _validate_ms(self.interval_ms, "interval_ms", 10_000.0)
        if self.interval_ms < 1:
            raise ValueError(f"interval_ms: must be >= 1, got {self.interval_ms}")

    def start(self) -> Self:
        """Start sampling; returns once the first sample is taken (or sampling failed)."""
        if self._thread is not None:
            raise RuntimeError("BacklogSampler already started")
        self._thread = threading.Thread(target=self._run, name=f"backlog-{self.dev}", daemon=True)
        self._thread.start()
        # so the caller's traffic never starts before the sampler watches
        self._ready.wait(timeout=10)
        return self

    def stop(self) -> BacklogPeak:
        """Stop sampling and return the peak (taking one last sample first)."""
        if self._thread is None:
            raise RuntimeError("BacklogSampler was not started")
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive() and self._error is None:
            self._error = "sampler thread did not stop within 10 s"
        self.peak = BacklogPeak(self._bytes, self._packets, self._samples, self._error)
        return self.peak

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            with root_qdisc_reader(self.dev, self.netns) as read:
                self._take(read())
                self._ready.set()
                if self.idle_priority:
                    _become_idle_thread()
                while True:
                    if self._stop.wait(self.interval_ms / 1000.0):
                        self._take(read())  # one more sample after stop(): the tail of the run counts too
                        return
                    self._take(read())
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    def _take(self, q: QdiscCounters) -> None:
        self._bytes = max(self._bytes, q.backlog_bytes)
        self._packets = max(self._packets, q.backlog_packets)
        self._samples += 1


@contextmanager
def root_qdisc_reader(dev: str, netns: str | None = None) -> Iterator[Callable[[], QdiscCounters]]:
    """A function reading `dev`'s root qdisc counters over one netlink socket, for a sampling loop.

    One thread only: pyroute2 sockets are not shared across threads.
    """
    validate_ifname(dev, "dev")
    with _ipr(netns) as ipr:
        idx = _index(ipr, dev, netns)
        yield lambda: _read_root_qdisc(ipr, idx, dev, netns)


# --------------------------------------------------------------------------
# bridges (inside a lab host, between lab taps only)


def create_bridge(name: str, ports: list[str], netns: str | None = None) -> list[str]:
    """A bridge over `ports` (lab taps), multicast snooping off so it floods multicast to every port.

    The ports' IPv4 addresses move to the bridge (an address on a bridge port
    is not used), so the guests behind them stay reachable. Ports are added in
    order: the bridge hands the original of a flooded packet to the port added
    first and clones to the rest, which is what ties a sender's socket memory
    to that port's queue. Returns the addresses moved ("a.b.c.d/len").
    """
    validate_ifname(name)
    for p in ports:
        validate_ifname(p, "port")
    moved: list[str] = []
    with _ipr(netns) as ipr:
        if _lookup(ipr, name) is not None:
            raise NetError(f"{_where(name, netns)} exists already")
        try:
            ipr.link("add", ifname=name, kind="bridge", br_mcast_snooping=0)
        except Exception as exc:
            raise NetError(f"creating bridge {_where(name, netns)} failed: {exc}") from exc
        br = _index(ipr, name, netns)
        for p in ports:
            idx = _index(ipr, p, netns)
            for a in ipr.get_addr(index=idx, family=2):
                addr, plen = a.get_attr("IFA_ADDRESS"), a["prefixlen"]
                ipr.addr("del", index=idx, address=addr, prefixlen=plen)
                ipr.addr("add", index=br, address=addr, prefixlen=plen)
                moved.append(f"{addr}/{plen}")
            ipr.link("set", index=idx, master=br)
        ipr.link("set", index=br, state="up")
    return moved


def delete_bridge(name: str, netns: str | None = None) -> bool:
    """Delete a bridge (its ports stay, unenslaved); False when there was none."""
    validate_ifname(name)
    with _ipr(netns) as ipr:
        idx = _lookup(ipr, name)
        if idx is None:
            return False
        link = _get_link(ipr, idx)
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "bridge":
            raise NetError(f"{_where(name, netns)} is not a bridge; not deleting it")
        ipr.link("del", index=idx)
    return True


# --------------------------------------------------------------------------
# namespaces and a link's address (a test's private /30)


def create_netns(name: str) -> None:
    """Create the named network namespace /run/netns/NAME (NetError if it exists)."""
    from pyroute2 import netns as _netns

    validate_netns(name)
    if name in _netns.listnetns():
        raise NetError(f"network namespace {name!r} exists already")
    try:
        _netns.create(name)
    except Exception as exc:
        raise NetError(f"creating network namespace {name!r} failed: {exc}") from exc


def delete_netns(name: str) -> bool:
    """Remove the named network namespace; False when there was none."""
    from pyroute2 import netns as _netns

    validate_netns(name)
    if name not in _netns.listnetns():
        return False
    _netns.remove(name)
    return True


def configure_link(
    dev: str, address: str, *, txqueuelen: int | None = None, neighbour: tuple[str, str] | None = None, netns: str | None = None
) -> None:
    """Bring `dev` up with `address` (CIDR), optionally its txqueuelen and one permanent neighbour (ip, lladdr).

    A permanent neighbour lets datagrams be routed out of a tap nobody
    answers ARP on: the frames leave through the tap without a peer.
    """
    validate_ifname(dev, "dev")
    iface = ipaddress.ip_interface(address)
    with _ipr(netns) as ipr:
        idx = _index(ipr, dev, netns)
        try:
            if txqueuelen is not None:
                _validate_uint(txqueuelen, "txqueuelen")
                ipr.link("set", index=idx, txqlen=txqueuelen)
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ipr.link("set", index=idx, state="up")
            if neighbour is not None:
                from pyroute2.netlink.rtnl.ndmsg import states

                ipr.neigh("replace", dst=neighbour[0], lladdr=neighbour[1], ifindex=idx, state=states["permanent"])
        except Exception as exc:
            raise NetError(f"{_where(dev, netns)}: configuring {address} failed: {exc}") from exc
        got = _get_link(ipr, idx).get_attr("IFLA_TXQLEN")
    if txqueuelen is not None and got != txqueuelen:
        raise NetError(f"{_where(dev, netns)}: txqueuelen reads back {got}, wanted {txqueuelen}")


def parse_qdisc_spec(spec: str) -> tuple[str, dict[str, int | str]]:
    """ "pfifo limit 1000" -> ("pfifo", {"limit": 1000}): a root qdisc as tc would be told it, for set_root_qdisc."""
    words = spec.split()
    if not words:
        raise ValueError("qdisc: empty")
    kind, rest = words[0], words[1:]
    if len(rest) % 2:
        raise ValueError(f"qdisc {spec!r}: parameters come in pairs (name value)")
    params: dict[str, int | str] = {}
    for key, value in zip(rest[::2], rest[1::2], strict=True):
        params[key] = int(value) if value.isdigit() else value
    return kind, params
