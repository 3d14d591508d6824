"""BPF unit tests of direct pod traffic on a backend's node (the real bpf_lb.o): a client that reaches a Service's
backend pod at the pod's own address gets its replies, untranslated, in every mode; so does a connection the pod
opens itself; while a reply of a flow that really was DSR'd, whose state this node lost, still never leaves with
the pod's address.  Whole frames, checksums included."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.lbmaps import NodeConfig
from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_PASS
from bpflb.model.cluster import dsr_backends, dsr_frontends
from bpflb.model.types import Mode, Proto
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL,
    LOCAL_POD,
    NODE1,
    NODE2_MAC,
    OTHER_NODE,
    Node,
    XdpNode,
    assert_frame,
    backend,
    dsr_option,
    fe,
    state,
)

pytestmark = pytest.mark.privileged



def backend_node(node: Node, mode: Mode) -> None:
    desired = state(fe(NODE1, 30080, (LOCAL,)), fe(NODE1, 30081, (backend(LOCAL_POD, 8081, local=True,
                                                                            proto=Proto.UDP),), proto=Proto.UDP))
    node.program(desired, mode)
    node.cluster.sync(dsr_frontends(desired, {IPv4Address(NODE1), IPv4Address(OTHER_NODE)}),
                      {b.l4 for f in desired.frontends.values() for b in f.backends},
                      {IPv4Network(f"{NODE1}/32"), IPv4Network(f"{OTHER_NODE}/32"), IPv4Network("10.244.0.0/16")},
                      dsr_backends=dsr_backends(desired))


def to_pod(flags: str, sport: int = 41000, *, payload: bytes = b"") -> bytes:
    """The client's packet to the pod's own address (routed to this node, as a cloud router does)."""
    pkt = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=64, id=3) / \
        TCP(sport=sport, dport=8080, flags=flags, seq=100)
    return bytes(pkt / Raw(payload) if payload else pkt)


def from_pod(flags: str, dport: int = 41000, *, sport: int = 8080, payload: bytes = b"") -> bytes:
    """The pod's packet as it leaves through the external device."""
    pkt = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=63, id=9) / \
        TCP(sport=sport, dport=dport, flags=flags, seq=900, ack=101)
    return bytes(pkt / Raw(payload) if payload else pkt)


@pytest.mark.parametrize("mode", [Mode.SNAT, Mode.DSR, Mode.HYBRID])
def test_a_client_reaching_the_pod_directly_gets_its_replies(node: Node, mode: Mode) -> None:
    backend_node(node, mode)
    syn = node.ingress(to_pod("S"))
    assert syn.retval == TC_ACT_OK and syn.data == to_pod("S"), "not a Service's packet: the kernel routes it"
    for flags, payload in (("SA", b""), ("PA", b"HTTP/1.1 200 OK"), ("FA", b"")):
        out = node.egress(from_pod(flags, payload=payload))
        assert out.retval == TC_ACT_OK
        assert_frame(out.data, from_pod(flags, payload=payload))        # untranslated: the pod's own address
    stats = node.maps.stats()
    assert stats["direct_flow"] == 1 and stats.get("drop_dsr_no_state", 0) == 0


def test_a_connection_the_pod_opens_from_its_service_port_works(node: Node) -> None:
    backend_node(node, Mode.DSR)
    assert node.egress(from_pod("S", dport=443)).retval == TC_ACT_OK
    assert node.egress(from_pod("A", dport=443, payload=b"GET")).retval == TC_ACT_OK
    assert node.maps.stats()["direct_flow"] == 1


def test_a_reply_of_a_dsr_flow_whose_state_was_lost_still_never_leaves(node: Node) -> None:
    backend_node(node, Mode.DSR)
    request = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                    IP(src=CLIENT, dst=LOCAL_POD, ttl=63, options=[dsr_option(OTHER_NODE, 30080)]) /
                    TCP(sport=41001, dport=8080, flags="S", seq=100))
    assert node.ingress(request).retval == TC_ACT_REDIRECT
    for key in [k for k, _ in node.maps.ct_rev.items_raw()]:
        node.maps.ct_rev.delete_raw(key)                      # the state is lost (LRU pressure, say)
    # The client's next segments carry no option; they must not turn the flow into a direct one.
    ack = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63) /
                TCP(sport=41001, dport=8080, flags="A", seq=101, ack=901))
    assert node.ingress(ack).retval != TC_ACT_SHOT
    out = node.egress(from_pod("PA", dport=41001, payload=b"leak?"))
    assert out.retval == TC_ACT_SHOT
    stats = node.maps.stats()
    assert stats["drop_dsr_no_state"] == 1 and stats.get("direct_flow", 0) == 0


def test_an_unknown_flow_of_a_backend_stays_dropped(node: Node) -> None:
    """Neither seen starting directly nor by DSR: dropped, as before."""
    backend_node(node, Mode.SNAT)
    assert node.egress(from_pod("PA", dport=41002, payload=b"?")).retval == TC_ACT_SHOT
    # Only a SYN without ACK opens a direct flow; a stray SYN-ACK from the client does not.
    node.ingress(to_pod("SA", sport=41002))
    assert node.egress(from_pod("A", dport=41002)).retval == TC_ACT_SHOT


def test_a_closed_direct_flow_lasts_closing_timeout_then_needs_a_new_syn(node: Node) -> None:
    backend_node(node, Mode.SNAT)
    node.maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=node.eth0,
                                    closing_timeout=0))
    node.ingress(to_pod("S", sport=41003))
    assert node.egress(from_pod("SA", dport=41003)).retval == TC_ACT_OK
    assert node.egress(from_pod("R", dport=41003)).retval == TC_ACT_OK      # the RST itself leaves
    flows = list(node.obj.map("lb_direct").items_raw())
    assert len(flows) == 1 and node.obj.map("lb_direct").decode_value(flows[0][1]).closing == 1
    # closing_timeout 0: the next packet of the closed flow finds it over (its clock ran since the RST).
    assert node.egress(from_pod("A", dport=41003)).retval == TC_ACT_SHOT
    node.ingress(to_pod("S", sport=41003))                                   # the tuple reused by a new flow
    assert node.egress(from_pod("SA", dport=41003)).retval == TC_ACT_OK


def test_udp_replies_of_backends_are_never_dropped(node: Node) -> None:
    backend_node(node, Mode.DSR)
    reply = bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT) /
                  UDP(sport=8081, dport=5353) / Raw(b"x"))
    assert node.egress(reply).retval == TC_ACT_OK


def test_xdp_passes_direct_pod_traffic_to_tc_which_records_it(xnode: XdpNode) -> None:
    backend_node(xnode, Mode.DSR)
    run = xnode.xdp(to_pod("S", sport=41004))
    assert run.retval == XDP_PASS and run.data == to_pod("S", sport=41004)
    xnode.ingress(run.data)
    assert xnode.egress(from_pod("SA", dport=41004)).retval == TC_ACT_OK
