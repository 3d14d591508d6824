"""BPF unit tests of loadBalancerSourceRanges (svcSourceRangeCheck): the real bpf_lb.o and bpf_xdp.o, maps
programmed by LBMaps from frontends with source ranges, crafted frames run through BPF_PROG_TEST_RUN. A
client inside an allow list reaches the backend, one outside is dropped and counted (at tc and at XDP);
a deny list inverts that; ranges are a frontend's own (another frontend's prefixes admit nobody here);
narrowing the ranges cuts an open flow; a list that admits nobody admits nobody; IP options and another
frontend kind do not get around the check."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.l2 import Ether

from bpflb.datapath.lbmaps import LBMaps
from bpflb.datapath.libbpf import TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX
from bpflb.model.types import Frontend, FrontendKind, Proto
from tests.bpf.packets import (
    CLIENT,
    NODE1,
    REMOTE,
    REMOTE_POD,
    Node,
    XdpNode,
    fe,
    frame_in,
    state,
)

pytestmark = pytest.mark.privileged

LB_IP = "198.18.1.10"
OTHER_LB_IP = "198.18.1.11"
OUTSIDER = "203.0.113.9"          # a client outside every range below


def ranged(addr: str = LB_IP, *nets: str, deny: bool = False, kind: FrontendKind = FrontendKind.LOADBALANCER,
           proto: Proto = Proto.TCP) -> Frontend:
    """A frontend on :80 towards the remote pod whose clients the given prefixes admit (or refuse)."""
    port = 80 if kind is not FrontendKind.NODEPORT else 30080
    return replace(fe(addr, port, (REMOTE,), kind=kind, proto=proto),
                   source_ranges=tuple(IPv4Network(n) for n in nets), source_ranges_deny=deny)


def syn(src: str, dst: str = LB_IP, sport: int = 40000, dport: int = 80, **ip: Any) -> bytes:
    return frame_in(TCP(sport=sport, dport=dport, flags="S", seq=1), dst=dst, src=src, **ip)


def forwarded(run_data: bytes) -> bool:
    return str(Ether(run_data)[IP].dst) == REMOTE_POD


def test_a_client_inside_the_ranges_reaches_the_backend_and_one_outside_is_dropped_and_counted(node: Node) -> None:
    node.program(state(ranged(LB_IP, f"{CLIENT}/32", "192.0.2.0/24")))
    inside = node.ingress(syn(CLIENT))
    assert inside.retval == TC_ACT_REDIRECT and forwarded(inside.data)
    also_inside = node.ingress(syn("192.0.2.77", sport=40001))       # the longest prefix is not needed
    assert also_inside.retval == TC_ACT_REDIRECT
    before = node.maps.stats()
    outside = node.ingress(syn(OUTSIDER, sport=40002))
    assert outside.retval == TC_ACT_SHOT
    stats = node.maps.stats()
    assert stats["drop_src_range"] - before["drop_src_range"] == 1
    assert stats["new_flow"] == before["new_flow"]                 # no flow, no SNAT port for the refused one
    tracked = {IPv4Address(int(node.maps.ct_fwd.decode_key(k).saddr).to_bytes(4, "little"))
               for k, _ in node.maps.ct_fwd.items_raw()}
    assert IPv4Address(OUTSIDER) not in tracked and IPv4Address(CLIENT) in tracked


def test_the_prefix_boundaries_are_the_cidrs(node: Node) -> None:
    node.program(state(ranged(LB_IP, "198.18.0.96/29")))        # .96 .. .103
    verdicts = {src: node.ingress(syn(src, sport=41000 + i)).retval
                for i, src in enumerate(("198.18.0.95", "198.18.0.96", CLIENT, "198.18.0.103", "198.18.0.104"))}
    assert verdicts == {"198.18.0.95": TC_ACT_SHOT, "198.18.0.96": TC_ACT_REDIRECT, CLIENT: TC_ACT_REDIRECT,
                        "198.18.0.103": TC_ACT_REDIRECT, "198.18.0.104": TC_ACT_SHOT}


def test_a_deny_list_refuses_its_prefixes_and_admits_everyone_else(node: Node) -> None:
    node.program(state(ranged(LB_IP, f"{CLIENT}/32", deny=True)))
    assert node.ingress(syn(CLIENT)).retval == TC_ACT_SHOT
    assert node.ingress(syn(OUTSIDER, sport=40001)).retval == TC_ACT_REDIRECT
    assert node.maps.stats()["drop_src_range"] == 1


def test_ranges_belong_to_their_own_frontend(node: Node) -> None:
    """Two LoadBalancer IPs: the client is in the first one's prefixes only, so the second drops it; a NodePort
    without ranges is not checked at all."""
    node.program(state(ranged(LB_IP, f"{CLIENT}/32"), ranged(OTHER_LB_IP, f"{OUTSIDER}/32"),
                       fe(NODE1, 30080, (REMOTE,))))
    assert node.ingress(syn(CLIENT)).retval == TC_ACT_REDIRECT
    assert node.ingress(syn(CLIENT, dst=OTHER_LB_IP, sport=40001)).retval == TC_ACT_SHOT
    assert node.ingress(syn(OUTSIDER, dst=OTHER_LB_IP, sport=40002)).retval == TC_ACT_REDIRECT
    assert node.ingress(syn(OUTSIDER, dst=NODE1, dport=30080, sport=40003)).retval == TC_ACT_REDIRECT


def test_narrowing_the_ranges_live_cuts_an_open_flow_and_widening_readmits_it(node: Node) -> None:
    node.program(state(ranged(LB_IP, "198.18.0.0/24")))
    assert node.ingress(syn(CLIENT)).retval == TC_ACT_REDIRECT
    ack = frame_in(TCP(sport=40000, dport=80, flags="A", seq=2, ack=2), dst=LB_IP)
    assert node.ingress(ack).retval == TC_ACT_REDIRECT
    node.maps.sync(state(ranged(LB_IP, "192.0.2.0/24")))           # the client's prefix is gone
    assert node.ingress(ack).retval == TC_ACT_SHOT
    node.maps.sync(state(ranged(LB_IP, "192.0.2.0/24", f"{CLIENT}/32")))
    assert node.ingress(ack).retval == TC_ACT_REDIRECT
    stats = node.maps.stats()
    assert stats["fwd_established"] == 2 and stats["drop_src_range"] == 1
    # Switching the check off (the setting, or the ranges removed) clears the flag and every prefix.
    report = node.maps.sync(state(fe(LB_IP, 80, (REMOTE,), kind=FrontendKind.LOADBALANCER)))
    assert report.source_ranges_removed == 2 and not list(node.maps.src_ranges.items_raw())
    assert node.ingress(syn(OUTSIDER, sport=40009)).retval == TC_ACT_REDIRECT


def test_a_list_that_admits_nobody_admits_nobody(node: Node) -> None:
    """A Service whose ranges were all IPv6 (or unreadable) fails closed on its IPv4 frontend."""
    node.program(state(ranged(LB_IP)))
    assert node.ingress(syn(CLIENT)).retval == TC_ACT_SHOT
    assert node.ingress(syn(OUTSIDER, sport=40001)).retval == TC_ACT_SHOT


def test_ip_options_and_udp_do_not_get_around_the_check(node: Node) -> None:
    node.program(state(ranged(LB_IP, f"{CLIENT}/32"), ranged(LB_IP, f"{CLIENT}/32", proto=Proto.UDP)))
    assert node.ingress(syn(OUTSIDER, options=[IPOption_Router_Alert()])).retval == TC_ACT_SHOT
    udp = frame_in(UDP(sport=5000, dport=80), dst=LB_IP, src=OUTSIDER, payload=b"hostname")
    assert node.ingress(udp).retval == TC_ACT_SHOT
    ok = frame_in(UDP(sport=5000, dport=80), dst=LB_IP, src=CLIENT, payload=b"hostname")
    assert node.ingress(ok).retval == TC_ACT_REDIRECT
    assert node.maps.stats()["drop_src_range"] == 2


def test_a_restart_on_pinned_maps_rewrites_no_prefix(node: Node) -> None:
    want = state(ranged(LB_IP, f"{CLIENT}/32", "192.0.2.0/24"))
    node.program(want)
    again = LBMaps(node.obj).sync(want)
    assert again.source_ranges_written == 0 and again.source_ranges_removed == 0 and not again.changed
    assert node.ingress(syn(OUTSIDER)).retval == TC_ACT_SHOT


def test_xdp_drops_a_refused_client_and_forwards_an_admitted_one(xnode: XdpNode) -> None:
    xnode.program(state(ranged(LB_IP, f"{CLIENT}/32")))
    admitted = xnode.xdp(syn(CLIENT))
    assert admitted.retval == XDP_TX and forwarded(admitted.data)
    refused = xnode.xdp(syn(OUTSIDER, sport=40001))
    assert refused.retval == XDP_DROP
    stats = xnode.maps.stats()
    assert stats["drop_src_range"] == 1 and stats["new_flow"] == 1 and stats["xdp_to_tc"] == 0
    assert stats["xdp_drop_src_range"] == 1
    # A deny list at XDP; a packet XDP hands to tc (IP options) is still checked there.
    xnode.maps.sync(state(ranged(LB_IP, f"{OUTSIDER}/32", deny=True)))
    assert xnode.xdp(syn(OUTSIDER, sport=40002)).retval == XDP_DROP
    with_options = syn(OUTSIDER, sport=40003, options=[IPOption_Router_Alert()])
    assert xnode.xdp(with_options).retval == XDP_PASS
    assert xnode.ingress(with_options).retval == TC_ACT_SHOT
    stats = xnode.maps.stats()
    assert stats["drop_src_range"] == 3 and stats["xdp_drop_src_range"] == 2, "the one with options at tc"
