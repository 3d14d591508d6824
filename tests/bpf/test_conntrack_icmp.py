"""BPF unit tests of ICMP errors about translated flows (ct_icmp.h, nf_conntrack's RELATED): an error about
a SNAT'd request reaches the client, one about a reply (SNAT, DSR) reaches the pod, one the node or its pod
raise about a DNAT'd or DSR request reaches the client; outer and quoted headers rewritten, and every
checksum -- outer IPv4, ICMP, quoted IPv4, quoted TCP/UDP -- exactly what the sender's own packet had."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT
from bpflb.model.types import Mode, Proto
from tests.bpf.ct_util import client_frame, configure, dsr_backend_node
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2,
    NODE2_MAC,
    REMOTE_POD,
    Node,
    assert_frame,
    backend,
    fe,
    state,
)

pytestmark = pytest.mark.privileged

ROUTER = "198.18.0.254"        # a router on the client's side of node1
OTHER_NODE = "198.18.0.13"     # the balancing node of a DSR flow, seen from a backend's node
BIG = b"d" * 1200


def program(node: Node, mode: Mode = Mode.SNAT) -> None:
    configure(node, mode=mode)
    node.maps.sync(state(fe(NODE1, 30080, (backend(REMOTE_POD, 8080, local=False),)),
                         fe(NODE1, 30081, (backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP),),
                            proto=Proto.UDP),
                         fe(NODE1, 30082, (backend(LOCAL_POD, 8081, local=True, proto=Proto.UDP),),
                            proto=Proto.UDP)))


def quote(ip_packet: Packet | bytes, length: int) -> bytes:
    """The first `length` bytes of an IPv4 packet, as an ICMP error quotes them."""
    return bytes(ip_packet)[:length]


def with_ttl(ip_packet: Packet, ttl: int) -> bytes:
    """The packet as a router saw it, TTL spent on the way (header checksum recomputed)."""
    pkt = IP(bytes(ip_packet))
    pkt.ttl = ttl
    del pkt.chksum
    return bytes(IP(bytes(pkt)))


def icmp_error(src_mac: str, src: str, dst: str, quoted: bytes, type_: int = 3, code: int = 4,
               mtu: int = 1400, ttl: int = 64) -> bytes:
    icmp = ICMP(type=type_, code=code, nexthopmtu=mtu) if type_ == 3 else ICMP(type=type_, code=code)
    return bytes(Ether(src=src_mac, dst=ETH0_MAC) / IP(src=src, dst=dst, ttl=ttl, id=5) / icmp / Raw(quoted))


def expected_error(src_mac: str, src: str, dst: str, quoted: bytes, type_: int = 3, code: int = 4,
                   mtu: int = 1400, ttl: int = 63) -> bytes:
    """The error as node1 forwards it: translated, TTL spent, the MACs left to the kernel's neighbour
    output (bpf_redirect_neigh), so as they came in."""
    icmp = ICMP(type=type_, code=code, nexthopmtu=mtu) if type_ == 3 else ICMP(type=type_, code=code)
    return bytes(Ether(src=src_mac, dst=ETH0_MAC) / IP(src=src, dst=dst, ttl=ttl, id=5) / icmp / Raw(quoted))


@pytest.mark.parametrize("length", [28, 576])
@pytest.mark.parametrize(("code", "mtu"), [(4, 1400), (1, 0)], ids=["frag needed", "host unreachable"])
def test_an_error_about_a_snat_request_reaches_the_client(node: Node, length: int, code: int, mtu: int) -> None:
    """A router behind node1 cannot forward the SNAT'd request (too big for the next hop; the backend's host
    does not answer ARP): the client learns it about the packet it sent (quoted exactly as it sent it, its
    TCP checksum included when quoted)."""
    program(node)
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="S", seq=1000)))
    sent = Ether(client_frame(TCP(sport=2000, dport=30080, flags="PA", seq=1001, ack=1), BIG))
    translated = Ether(node.ingress(bytes(sent)).data)
    assert translated[IP].dst == REMOTE_POD
    run = node.ingress(icmp_error(NODE2_MAC, NODE2, NODE1, quote(translated[IP], length), code=code, mtu=mtu))
    assert run.retval == TC_ACT_REDIRECT
    as_sent = with_ttl(sent[IP], 63)
    assert_frame(run.data, expected_error(NODE2_MAC, NODE2, CLIENT, as_sent[:length], code=code, mtu=mtu))
    assert node.maps.stats()["icmp_related"] == 1


def test_an_error_the_backend_raises_itself_names_the_frontend(node: Node) -> None:
    """UDP port unreachable from the pod: the client sees it from the frontend, about its own datagram."""
    program(node)
    sent = Ether(client_frame(UDP(sport=2000, dport=30081), b"is anyone there"))
    translated = Ether(node.ingress(bytes(sent)).data)
    run = node.ingress(icmp_error(NODE2_MAC, REMOTE_POD, NODE1, quote(translated[IP], 64), code=3, mtu=0, ttl=63))
    assert run.retval == TC_ACT_REDIRECT
    assert_frame(run.data, expected_error(NODE2_MAC, NODE1, CLIENT, with_ttl(sent[IP], 63)[:64], code=3,
                                          mtu=0, ttl=62))


def test_time_exceeded_about_a_snat_request_reaches_the_client(node: Node) -> None:
    program(node)
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="S", seq=1000)))
    sent = Ether(client_frame(TCP(sport=2000, dport=30080, flags="A", seq=1001, ack=1)))
    translated = Ether(node.ingress(bytes(sent)).data)
    run = node.ingress(icmp_error(NODE2_MAC, NODE2, NODE1, quote(translated[IP], 40), type_=11, code=0))
    assert_frame(run.data, expected_error(NODE2_MAC, NODE2, CLIENT, with_ttl(sent[IP], 63)[:40], type_=11, code=0))


def test_frag_needed_about_a_reply_reaches_the_pod(node: Node) -> None:
    """A smaller MTU on the client's side: the pod, whose reply it is, learns it, about the reply it sent."""
    program(node)
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="S", seq=1000)))
    nat_port = Ether(node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="A", seq=1001, ack=1))).data).sport
    reply = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63, id=9) / \
        TCP(sport=8080, dport=nat_port, flags="PA", seq=1, ack=1001) / Raw(BIG)
    translated = Ether(node.ingress(bytes(reply)).data)
    assert (translated[IP].dst, translated[TCP].dport) == (CLIENT, 2000)
    run = node.ingress(icmp_error(CLIENT_MAC, ROUTER, NODE1, quote(translated[IP], 576)))
    assert run.retval == TC_ACT_REDIRECT
    assert_frame(run.data, expected_error(CLIENT_MAC, ROUTER, REMOTE_POD, with_ttl(reply[IP], 62)[:576]))


def test_frag_needed_about_a_dsr_reply_reaches_the_pod(node: Node) -> None:
    """DSR: the pod's reply left its node from the frontend; the error comes back to the frontend's node,
    which sends it on to the pod, about the reply as the pod sent it."""
    program(node, Mode.DSR)
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="S", seq=1000)))
    pod_sent = IP(src=REMOTE_POD, dst=CLIENT, ttl=64, id=3) / TCP(sport=8080, dport=2000, flags="PA", seq=1,
                                                                  ack=1001) / Raw(BIG)
    as_client_side = IP(src=NODE1, dst=CLIENT, ttl=62, id=3) / TCP(sport=30080, dport=2000, flags="PA", seq=1,
                                                                   ack=1001) / Raw(BIG)
    run = node.ingress(icmp_error(CLIENT_MAC, ROUTER, NODE1, quote(as_client_side, 576)))
    assert run.retval == TC_ACT_REDIRECT
    assert_frame(run.data, expected_error(CLIENT_MAC, ROUTER, REMOTE_POD, with_ttl(pod_sent, 62)[:576]))


def test_the_backends_node_tells_the_dsr_client_about_the_frontend(node: Node) -> None:
    """DSR, the backend's node: its stack cannot forward the client's request to the pod (MTU) and answers
    the client, quoting the request as it arrived; the client must see it about the frontend it used."""
    dsr_backend_node(node, (OTHER_NODE,))
    opt = IPOption(b"\x9a\x08" + (30080).to_bytes(2, "big") + IPv4Address(OTHER_NODE).packed)
    node.ingress(bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63, options=[opt]) /
                       TCP(sport=45000, dport=8080, flags="S", seq=1000)))
    arrived = IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=4) / TCP(sport=45000, dport=8080, flags="PA", seq=1001,
                                                                ack=1) / Raw(BIG)
    sent = IP(src=CLIENT, dst=OTHER_NODE, ttl=63, id=4) / TCP(sport=45000, dport=30080, flags="PA", seq=1001,
                                                              ack=1) / Raw(BIG)
    error = bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=NODE1, dst=CLIENT, ttl=64, id=5) /
                  ICMP(type=3, code=4, nexthopmtu=1400) / Raw(quote(arrived, 576)))
    run = node.egress(error)
    assert run.retval == TC_ACT_OK
    assert_frame(run.data, bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=NODE1, dst=CLIENT, ttl=64, id=5) /
                                 ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(sent)[:576])))


def test_a_local_pods_port_unreachable_names_the_frontend(node: Node) -> None:
    program(node)
    sent = Ether(client_frame(UDP(sport=2000, dport=30082), b"hello pod"))
    delivered = Ether(node.ingress(bytes(sent)).data)
    assert delivered[IP].dst == LOCAL_POD
    error = bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=64, id=5) /
                  ICMP(type=3, code=3) / Raw(quote(delivered[IP], 64)))
    run = node.egress(error)
    assert run.retval == TC_ACT_OK
    assert_frame(run.data, bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=NODE1, dst=CLIENT, ttl=64, id=5) /
                                 ICMP(type=3, code=3) / Raw(with_ttl(sent[IP], 63)[:64])))


def test_errors_about_no_flow_and_other_icmp_pass_untouched(node: Node) -> None:
    program(node)
    stranger = IP(src=NODE1, dst="10.244.2.99", ttl=64) / TCP(sport=40000, dport=80, flags="S")
    for frame in (icmp_error(NODE2_MAC, NODE2, NODE1, quote(stranger, 40)),
                  bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1) / ICMP(type=8)),
                  icmp_error(NODE2_MAC, NODE2, NODE1, b"\x45\x00"[:2])):
        run = node.ingress(frame)
        assert run.retval == TC_ACT_OK and run.data == frame
    assert node.maps.stats().get("icmp_related", 0) == 0
