"""BPF unit tests of XDP and tc in agreement (the real bpf_xdp.o in front of bpf_lb.o, sharing maps):

- one decision per flow: when XDP picks a backend it records the flow, a local backend included, and tc carries
  that flow on instead of picking again, so Random spreads evenly and Maglev maps every flow as the model says,
  with and without XDP;
- neighbours: XDP forwards with the MAC of a neighbour entry the kernel holds valid (and follows it when it
  changes), hands anything unresolved to tc, and hands a flow start to tc when the kernel has not seen bpflb use
  a next hop for a second, so the kernel's neighbour state machine keeps verifying the entries XDP relies on."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpflb.datapath.libbpf import TC_ACT_REDIRECT, XDP_PASS, XDP_TX, ffi
from bpflb.model import maglev
from bpflb.model.types import AgentSettings, Algorithm, DesiredState, Frontend, FrontendKind, Mode
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2,
    REMOTE_POD,
    XdpNode,
    backend,
    l4,
)

pytestmark = pytest.mark.privileged

LOCAL = backend(LOCAL_POD, 8080, local=True, name="echo-c")
REMOTE = backend(REMOTE_POD, 8080, local=False, name="echo-a")
SEED = 11


def split_state(algorithm: Algorithm) -> DesiredState:
    front = Frontend(l4(NODE1, 30080), FrontendKind.NODEPORT, "default/split", "http", False, (REMOTE, LOCAL), False,
                     algorithm=algorithm)
    return DesiredState("node1", (IPv4Address(NODE1),), {front.l4: front},
                        settings=AgentSettings(algorithm=algorithm, maglev_seed=SEED))


def one_remote() -> DesiredState:
    front = Frontend(l4(NODE1, 30080), FrontendKind.NODEPORT, "default/echo", "", False, (REMOTE,), False)
    return DesiredState("node1", (IPv4Address(NODE1),), {front.l4: front})


def syn(sport: int, flags: str = "S") -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1, ttl=64) /
                 TCP(sport=sport, dport=30080, flags=flags))


def through_xdp_then_tc(xnode: XdpNode, frame: bytes) -> str:
    """Where the packet ends up: XDP forwards it, or passes it to tc, which forwards it."""
    run = xnode.xdp(frame)
    if run.retval == XDP_TX:
        return str(Ether(run.data)[IP].dst)
    assert run.retval == XDP_PASS and run.data == frame, "XDP passes packets unmodified"
    tc = xnode.ingress(frame)
    assert tc.retval == TC_ACT_REDIRECT
    return str(Ether(tc.data)[IP].dst)


def recorded_backend(xnode: XdpNode, sport: int) -> str:
    for key, entry in xnode.maps.flows():
        if int.from_bytes(int(key.sport).to_bytes(2, "little"), "big") == sport:
            return str(IPv4Address(int(entry.backend_addr).to_bytes(4, "little")))
    raise AssertionError(f"no flow from port {sport}")


def clear_conntrack(xnode: XdpNode) -> None:
    for m in (xnode.maps.ct_fwd, xnode.maps.ct_rev):
        for key in [k for k, _ in m.items_raw()]:
            m.delete_raw(key)


def test_random_spreads_evenly_with_xdp_because_tc_keeps_xdps_pick(xnode: XdpNode) -> None:
    xnode.program(split_state(Algorithm.RANDOM), Mode.SNAT)
    flows = 1000
    landed: Counter[str] = Counter()
    for i in range(flows):
        dst = through_xdp_then_tc(xnode, syn(50000 + i))
        assert dst == recorded_backend(xnode, 50000 + i), "the packet went where the flow was recorded"
        landed[dst] += 1
        # The flow's next packet stays with it, whichever layer carries it.
        assert through_xdp_then_tc(xnode, syn(50000 + i, "A")) == dst
    # Binomial(1000, 0.5): 40-60% is more than 6 standard deviations wide.  Picking twice gave the local one 25%.
    assert 0.4 * flows <= landed[LOCAL_POD] <= 0.6 * flows, landed
    assert xnode.maps.stats()["new_flow"] == flows, "one decision per flow"


def test_maglev_maps_every_flow_identically_with_and_without_xdp(xnode: XdpNode) -> None:
    xnode.program(split_state(Algorithm.MAGLEV), Mode.SNAT)
    ports = range(51000, 51300)
    with_xdp = [through_xdp_then_tc(xnode, syn(p)) for p in ports]
    clear_conntrack(xnode)
    tc_only = [str(Ether(xnode.ingress(syn(p)).data)[IP].dst) for p in ports]
    addr = {"echo-a": REMOTE_POD, "echo-c": LOCAL_POD}
    model = [addr[maglev.pick(["echo-a", "echo-c"], IPv4Address(CLIENT), p, 30080, 6, seed=SEED)] for p in ports]
    assert with_xdp == tc_only == model
    assert set(with_xdp) == {LOCAL_POD, REMOTE_POD}


def neigh(xnode: XdpNode, *args: str) -> None:
    subprocess.run(["ip", "-n", xnode.ns, "neigh", *args], check=True, capture_output=True)


def seen(xnode: XdpNode) -> dict[tuple[int, str], int]:
    m = xnode.obj.map("lb_neigh_seen")
    out = {}
    for k, v in m.items_raw():
        key = m.decode_key(k)
        out[(int(key.ifindex), str(IPv4Address(int(key.addr).to_bytes(4, "little"))))] = \
            int(ffi().cast("__u64 *", ffi().from_buffer(v))[0])
    return out


def age(xnode: XdpNode, seconds: float) -> None:
    """Make every next hop look as if tc last sent to it `seconds` ago."""
    m = xnode.obj.map("lb_neigh_seen")
    then = (time.monotonic_ns() - int(seconds * 1e9)).to_bytes(8, "little")
    for k, _ in list(m.items_raw()):
        m.update_raw(k, then)


def test_xdp_follows_a_changed_neighbour_entry_at_once(xnode: XdpNode) -> None:
    xnode.program(one_remote(), Mode.SNAT)
    assert Ether(xnode.xdp(syn(52000)).data).dst == "02:00:00:00:00:12"
    neigh(xnode, "replace", NODE2, "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "reachable")
    out = xnode.xdp(syn(52000, "A"))
    assert out.retval == XDP_TX and Ether(out.data).dst == "02:00:00:00:00:99"


def test_xdp_leaves_unresolved_next_hops_to_tc(xnode: XdpNode) -> None:
    xnode.program(one_remote(), Mode.SNAT)
    neigh(xnode, "del", NODE2, "dev", "eth0")
    frame = syn(52100)
    run = xnode.xdp(frame)
    assert run.retval == XDP_PASS and run.data == frame
    assert xnode.ingress(frame).retval == TC_ACT_REDIRECT       # tc sends it; the kernel resolves the neighbour
    neigh(xnode, "replace", NODE2, "lladdr", "02:00:00:00:00:12", "dev", "eth0", "nud", "failed")
    assert xnode.xdp(syn(52100, "A")).retval == XDP_PASS, "a FAILED entry is no neighbour either"


def test_a_flow_start_goes_through_tc_once_the_kernel_has_not_seen_the_next_hop_for_a_second(
        xnode: XdpNode) -> None:
    xnode.program(one_remote(), Mode.SNAT)
    assert xnode.xdp(syn(52200)).retval == XDP_TX            # the next hop's clock starts
    assert list(seen(xnode)) == [(xnode.eth0, NODE2)]
    assert xnode.xdp(syn(52201)).retval == XDP_TX            # within the second: XDP keeps it
    age(xnode, 1.5)
    # An established flow's packets stay at XDP, due or not: no reordering within a TCP flow.
    assert xnode.xdp(syn(52200, "A")).retval == XDP_TX
    # The next flow start goes through tc, which sends it with bpf_redirect_neigh (the kernel sees the entry
    # in use); its flow was recorded by XDP, so tc carries it on to the same backend.
    frame = syn(52202)
    run = xnode.xdp(frame)
    assert run.retval == XDP_PASS and run.data == frame
    assert Ether(xnode.ingress(frame).data)[IP].dst == REMOTE_POD == recorded_backend(xnode, 52202)
    assert xnode.maps.stats()["xdp_neigh_check"] == 1
    assert time.monotonic_ns() - seen(xnode)[(xnode.eth0, NODE2)] < 1e9, "the clock restarted"
    assert xnode.xdp(syn(52203)).retval == XDP_TX
