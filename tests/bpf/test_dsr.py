"""BPF unit tests of DSR and Hybrid: the frontend carried in Cilium's IPv4 option (0x9a, port then
address), inserted on the load-balancing node, checked, recorded and stripped on the backend's node,
whose egress rewrites the pod's replies to come from the frontend.  Whole frames, checksums included."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
from bpflb.model.cluster import dsr_backends, dsr_frontends
from bpflb.model.types import Mode, Proto
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2_MAC,
    OTHER_NODE,
    REMOTE,
    REMOTE_POD,
    Node,
    assert_frame,
    backend,
    dsr_option,
    fe,
    frame_in,
    recomputed,
    state,
)

pytestmark = pytest.mark.privileged



def test_syn_gets_the_option_later_segments_do_not(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.DSR)
    run = node.ingress(frame_in(TCP(sport=40000, dport=30080, flags="S", seq=10), payload=b"hi"))
    assert run.retval == TC_ACT_REDIRECT
    expected = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / \
        IP(src=CLIENT, dst=REMOTE_POD, ttl=63, id=7, options=[dsr_option(NODE1, 30080)]) / \
        TCP(sport=40000, dport=8080, flags="S", seq=10) / Raw(b"hi")
    assert_frame(run.data, bytes(expected))

    ack = node.ingress(frame_in(TCP(sport=40000, dport=30080, flags="A", seq=11, ack=99)))
    expected_ack = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=REMOTE_POD, ttl=63, id=7) / \
        TCP(sport=40000, dport=8080, flags="A", seq=11, ack=99)
    assert_frame(ack.data, bytes(expected_ack))
    # A retransmitted SYN carries the option again (the backend's node may have missed the first).
    again = Ether(node.ingress(frame_in(TCP(sport=40000, dport=30080, flags="S", seq=10))).data)
    assert again[IP].ihl == 7
    assert not list(node.maps.ct_rev.items_raw()), "the balancing node keeps no reply state for DSR flows"


def test_udp_carries_the_option_on_every_datagram(node: Node) -> None:
    udp_be = backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP)
    node.program(state(fe(NODE1, 30081, (udp_be,), proto=Proto.UDP)), Mode.DSR)
    for n in range(2):
        run = node.ingress(frame_in(UDP(sport=5000, dport=30081), payload=b"clientip"))
        assert run.retval == TC_ACT_REDIRECT, n
        expected = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / \
            IP(src=CLIENT, dst=REMOTE_POD, ttl=63, id=7, options=[dsr_option(NODE1, 30081)]) / \
            UDP(sport=5000, dport=8081) / Raw(b"clientip")
        assert_frame(run.data, bytes(expected))


def test_hybrid_sends_tcp_by_dsr_and_udp_by_snat(node: Node) -> None:
    udp_be = backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP)
    node.program(state(fe(NODE1, 30080, (REMOTE,)), fe(NODE1, 30081, (udp_be,), proto=Proto.UDP)), Mode.HYBRID)
    tcp = Ether(node.ingress(frame_in(TCP(sport=40001, dport=30080, flags="S"))).data)
    assert tcp[IP].src == CLIENT and tcp[IP].ihl == 7
    udp = Ether(node.ingress(frame_in(UDP(sport=5001, dport=30081), payload=b"x")).data)
    assert udp[IP].src == NODE1 and udp[IP].ihl == 5 and 32768 <= udp[UDP].sport <= 65535
    assert recomputed(bytes(udp)) == bytes(udp)


def test_local_backends_and_local_policy_stay_as_in_snat_mode(node: Node) -> None:
    local = backend(LOCAL_POD, 8080, local=True)
    node.program(state(fe(NODE1, 30080, (local,))), Mode.DSR)
    out = Ether(node.ingress(frame_in(TCP(sport=40002, dport=30080, flags="S"))).data)
    assert (out[IP].src, out[IP].dst, out[IP].ihl) == (CLIENT, LOCAL_POD, 5)


def test_option_beyond_the_path_mtu_answers_fragmentation_needed(node: Node) -> None:
    udp_be = backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP)
    node.program(state(fe(NODE1, 30081, (udp_be,), proto=Proto.UDP)), Mode.DSR)
    big = frame_in(UDP(sport=5002, dport=30081), payload=b"z" * (1500 - 28), flags="DF")
    assert len(Ether(big)[IP]) == 1500
    run = node.ingress(big)
    assert run.retval == TC_ACT_REDIRECT
    quoted = bytes(Ether(big)[IP])[:28]
    expected = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / \
        IP(src=NODE1, dst=CLIENT, ttl=64, id=0, tos=0xC0, proto=1) / ICMP(type=3, code=4, nexthopmtu=1492) / \
        Raw(quoted)
    assert_frame(run.data, bytes(expected))
    assert node.maps.stats()["icmp_frag_needed"] == 1
    # 8 bytes smaller fits and goes through with the option.
    ok = node.ingress(frame_in(UDP(sport=5002, dport=30081), payload=b"z" * (1492 - 28), flags="DF"))
    assert ok.retval == TC_ACT_REDIRECT and len(Ether(ok.data)[IP]) == 1500


def backend_node(node: Node) -> None:
    """Make the scratch node a backend's node: LOCAL_POD is its echo pod; OTHER_NODE:30080 a frontend.
    The cluster maps are programmed as the agent does, from the model (bpflb.model.cluster)."""
    local = backend(LOCAL_POD, 8080, local=True)
    desired = state(fe(NODE1, 30080, (local,)))
    node.program(desired, Mode.SNAT)   # its own mode does not matter
    node.cluster.sync(dsr_frontends(desired, {IPv4Address(NODE1), IPv4Address(OTHER_NODE)}), {local.l4},
                      {IPv4Network("198.18.0.11/32"), IPv4Network(f"{OTHER_NODE}/32"), IPv4Network("10.244.0.0/16")},
                      dsr_backends=dsr_backends(desired))


def dsr_request(flags: str = "S", frontend: str = OTHER_NODE, port: int = 30080) -> bytes:
    return bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                 IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=5, options=[dsr_option(frontend, port)]) /
                 TCP(sport=40010, dport=8080, flags=flags, seq=1) / Raw(b"GET"))


def test_backend_node_records_the_frontend_strips_the_option_and_rewrites_the_reply(node: Node) -> None:
    backend_node(node)
    run = node.ingress(dsr_request())
    assert run.retval == TC_ACT_REDIRECT
    expected = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=62, id=5) / \
        TCP(sport=40010, dport=8080, flags="S", seq=1) / Raw(b"GET")
    assert_frame(run.data, bytes(expected))

    reply = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=63, id=8) / \
        TCP(sport=8080, dport=40010, flags="SA", seq=500, ack=2) / Raw(b"200")
    out = node.egress(bytes(reply))
    assert out.retval == TC_ACT_OK
    expected_reply = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=OTHER_NODE, dst=CLIENT, ttl=63, id=8) / \
        TCP(sport=30080, dport=40010, flags="SA", seq=500, ack=2) / Raw(b"200")
    assert_frame(out.data, bytes(expected_reply))
    assert node.maps.stats()["dsr_accepted"] == 1


def test_spoofed_option_naming_an_unknown_frontend_is_dropped_and_counted(node: Node) -> None:
    backend_node(node)
    for frontend, port in (("203.0.113.7", 30080), (OTHER_NODE, 30999)):
        run = node.ingress(dsr_request(frontend=frontend, port=port))
        assert run.retval == TC_ACT_SHOT
    assert node.maps.stats()["drop_dsr_spoofed"] == 2
    # Nothing recorded: the pod's reply would not be rewritten to the spoofed frontend.
    reply = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT) / \
        TCP(sport=8080, dport=40010, flags="SA")
    assert node.egress(bytes(reply)).retval == TC_ACT_SHOT        # untracked: see the next test


def test_untracked_reply_of_a_backend_never_leaves_with_the_pod_address(node: Node) -> None:
    backend_node(node)
    data = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT) / \
        TCP(sport=8080, dport=40011, flags="PA") / Raw(b"leak?")
    assert node.egress(bytes(data)).retval == TC_ACT_SHOT
    assert node.maps.stats()["drop_dsr_no_state"] == 1
    # Replies into the cluster (an SNAT'd request from another node) and the pod's own SYNs pass.
    to_node = Ether() / IP(src=LOCAL_POD, dst=NODE1) / TCP(sport=8080, dport=61000, flags="SA")
    assert node.egress(bytes(to_node)).retval == TC_ACT_OK
    own = Ether() / IP(src=LOCAL_POD, dst=CLIENT) / TCP(sport=8080, dport=443, flags="S")
    assert node.egress(bytes(own)).retval == TC_ACT_OK
