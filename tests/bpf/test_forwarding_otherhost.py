"""BPF unit tests of frames not addressed to the node's MAC. On a promiscuous or bridged device, on a flooding
L2, the node's ingress sees unicast frames meant for other hosts (PACKET_OTHERHOST), which the kernel's IP
stack drops; and every node of a segment receives frames sent to a broadcast or multicast MAC
(PACKET_BROADCAST, PACKET_MULTICAST), which the kernel never forwards nor lets TCP take. bpflb must not
balance, translate, forward or answer either (a duplicate of another node's traffic; one group frame to an
externalIP would become a connection per node): tc passes them untouched and counts them (pass_other_host,
pass_l2_group), XDP hands them to tc without touching them; the same frames addressed to the node are still
handled.

BPF_PROG_TEST_RUN sets skb->pkt_type from the frame's destination MAC against the test device's own (eth0 of
the scratch node, ETH0_MAC), as the driver's eth_type_trans does on a real device."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, XDP_TX
from bpflb.model.types import Mode, Proto
from tests.bpf.packets import (
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL,
    NODE1,
    NODE2,
    NODE2_MAC,
    REMOTE,
    REMOTE_POD,
    Node,
    XdpNode,
    backend,
    dsr_option,
    fe,
    frame_in,
    state,
)

pytestmark = pytest.mark.privileged

# Other hosts' MACs: one differing from eth0's in its last byte only, one in its first (group bit still clear).
OTHER_MACS = {"last byte": "02:00:00:00:00:10", "first byte": "06:00:00:00:00:11"}
# Group MACs: broadcast, an IPv4 multicast group's, an IPv6 one's.
GROUP_MACS = {"broadcast": "ff:ff:ff:ff:ff:ff", "IPv4 multicast": "01:00:5e:00:00:01",
              "IPv6 multicast": "33:33:00:00:00:01"}


def to_mac(frame: bytes, mac: str) -> bytes:
    """The frame with another destination MAC (nothing else changes)."""
    return bytes.fromhex(mac.replace(":", "")) + frame[6:]


def program(node: Node, mode: Mode = Mode.SNAT) -> None:
    node.program(state(fe(NODE1, 30080, (REMOTE,)), fe(NODE1, 30081, (LOCAL,)),
                       fe(NODE1, 30082, (backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP),), proto=Proto.UDP),
                       fe(NODE1, 30083, (), no_endpoints=True)), mode)


def ct_sizes(node: Node) -> tuple[int, int]:
    return len(list(node.maps.ct_fwd.items_raw())), len(list(node.maps.ct_rev.items_raw()))


NEW_FLOWS = {
    "SNAT to a remote pod": frame_in(TCP(sport=40000, dport=30080, flags="S", seq=1)),
    "DNAT to a local pod": frame_in(TCP(sport=40001, dport=30081, flags="S", seq=1)),
    "UDP to a remote pod": frame_in(UDP(sport=40002, dport=30082), payload=b"hostname"),
    "a frontend without endpoints (would be answered)": frame_in(TCP(sport=40003, dport=30083, flags="S", seq=1)),
    "a DSR request for a pod (IP option)": bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                                               IP(src="198.18.0.100", dst="10.244.1.10", ttl=63,
                                                  options=[dsr_option(NODE2, 30080)]) /
                                               TCP(sport=40004, dport=8080, flags="S", seq=1)),
}


# Every MAC not the node's, with the counter its frames go to.
NOT_OURS = {**{f"{k} (another host)": (mac, "pass_other_host") for k, mac in OTHER_MACS.items()},
            **{k: (mac, "pass_l2_group") for k, mac in GROUP_MACS.items()}}


@pytest.mark.parametrize("mac_counter", NOT_OURS.values(), ids=NOT_OURS.keys())
@pytest.mark.parametrize("kind", NEW_FLOWS.keys())
def test_a_new_flow_to_another_hosts_or_a_group_mac_is_passed_untouched_and_counted(
        node: Node, kind: str, mac_counter: tuple[str, str]) -> None:
    mac, counter = mac_counter
    program(node)
    frame = to_mac(NEW_FLOWS[kind], mac)
    run = node.ingress(frame)
    assert (run.retval, run.data) == (TC_ACT_OK, frame)
    assert ct_sizes(node) == (0, 0), "no state for a frame not addressed to the node"
    stats = node.maps.stats()
    other = "pass_l2_group" if counter == "pass_other_host" else "pass_other_host"
    assert stats[counter] == 1 and not stats.get(other)
    assert not any(stats.get(name, 0) for name in ("new_flow", "icmp_sent", "reject_no_endpoints",
                                                    "drop_dsr_spoofed", "dsr_accepted"))


def test_another_hosts_copy_of_a_flow_is_not_forwarded_but_the_nodes_own_is(node: Node) -> None:
    """A flow this node carries: a copy of its segments, its replies and an ICMP error about it, addressed to
    another MAC, is left alone; the frames addressed to the node go on being translated."""
    program(node)
    syn = frame_in(TCP(sport=41000, dport=30080, flags="S", seq=1))
    run = node.ingress(syn)
    assert run.retval == TC_ACT_REDIRECT
    nat_port = Ether(run.data)[TCP].sport
    other = OTHER_MACS["last byte"]
    reply = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63, id=2) /
                  TCP(sport=8080, dport=nat_port, flags="SA", seq=9, ack=2))
    error = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=NODE2, dst=NODE1, ttl=64) / ICMP(type=3, code=4) /
                  Raw(bytes(Ether(run.data)[IP])[:28]))
    ack = frame_in(TCP(sport=41000, dport=30080, flags="A", seq=2, ack=10), payload=b"GET /")
    before = node.maps.stats()
    for frame in (to_mac(ack, other), to_mac(reply, other), to_mac(error, other)):
        out = node.ingress(frame)
        assert (out.retval, out.data) == (TC_ACT_OK, frame)
    after = node.maps.stats()
    assert after["pass_other_host"] == 3
    for name in ("fwd_established", "reply_snat", "icmp_related"):
        assert after.get(name, 0) == before.get(name, 0), name
    # The node's own frames of the flow are translated as ever.
    assert Ether(node.ingress(reply).data)[TCP].dport == 41000
    assert Ether(node.ingress(ack).data)[TCP].sport == nat_port
    assert node.ingress(error).retval == TC_ACT_REDIRECT
    final = node.maps.stats()
    assert (final["reply_snat"], final["fwd_established"], final["icmp_related"]) == (1, 1, 1)
    assert final["pass_other_host"] == 3


def test_the_node_answers_frames_to_its_own_mac(node: Node) -> None:
    """Positive control for the rules above: the same frames to eth0's MAC are handled (a SYN translated, a
    frontend without endpoints answered)."""
    program(node)
    assert node.ingress(NEW_FLOWS["SNAT to a remote pod"]).retval == TC_ACT_REDIRECT
    assert node.ingress(NEW_FLOWS["a frontend without endpoints (would be answered)"]).retval == TC_ACT_REDIRECT
    stats = node.maps.stats()
    assert not stats.get("pass_other_host") and not stats.get("pass_l2_group") and stats["new_flow"] == 1


@pytest.mark.parametrize("mac", [*OTHER_MACS.values(), *GROUP_MACS.values()], ids=[*OTHER_MACS, *GROUP_MACS])
def test_xdp_hands_another_hosts_frames_to_tc_untouched(xnode: XdpNode, mac: str) -> None:
    """XDP has no pkt_type: it compares the destination MAC with the device's own.  Another host's new flow,
    established segment and SNAT reply go to tc unmodified and without state (where tc passes and counts
    them); the node's own frames are still forwarded at XDP."""
    program(xnode)
    syn = frame_in(TCP(sport=43000, dport=30080, flags="S", seq=1))
    frame = to_mac(syn, mac)
    run = xnode.xdp(frame)
    assert (run.retval, run.data) == (XDP_PASS, frame)
    assert ct_sizes(xnode) == (0, 0)
    tc = xnode.ingress(frame)
    assert (tc.retval, tc.data) == (TC_ACT_OK, frame)

    own = xnode.xdp(syn)
    assert own.retval == XDP_TX
    nat_port = Ether(own.data)[TCP].sport
    reply = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63, id=2) /
                  TCP(sport=8080, dport=nat_port, flags="SA", seq=9, ack=2))
    ack = frame_in(TCP(sport=43000, dport=30080, flags="A", seq=2, ack=10))
    for f in (to_mac(ack, mac), to_mac(reply, mac)):
        out = xnode.xdp(f)
        assert (out.retval, out.data) == (XDP_PASS, f)
    stats = xnode.maps.stats()
    assert (stats["xdp_tx"], stats["new_flow"], stats.get("reply_snat", 0)) == (1, 1, 0)
    assert stats["pass_other_host" if mac in OTHER_MACS.values() else "pass_l2_group"] == 1
    back = xnode.xdp(reply)
    assert back.retval == XDP_TX and Ether(back.data).dst == CLIENT_MAC
