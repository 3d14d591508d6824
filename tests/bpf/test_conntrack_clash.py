"""BPF unit tests of client tuples that clash at a local backend: a client's source port reused towards
another frontend that leads to the same pod, while the pod still knows that tuple from the earlier flow
(a live flow, a DSR flow whose state the backend's node keeps, a connection in the pod's TIME_WAIT).  The
new flow gets another client port (as nf_nat does on a clash), its replies go back to the client's own
port from its own frontend, and the earlier flow keeps its translation."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.conntrack import (
    Collector,
    close_dsr_gate,
    dsr_gate_open,
    dsr_mappings_made,
    open_dsr_gate,
)
from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, ffi
from bpflb.model.types import Mode, Proto
from tests.bpf.ct_util import age, backends_node, dsr_request, entries, flag, from_pod
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2_MAC,
    OTHER_NODE,
    Node,
    assert_frame,
    fe,
    frame_in,
    state,
)

pytestmark = pytest.mark.privileged


def test_a_local_flow_on_a_tuple_a_dsr_flow_holds_gets_a_client_port_of_its_own(node: Node) -> None:
    """The lab's lost second: a DSR flow (through another node) from client port 45000 to the pod; the client
    then opens node1's own NodePort from the same port.  Sharing the pod's tuple, the new flow's SYN-ACK
    would leave as the DSR flow's frontend (the client answers it with a RST and retransmits its SYN a
    second later).  Remapped, each flow's replies come from its own frontend."""
    backends_node(node)
    assert node.ingress(dsr_request(TCP(sport=45000, dport=8080, flags="S", seq=100))).retval == TC_ACT_REDIRECT
    node.egress(from_pod(TCP(sport=8080, dport=45000, flags="SA", seq=900, ack=101)))

    run = node.ingress(frame_in(TCP(sport=45000, dport=30180, flags="S", seq=5000)))
    assert run.retval == TC_ACT_REDIRECT
    to_pod = Ether(run.data)
    mapped = to_pod[TCP].sport
    assert (to_pod[IP].src, to_pod[IP].dst, to_pod[TCP].dport) == (CLIENT, LOCAL_POD, 8080)
    assert mapped != 45000, "the pod would see the DSR flow's tuple"
    assert_frame(run.data, bytes(Ether(src=to_pod.src, dst=to_pod.dst) /
                                 IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=7) /
                                 TCP(sport=mapped, dport=8080, flags="S", seq=5000)))
    assert node.maps.stats()["ct_port_remapped"] == 1

    synack = node.egress(from_pod(TCP(sport=8080, dport=mapped, flags="SA", seq=7000, ack=5001)))
    assert synack.retval == TC_ACT_OK
    assert_frame(synack.data, bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=NODE1, dst=CLIENT, ttl=63, id=8) /
                                    TCP(sport=30180, dport=45000, flags="SA", seq=7000, ack=5001)))
    # The client's next segments keep the mapping; the DSR flow's replies keep their frontend.
    ack = Ether(node.ingress(frame_in(TCP(sport=45000, dport=30180, flags="A", seq=5001, ack=7001))).data)
    assert (ack[IP].src, ack[TCP].sport) == (CLIENT, mapped)
    old = Ether(node.egress(from_pod(TCP(sport=8080, dport=45000, flags="A", seq=901, ack=101))).data)
    assert (old[IP].src, old[TCP].sport, old[TCP].dport) == (OTHER_NODE, 30080, 45000)
    fwd = entries(node.maps.ct_fwd)
    [local] = [e for e in fwd.values() if e.flags & flag("CT_F_LOCAL")]
    assert local.flags & flag("CT_F_PORTMAP") and local.state & flag("CT_S_ESTABLISHED")


def test_a_udp_flow_on_a_tuple_another_frontends_flow_holds_gets_its_own_replies(node: Node) -> None:
    """UDP (the lab's node2:30181): a datagram through another node's NodePort (DSR), then from the same
    client port to node1's own: each flow's answers come from the frontend it was sent to, the client's
    connected socket would drop any other."""
    backends_node(node, Proto.UDP, 8081)
    assert node.ingress(dsr_request(UDP(sport=5000, dport=8081), payload=b"hostname")).retval == TC_ACT_REDIRECT
    to_pod = Ether(node.ingress(frame_in(UDP(sport=5000, dport=30180), payload=b"hostname")).data)
    mapped = to_pod[UDP].sport
    assert (to_pod[IP].src, to_pod[UDP].dport) == (CLIENT, 8081) and mapped != 5000
    new = Ether(node.egress(from_pod(UDP(sport=8081, dport=mapped), b"echo-a")).data)
    assert (new[IP].src, new[UDP].sport, new[IP].dst, new[UDP].dport) == (NODE1, 30180, CLIENT, 5000)
    assert bytes(new[Raw]) == b"echo-a"
    old = Ether(node.egress(from_pod(UDP(sport=8081, dport=5000), b"echo-a")).data)
    assert (old[IP].src, old[UDP].sport) == (OTHER_NODE, 30080)
    # The flow's next datagrams take the same port.
    again = Ether(node.ingress(frame_in(UDP(sport=5000, dport=30180), payload=b"clientip")).data)
    assert again[UDP].sport == mapped


def close(node: Node, sport: int, dport: int, *, rst: bool = False) -> None:
    """A local flow from the client's sport to node1:dport, its handshake and its close (FIN both ways, the
    pod first as the echo server does; or a RST from the client)."""
    to_pod = Ether(node.ingress(frame_in(TCP(sport=sport, dport=dport, flags="S", seq=100))).data)
    seen = to_pod[TCP].sport
    node.egress(from_pod(TCP(sport=8080, dport=seen, flags="SA", seq=900, ack=101)))
    node.ingress(frame_in(TCP(sport=sport, dport=dport, flags="A", seq=101, ack=901)))
    if rst:
        node.ingress(frame_in(TCP(sport=sport, dport=dport, flags="R", seq=101)))
        return
    node.egress(from_pod(TCP(sport=8080, dport=seen, flags="FA", seq=901, ack=101)))
    node.ingress(frame_in(TCP(sport=sport, dport=dport, flags="FA", seq=101, ack=902)))


def syn_port(node: Node, sport: int, dport: int) -> int:
    """The client port the pod sees for a new SYN from sport to node1:dport."""
    return int(Ether(node.ingress(frame_in(TCP(sport=sport, dport=dport, flags="S", seq=7777))).data)[TCP].sport)


def test_a_tuple_in_the_pods_time_wait_is_not_reused_by_another_frontends_flow(node: Node) -> None:
    """The pod closed first (TIME_WAIT, 60 s).  A SYN from the same client port through another frontend
    carries a sequence number and timestamps the client chose for another destination, which TIME_WAIT may
    refuse (it answers with the old connection's ACK): past the flow's closing time, while the map still
    has its entry, the new flow takes another port."""
    backends_node(node)
    close(node, 46000, 30080)
    age(node, 11)                  # past closing_timeout (10 s), inside TIME_WAIT
    assert syn_port(node, 46000, 30180) != 46000
    assert node.maps.stats()["ct_port_remapped"] == 1


def test_the_client_reopening_its_tuple_to_the_same_frontend_keeps_its_port(node: Node) -> None:
    """The same frontend: the client's sequence numbers and timestamps for that destination move on, and
    TIME_WAIT accepts the new SYN (as nf_conntrack lets the tuple be reused); and after a RST there is no
    TIME_WAIT at all."""
    backends_node(node)
    close(node, 47000, 30080)
    assert syn_port(node, 47000, 30080) == 47000
    close(node, 47002, 30080, rst=True)
    assert syn_port(node, 47002, 30180) == 47002
    age(node, 61)                  # TIME_WAIT is over
    assert syn_port(node, 47000, 30180) == 47000
    assert node.maps.stats()["ct_port_remapped"] == 0


def test_a_dsr_flow_on_a_tuple_a_local_flow_holds_gets_a_client_port_of_its_own(node: Node) -> None:
    """The other way round: a live local flow from client port 45100, then a DSR request from the same port
    through another node.  The DSR flow is mapped to a port of its own on its SYN (which carries the
    option) and on every later segment (which does not); each flow's replies keep their frontend; and the
    mapping closes with the flow."""
    backends_node(node)
    to_pod = Ether(node.ingress(frame_in(TCP(sport=45100, dport=30180, flags="S", seq=100))).data)
    assert to_pod[TCP].sport == 45100
    node.egress(from_pod(TCP(sport=8080, dport=45100, flags="SA", seq=900, ack=101)))

    run = node.ingress(dsr_request(TCP(sport=45100, dport=8080, flags="S", seq=5000)))
    assert run.retval == TC_ACT_REDIRECT
    syn = Ether(run.data)
    mapped = syn[TCP].sport
    assert mapped != 45100 and syn[IP].ihl == 5 and (syn[IP].src, syn[IP].dst) == (CLIENT, LOCAL_POD)
    assert_frame(run.data, bytes(Ether(src=syn.src, dst=syn.dst) / IP(src=CLIENT, dst=LOCAL_POD, ttl=62, id=3) /
                                 TCP(sport=mapped, dport=8080, flags="S", seq=5000)))
    synack = Ether(node.egress(from_pod(TCP(sport=8080, dport=mapped, flags="SA", seq=7000, ack=5001))).data)
    assert (synack[IP].src, synack[TCP].sport, synack[IP].dst, synack[TCP].dport) == (OTHER_NODE, 30080, CLIENT, 45100)
    old = Ether(node.egress(from_pod(TCP(sport=8080, dport=45100, flags="A", seq=901, ack=101))).data)
    assert (old[IP].src, old[TCP].sport) == (NODE1, 30180)

    later = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=4) / \
        TCP(sport=45100, dport=8080, flags="PA", seq=5001, ack=7001) / Raw(b"GET / HTTP/1.1\r\n\r\n")
    run = node.ingress(bytes(later))
    assert run.retval == TC_ACT_REDIRECT
    assert_frame(run.data, bytes(Ether(src=syn.src, dst=syn.dst) / IP(src=CLIENT, dst=LOCAL_POD, ttl=62, id=4) /
                                 TCP(sport=mapped, dport=8080, flags="PA", seq=5001, ack=7001) /
                                 Raw(b"GET / HTTP/1.1\r\n\r\n")))
    # Both FINs: the mapping and its reverse entry close together.
    node.egress(from_pod(TCP(sport=8080, dport=mapped, flags="FA", seq=7001, ack=5019)))
    node.ingress(bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63) /
                       TCP(sport=45100, dport=8080, flags="FA", seq=5019, ack=7002)))
    mapping = [e for e in entries(node.maps.ct_fwd).values() if e.flags & flag("CT_F_DSR")]
    remapped = [e for e in entries(node.maps.ct_rev).values() if e.flags & flag("CT_F_PORTMAP")]
    assert len(mapping) == len(remapped) == 1
    assert mapping[0].flags & remapped[0].flags & flag("CT_F_CLOSING")


def test_a_udp_dsr_flow_keeps_its_mapping_for_every_datagram(node: Node) -> None:
    """UDP through another node after a local UDP flow of the same client port: every datagram carries the
    option and takes the same mapped port; the answers come from the frontend each was sent to."""
    backends_node(node, Proto.UDP, 8081)
    node.ingress(frame_in(UDP(sport=5100, dport=30180), payload=b"hostname"))
    ports = {Ether(node.ingress(dsr_request(UDP(sport=5100, dport=8081), payload=b"hostname")).data)[UDP].sport
             for _ in range(3)}
    assert len(ports) == 1 and 5100 not in ports
    [mapped] = ports
    dsr = Ether(node.egress(from_pod(UDP(sport=8081, dport=mapped), b"echo-a")).data)
    assert (dsr[IP].src, dsr[UDP].sport, dsr[UDP].dport) == (OTHER_NODE, 30080, 5100)
    local = Ether(node.egress(from_pod(UDP(sport=8081, dport=5100), b"echo-a")).data)
    assert (local[IP].src, local[UDP].sport, local[UDP].dport) == (NODE1, 30180, 5100)
    assert node.maps.stats()["ct_port_remapped"] == 1


def test_a_dsr_flow_the_client_closed_is_reopened_by_its_next_syn(node: Node) -> None:
    """The balancing node of a DSR flow sees only the client's side, never the backend's FIN, so the flow
    never looks closed there.  Once the client sent its FIN, a SYN on that tuple is the client's next
    connection (TIME_WAIT reuse): a new flow, in the node's mode now, never the old flow's DSR."""
    from tests.bpf.packets import REMOTE, REMOTE_POD

    node.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.DSR)
    assert Ether(node.ingress(frame_in(TCP(sport=48000, dport=30080, flags="S", seq=10))).data)[IP].ihl == 7
    node.ingress(frame_in(TCP(sport=48000, dport=30080, flags="A", seq=11, ack=99)))
    node.ingress(frame_in(TCP(sport=48000, dport=30080, flags="FA", seq=11, ack=150)))
    node.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.SNAT)
    again = Ether(node.ingress(frame_in(TCP(sport=48000, dport=30080, flags="S", seq=5000))).data)
    assert (again[IP].src, again[IP].dst, again[IP].ihl) == (NODE1, REMOTE_POD, 5), "the old DSR flow went on"
    # A SYN retransmitted before any FIN stays in its flow (mode switched or not).
    node.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.DSR)
    node.ingress(frame_in(TCP(sport=48002, dport=30080, flags="S", seq=10)))
    node.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.SNAT)
    assert Ether(node.ingress(frame_in(TCP(sport=48002, dport=30080, flags="S", seq=10))).data)[IP].ihl == 7


def gate_open(node: Node) -> bool:
    """lb_dsr_mapped: whether non-service packets look in ct_fwd for a remapped DSR flow's mapping."""
    return dsr_gate_open(node.maps.dsr_mapped)


def test_non_service_packets_look_for_remapped_dsr_flows_only_while_the_node_may_hold_one(node: Node) -> None:
    """The lookup dsr_mapped_ingress makes for every non-service packet is skipped while the node holds no
    remapped DSR flow (lb_dsr_mapped).  The agent opens the gate at start (a previous agent's flows); a
    collection that finds no mapping closes it; a remap opens it again before its mapping exists, and its
    later segments are rewritten; a collection keeps it open while the mapping lives and closes it once the
    flow is gone.  A mapping counted while a collection ran keeps it open."""
    collector = Collector(node.maps.ct_fwd, node.maps.ct_rev, node.maps.config, node.maps.dsr_mapped)
    assert not gate_open(node)                          # fresh maps: no remap ever made
    open_dsr_gate(node.maps.dsr_mapped)                 # what the agent does when it loads the datapath
    assert gate_open(node)
    assert collector.collect().dsr_mapped == 0 and not gate_open(node)

    backends_node(node)
    node.ingress(frame_in(TCP(sport=45100, dport=30180, flags="S", seq=100)))
    node.egress(from_pod(TCP(sport=8080, dport=45100, flags="SA", seq=900, ack=101)))
    mapped = Ether(node.ingress(dsr_request(TCP(sport=45100, dport=8080, flags="S", seq=5000))).data)[TCP].sport
    assert mapped != 45100 and gate_open(node)
    assert collector.collect().dsr_mapped == 1 and gate_open(node)

    def later(seq: int, flags: str = "A") -> bytes:
        return bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=4) /
                     TCP(sport=45100, dport=8080, flags=flags, seq=seq, ack=7001))

    assert Ether(node.ingress(later(5001)).data)[TCP].sport == mapped
    node.ingress(later(5001, "R"))                      # the client resets it: both entries end
    age(node, 3)                                        # past a reset flow's lifetime
    assert collector.collect().dsr_mapped == 0 and not gate_open(node)
    stray = later(5002)
    assert (run := node.ingress(stray)).retval == TC_ACT_OK and run.data == stray    # no mapping: untouched

    made = dsr_mappings_made(node.maps.dsr_mapped)
    node.maps.dsr_mapped.update(ffi().new("__u32 *", 0), ffi().new("__u64 *", made + 1))  # a remap meanwhile
    close_dsr_gate(node.maps.dsr_mapped, made)
    assert gate_open(node)
