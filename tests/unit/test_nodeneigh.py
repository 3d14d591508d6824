"""The peer-node neighbour refresher's decisions (datapath.nodeneigh) on a fake kernel: which peers it asks, the
unicast request first and the broadcast only when that goes unanswered, repeated past the kernel's locktime
and then backing off, permanent entries and peers behind a gateway left alone, and the frame it sends."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from scapy.layers.l2 import ARP, Ether

from bpflb.cli import build_parser, cmd_agent
from bpflb.datapath.nodeneigh import (
    BROADCAST,
    NUD_FAILED,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_REACHABLE,
    NUD_STALE,
    QUIET_BROADCASTS,
    QUIET_EVERY,
    Entry,
    Refresher,
    Route,
    arp_request,
    verifiable,
)

ME = IPv4Address("198.18.0.11")
PEER, OTHER, ROUTED = IPv4Address("198.18.0.12"), IPv4Address("198.18.0.13"), IPv4Address("10.9.0.5")
OLD, NEW, OWN = "0a:00:00:00:00:12", "0a:00:00:00:00:99", "0a:00:00:00:00:11"


@dataclass
class FakeKernel:
    """Routes and entries as a test sets them; requests recorded as (target, destination MAC)."""

    now: float = 100.0
    routes: dict[IPv4Address, Route] = field(default_factory=dict)
    table: dict[IPv4Address, tuple[str, int, float]] = field(default_factory=dict)  # mac, state, confirmed at
    sent: list[tuple[IPv4Address, str]] = field(default_factory=list)
    mac: str = OWN
    route_lookups: int = 0

    def route(self, addr: IPv4Address) -> Route | None:
        self.route_lookups += 1
        return self.routes.get(addr)

    def entries(self) -> Mapping[tuple[int, IPv4Address], Entry]:
        return {(2, a): Entry(2, mac, state, self.now - at) for a, (mac, state, at) in self.table.items()}

    def own_mac(self, ifindex: int) -> str:
        return self.mac

    def send(self, ifindex: int, dst_mac: str, src: IPv4Address, target: IPv4Address, own_mac: str) -> None:
        assert (ifindex, src, own_mac) == (2, ME, OWN)
        self.sent.append((target, dst_mac))

    def answer(self, addr: IPv4Address, mac: str) -> None:
        """The kernel took a reply from mac for addr (as arp_process does outside the locktime)."""
        self.table[addr] = (mac, NUD_REACHABLE, self.now)


def refresher(*peers: IPv4Address) -> tuple[Refresher, FakeKernel]:
    kernel = FakeKernel(routes={PEER: Route(2, ME), OTHER: Route(2, ME)})
    r = Refresher(kernel, 0.5, clock=lambda: kernel.now)
    r.set_peers(peers)
    return r, kernel


def tick(r: Refresher, k: FakeKernel, answer: dict[IPv4Address, str] | None = None) -> list[tuple[IPv4Address, str]]:
    """One interval: probe, the peers in `answer` reply (at the MAC given), check; what was sent."""
    k.sent.clear()
    r.probe()
    k.now += r.grace
    for addr, mac in (answer or {}).items():
        if (addr, mac) in k.sent:
            k.answer(addr, mac)
    r.check()
    for addr, mac in (answer or {}).items():
        if (addr, BROADCAST) in k.sent:
            k.answer(addr, mac)
    k.now += r.interval - r.grace
    return list(k.sent)


def test_a_peer_that_answers_gets_one_unicast_request_per_interval_and_no_broadcast() -> None:
    r, k = refresher(PEER)
    k.table[PEER] = (OLD, NUD_REACHABLE, k.now - 5)
    for _ in range(5):
        assert tick(r, k, {PEER: OLD}) == [(PEER, OLD)]
    assert (r.stats.unicast, r.stats.broadcast, r.stats.mac_changes) == (5, 0, 0)


def test_a_stale_entry_is_verified_too() -> None:
    r, k = refresher(PEER)
    k.table[PEER] = (OLD, NUD_STALE, k.now - 60)
    assert tick(r, k, {PEER: OLD}) == [(PEER, OLD)]


def test_a_peer_that_moved_is_asked_by_broadcast_and_the_change_is_counted_once() -> None:
    r, k = refresher(PEER)
    k.table[PEER] = (OLD, NUD_REACHABLE, k.now - 5)
    tick(r, k, {PEER: OLD})
    # The MAC changes: the old one answers nothing; the broadcast reaches the new one.
    assert tick(r, k, {PEER: NEW}) == [(PEER, OLD), (PEER, BROADCAST)]
    assert k.table[PEER][0] == NEW
    assert tick(r, k, {PEER: NEW}) == [(PEER, NEW)]
    assert tick(r, k, {PEER: NEW}) == [(PEER, NEW)]
    assert r.stats.mac_changes == 1


def test_the_broadcast_is_repeated_while_the_kernel_keeps_the_old_mac_locktime() -> None:
    r, k = refresher(PEER)
    k.table[PEER] = (OLD, NUD_REACHABLE, k.now - 5)
    tick(r, k, {PEER: OLD})
    assert tick(r, k) == [(PEER, OLD), (PEER, BROADCAST)]      # the reply fell within the locktime
    assert tick(r, k, {PEER: NEW}) == [(PEER, OLD), (PEER, BROADCAST)]
    assert k.table[PEER][0] == NEW
    assert tick(r, k, {PEER: NEW}) == [(PEER, NEW)]


def test_a_silent_peer_gets_broadcasts_that_back_off() -> None:
    r, k = refresher(PEER)
    k.table[PEER] = (OLD, NUD_STALE, k.now - 5)
    broadcasts = [(PEER, BROADCAST) in tick(r, k) for _ in range(3 * QUIET_EVERY)]
    assert broadcasts[:QUIET_BROADCASTS] == [True] * QUIET_BROADCASTS
    assert sum(broadcasts[QUIET_BROADCASTS:]) == 3      # then once every QUIET_EVERY intervals
    # It answers again: back to unicast alone.
    assert tick(r, k, {PEER: OLD}) == [(PEER, OLD)]
    assert tick(r, k, {PEER: OLD}) == [(PEER, OLD)]


def test_permanent_noarp_failed_missing_and_routed_peers_are_left_to_the_kernel() -> None:
    r, k = refresher(PEER, OTHER, ROUTED, ME)
    k.table[PEER] = (OLD, NUD_PERMANENT, k.now - 5)
    k.table[OTHER] = (OLD, NUD_NOARP, k.now - 5)
    k.table[ROUTED] = (OLD, NUD_REACHABLE, k.now - 5)     # its route has a gateway: FakeKernel.route says None
    assert tick(r, k) == []
    k.table[OTHER] = ("", NUD_FAILED, k.now - 5)
    assert tick(r, k) == []
    del k.table[OTHER]
    assert tick(r, k) == []
    assert not verifiable(Entry(2, OLD, NUD_REACHABLE | NUD_PERMANENT, 0.0))
    assert verifiable(Entry(2, OLD, NUD_REACHABLE, 0.0))


def test_routes_are_looked_up_again_when_the_peers_change_and_otherwise_rarely() -> None:
    r, k = refresher(PEER)
    k.table[PEER] = (OLD, NUD_REACHABLE, k.now)
    for _ in range(4):
        tick(r, k, {PEER: OLD})
    assert k.route_lookups == 1
    r.set_peers([PEER, OTHER])
    k.table[OTHER] = (NEW, NUD_REACHABLE, k.now)
    assert sorted(tick(r, k, {PEER: OLD, OTHER: NEW})) == [(PEER, OLD), (OTHER, NEW)]
    assert k.route_lookups == 3
    r.set_peers([OTHER])
    assert tick(r, k, {OTHER: NEW}) == [(OTHER, NEW)]


def test_no_request_when_the_devices_mac_changed_since_the_entries_were_read() -> None:
    r, k = refresher(PEER)
    k.table[PEER] = (OLD, NUD_REACHABLE, k.now)
    k.mac = "0a:00:00:00:00:77"        # FakeKernel.send asserts the MAC it was given
    r.kernel = k
    sent: list[str] = []

    def send(ifindex: int, dst_mac: str, src: IPv4Address, target: IPv4Address, own_mac: str) -> None:
        sent.append(own_mac)
        raise OSError("the MAC of device 2 changed since its neighbours were read")

    k.send = send  # type: ignore[method-assign]
    r.probe()
    assert sent == ["0a:00:00:00:00:77"] and r.stats.unicast == 0 and r.stats.errors == 1


def test_the_request_frame() -> None:
    frame = Ether(arp_request(OWN, ME, PEER, OLD))
    assert (frame.src, frame.dst, frame.type) == (OWN, OLD, 0x0806)
    arp = frame[ARP]
    assert (arp.op, arp.hwsrc, arp.psrc, arp.hwdst, arp.pdst) == (1, OWN, str(ME), "00:00:00:00:00:00", str(PEER))
    assert Ether(arp_request(OWN, ME, PEER)).dst == BROADCAST


def test_the_flag_is_parsed_and_bad_values_are_refused(capsys: object) -> None:
    parser = build_parser()
    base = ["agent", "--node-name", "n1", "--source-dir", "/nonexistent"]
    assert parser.parse_args(base).node_neigh_refresh == 0.5
    assert parser.parse_args([*base, "--node-neigh-refresh", "0"]).node_neigh_refresh == 0.0
    for bad in ("-1", "nan", "7200"):
        assert cmd_agent(parser.parse_args([*base, "--node-neigh-refresh", bad])) == 2
