"""BPF unit tests of the XDP fast path: the real bpf_xdp.o, sharing its maps with bpf_lb.o, on crafted
frames: remote-backend flows forwarded by SNAT or DSR and transmitted straight back out (XDP_TX),
SNAT replies, and everything else passed on to tc unmodified, with state shared both ways."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.lbmaps import NodeConfig
from bpflb.datapath.libbpf import TC_ACT_REDIRECT, XDP_PASS, XDP_TX
from bpflb.model.cluster import NodeInfo
from bpflb.model.types import Mode, Proto
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
    XdpNode,
    assert_frame,
    backend,
    dsr_option,
    fe,
    frame_in,
    state,
)

pytestmark = pytest.mark.privileged


def test_new_snat_flow_and_its_reply_are_forwarded_at_xdp(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.SNAT)
    run = xnode.xdp(frame_in(TCP(sport=40000, dport=30080, flags="S", seq=1), payload=b"abc"))
    assert run.retval == XDP_TX
    nat_port = Ether(run.data)[TCP].sport
    expected = Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=NODE1, dst=REMOTE_POD, ttl=63, id=7) / \
        TCP(sport=nat_port, dport=8080, flags="S", seq=1) / Raw(b"abc")
    assert_frame(run.data, bytes(expected))
    reply = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63, id=2) / \
        TCP(sport=8080, dport=nat_port, flags="SA", seq=9, ack=2)
    back = xnode.xdp(bytes(reply))
    assert back.retval == XDP_TX
    expected_back = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=NODE1, dst=CLIENT, ttl=62, id=2) / \
        TCP(sport=30080, dport=40000, flags="SA", seq=9, ack=2)
    assert_frame(back.data, bytes(expected_back))
    stats = xnode.maps.stats()
    assert stats["xdp_tx"] == 2 and stats["new_flow"] == 1 and stats["reply_snat"] == 1


def test_dsr_at_xdp_inserts_the_option_on_the_syn_only(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.DSR)
    syn = xnode.xdp(frame_in(TCP(sport=40001, dport=30080, flags="S", seq=5), payload=b"x"))
    assert syn.retval == XDP_TX
    expected = Ether(src=ETH0_MAC, dst=NODE2_MAC) / \
        IP(src=CLIENT, dst=REMOTE_POD, ttl=63, id=7, options=[dsr_option(NODE1, 30080)]) / \
        TCP(sport=40001, dport=8080, flags="S", seq=5) / Raw(b"x")
    assert_frame(syn.data, bytes(expected))
    ack = xnode.xdp(frame_in(TCP(sport=40001, dport=30080, flags="A", seq=6, ack=1)))
    assert ack.retval == XDP_TX
    assert_frame(ack.data, bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) /
                                 IP(src=CLIENT, dst=REMOTE_POD, ttl=63, id=7) /
                                 TCP(sport=40001, dport=8080, flags="A", seq=6, ack=1)))


def test_hybrid_at_xdp_snats_udp(xnode: XdpNode) -> None:
    udp_be = backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP)
    xnode.program(state(fe(NODE1, 30081, (udp_be,), proto=Proto.UDP)), Mode.HYBRID)
    run = xnode.xdp(frame_in(UDP(sport=5000, dport=30081), payload=b"hostname"))
    assert run.retval == XDP_TX
    out = Ether(run.data)
    assert (out[IP].src, out[IP].dst, out[IP].ihl) == (NODE1, REMOTE_POD, 5)
    assert_frame(run.data, bytes(Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=NODE1, dst=REMOTE_POD, ttl=63, id=7) /
                                 UDP(sport=out[UDP].sport, dport=8081) / Raw(b"hostname")))


def test_state_is_shared_with_tc_both_ways(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.SNAT)
    # tc saw the SYN (acceleration just turned on); XDP carries on with the same SNAT port.
    by_tc = Ether(xnode.ingress(frame_in(TCP(sport=40002, dport=30080, flags="S"))).data)
    by_xdp = xnode.xdp(frame_in(TCP(sport=40002, dport=30080, flags="A")))
    assert by_xdp.retval == XDP_TX and Ether(by_xdp.data)[TCP].sport == by_tc[TCP].sport
    # ...and the other way round.
    first = Ether(xnode.xdp(frame_in(TCP(sport=40003, dport=30080, flags="S"))).data)
    later = xnode.ingress(frame_in(TCP(sport=40003, dport=30080, flags="A")))
    assert later.retval == TC_ACT_REDIRECT and Ether(later.data)[TCP].sport == first[TCP].sport


def test_everything_else_goes_on_to_tc_untouched(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30080, (LOCAL,)), fe(NODE1, 30090, (), no_endpoints=True),
                        fe(NODE1, 30091, (REMOTE,))), Mode.DSR)
    cases = {
        "local backend": frame_in(TCP(sport=40004, dport=30080, flags="S")),
        "no endpoints (tc rejects)": frame_in(TCP(sport=40004, dport=30090, flags="S")),
        "not a service": frame_in(TCP(sport=40004, dport=22, flags="S")),
        "truncated": frame_in(TCP(sport=40004, dport=30091, flags="S"))[:14 + 20 + 10],
        "fragment": frame_in(TCP(sport=40004, dport=30091, flags="S"), flags="MF"),
        "option beyond the MTU (tc answers ICMP)": frame_in(UDP(sport=1, dport=30091), payload=b"z" * 1472,
                                                            flags="DF"),
        "a DSR request for a pod of this node": bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                                                      IP(src=CLIENT, dst=LOCAL_POD,
                                                         options=[dsr_option(NODE1, 30080)]) /
                                                      TCP(sport=40005, dport=8080, flags="S")),
    }
    for what, frame in cases.items():
        run = xnode.xdp(frame)
        assert run.retval == XDP_PASS, what
        assert run.data == frame, what
    flows = {(int.from_bytes(int(k.sport).to_bytes(2, "little"), "big"),
              int.from_bytes(int(k.dport).to_bytes(2, "little"), "big")) for k, _ in xnode.maps.flows()}
    # Nothing recorded for packets passed on, except the flow to the local backend XDP chose (one decision
    # per flow: see test_forwarding_xdp.py); tc then delivers it to that backend.
    assert flows == {(40004, 30080)}
    tc = Ether(xnode.ingress(cases["local backend"]).data)
    assert (tc[IP].dst, tc[TCP].dport) == (LOCAL_POD, 8080)


def test_the_overlay_is_left_to_tc(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30080, (REMOTE,))), Mode.SNAT)
    xnode.maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=xnode.eth0,
                                     tunnel_mode=1))
    xnode.cluster.sync({}, set(), set(), [NodeInfo("node2", IPv4Address("198.18.0.12"),
                                                      (IPv4Network("10.244.2.0/24"),))])
    frame = frame_in(TCP(sport=40006, dport=30080, flags="S"))
    run = xnode.xdp(frame)
    assert run.retval == XDP_PASS and run.data == frame
