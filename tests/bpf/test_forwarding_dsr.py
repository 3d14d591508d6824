"""BPF unit tests of DSR acceptance on a backend's node (the real bpf_lb.o and bpf_xdp.o, maps programmed from the
model as the agent does): the IPv4 option 0x9a is honoured only for a packet to one of this node's backends of
the Service owning the named frontend, on its target port and protocol.  Every other destination (another port
of the pod, another Service's pod, the node itself, an address outside the cluster) is dropped and counted as
drop_dsr_spoofed before any state exists, at tc; XDP leaves option-carrying packets to tc untouched."""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.libbpf import TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_PASS
from bpflb.model.cluster import dsr_backends, dsr_frontends
from bpflb.model.types import Backend, DesiredState, Frontend, FrontendKind, Mode, Proto
from tests.bpf.packets import (
    CLIENT,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2,
    NODE2_MAC,
    OTHER_NODE,
    Node,
    XdpNode,
    backend,
    dsr_option,
    fe,
    l4,
)

pytestmark = pytest.mark.privileged

LB_IP = "198.18.1.10"
OTHER_POD = "10.244.1.11"        # a pod of this node backing another Service (port 6379)
DRAINING_POD = "10.244.1.12"     # a terminating backend of the echo Service on this node
OUTSIDE = "198.51.100.7"         # routed by this node (via node2), outside the cluster

LOCAL_TCP = backend(LOCAL_POD, 8080, local=True)
LOCAL_UDP = backend(LOCAL_POD, 8081, local=True, proto=Proto.UDP)


def echo(addr: str, port: int, *, kind: FrontendKind = FrontendKind.NODEPORT, local_only: bool = False) -> Frontend:
    draining = (Backend(l4(DRAINING_POD, 8080), "echo-old", "node1", True, terminating=True),)
    return Frontend(l4(addr, port), kind, "default/echo", "http", local_only, (LOCAL_TCP,), False, draining=draining)


def cluster_state() -> DesiredState:
    frontends = [
        echo(NODE1, 30080),
        echo(LB_IP, 80, kind=FrontendKind.LOADBALANCER),
        echo(NODE1, 30180, local_only=True),                                    # eTP Local: never DSR'd here
        fe(NODE1, 30081, (LOCAL_UDP,), proto=Proto.UDP),
        fe(NODE1, 30090, (backend(OTHER_POD, 6379, local=True),)),                # another Service's pod
    ]
    return DesiredState("node1", (IPv4Address(NODE1),), {f.l4: f for f in frontends})


@pytest.fixture
def backend_node(node: Node) -> Node:
    desired = cluster_state()
    node.program(desired, Mode.SNAT)
    node.cluster.sync(dsr_frontends(desired, {IPv4Address(NODE1), IPv4Address(OTHER_NODE)}),
                      {be.l4 for f in desired.frontends.values() for be in (*f.backends, *f.draining)},
                      {IPv4Network(f"{NODE1}/32"), IPv4Network(f"{OTHER_NODE}/32"), IPv4Network("10.244.0.0/16")},
                      dsr_backends=dsr_backends(desired))
    # Routes and neighbours for every destination, so a relay would find its way out were it let through.
    for cmd in (["route", "add", "198.51.100.0/24", "via", NODE2],
                ["neigh", "add", OTHER_POD, "lladdr", "02:00:00:00:01:11", "dev", "lxc0", "nud", "permanent"],
                ["neigh", "add", DRAINING_POD, "lladdr", "02:00:00:00:01:12", "dev", "lxc0", "nud", "permanent"]):
        subprocess.run(["ip", "-n", node.ns, *cmd], check=True, capture_output=True)
    return node


def request(dst: str, dport: int, frontend: str, fport: int, *, proto: Proto = Proto.TCP, sport: int = 40000) -> bytes:
    l4hdr = TCP(sport=sport, dport=dport, flags="S", seq=1) if proto is Proto.TCP else UDP(sport=sport, dport=dport)
    return bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                 IP(src=CLIENT, dst=dst, ttl=63, id=5, options=[dsr_option(frontend, fport)]) / l4hdr / Raw(b"x"))


ACCEPTED = {
    "a NodePort named on another node's address, to its backend": (LOCAL_POD, 8080, OTHER_NODE, 30080, Proto.TCP),
    "the same NodePort named on this node's address": (LOCAL_POD, 8080, NODE1, 30080, Proto.TCP),
    "a LoadBalancer IP, to its backend": (LOCAL_POD, 8080, LB_IP, 80, Proto.TCP),
    "a UDP NodePort, to its backend's UDP port": (LOCAL_POD, 8081, OTHER_NODE, 30081, Proto.UDP),
    "a draining backend (a retransmitted SYN of its open flow)": (DRAINING_POD, 8080, OTHER_NODE, 30080, Proto.TCP),
}

REFUSED = {
    "the backend pod on a port that is not the target port": (LOCAL_POD, 22, OTHER_NODE, 30080, Proto.TCP),
    "another Service's pod on its port": (OTHER_POD, 6379, OTHER_NODE, 30080, Proto.TCP),
    "another Service's frontend naming this pod": (LOCAL_POD, 8080, OTHER_NODE, 30090, Proto.TCP),
    "an address outside the cluster": (OUTSIDE, 53, OTHER_NODE, 30080, Proto.UDP),
    "an address outside the cluster, TCP": (OUTSIDE, 443, OTHER_NODE, 30080, Proto.TCP),
    "the node itself": (NODE1, 22, OTHER_NODE, 30080, Proto.TCP),
    "a frontend (the option is for backends)": (NODE1, 30080, OTHER_NODE, 30080, Proto.TCP),
    "the right pod and port over the other protocol": (LOCAL_POD, 8080, OTHER_NODE, 30080, Proto.UDP),
    "an externalTrafficPolicy Local frontend": (LOCAL_POD, 8080, OTHER_NODE, 30180, Proto.TCP),
    "an unknown frontend": (LOCAL_POD, 8080, "203.0.113.7", 30080, Proto.TCP),
    "a LoadBalancer IP with the NodePort's port": (LOCAL_POD, 8080, LB_IP, 30080, Proto.TCP),
    "a node address with the LoadBalancer's port": (LOCAL_POD, 8080, OTHER_NODE, 80, Proto.TCP),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_the_option_is_honoured_for_a_backend_of_the_named_frontend(backend_node: Node, case: str) -> None:
    dst, dport, frontend, fport, proto = ACCEPTED[case]
    run = backend_node.ingress(request(dst, dport, frontend, fport, proto=proto))
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    assert (out[IP].dst, out[IP].ihl, out[IP].ttl) == (dst, 5, 62), "stripped and forwarded to the backend"
    replies = [(backend_node.maps.ct_rev.decode_key(k), backend_node.maps.ct_rev.decode_value(v))
               for k, v in backend_node.maps.ct_rev.items_raw()]
    assert len(replies) == 1 and str(IPv4Address(int(replies[0][1].fe_addr).to_bytes(4, "little"))) == frontend
    stats = backend_node.maps.stats()
    assert stats["dsr_accepted"] == 1 and stats["drop_dsr_spoofed"] == 0


@pytest.mark.parametrize("case", list(REFUSED))
def test_anything_else_is_dropped_counted_and_leaves_no_state(backend_node: Node, case: str) -> None:
    dst, dport, frontend, fport, proto = REFUSED[case]
    run = backend_node.ingress(request(dst, dport, frontend, fport, proto=proto))
    assert run.retval == TC_ACT_SHOT
    stats = backend_node.maps.stats()
    assert stats["drop_dsr_spoofed"] == 1 and stats["dsr_accepted"] == 0
    assert not list(backend_node.maps.ct_rev.items_raw()), "no reply state for a refused request"
    assert not list(backend_node.obj.map("lb_direct").items_raw()), "nor a direct flow"


def test_membership_follows_the_services(backend_node: Node) -> None:
    """The pairs are the model's: a pod that stops backing the Service stops being reachable by DSR."""
    frame = request(LOCAL_POD, 8080, OTHER_NODE, 30080)
    assert backend_node.ingress(frame).retval == TC_ACT_REDIRECT
    desired = cluster_state()
    del desired.frontends[l4(NODE1, 30080)]
    backend_node.program(desired, Mode.SNAT)
    backend_node.cluster.sync(dsr_frontends(desired, {IPv4Address(NODE1), IPv4Address(OTHER_NODE)}), set(), set(),
                              dsr_backends=dsr_backends(desired))
    assert backend_node.ingress(request(LOCAL_POD, 8080, OTHER_NODE, 30080, sport=40001)).retval == TC_ACT_SHOT
    # The LoadBalancer IP of the same Service still names it.
    assert backend_node.ingress(request(LOCAL_POD, 8080, LB_IP, 80, sport=40002)).retval == TC_ACT_REDIRECT


def test_xdp_leaves_option_carrying_packets_to_tc_untouched(xnode: XdpNode) -> None:
    desired = cluster_state()
    xnode.program(desired, Mode.DSR)
    xnode.cluster.sync(dsr_frontends(desired, {IPv4Address(NODE1), IPv4Address(OTHER_NODE)}), set(), set(),
                       dsr_backends=dsr_backends(desired))
    for frame in (request(LOCAL_POD, 22, OTHER_NODE, 30080), request(OUTSIDE, 53, OTHER_NODE, 30080, proto=Proto.UDP),
                  request(LOCAL_POD, 8080, OTHER_NODE, 30080)):
        run = xnode.xdp(frame)
        assert run.retval == XDP_PASS and run.data == frame
    assert not list(xnode.maps.ct_rev.items_raw())
    assert xnode.ingress(request(LOCAL_POD, 22, OTHER_NODE, 30080)).retval == TC_ACT_SHOT
    assert xnode.maps.stats()["drop_dsr_spoofed"] == 1
