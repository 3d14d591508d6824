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
from tests.bpf.ct_util import backends_node, client_frame, configure, dsr_backend_node, dsr_request, from_pod
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2,
    NODE2_MAC,
    OTHER_NODE,
    REMOTE_POD,
    Node,
    assert_frame,
    backend,
    fe,
    state,
)

pytestmark = pytest.mark.privileged

ROUTER = "198.18.0.254"        # a router on the client's side of node1
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


# Errors about flows whose client port was remapped on a clash (conntrack.h's ct_portmap): the pod knows the
# flow by the remapped port, the client by its own.  Each error must reach its side quoted with that side's
# port (and the earlier flow that holds the client's tuple keeps its own translation).

POD_GW = "10.244.1.1"          # node1's address on the pods' network: where its stack's errors to a pod come from


def remapped_udp_local(node: Node) -> tuple[Packet, Packet]:
    """A DSR datagram from client port 5000 through OTHER_NODE, then one from the same port to node1's own
    NodePort :30180 (a local backend): the second flow's client port is remapped.  (the client's datagram of
    the remapped flow as it sent it, the same as node1 delivered it to the pod)."""
    backends_node(node, Proto.UDP, 8081)
    assert node.ingress(dsr_request(UDP(sport=5000, dport=8081), payload=b"hostname")).retval == TC_ACT_REDIRECT
    sent = Ether(client_frame(UDP(sport=5000, dport=30180), b"is anyone there", dst=NODE1))
    delivered = Ether(node.ingress(bytes(sent)).data)
    assert delivered[UDP].sport != 5000 and node.maps.stats()["ct_port_remapped"] == 1
    return sent, delivered


def test_a_pods_error_about_a_remapped_request_reaches_the_client_with_its_own_port(node: Node) -> None:
    """UDP port unreachable from the pod about the remapped flow's datagram (client:mapped -> pod): the client
    sees it from the frontend, about the datagram it sent from its own port; the UDP checksum in the quote is
    its own.  The same error about the earlier (DSR) flow's datagram still names that flow's frontend."""
    sent, delivered = remapped_udp_local(node)
    error = bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=64, id=5) /
                  ICMP(type=3, code=3) / Raw(quote(delivered[IP], 64)))
    run = node.egress(error)
    assert run.retval == TC_ACT_OK
    assert_frame(run.data, bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=NODE1, dst=CLIENT, ttl=64, id=5) /
                                 ICMP(type=3, code=3) / Raw(with_ttl(sent[IP], 63)[:64])))
    assert node.maps.stats()["icmp_related"] == 1

    dsr_delivered = IP(src=CLIENT, dst=LOCAL_POD, ttl=62, id=3) / UDP(sport=5000, dport=8081) / Raw(b"hostname")
    dsr_sent = IP(src=CLIENT, dst=OTHER_NODE, ttl=62, id=3) / UDP(sport=5000, dport=30080) / Raw(b"hostname")
    error = bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=64, id=6) /
                  ICMP(type=3, code=3) / Raw(quote(dsr_delivered, 64)))
    assert_frame(node.egress(error).data,
                 bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=OTHER_NODE, dst=CLIENT, ttl=64, id=6) /
                       ICMP(type=3, code=3) / Raw(bytes(dsr_sent)[:64])))


@pytest.mark.parametrize("length", [28, 576])
def test_the_nodes_frag_needed_about_a_remapped_tcp_request_reaches_the_client(node: Node, length: int) -> None:
    """node1's stack cannot take the remapped flow's segment on to the pod (MTU) and answers from its own
    address, quoting the segment as it was then (client:mapped -> pod): the client learns it about the
    segment it sent, TCP checksum included when quoted; the outer source stays the node's."""
    backends_node(node)
    assert node.ingress(dsr_request(TCP(sport=45000, dport=8080, flags="S", seq=100))).retval == TC_ACT_REDIRECT
    mapped = int(Ether(node.ingress(client_frame(TCP(sport=45000, dport=30180, flags="S", seq=5000))).data)[TCP].sport)
    assert mapped != 45000
    node.egress(from_pod(TCP(sport=8080, dport=mapped, flags="SA", seq=7000, ack=5001)))
    sent = Ether(client_frame(TCP(sport=45000, dport=30180, flags="PA", seq=5001, ack=7001), BIG))
    delivered = Ether(node.ingress(bytes(sent)).data)
    assert (delivered[IP].dst, delivered[TCP].sport) == (LOCAL_POD, mapped)
    error = bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=POD_GW, dst=CLIENT, ttl=64, id=5) /
                  ICMP(type=3, code=4, nexthopmtu=1000) / Raw(quote(delivered[IP], length)))
    run = node.egress(error)
    assert run.retval == TC_ACT_OK
    assert_frame(run.data, bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=POD_GW, dst=CLIENT, ttl=64, id=5) /
                                 ICMP(type=3, code=4, nexthopmtu=1000) / Raw(with_ttl(sent[IP], 63)[:length])))


def test_frag_needed_about_a_remapped_reply_reaches_the_pod_with_its_port(node: Node) -> None:
    """A smaller MTU on the client's side: the router's error quotes the reply as the client would get it
    (node1:30180 -> client:45000); the pod learns it about the reply it sent, to the remapped port."""
    backends_node(node)
    node.ingress(dsr_request(TCP(sport=45000, dport=8080, flags="S", seq=100)))
    mapped = int(Ether(node.ingress(client_frame(TCP(sport=45000, dport=30180, flags="S", seq=5000))).data)[TCP].sport)
    assert mapped != 45000
    reply = Ether(from_pod(TCP(sport=8080, dport=mapped, flags="PA", seq=7001, ack=5001), BIG))
    translated = Ether(node.egress(bytes(reply)).data)
    assert (translated[IP].src, translated[TCP].sport, translated[TCP].dport) == (NODE1, 30180, 45000)
    run = node.ingress(icmp_error(CLIENT_MAC, ROUTER, NODE1, quote(translated[IP], 576)))
    assert run.retval == TC_ACT_REDIRECT
    assert_frame(run.data, expected_error(CLIENT_MAC, ROUTER, LOCAL_POD, bytes(reply[IP])[:576]))
    assert node.maps.stats()["icmp_related"] == 1


def test_the_dsr_backends_node_delivers_an_error_about_a_remapped_reply_with_the_pods_port(node: Node) -> None:
    """DSR, the flow remapped on the backend's node (node1) because a local flow holds the client's tuple: the
    balancing node sends a router's error about the reply on to the pod (client's own port in the quote);
    node1 gives the quote the port the pod answered.  An error about the local flow's reply is not taken
    for the DSR flow."""
    backends_node(node)
    node.ingress(client_frame(TCP(sport=45100, dport=30180, flags="S", seq=100)))
    node.egress(from_pod(TCP(sport=8080, dport=45100, flags="SA", seq=900, ack=101)))
    mapped = int(Ether(node.ingress(dsr_request(TCP(sport=45100, dport=8080, flags="S", seq=5000))).data)[TCP].sport)
    assert mapped != 45100
    pod_sent = IP(src=LOCAL_POD, dst=CLIENT, ttl=64, id=3) / TCP(sport=8080, dport=mapped, flags="PA", seq=7001,
                                                                 ack=5001) / Raw(BIG)
    as_balancer_sent_on = IP(src=LOCAL_POD, dst=CLIENT, ttl=62, id=3) / TCP(sport=8080, dport=45100, flags="PA",
                                                                            seq=7001, ack=5001) / Raw(BIG)
    run = node.ingress(icmp_error(NODE2_MAC, ROUTER, LOCAL_POD, quote(with_ttl(as_balancer_sent_on, 62), 576), ttl=63))
    assert run.retval == TC_ACT_REDIRECT
    assert_frame(run.data, expected_error(NODE2_MAC, ROUTER, LOCAL_POD, with_ttl(pod_sent, 62)[:576], ttl=62))
    assert node.maps.stats()["icmp_related"] == 1

    # The local flow's reply, node1:30180 -> client:45100: its error reaches the pod about port 45100.
    local_reply = IP(src=LOCAL_POD, dst=CLIENT, ttl=63, id=8) / TCP(sport=8080, dport=45100, flags="A", seq=901,
                                                                    ack=101)
    as_client_got = IP(src=NODE1, dst=CLIENT, ttl=63, id=8) / TCP(sport=30180, dport=45100, flags="A", seq=901,
                                                                  ack=101)
    run = node.ingress(icmp_error(CLIENT_MAC, ROUTER, NODE1, quote(as_client_got, 40)))
    assert_frame(run.data, expected_error(CLIENT_MAC, ROUTER, LOCAL_POD, bytes(local_reply)[:40]))


def test_a_pods_error_about_a_remapped_dsr_request_names_the_dsr_frontend_and_the_clients_port(node: Node) -> None:
    """The other way round: a local UDP flow holds client port 5100, a DSR datagram from it is remapped; the
    pod's port unreachable about that datagram reaches the client from the frontend it used (through
    OTHER_NODE), about its own port."""
    backends_node(node, Proto.UDP, 8081)
    node.ingress(client_frame(UDP(sport=5100, dport=30180), b"hostname"))
    delivered = Ether(node.ingress(dsr_request(UDP(sport=5100, dport=8081), payload=b"hostname")).data)
    assert delivered[UDP].sport != 5100 and delivered[IP].ihl == 5
    dsr_sent = IP(src=CLIENT, dst=OTHER_NODE, ttl=62, id=3) / UDP(sport=5100, dport=30080) / Raw(b"hostname")
    error = bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=64, id=6) /
                  ICMP(type=3, code=3) / Raw(quote(delivered[IP], 64)))
    run = node.egress(error)
    assert run.retval == TC_ACT_OK
    assert_frame(run.data, bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=OTHER_NODE, dst=CLIENT, ttl=64, id=6) /
                                 ICMP(type=3, code=3) / Raw(bytes(dsr_sent)[:64])))
