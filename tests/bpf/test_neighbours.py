"""The unresolved-neighbour path, at tc and at XDP: a backend whose next hop has no neighbour entry yet (the
FIB lookup answers NO_NEIGH). tc translates the packet and hands it to bpf_redirect_neigh, so the kernel
resolves the MAC (it never sends a frame to a stale or zero MAC); XDP rewrites nothing and passes the packet
to tc, counting it as handed over."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.libbpf import TC_ACT_REDIRECT, XDP_PASS
from bpflb.model.types import Mode
from tests.bpf.packets import CLIENT_MAC, ETH0_MAC, NODE1, Node, XdpNode, backend, fe, frame_in, state

pytestmark = pytest.mark.privileged

UNRESOLVED = "198.18.0.50"      # on eth0's subnet, no neighbour entry in the scratch namespace


def test_tc_hands_an_unresolved_next_hop_to_the_kernel_after_translating(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (backend(UNRESOLVED, 8080, local=False),))), Mode.SNAT)
    before = node.maps.stats()
    run = node.ingress(frame_in(TCP(sport=40100, dport=30080, flags="S", seq=1), payload=b"abc"))
    assert run.retval == TC_ACT_REDIRECT                      # bpf_redirect_neigh: the kernel resolves the MAC
    out = Ether(run.data)
    assert (out[IP].src, out[IP].dst, out[TCP].dport, out[IP].ttl) == (NODE1, UNRESOLVED, 8080, 63)
    assert bytes(out[Raw]) == b"abc"
    # The MACs are left for the kernel's neighbour output to fill in (as on every tc redirect: fib.h).
    assert (out.src, out.dst) == (CLIENT_MAC, ETH0_MAC)
    after = node.maps.stats()
    assert after["new_flow"] - before["new_flow"] == 1
    assert after["pass_fib_failed"] == before["pass_fib_failed"]     # not a FIB failure: forwarded


def test_xdp_passes_an_unresolved_next_hop_to_tc_untouched(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30080, (backend(UNRESOLVED, 8080, local=False),))), Mode.SNAT)
    frame = frame_in(TCP(sport=40200, dport=30080, flags="S", seq=1), payload=b"abc")
    before = xnode.maps.stats()
    run = xnode.xdp(frame)
    assert run.retval == XDP_PASS and run.data == frame           # nothing rewritten: tc takes it as it came
    after = xnode.maps.stats()
    assert after["xdp_to_tc"] - before["xdp_to_tc"] == 1 and after["xdp_tx"] == before["xdp_tx"]
    then = xnode.ingress(frame)                                    # and tc does the job
    assert then.retval == TC_ACT_REDIRECT and Ether(then.data)[IP].dst == UNRESOLVED
