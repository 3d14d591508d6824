"""Peer nodes' neighbour entries kept verified: a node re-created with its address and a new MAC, sending no
ARP of its own, is reached again within about one refresh interval instead of the kernel's 15-50 s.

Why: traffic bpflb forwards to a peer node never confirms the neighbour entry (only a host's own TCP does), so
a REACHABLE or STALE entry holding a dead MAC lasts its reachable time, then DELAY and probes.  Every interval
the refresher sends each on-link peer whose entry holds a MAC a unicast ARP request to that MAC; the kernel
takes the reply as a confirmation (NDA_CACHEINFO's confirmed age drops).  A peer whose entry was not confirmed
shortly after gets a broadcast request: the machine now holding the address answers, and the kernel's own
ARP code replaces the entry's MAC -- unless the entry changed less than `locktime` (1 s) ago, so the broadcast
is repeated every interval until the entry is confirmed (then backing off for a peer that stays silent).
Entries an administrator made permanent (or NOARP), and peers without an entry or behind a gateway, are left
to the kernel.  The requests carry the device's current MAC, read as each is sent: they never teach a peer
an old MAC of this node."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, Protocol

log = logging.getLogger("bpflb.agent")

DEFAULT_REFRESH = 0.5          # seconds between two unicast requests to a peer (--node-neigh-refresh)
ROUTES_EVERY = 10.0            # the peers' routes (on-link? which device, which source) are looked up this often
QUIET_BROADCASTS = 6           # a peer that stays silent gets a broadcast each interval this many times...
QUIET_EVERY = 20               # ...then one every this many intervals (10 s at the default)
BROADCAST = "ff:ff:ff:ff:ff:ff"
ETH_P_ARP = 0x0806
RTN_UNICAST = 1
NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE = 0x01, 0x02, 0x04, 0x08, 0x10
NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x20, 0x40, 0x80
VERIFIABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE    # holds a MAC the kernel may use
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")     # NDA_CACHEINFO ages are in clock_t (USER_HZ)
_ARP = struct.Struct("!HHBBH")             # htype, ptype, hlen, plen, op


def arp_request(src_mac: str, src_ip: IPv4Address, target: IPv4Address, dst_mac: str = BROADCAST) -> bytes:
    """An Ethernet ARP request 'who has target, tell src_ip' sent to dst_mac (the target's MAC for a unicast
    one; the target hardware address is left zero, as the kernel's own unicast probes do)."""
    def raw(mac: str) -> bytes:
        return bytes.fromhex(mac.replace(":", ""))
    return (raw(dst_mac) + raw(src_mac) + ETH_P_ARP.to_bytes(2, "big") + _ARP.pack(1, 0x0800, 6, 4, 1)
            + raw(src_mac) + src_ip.packed + bytes(6) + target.packed)


@dataclass(frozen=True)
class Route:
    """How this node reaches a peer: on-link through ifindex, from src."""

    ifindex: int
    src: IPv4Address


@dataclass(frozen=True)
class Entry:
    """A neighbour entry of the kernel's, as the refresher needs it."""

    ifindex: int
    mac: str
    state: int
    confirmed_age: float       # seconds since the kernel last confirmed it


def verifiable(entry: Entry | None) -> bool:
    """An entry the refresher may probe: it holds a MAC the kernel uses, and no administrator pinned it."""
    return (entry is not None and bool(entry.mac) and bool(entry.state & VERIFIABLE)
            and not entry.state & (NUD_PERMANENT | NUD_NOARP))


class Kernel(Protocol):
    """What the refresher needs of the kernel (netlink and packet sockets), a fake in unit tests."""

    def route(self, addr: IPv4Address) -> Route | None:
        """The peer's route when it is on-link (no gateway, not local), else None."""

    def entries(self) -> Mapping[tuple[int, IPv4Address], Entry]:
        """The IPv4 neighbour entries by (ifindex, address)."""

    def own_mac(self, ifindex: int) -> str:
        """The device's MAC now."""

    def send(self, ifindex: int, dst_mac: str, src: IPv4Address, target: IPv4Address, own_mac: str) -> None:
        """An ARP request for target from src and own_mac to dst_mac; OSError when the device's MAC is no
        longer own_mac."""


@dataclass
class Peer:
    """The refresher's memory of one peer."""

    addr: IPv4Address
    route: Route | None = None
    mac: str = ""               # what its entry held at the last look
    sent: float | None = None   # when the last unicast request left (monotonic), awaiting confirmation
    silent: int = 0             # checks in a row without a confirmation


@dataclass
class Stats:
    unicast: int = 0
    broadcast: int = 0
    mac_changes: int = 0
    errors: int = 0


@dataclass
class Refresher:
    """The logic, on a Kernel: probe() sends the unicast requests of one interval, check() (a short while
    later) the broadcasts for peers that did not confirm.  run() turns them on a thread."""

    kernel: Kernel
    interval: float = DEFAULT_REFRESH
    clock: Callable[[], float] = time.monotonic
    peers: dict[IPv4Address, Peer] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    _routes_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def grace(self) -> float:
        """How long a peer has to answer a unicast request before the broadcast (an ARP round trip on a LAN
        is well under a millisecond; this leaves room for a loaded node)."""
        return min(0.1, self.interval / 4)

    def set_peers(self, addrs: Iterable[IPv4Address]) -> None:
        """The peer nodes' addresses (every sync: the Node objects); routes are looked up again for a change."""
        want = set(addrs)
        with self._lock:
            if want == set(self.peers):
                return
            self.peers = {a: self.peers.get(a) or Peer(a) for a in sorted(want)}
            self._routes_at = None

    def _routes(self, now: float) -> None:
        if self._routes_at is not None and now - self._routes_at < ROUTES_EVERY:
            return
        self._routes_at = now
        for peer in self.peers.values():
            try:
                peer.route = self.kernel.route(peer.addr)
            except OSError as exc:
                log.debug("node neighbour %s: no route: %s", peer.addr, exc)
                peer.route = None

    def probe(self) -> None:
        """One interval's unicast requests: to each on-link peer whose entry holds a MAC, that MAC."""
        with self._lock:
            now = self.clock()
            self._routes(now)
            # The device's MAC before the entries: when it changes, the kernel flushes them (neigh_changeaddr),
            # and a request in between would announce the new MAC; send() refuses then.
            own = self._own_macs()
            entries = self.kernel.entries()
            for peer in self.peers.values():
                entry = entries.get((peer.route.ifindex, peer.addr)) if peer.route else None
                if peer.route is None or entry is None or not verifiable(entry):
                    peer.sent, peer.silent = None, 0
                    peer.mac = entry.mac if entry is not None else ""
                    continue
                self._notice(peer, entry)
                if self._send(peer, entry.mac, own):
                    self.stats.unicast += 1
                    peer.sent = self.clock()

    def check(self) -> None:
        """Broadcast for each peer whose entry was not confirmed since its unicast request left."""
        with self._lock:
            own = self._own_macs()
            entries = self.kernel.entries()
            now = self.clock()
            for peer in self.peers.values():
                if peer.sent is None or peer.route is None:
                    continue
                entry = entries.get((peer.route.ifindex, peer.addr))
                if entry is None or not verifiable(entry):
                    peer.sent = None
                    continue
                # Ages are whole clock ticks, rounded down: a confirmation is at most one tick older than it says.
                if now - entry.confirmed_age >= peer.sent or entry.mac != peer.mac:
                    self._notice(peer, entry)
                    peer.silent = 0
                    continue
                peer.silent += 1
                if peer.silent <= QUIET_BROADCASTS or peer.silent % QUIET_EVERY == 0:
                    if peer.silent == 1:
                        log.debug("node neighbour %s did not answer at %s: asking by broadcast", peer.addr,
                                  entry.mac)
                    if self._send(peer, BROADCAST, own):
                        self.stats.broadcast += 1

    def _notice(self, peer: Peer, entry: Entry) -> None:
        if peer.mac and entry.mac != peer.mac:
            self.stats.mac_changes += 1
            how = ("it stopped answering at the old one, and answered a broadcast ARP request" if peer.silent
                   else "the kernel learned it from the peer itself")
            log.info("node neighbour %s changed MAC from %s to %s: the kernel's entry holds the new one (%s)",
                     peer.addr, peer.mac, entry.mac, how)
        peer.mac = entry.mac

    def _own_macs(self) -> dict[int, str]:
        out = {}
        for ifindex in {p.route.ifindex for p in self.peers.values() if p.route is not None}:
            try:
                out[ifindex] = self.kernel.own_mac(ifindex)
            except OSError as exc:          # the device went away: its routes are looked up again
                log.debug("node neighbours: device %d: %s", ifindex, exc)
                self._routes_at = None
        return out

    def _send(self, peer: Peer, dst_mac: str, own: Mapping[int, str]) -> bool:
        assert peer.route is not None
        if peer.route.ifindex not in own:
            return False
        try:
            self.kernel.send(peer.route.ifindex, dst_mac, peer.route.src, peer.addr, own[peer.route.ifindex])
        except OSError as exc:
            self.stats.errors += 1
            log.debug("ARP request to %s (%s): %s", peer.addr, dst_mac, exc)
            return False
        return True

    def run(self, stop: threading.Event) -> None:
        """probe(), check() after the grace, the rest of the interval; until stop is set."""
        while not stop.is_set():
            start = self.clock()
            try:
                self.probe()
                if stop.wait(self.grace):
                    return
                self.check()
            except Exception:
                log.exception("refreshing the node neighbours failed (retrying next interval)")
            stop.wait(max(0.0, self.interval - (self.clock() - start)))


class NetlinkKernel:
    """Kernel through pyroute2 and AF_PACKET sockets, in this network namespace."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.sockets: dict[int, socket.socket] = {}

    def close(self) -> None:
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()
        self.ipr.close()

    def route(self, addr: IPv4Address) -> Route | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msgs = self.ipr.route("get", dst=str(addr))
        except NetlinkError as exc:       # no route to it (ENETUNREACH): nothing on-link to verify
            log.debug("node neighbour %s: %s", addr, exc)
            return None
        for msg in msgs:
            if msg["type"] != RTN_UNICAST or msg.get_attr("RTA_GATEWAY"):
                return None
            oif, src = msg.get_attr("RTA_OIF"), msg.get_attr("RTA_PREFSRC")
            if oif and src:
                return Route(int(oif), IPv4Address(str(src)))
        return None

    def entries(self) -> dict[tuple[int, IPv4Address], Entry]:
        out = {}
        for n in self.ipr.get_neighbours(family=socket.AF_INET):
            dst, mac = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
            cache: Any = n.get_attr("NDA_CACHEINFO") or {}
            if not dst:
                continue
            confirmed = float(cache.get("ndm_confirmed", 1 << 31)) / CLOCK_TICKS
            out[(int(n["ifindex"]), IPv4Address(str(dst)))] = Entry(int(n["ifindex"]), str(mac or "").lower(),
                                                                     int(n["state"]), confirmed)
        return out

    def _socket(self, ifindex: int) -> socket.socket:
        s = self.sockets.get(ifindex)
        if s is None:
            # Protocol 0: this socket only sends, the kernel queues nothing to it.
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                s.bind((socket.if_indextoname(ifindex), 0))
            except OSError:
                s.close()
                raise
            self.sockets[ifindex] = s
        return s

    def own_mac(self, ifindex: int) -> str:
        # getsockname reads the bound device's address as of now.
        name = self._socket(ifindex).getsockname()
        if len(name[4]) < 6:     # the device went away: bind again next time
            self.sockets.pop(ifindex).close()
            raise OSError(f"device {ifindex} is gone")
        return ":".join(f"{b:02x}" for b in bytes(name[4])[:6])

    def send(self, ifindex: int, dst_mac: str, src: IPv4Address, target: IPv4Address, own_mac: str) -> None:
        if self.own_mac(ifindex) != own_mac:
            raise OSError(f"the MAC of device {ifindex} changed since its neighbours were read")
        self._socket(ifindex).send(arp_request(own_mac, src, target, dst_mac))


class NodeNeighbours:
    """The refresher on a daemon thread of the agent: start(), set_peers() every sync, stop()."""

    def __init__(self, interval: float = DEFAULT_REFRESH) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel: NetlinkKernel | None = None
        self.refresher: Refresher | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.interval <= 0:
            log.info("not verifying the peer nodes' neighbour entries (--node-neigh-refresh 0): a node re-created "
                     "with a new MAC is reached again at the kernel's ARP timers (15-50 s)")
            return
        self._kernel = NetlinkKernel()
        self.refresher = Refresher(self._kernel, self.interval)
        self._thread = threading.Thread(target=self.refresher.run, args=(self._stop,), name="node-neighbours",
                                        daemon=True)
        self._thread.start()

    def set_peers(self, addrs: Iterable[IPv4Address]) -> None:
        if self.refresher is not None:
            self.refresher.set_peers(addrs)

    def counts(self) -> dict[str, int]:
        """The refresher's counters (requests by kind, MAC changes found), empty when it does not run."""
        if self.refresher is None:
            return {}
        s = self.refresher.stats
        return {"unicast": s.unicast, "broadcast": s.broadcast, "mac_changes": s.mac_changes, "errors": s.errors}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None
        self.refresher = None
        self._stop = threading.Event()
