"""BPF unit tests of TTL handling (the real bpf_lb.o and bpf_xdp.o): a packet bpflb would forward with its TTL
running out (TTL 0 or 1 on arrival) is not translated and creates or changes no state; tc answers it with ICMP
time exceeded from the node's address, as the kernel's forwarding path does, and counts it; XDP hands it to tc
unmodified.  TTL 2 still goes through, leaving with 1."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_PASS, XDP_TX
from bpflb.model.cluster import dsr_backends, dsr_frontends
from bpflb.model.types import Mode
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL,
    LOCAL_POD,
    NODE1,
    NODE2_MAC,
    REMOTE,
    REMOTE_POD,
    Node,
    XdpNode,
    assert_frame,
    dsr_option,
    fe,
    state,
)

pytestmark = pytest.mark.privileged


def client_frame(flags: str, ttl: int, sport: int = 42000, dport: int = 30080) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1, ttl=ttl, id=7) /
                 TCP(sport=sport, dport=dport, flags=flags, seq=5) / Raw(b"data"))


def time_exceeded(offending: bytes, *, to: str, macs: tuple[str, str]) -> bytes:
    """ICMP time exceeded from the node's address, quoting the packet as it arrived (header + 8 bytes)."""
    quoted = bytes(Ether(offending)[IP])[:28]
    return bytes(Ether(src=macs[0], dst=macs[1]) / IP(src=NODE1, dst=to, ttl=64, id=0, tos=0xC0, proto=1) /
                 ICMP(type=11, code=0) / Raw(quoted))


def conntrack(node: Node) -> tuple[list[bytes], list[bytes]]:
    return ([v for _, v in node.maps.ct_fwd.items_raw()], [v for _, v in node.maps.ct_rev.items_raw()])


@pytest.mark.parametrize("ttl", [1, 0])
@pytest.mark.parametrize("backend", [REMOTE, LOCAL], ids=["remote backend", "local backend"])
def test_a_new_flow_with_ttl_running_out_gets_time_exceeded_and_no_state(node: Node, ttl: int,
                                                                         backend: object) -> None:
    node.program(state(fe(NODE1, 30080, (backend,))))   # type: ignore[arg-type]
    frame = client_frame("S", ttl)
    run = node.ingress(frame)
    assert run.retval == TC_ACT_REDIRECT
    assert_frame(run.data, time_exceeded(frame, to=CLIENT, macs=(ETH0_MAC, CLIENT_MAC)))
    assert conntrack(node) == ([], [])
    stats = node.maps.stats()
    assert stats["drop_ttl_exceeded"] == 1 and stats["icmp_sent"] == 1 and stats["new_flow"] == 0


def test_ttl_2_is_forwarded_with_1(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (REMOTE,))))
    run = node.ingress(client_frame("S", 2))
    assert run.retval == TC_ACT_REDIRECT and Ether(run.data)[IP].ttl == 1 and Ether(run.data)[IP].dst == REMOTE_POD


def test_an_established_flow_is_left_as_it_was(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (REMOTE,))))
    assert node.ingress(client_frame("S", 64)).retval == TC_ACT_REDIRECT
    before = conntrack(node)
    fin = client_frame("FA", 1)
    run = node.ingress(fin)
    assert_frame(run.data, time_exceeded(fin, to=CLIENT, macs=(ETH0_MAC, CLIENT_MAC)))
    assert conntrack(node) == before, "the FIN that never left closes nothing"


def test_a_snat_reply_with_ttl_running_out_is_answered_to_the_backend(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (REMOTE,))))
    nat_port = Ether(node.ingress(client_frame("S", 64)).data)[TCP].sport
    before = conntrack(node)
    reply = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=1, id=2) /
                  TCP(sport=8080, dport=nat_port, flags="A"))
    run = node.ingress(reply)
    quoted = bytes(Ether(reply)[IP])[:28]
    assert_frame(run.data, bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) /
                                 IP(src=NODE1, dst=REMOTE_POD, ttl=64, id=0, tos=0xC0, proto=1) /
                                 ICMP(type=11, code=0) / Raw(quoted)))
    # A RST is not answered (no ICMP about a reset), and it closes nothing: it never left.
    rst = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=1, id=3) /
                TCP(sport=8080, dport=nat_port, flags="RA"))
    assert node.ingress(rst).retval == TC_ACT_SHOT
    assert conntrack(node) == before
    stats = node.maps.stats()
    assert stats["reply_snat"] == 0 and stats["drop_ttl_exceeded"] == 2 and stats["icmp_suppressed"] == 1


def test_a_dsr_request_with_ttl_running_out_is_answered_and_recorded_nowhere(node: Node) -> None:
    other = "198.18.0.13"
    desired = state(fe(NODE1, 30080, (LOCAL,)))
    node.program(desired)
    node.cluster.sync(dsr_frontends(desired, {IPv4Address(NODE1), IPv4Address(other)}), {LOCAL.l4},
                      {IPv4Network("10.244.0.0/16")}, dsr_backends=dsr_backends(desired))
    request = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                    IP(src=CLIENT, dst=LOCAL_POD, ttl=1, id=5, options=[dsr_option(other, 30080)]) /
                    TCP(sport=42001, dport=8080, flags="S"))
    run = node.ingress(request)
    assert run.retval == TC_ACT_REDIRECT and Ether(run.data)[ICMP].type == 11
    assert Ether(run.data)[IP].dst == CLIENT and Ether(run.data)[IP].src == NODE1
    assert conntrack(node) == ([], [])


def test_the_kernels_packets_and_local_answers_are_not_bpflbs_to_expire(node: Node) -> None:
    node.program(state(fe(NODE1, 30090, (), no_endpoints=True)))
    other = client_frame("S", 1, dport=22)
    assert node.ingress(other).retval == TC_ACT_OK and node.ingress(other).data == other
    # A Service without endpoints answers for itself (port unreachable), like a local socket would.
    run = node.ingress(client_frame("S", 1, dport=30090))
    assert Ether(run.data)[ICMP].type == 3
    assert node.maps.stats().get("drop_ttl_exceeded", 0) == 0


@pytest.mark.parametrize("mode", [Mode.SNAT, Mode.DSR])
def test_xdp_hands_ttl_running_out_to_tc_unmodified_and_records_nothing(xnode: XdpNode, mode: Mode) -> None:
    xnode.program(state(fe(NODE1, 30080, (REMOTE,))), mode)
    frame = client_frame("S", 1)
    run = xnode.xdp(frame)
    assert run.retval == XDP_PASS and run.data == frame
    assert conntrack(xnode) == ([], [])
    tc = xnode.ingress(frame)
    assert Ether(tc.data)[ICMP].type == 11
    # An established flow and a SNAT reply alike.
    assert xnode.xdp(client_frame("S", 64, sport=42010)).retval == XDP_TX
    late = client_frame("A", 1, sport=42010)
    assert xnode.xdp(late).retval == XDP_PASS
    stats = xnode.maps.stats()
    assert stats["drop_ttl_exceeded"] == 1 and stats["xdp_to_tc"] >= 2


def test_xdp_hands_a_snat_reply_with_ttl_running_out_to_tc(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.SNAT)
    nat_port = Ether(xnode.xdp(client_frame("S", 64)).data)[TCP].sport
    reply = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=1) /
                  TCP(sport=8080, dport=nat_port, flags="SA"))
    run = xnode.xdp(reply)
    assert run.retval == XDP_PASS and run.data == reply
