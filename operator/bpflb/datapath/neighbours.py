"""Neighbour hygiene on a node: when the machine behind a MAC leaves a bridge of the node (the bridge drops
the forwarding entry it learned for that MAC: a pod's veth was deleted, or the station fell silent past
the bridge's ageing time), the node's IPv4 neighbour entries that still point at that MAC are deleted, so
the next packet to their address is resolved afresh.

Why: a pod replaced by a new one with the same address and a new MAC sends no gratuitous ARP, and the
kernel keeps using a REACHABLE or STALE entry with the old MAC for seconds to minutes (reachable time, then
DELAY and PROBE; 35 s measured on a bridge with a fixed MAC).  Nothing in the Service view changes with the
MAC.  The bridge's own event is immediate, Kubernetes-independent, and names exactly the MAC that went
away; the datapath (fib.h) then resolves through the kernel's neighbour table, so the new pod is reachable
through bpflb and through the kernel's forwarding alike as soon as it answers ARP.  Entries an administrator
made permanent are left alone.

Traffic to the address while the new pod is not up yet leaves the kernel resolving it (INCOMPLETE), and the
kernel asks again only after its retransmit time (1 s): the new pod would be reached up to a second after it
is up.  So for a few seconds after a MAC leaves a bridge the watcher asks itself, every 0.1 s, for every
address the kernel is still resolving on that bridge (an ARP request with the bridge's own MAC and address):
the new pod's reply completes the kernel's pending entry at once, its queued packets with it.  This also
covers a bridge that lost its last port, where the kernel flushed the entries itself on carrier loss.  Per-pod routed devices (no bridge) need none of this: deleting the device
deletes its neighbours."""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_NEIGH = 0x4
RTM_DELNEIGH = 29
AF_BRIDGE = 7
NDA_LLADDR = 2
NDA_MASTER = 9
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
NUD_PENDING = 0x01 | 0x20                     # INCOMPLETE, FAILED: the kernel is resolving, or gave up for now
ETH_P_ARP = 0x0806
PROBE_EVERY_S = 0.1      # how often the addresses pending on a bridge a MAC left are asked for ...
PROBE_FOR_S = 5.0        # ... and for how long after it left
_NLMSG = struct.Struct("=IHHII")     # struct nlmsghdr
_NDMSG = struct.Struct("=BxxxiHBB")  # struct ndmsg: family, ifindex, state, flags, type
_RTA = struct.Struct("=HH")          # struct rtattr


@dataclass(frozen=True)
class StationGone:
    """A bridge forgot a MAC it had learned on one of its ports."""

    mac: str
    bridge: int      # the bridge's ifindex (NDA_MASTER), 0 when the message did not say


def parse_events(data: bytes) -> list[StationGone]:
    """The learned-FDB removals in a buffer of rtnetlink messages (anything else is skipped)."""
    out = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind = _NLMSG.unpack_from(data, off)[:2]
        if length < _NLMSG.size or off + length > len(data):
            break
        body = off + _NLMSG.size
        if kind == RTM_DELNEIGH and length >= _NLMSG.size + _NDMSG.size:
            family, _ifindex, state, flags, _type = _NDMSG.unpack_from(data, body)
            # Learned entries only: not the bridge's own MACs (NTF_SELF) nor static ones (PERMANENT/NOARP).
            if family == AF_BRIDGE and not flags & NTF_SELF and not state & (NUD_PERMANENT | NUD_NOARP):
                mac, bridge = None, 0
                attr = body + _NDMSG.size
                while attr + _RTA.size <= off + length:
                    alen, atype = _RTA.unpack_from(data, attr)
                    if alen < _RTA.size:
                        break
                    value = data[attr + _RTA.size:attr + alen]
                    if atype == NDA_LLADDR and len(value) == 6:
                        mac = ":".join(f"{b:02x}" for b in value)
                    elif atype == NDA_MASTER and len(value) == 4:
                        bridge = int.from_bytes(value, "little")
                    attr += (alen + 3) & ~3
                if mac:
                    out.append(StationGone(mac, bridge))
        off += (length + 3) & ~3
    return out


def forget(gone: StationGone, ipr: IPRoute) -> list[str]:
    """Delete the IPv4 neighbour entries on the bridge that still point at the MAC that left; returns the
    addresses forgotten."""
    forgotten = []
    query = {"family": socket.AF_INET, **({"ifindex": gone.bridge} if gone.bridge else {})}
    for n in ipr.get_neighbours(**query):
        if str(n.get_attr("NDA_LLADDR") or "").lower() != gone.mac or n["state"] & NUD_PERMANENT:
            continue
        dst = str(n.get_attr("NDA_DST"))
        try:
            ipr.neigh("del", dst=dst, ifindex=n["ifindex"])
        except NetlinkError as exc:     # gone meanwhile: nothing to forget
            log.debug("neighbour %s: %s", dst, exc)
            continue
        forgotten.append(dst)
    return forgotten


def arp_request(sender_mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
    """A broadcast ARP request for target_ip from (sender_mac, sender_ip)."""
    return (b"\xff" * 6 + sender_mac + struct.pack("!H", ETH_P_ARP) +
            struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + sender_mac + sender_ip + b"\x00" * 6 + target_ip)


@dataclass
class _Probe:
    """A bridge a MAC left: its pending addresses are asked for until `until`."""

    bridge: int
    until: float


def _bridge_source(ipr: IPRoute, bridge: int, addr: str) -> tuple[str, bytes, bytes] | None:
    """(name, MAC, IPv4 address in addr's subnet) of the bridge, or None when it has no such address."""
    links = ipr.get_links(bridge)
    if not links:
        return None
    name, mac = links[0].get_attr("IFLA_IFNAME"), links[0].get_attr("IFLA_ADDRESS")
    target = IPv4Address(addr)
    for a in ipr.get_addr(index=bridge, family=socket.AF_INET):
        net = IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
        if target in net and name and mac:
            return str(name), bytes.fromhex(str(mac).replace(":", "")), IPv4Address(a.get_attr("IFA_ADDRESS")).packed
    return None


class NeighbourHygiene:
    """Watches this network namespace's bridges in a thread; start() once, stop() at the end."""

    def __init__(self, on_forget: Callable[[StationGone, list[str]], None] | None = None) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._on_forget = on_forget

    def start(self) -> None:
        """Subscribe now (events from this moment on are seen), handle them in a daemon thread."""
        if self._thread is not None:
            return
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        sock.bind((0, RTMGRP_NEIGH))
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="neighbour-hygiene", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _run(self) -> None:
        assert self._sock is not None
        probes: list[_Probe] = []
        with IPRoute() as ipr, socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._sock], [], [], PROBE_EVERY_S if probes else 0.5)
                probes = self._ask(ipr, raw, probes)
                if not ready:
                    continue
                try:
                    data = self._sock.recv(1 << 16)
                except OSError as exc:     # ENOBUFS: events were lost; the kernel's own timers remain
                    log.warning("neighbour events: %s (some may have been missed)", exc)
                    continue
                for gone in parse_events(data):
                    try:
                        forgotten = forget(gone, ipr)
                    except Exception:
                        log.exception("forgetting the neighbours of %s failed", gone.mac)
                        continue
                    if gone.bridge:
                        probes = [p for p in probes if p.bridge != gone.bridge]
                        probes.append(_Probe(gone.bridge, time.monotonic() + PROBE_FOR_S))
                    if forgotten:
                        log.info("forgot neighbour %s (%s): that MAC left bridge ifindex %d; the next packet "
                                 "resolves the address again", ", ".join(forgotten), gone.mac, gone.bridge)
                    if self._on_forget is not None:
                        self._on_forget(gone, forgotten)

    @staticmethod
    def _ask(ipr: IPRoute, raw: socket.socket, probes: list[_Probe]) -> list[_Probe]:
        """Ask once more for every address pending on each bridge a MAC left lately; the bridges still to watch."""
        now, left = time.monotonic(), []
        for probe in probes:
            if now > probe.until:
                continue
            left.append(probe)
            try:
                for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=probe.bridge):
                    if not n["state"] & NUD_PENDING:
                        continue
                    addr = str(n.get_attr("NDA_DST"))
                    source = _bridge_source(ipr, probe.bridge, addr)
                    if source is not None:
                        name, mac, ip = source
                        raw.sendto(arp_request(mac, ip, IPv4Address(addr).packed), (name, ETH_P_ARP))
            except (OSError, NetlinkError) as exc:     # the bridge went away meanwhile, say
                log.debug("asking for the addresses pending on bridge %d: %s", probe.bridge, exc)
        return left
