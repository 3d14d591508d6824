"""BPF unit tests of flow lifetimes (conntrack.h): a handshake that never completes holds its state and
port 60 s from its first packet and no longer, whatever the backend retransmits; a completed one lives the
established lifetime; a flow is closing only once both sides sent FIN (a half-closed connection keeps its
port), or on RST; UDP lives 60 s refreshed by either direction, the two entries of a flow kept in step; a
live entry is never overwritten. Time passes by moving the entries' clocks back (ct_util.age)."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.l2 import Ether

from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT
from bpflb.model.types import Proto
from tests.bpf.ct_util import (
    age,
    backend_frame,
    client_frame,
    configure,
    dsr_backend_node,
    entries,
    flag,
    the_flow,
)
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2_MAC,
    Node,
    backend,
    fe,
    state,
)

pytestmark = pytest.mark.privileged

NAT_PORT = 40000


def one_port(node: Node, **settings: Any) -> None:
    """node1 with a single SNAT port and the agent's lifetimes: every flow to the remote pod competes for it."""
    configure(node, nat_port_min=NAT_PORT, nat_port_max=NAT_PORT, **settings)
    node.maps.sync(state(fe(NODE1, 30080, (backend("10.244.2.10", 8080, local=False),)),
                         fe(NODE1, 30081, (backend("10.244.2.10", 8081, local=False, proto=Proto.UDP),),
                            proto=Proto.UDP)))


def syn(sport: int) -> bytes:
    return client_frame(TCP(sport=sport, dport=30080, flags="S", seq=1000))


def gets_the_port(node: Node, frame: bytes) -> bool:
    out = Ether(node.ingress(frame).data)
    if out.haslayer(ICMP) or (out.haslayer(TCP) and "R" in str(out[TCP].flags)):
        return False
    assert out[IP].src == NODE1
    return bool(out.sport == NAT_PORT)


def handshake(node: Node, sport: int) -> None:
    """SYN, the backend's SYN-ACK, the client's ACK of it."""
    node.ingress(syn(sport))
    node.ingress(backend_frame(TCP(sport=8080, flags="SA", seq=5000, ack=1001), NAT_PORT))
    node.ingress(client_frame(TCP(sport=sport, dport=30080, flags="A", seq=1001, ack=5001)))


def test_a_handshake_that_never_completes_holds_its_port_60s_from_its_first_packet(node: Node) -> None:
    one_port(node)
    assert gets_the_port(node, syn(2000))
    created = the_flow(node, 2000)[0].last_seen
    age(node, 30)
    # The backend keeps retransmitting its SYN-ACK to a client that never answers (a spoofed source):
    # that does not extend the flow's life.
    for _ in range(3):
        reply = node.ingress(backend_frame(TCP(sport=8080, flags="SA", seq=5000, ack=1001), NAT_PORT))
        assert reply.retval == TC_ACT_REDIRECT
    fwd, rev = the_flow(node, 2000)
    assert rev is not None and fwd.last_seen == rev.last_seen == created - 30 * 10**9
    assert not fwd.state & flag("CT_S_ESTABLISHED") and fwd.state & flag("CT_S_SYN_ACK")
    assert not gets_the_port(node, syn(2001)), "59 s: the port is still the pending handshake's"
    age(node, 29)
    assert not gets_the_port(node, syn(2001))
    age(node, 2)
    assert gets_the_port(node, syn(2001)), "past 60 s the pending handshake's port is free"


def test_a_blind_ack_does_not_complete_the_handshake(node: Node) -> None:
    one_port(node)
    node.ingress(syn(2000))
    node.ingress(backend_frame(TCP(sport=8080, flags="SA", seq=5000, ack=1001), NAT_PORT))
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="A", seq=1001, ack=123456)))
    fwd, _ = the_flow(node, 2000)
    assert not fwd.state & flag("CT_S_ESTABLISHED")
    age(node, 61)
    assert gets_the_port(node, syn(2001))


def test_a_completed_handshake_makes_both_entries_established(node: Node) -> None:
    one_port(node, tcp_timeout=120)      # (the agent's 6 h, shortened: the test cannot age entries beyond boot)
    handshake(node, 2000)
    fwd, rev = the_flow(node, 2000)
    assert rev is not None
    assert fwd.state & flag("CT_S_ESTABLISHED") and rev.state & flag("CT_S_ESTABLISHED")
    age(node, 100)
    assert not gets_the_port(node, syn(2001)), "an idle established flow keeps its port for tcp_timeout"
    data = node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="PA", seq=1001, ack=5001)))
    assert Ether(data.data)[TCP].sport == NAT_PORT
    age(node, 121)
    assert gets_the_port(node, syn(2001))


def test_the_backends_first_data_also_completes_it(node: Node) -> None:
    """The client's ACK was not seen here (lost, or took another path): the backend's own segment says it."""
    one_port(node)
    node.ingress(syn(2000))
    node.ingress(backend_frame(TCP(sport=8080, flags="PA", seq=5001, ack=1001), NAT_PORT))
    assert the_flow(node, 2000)[0].state & flag("CT_S_ESTABLISHED")


def test_a_half_closed_connection_keeps_its_port_until_both_sides_finish(node: Node) -> None:
    one_port(node)
    handshake(node, 2000)
    # The client is done sending (FIN); the server answers for a long while after that.
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="FA", seq=1001, ack=5001)))
    fwd, rev = the_flow(node, 2000)
    assert rev is not None and not fwd.flags & flag("CT_F_CLOSING") and not rev.flags & flag("CT_F_CLOSING")
    assert fwd.state & flag("CT_S_FIN_FWD") and rev.state & flag("CT_S_FIN_FWD")
    age(node, 11)
    late = node.ingress(backend_frame(TCP(sport=8080, flags="PA", seq=5001, ack=1002), NAT_PORT, b"late answer"))
    out = Ether(late.data)
    assert late.retval == TC_ACT_REDIRECT and (out[IP].dst, out[TCP].dport, out[TCP].sport) == (CLIENT, 2000, 30080)
    ack = node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="A", seq=1002, ack=5012)))
    assert Ether(ack.data)[TCP].sport == NAT_PORT, "the client's ACKs still leave from the flow's port"
    assert not gets_the_port(node, syn(2001))
    # The server finishes too: now the flow is closing, and its port is free after the closing time.
    node.ingress(backend_frame(TCP(sport=8080, flags="FA", seq=5012, ack=1002), NAT_PORT))
    fwd, rev = the_flow(node, 2000)
    assert rev is not None and fwd.flags & flag("CT_F_CLOSING") and rev.flags & flag("CT_F_CLOSING")
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="A", seq=1002, ack=5013)))
    assert not gets_the_port(node, syn(2001))
    age(node, 11)
    assert gets_the_port(node, syn(2001))


def test_a_reset_either_way_closes_the_flow_at_once(node: Node) -> None:
    one_port(node)
    handshake(node, 2000)
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="R", seq=1001)))
    fwd, rev = the_flow(node, 2000)
    assert rev is not None and fwd.flags & rev.flags & flag("CT_F_RESET")
    age(node, 1.1)
    assert gets_the_port(node, syn(2001))


@pytest.mark.parametrize("keeper", ["client", "backend"])
def test_udp_is_kept_alive_by_either_direction_alone(node: Node, keeper: str) -> None:
    """A flow only one side keeps busy keeps both of its entries, its port and its backend: 3 minutes of
    one-way traffic with a 60 s lifetime; another client never gets the port meanwhile."""
    one_port(node)
    first = client_frame(UDP(sport=2000, dport=30081), b"hello")
    assert gets_the_port(node, first)
    for _ in range(6):
        age(node, 30)
        if keeper == "client":
            out = Ether(node.ingress(client_frame(UDP(sport=2000, dport=30081), b"still here")).data)
            assert (out[IP].dst, out[UDP].sport) == ("10.244.2.10", NAT_PORT)
        else:
            out = Ether(node.ingress(backend_frame(UDP(sport=8081), NAT_PORT, b"news")).data)
            assert (out[IP].dst, out[UDP].dport) == (CLIENT, 2000)
        assert not gets_the_port(node, client_frame(UDP(sport=2001, dport=30081), b"me too"))
        fwd, rev = the_flow(node, 2000)
        assert rev is not None and abs(fwd.last_seen - rev.last_seen) <= 10**9, "the entries move together"
    # Finally the other side speaks: it reaches the same client, from the same backend.
    reply = Ether(node.ingress(backend_frame(UDP(sport=8081), NAT_PORT, b"answer")).data)
    assert (reply[IP].src, reply[UDP].sport, reply[IP].dst, reply[UDP].dport) == (NODE1, 30081, CLIENT, 2000)
    age(node, 61)
    assert gets_the_port(node, client_frame(UDP(sport=2001, dport=30081), b"me too"))


def test_a_retransmitted_syn_keeps_the_flow_and_its_port(node: Node) -> None:
    configure(node, nat_port_min=40000, nat_port_max=40999)
    node.maps.sync(state(fe(NODE1, 30080, (backend("10.244.2.10", 8080, local=False),))))
    first = Ether(node.ingress(syn(2000)).data)[TCP].sport
    for _ in range(3):
        assert Ether(node.ingress(syn(2000)).data)[TCP].sport == first
    assert len(entries(node.maps.ct_fwd)) == len(entries(node.maps.ct_rev)) == 1


def test_a_reopened_tuple_is_a_new_flow_and_the_old_port_waits_out_its_closing_time(node: Node) -> None:
    configure(node, nat_port_min=40000, nat_port_max=40001)
    node.maps.sync(state(fe(NODE1, 30080, (backend("10.244.2.10", 8080, local=False),))))
    handshake_port = Ether(node.ingress(syn(2000)).data)[TCP].sport
    node.ingress(backend_frame(TCP(sport=8080, flags="SA", seq=5000, ack=1001), handshake_port))
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="FA", seq=1001, ack=5001)))
    node.ingress(backend_frame(TCP(sport=8080, flags="FA", seq=5001, ack=1002), handshake_port))
    # The client opens its tuple again at once (TIME_WAIT reuse): a new flow, on the other port.
    again = Ether(node.ingress(syn(2000)).data)[TCP].sport
    assert again != handshake_port
    old = [e for e in entries(node.maps.ct_rev).values() if e.nat_port == int.from_bytes(
        handshake_port.to_bytes(2, "big"), "little")]
    assert len(old) == 1 and old[0].flags & flag("CT_F_CLOSING"), "the old flow's port waits out its closing time"
    refused = Ether(node.ingress(syn(2001)).data)
    assert "R" in str(refused[TCP].flags), "both ports are held: the closing flow's and the new one's"
    age(node, 11)
    assert Ether(node.ingress(syn(2001)).data)[TCP].sport == handshake_port


def test_a_live_dsr_flow_on_the_backends_node_is_never_overwritten(node: Node) -> None:
    """A second DSR SYN for a live flow's tuple naming another frontend (spoofed, a confused node, or the
    client's port reused towards another frontend) leaves the live flow's reverse state alone; the pod still
    answers as that flow's frontend, and the new request gets a client port of its own
    (test_conntrack_clash.py)."""
    other_node = "198.18.0.13"
    dsr_backend_node(node, (other_node, "198.18.0.14"))

    def dsr_syn(fe_addr: str) -> bytes:
        opt = IPOption(b"\x9a\x08" + (30080).to_bytes(2, "big") + IPv4Address(fe_addr).packed)
        return bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63, options=[opt]) /
                     TCP(sport=45000, dport=8080, flags="S"))

    assert node.ingress(dsr_syn(other_node)).retval == TC_ACT_REDIRECT
    pod_ack = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT) / \
        TCP(sport=8080, dport=45000, flags="A")
    node.egress(bytes(pod_ack))     # the pod's first non-SYN segment: the flow is established
    second = Ether(node.ingress(dsr_syn("198.18.0.14")).data)
    assert second[TCP].sport != 45000 and node.maps.stats()["ct_port_remapped"] == 1
    out = Ether(node.egress(bytes(pod_ack)).data)
    assert (out[IP].src, out[TCP].sport) == (other_node, 30080)
    [rev] = [e for e in entries(node.maps.ct_rev).values() if not e.flags & flag("CT_F_PORTMAP")]
    assert rev.state & flag("CT_S_ESTABLISHED")


def test_a_local_backends_flow_keeps_its_reverse_entry(node: Node) -> None:
    configure(node)
    node.maps.sync(state(fe(NODE1, 30080, (backend(LOCAL_POD, 8080, local=True),))))
    node.ingress(syn(2000))
    pod_synack = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT) / \
        TCP(sport=8080, dport=2000, flags="SA", seq=7000, ack=1001)
    assert node.egress(bytes(pod_synack)).retval == TC_ACT_OK
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="A", seq=1001, ack=7001)))
    node.ingress(syn(2000))        # a stray SYN on the live flow: not a new flow
    [rev] = entries(node.maps.ct_rev).values()
    [fwd] = entries(node.maps.ct_fwd).values()
    assert rev.state & fwd.state & flag("CT_S_ESTABLISHED")


def test_a_segment_without_syn_and_without_state_is_counted(node: Node) -> None:
    configure(node)
    node.maps.sync(state(fe(NODE1, 30080, (backend("10.244.2.10", 8080, local=False),))))
    node.ingress(client_frame(TCP(sport=2000, dport=30080, flags="A", seq=1, ack=1)))
    node.ingress(syn(2001))
    assert node.maps.stats()["ct_no_state"] == 1
