"""BPF unit tests of the SNAT port pool (natpool.h, flow.h, reset.h): ports unique per full tuple at high
occupancy, the default range's capacity, exhaustion answered with a RST (TCP) or ICMP port unreachable (UDP)
and counted (never towards a sender that is no unicast host, ICMP within the node's budget), ports of the node's own
sockets (connecting, bound, listening, in TIME_WAIT) never handed out, and dead flows' ports given again only when
both of their entries are dead."""

from __future__ import annotations

import select
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
from bpflb.model.types import Proto
from tests.bpf.ct_util import (
    age,
    backend_frame,
    client_frame,
    configure,
    entries,
    inside,
    out_sport,
    the_flow,
    with_sport,
)
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    NODE1,
    NODE2_MAC,
    REMOTE_POD,
    SENDERS,
    Node,
    XdpNode,
    assert_frame,
    backend,
    fe,
    state,
)

pytestmark = pytest.mark.privileged

OTHER_POD = "10.244.2.11"


def program(node: Node, **settings: Any) -> None:
    configure(node, **settings)
    node.maps.sync(state(
        fe(NODE1, 30080, (backend(REMOTE_POD, 8080, local=False),)),
        fe(NODE1, 30090, (backend(REMOTE_POD, 9090, local=False),)),
        fe(NODE1, 30180, (backend(OTHER_POD, 8080, local=False),)),
        fe(NODE1, 30080, (backend(REMOTE_POD, 8080, local=False, proto=Proto.UDP),), proto=Proto.UDP)))


def open_flows(node: Node, template: bytes, first_sport: int, count: int) -> list[int]:
    """count new flows from consecutive client ports; the SNAT port each got (all must be forwarded)."""
    ports = []
    with inside(node):
        for sport in range(first_sport, first_sport + count):
            run = node.obj.test_run("lb_ingress", with_sport(template, sport), ifindex=node.eth0)
            assert run.retval == TC_ACT_REDIRECT, f"flow {sport - first_sport} of {count} was not forwarded"
            ports.append(out_sport(run.data))
    return ports


SYN = client_frame(TCP(sport=1, dport=30080, flags="S", seq=1000))


def test_the_default_range_gives_30000_concurrent_flows_to_one_backend_unique_ports(node: Node) -> None:
    """docs/limits.md's figure.  128 random tries per new flow: with k ports held a flow is refused with
    probability (k/32768)^128, so a refusal before 30,000 flows are in place happens in about 0.3% of fills
    (and a second one almost never): the client's retry from another port is allowed for, as a client would."""
    program(node)      # the agent's default range, 32768-65535
    ports: list[int] = []
    refused = 0
    with inside(node):
        sport = 1024
        while len(ports) < 30_000 and refused <= 3:
            run = node.obj.test_run("lb_ingress", with_sport(SYN, sport), ifindex=node.eth0)
            if run.retval == TC_ACT_REDIRECT and Ether(run.data)[IP].dst == REMOTE_POD:
                ports.append(out_sport(run.data))
            else:
                refused += 1
            sport += 1
    assert refused <= 3 and len(ports) == 30_000, (refused, len(ports))
    assert len(set(ports)) == 30_000, "two live flows share a SNAT port"
    assert min(ports) >= 32768 and max(ports) <= 65535
    assert len(list(node.maps.ct_rev.items_raw())) == 30_000
    assert node.maps.stats().get("drop_nat_exhausted", 0) == refused


def test_ports_are_unique_per_backend_tuple_not_per_node(node: Node) -> None:
    """nf_nat's rule: a port must only be unique per (node, backend address, backend port, protocol)."""
    program(node, nat_port_min=40000, nat_port_max=40063)
    per_tuple = {
        "10.244.2.10:8080/TCP": open_flows(node, SYN, 2000, 64),
        "10.244.2.10:9090/TCP": open_flows(node, client_frame(TCP(sport=1, dport=30090, flags="S")), 3000, 64),
        "10.244.2.11:8080/TCP": open_flows(node, client_frame(TCP(sport=1, dport=30180, flags="S")), 4000, 64),
        "10.244.2.10:8080/UDP": open_flows(node, client_frame(UDP(sport=1, dport=30080), b"x"), 5000, 64),
    }
    for tuple_, ports in per_tuple.items():
        assert sorted(ports) == list(range(40000, 40064)), f"{tuple_}: every port of the range, each once"
    # Full for 10.244.2.10:8080/TCP, so the next flow there is refused, while the others were not affected.
    refused = node.ingress(with_sport(SYN, 6000))
    assert refused.retval == TC_ACT_REDIRECT and Ether(refused.data)[TCP].flags == "RA"


def test_exhausted_tcp_is_answered_with_a_reset_and_counted(node: Node) -> None:
    program(node, nat_port_min=40000, nat_port_max=40015)
    open_flows(node, SYN, 2000, 16)
    syn = client_frame(TCP(sport=2100, dport=30080, flags="S", seq=1000, window=500), payload=b"early data")
    run = node.ingress(syn)
    assert run.retval == TC_ACT_REDIRECT
    expected = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=NODE1, dst=CLIENT, ttl=64, id=0, flags="DF") / \
        TCP(sport=30080, dport=2100, flags="RA", seq=0, ack=1000 + 1 + len(b"early data"), window=0)
    assert_frame(run.data, bytes(expected))
    # A segment with an ACK (mid-stream, no state, no port) gets a RST with its ACK number as sequence.
    ack = node.ingress(client_frame(TCP(sport=2101, dport=30080, flags="A", seq=5, ack=777)))
    expected_ack = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=NODE1, dst=CLIENT, ttl=64, id=0, flags="DF") / \
        TCP(sport=30080, dport=2101, flags="R", seq=777, ack=0, window=0)
    assert_frame(ack.data, bytes(expected_ack))
    # A RST is never answered.
    assert node.ingress(client_frame(TCP(sport=2102, dport=30080, flags="R", seq=5))).retval == TC_ACT_SHOT
    stats = node.maps.stats()
    assert stats["drop_nat_exhausted"] == 3 and stats["reset_nat_exhausted"] == 2
    assert stats["new_flow"] == 16
    assert len(entries(node.maps.ct_fwd)) == 16, "refused flows leave no state"


def test_exhausted_udp_is_answered_with_icmp_port_unreachable(node: Node) -> None:
    program(node, nat_port_min=40000, nat_port_max=40015)
    udp = client_frame(UDP(sport=1, dport=30080), b"ping")
    open_flows(node, udp, 2000, 16)
    original = with_sport(udp, 2100)
    run = node.ingress(original)
    assert run.retval == TC_ACT_REDIRECT
    quoted = bytes(Ether(original)[IP])[:28]
    expected = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / \
        IP(src=NODE1, dst=CLIENT, ttl=64, id=0, tos=0xC0, proto=1) / ICMP(type=3, code=3) / Raw(quoted)
    assert_frame(run.data, bytes(expected))
    stats = node.maps.stats()
    assert stats["drop_nat_exhausted"] == 1 and stats["icmp_nat_exhausted"] == 1


@pytest.mark.parametrize("case", [*SENDERS, "a frame sent to the broadcast MAC"])
def test_exhausted_tcp_sends_no_reset_to_a_sender_that_is_no_unicast_host(node: Node, case: str) -> None:
    """The RST of a refusal keeps icmp.h's sender rules: a spoofed flood on an exhausted tuple reflects
    nothing towards a broadcast, multicast, zero, loopback, own or unroutable address."""
    program(node, nat_port_min=40000, nat_port_max=40015)
    open_flows(node, SYN, 2000, 16)
    if case in SENDERS:
        frame = client_frame(TCP(sport=2100, dport=30080, flags="S", seq=1000), src=SENDERS[case])
    else:
        frame = bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / Ether(with_sport(SYN, 2100))[IP])
    run = node.ingress(frame)
    stats = node.maps.stats()
    if case not in SENDERS:        # never this node's to balance (the kernel's TCP drops it): passed as it came
        assert (run.retval, run.data) == (TC_ACT_OK, frame)
        assert stats["pass_l2_group"] == 1 and not stats.get("drop_nat_exhausted")
        return
    assert run.retval == TC_ACT_SHOT and not Ether(run.data)[TCP].flags.R, Ether(run.data)[TCP].flags
    assert stats["drop_nat_exhausted"] == 1 and stats["reset_suppressed"] == 1
    # The control: a unicast client in the same state still gets its RST.
    assert Ether(node.ingress(with_sport(SYN, 2101)).data)[TCP].flags == "RA"
    assert node.maps.stats()["reset_suppressed"] == 1


def test_exhausted_udp_gets_no_more_errors_than_the_icmp_budget(node: Node) -> None:
    """The ICMP errors of refusals draw on the node's budget (rate 1/s, burst 2 here): of 10 refused datagrams,
    2 are answered (one more per second the test takes), the rest counted as rate-limited."""
    program(node, nat_port_min=40000, nat_port_max=40015)
    udp = client_frame(UDP(sport=1, dport=30080), b"ping")
    open_flows(node, udp, 2000, 16)
    frames = [with_sport(udp, 2100 + i) for i in range(10)]
    with inside(node):
        start = time.monotonic()
        node.maps.set_icmp_limit(rate=1, burst=2)
        runs = [node.obj.test_run("lb_ingress", f, ifindex=node.eth0) for f in frames]
        elapsed = time.monotonic() - start
    answered = [r for r in runs if Ether(r.data).haslayer(ICMP)]
    assert all(r.retval == TC_ACT_REDIRECT for r in answered) and \
        all(r.retval == TC_ACT_SHOT for r in runs if r not in answered)
    assert len(answered) == 2 or 2 < len(answered) <= 2 + int(elapsed), (len(answered), elapsed)
    stats = node.maps.stats()
    assert stats["drop_nat_exhausted"] == 10 and stats["icmp_nat_exhausted"] == 10
    assert stats["icmp_sent"] == len(answered) and stats["icmp_rate_limited"] == 10 - len(answered)


def test_a_port_a_node_socket_uses_towards_the_backend_is_never_handed_out(node: Node) -> None:
    """The pool's socket check: a connection of the node itself (here in SYN_SENT, towards the remote pod)
    and a bound UDP socket keep their ports; other backend tuples still get those ports."""
    program(node, nat_port_min=40000, nat_port_max=40015)
    with inside(node):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setblocking(False)
        tcp.bind((NODE1, 40007))
        assert tcp.connect_ex((REMOTE_POD, 8080)) in (0, 115)   # EINPROGRESS: the SYN is out, unanswered
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((NODE1, 40011))
    try:
        tcp_ports = open_flows(node, SYN, 2000, 15)
        assert 40007 not in tcp_ports and len(set(tcp_ports)) == 15
        refused = node.ingress(with_sport(SYN, 2100))       # the 16th port is the socket's
        assert Ether(refused.data)[TCP].flags == "RA"
        udp_ports = open_flows(node, client_frame(UDP(sport=1, dport=30080), b"x"), 3000, 15)
        assert 40011 not in udp_ports
        assert 40007 in open_flows(node, client_frame(TCP(sport=1, dport=30090, flags="S")), 4000, 16), \
            "the socket only holds its port towards 10.244.2.10:8080"
        assert node.maps.stats()["nat_port_socket"] >= 2
    finally:
        tcp.close()
        udp.close()


def _time_wait(node: Node, port: int) -> socket.socket:
    """Inside node1: a connection of the node from NODE1:port to the remote pod, taken through its handshake
    and closed (FIN both ways) by frames written on eth0's peer, so that it lies in TIME_WAIT; returns the
    raw socket on the peer (the caller closes it)."""
    wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    wire.bind(("wire0", 0))
    wire.settimeout(5)

    def from_node(flag: str) -> TCP:
        while True:
            pkt = Ether(wire.recv(2048))
            if pkt.haslayer(TCP) and pkt[TCP].sport == port and flag in str(pkt[TCP].flags):
                return cast(TCP, pkt[TCP])

    def to_node(flags: str, seq: int, ack: int) -> None:
        wire.send(bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63) /
                        TCP(sport=8080, dport=port, flags=flags, seq=seq, ack=ack, window=65535)))

    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.bind((NODE1, port))
    conn.setblocking(False)
    assert conn.connect_ex((REMOTE_POD, 8080)) == 115                    # EINPROGRESS
    syn = from_node("S")
    to_node("SA", 5000, syn.seq + 1)
    _, writable, _ = select.select([], [conn], [], 5)
    assert writable and conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0, "the handshake completed"
    conn.close()                                                          # the node closes first: FIN
    fin = from_node("F")
    to_node("FA", 5001, fin.seq + 1)
    return wire


def test_a_port_a_node_listener_or_time_wait_holds_is_never_handed_out(node: Node) -> None:
    """The socket check covers what the backend's reply would find: a listener on the node's address and port
    (any peer), and a connection of the node in TIME_WAIT towards the same backend tuple."""
    program(node, nat_port_min=40000, nat_port_max=40015)
    with inside(node):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((NODE1, 40005))
        listener.listen()
        wire = _time_wait(node, 40009)
        tcp_table = Path("/proc/net/tcp").read_text()
    try:
        # /proc/net/tcp: local address 0B0012C6:9C49 (198.18.0.11:40009), state 06 (TIME_WAIT)
        assert any(f.split()[1] == "0B0012C6:9C49" and f.split()[3] == "06" for f in tcp_table.splitlines()[1:]), \
            tcp_table
        ports = open_flows(node, SYN, 2000, 14)
        assert len(set(ports)) == 14 and not {40005, 40009} & set(ports), sorted(ports)
        refused = node.ingress(with_sport(SYN, 2100))          # the last two ports are the listener's and the TIME_WAIT's
        assert Ether(refused.data)[TCP].flags == "RA"
        assert node.maps.stats()["nat_port_socket"] >= 2
    finally:
        wire.close()
        listener.close()


def test_a_dead_flows_port_is_given_again_only_when_both_entries_are_dead(node: Node) -> None:
    program(node, nat_port_min=40000, nat_port_max=40000)
    udp = client_frame(UDP(sport=1, dport=30080), b"x")
    assert open_flows(node, udp, 2000, 1) == [40000]
    # The forward entry alone alive (its reverse entry ran out): the port stays with the flow.
    key, fwd = next(iter(entries(node.maps.ct_fwd).items()))
    age(node, 61)
    m = node.maps.ct_fwd
    live = m.lookup(m.decode_key(key))
    assert live is not None
    live.last_seen = fwd.last_seen
    m.update(m.decode_key(key), live)
    refused = node.ingress(with_sport(udp, 2001))
    assert Ether(refused.data).haslayer(ICMP), "a port is not given while the old flow's forward entry lives"
    # Both dead: the port serves the new flow, which now owns both of its entries.
    age(node, 61)
    assert open_flows(node, udp, 2001, 1) == [40000]
    assert node.maps.stats()["nat_port_reused"] == 1
    fwd_new, rev_new = the_flow(node, 2001)
    assert rev_new is not None and rev_new.client_port == fwd_new.client_port
    # The old flow's forward entry, dead, now carries nothing: its next datagram is a new flow (no port left).
    again = node.ingress(with_sport(udp, 2000))
    assert Ether(again.data).haslayer(ICMP)
    assert Counter(e.nat_port for e in entries(node.maps.ct_rev).values()) == Counter({fwd_new.nat_port: 1})


def test_replies_of_pooled_flows_reach_their_own_clients(node: Node) -> None:
    program(node, nat_port_min=40000, nat_port_max=40003)
    ports = open_flows(node, SYN, 2000, 4)
    for client_port, nat_port in zip(range(2000, 2004), ports, strict=True):
        reply = node.ingress(backend_frame(TCP(sport=8080, flags="SA", seq=1, ack=1001), nat_port))
        out = Ether(reply.data)
        assert (out[IP].dst, out[TCP].dport, out[TCP].sport) == (CLIENT, client_port, 30080)


def test_a_full_conntrack_map_refuses_new_flows_and_keeps_the_live_ones(node: Node) -> None:
    """262,144 forward entries (CT_MAX): the next new flow cannot be tracked and is refused with a RST (UDP:
    ICMP), counted in ct_insert_failed; its port goes back to the pool; the flows already there go on."""
    from bpflb.datapath.conntrack import CT_ENTRY, CT_TUPLE
    from bpflb.datapath.lbmaps import update_batch
    from bpflb.datapath.libbpf import const

    program(node)
    live = out_sport(node.ingress(with_sport(SYN, 2000)).data)
    room = const("CT_MAX") - len(entries(node.maps.ct_fwd))
    filler = CT_ENTRY.pack(2**63, 0, b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    update_batch(node.maps.ct_fwd, [(CT_TUPLE.pack(i.to_bytes(4, "big"), b"\x0a\0\0\x01", 1, 1, 6), filler)
                                    for i in range(1, room + 1)])
    refused = node.ingress(with_sport(SYN, 2001))
    assert Ether(refused.data)[TCP].flags == "RA"
    refused_udp = node.ingress(client_frame(UDP(sport=2002, dport=30080), b"x"))
    assert Ether(refused_udp.data).haslayer(ICMP)
    stats = node.maps.stats()
    assert stats["ct_insert_failed"] == 2 and stats.get("drop_nat_exhausted", 0) == 0
    assert len(entries(node.maps.ct_rev)) == 1, "the refused flows' ports went back to the pool"
    ack = node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="A", seq=1001, ack=1)))
    assert ack.retval == TC_ACT_REDIRECT and out_sport(ack.data) == live


def test_exhaustion_at_xdp_hands_the_packet_to_tc_which_answers(xnode: XdpNode) -> None:
    from bpflb.datapath.libbpf import XDP_PASS, XDP_TX

    program(xnode, nat_port_min=40000, nat_port_max=40000)
    assert xnode.xdp(with_sport(SYN, 2000)).retval == XDP_TX
    frame = with_sport(SYN, 2001)
    run = xnode.xdp(frame)
    assert run.retval == XDP_PASS and run.data == frame, "untouched, on to tc"
    assert Ether(xnode.ingress(frame).data)[TCP].flags == "RA"
