"""BPF unit tests of IP fragments (frag.h) on the real bpf_lb.o / bpf_xdp.o with BPF_PROG_TEST_RUN: a
fragmented UDP datagram of a flow is translated whole, in both directions (SNAT to a remote backend and its
replies, DNAT to a local one and its replies at egress, DSR on both nodes, the pod-facing ClusterIP path):
each fragment's exact headers, its IPv4 checksum, and the UDP checksum of the datagram reassembled by scapy
after translation.  A later fragment without its first one passes untouched and is counted; a fragment
record is used only while young; a flood of first fragments only pushes out fragment records, never a
flow; no ICMP error is ever about a later fragment; XDP hands fragments to tc."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import cast

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet import defragment as _defragment
from scapy.layers.inet import fragment as _fragment
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.plist import PacketList

from bpflb.datapath import loader
from bpflb.datapath.eastwest import EastWestMaps
from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_PASS, const
from bpflb.model.cluster import dsr_backends, dsr_frontends
from bpflb.model.types import Backend, DesiredState, Frontend, FrontendKind, Mode, Proto
from bpflb_lab.lab.netns import entered
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    LOCAL_POD_MAC,
    LXC_MAC,
    NODE1,
    NODE2_MAC,
    OTHER_NODE,
    REMOTE_POD,
    Node,
    XdpNode,
    backend,
    dsr_option,
    fe,
    l4,
    state,
    wait_idle,
)

pytestmark = pytest.mark.privileged

UDP_REMOTE = backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP)
UDP_LOCAL = backend(LOCAL_POD, 8081, local=True, proto=Proto.UDP)
PAYLOAD = bytes(range(256)) * 12          # 3,072 bytes: three fragments of at most 1,500 bytes
FRAG_MAX = const("LB_FRAG_MAX")


def fragment(pkt: Packet, fragsize: int) -> list[Packet]:
    """scapy's fragment(), typed: scapy leaves it unannotated (it returns a list of packets)."""
    return cast("list[Packet]", _fragment(pkt, fragsize=fragsize))  # type: ignore[no-untyped-call]


def defragment(plist: list[Packet]) -> PacketList:
    """scapy's defragment(), typed: scapy leaves it unannotated (it returns a PacketList)."""
    return cast(PacketList, _defragment(plist))  # type: ignore[no-untyped-call]


def datagram(src: str, dst: str, sport: int, dport: int, *, ident: int = 7, ttl: int = 64, smac: str = CLIENT_MAC,
             dmac: str = ETH0_MAC, payload: bytes = PAYLOAD, chksum: int | None = None,
             options: list[object] | None = None) -> Packet:
    pkt = Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, ttl=ttl, id=ident, options=options or []) / \
        UDP(sport=sport, dport=dport, chksum=chksum) / Raw(payload)
    return Ether(bytes(pkt))


def frags(pkt: Packet) -> list[bytes]:
    """The datagram cut as a 1,500-byte MTU cuts it (the UDP checksum computed over the whole first)."""
    return [bytes(f) for f in fragment(pkt, fragsize=1480)]


def assert_frags(outs: list[bytes], expected: Packet) -> None:
    """Each output fragment byte for byte as the expected (translated) datagram cut the same way, so every
    header field and each fragment's IPv4 checksum; and the datagram reassembled from the outputs carries a
    right UDP checksum and the whole payload."""
    want = frags(expected)
    assert len(outs) == len(want)
    for i, (out, exp) in enumerate(zip(outs, want, strict=True)):
        if out != exp:
            pytest.fail(f"fragment {i} differs\n got:      {Ether(out)!r}\n expected: {Ether(exp)!r}")
        ip = Ether(out)[IP]
        check = ip.chksum
        del ip.chksum
        assert IP(bytes(ip))[IP].chksum == check, f"fragment {i}: IPv4 header checksum"
    whole = defragment([Ether(o)[IP] for o in outs])
    assert len(whole) == 1
    dgram = IP(bytes(whole[0]))
    assert bytes(dgram[UDP].payload) == bytes(expected[UDP].payload)
    if dgram[UDP].chksum:
        check = dgram[UDP].chksum
        del dgram[UDP].chksum
        assert IP(bytes(dgram))[UDP].chksum == check, "UDP checksum of the reassembled datagram"


def run_all(run: object, frames: list[bytes], verdict: int = TC_ACT_REDIRECT) -> list[bytes]:
    outs = []
    for i, frame in enumerate(frames):
        res = run(frame)  # type: ignore[operator]
        assert res.retval == verdict, f"fragment {i}: verdict {res.retval}"
        outs.append(res.data)
    return outs


def ipv4_checksum(header: bytes) -> bytes:
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF).to_bytes(2, "big")


def frag_records(node: Node) -> int:
    return len(list(node.obj.map("lb_frags").items_raw()))


# -- SNAT to a remote backend, and its replies --------------------------------------------------------------


def test_snat_request_and_reply_fragments_are_translated_whole(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    request = datagram(CLIENT, NODE1, 5000, 30081)
    outs = run_all(node.ingress, frags(request))
    nat_port = Ether(outs[0])[UDP].sport
    assert 32768 <= nat_port <= 65535
    assert_frags(outs, datagram(NODE1, REMOTE_POD, nat_port, 8081, ttl=63))
    assert len(node.maps.flows()) == 1, "one flow for the whole datagram"

    reply = datagram(REMOTE_POD, NODE1, 8081, nat_port, ident=900, ttl=63, smac=NODE2_MAC)
    back = run_all(node.ingress, frags(reply))
    assert_frags(back, datagram(NODE1, CLIENT, 30081, 5000, ident=900, ttl=62, smac=NODE2_MAC))
    stats = node.maps.stats()
    assert (stats["new_flow"], stats["fwd_established"], stats["reply_snat"]) == (1, 2, 3)
    assert (stats["frag_tracked"], stats["frag_followed"], stats["frag_track_failed"]) == (2, 4, 0)
    assert stats["pass_fragment"] == 0


def test_a_zero_udp_checksum_stays_zero_in_the_first_fragment(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    outs = run_all(node.ingress, frags(datagram(CLIENT, NODE1, 5001, 30081, chksum=0)))
    nat_port = Ether(outs[0])[UDP].sport
    assert Ether(outs[0])[UDP].chksum == 0
    assert_frags(outs, datagram(NODE1, REMOTE_POD, nat_port, 8081, ttl=63, chksum=0))


def test_local_backend_request_fragments_are_dnat_and_reply_fragments_translated_at_egress(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_LOCAL,), proto=Proto.UDP)))
    outs = run_all(node.ingress, frags(datagram(CLIENT, NODE1, 5002, 30081)))
    assert_frags(outs, datagram(CLIENT, LOCAL_POD, 5002, 8081, ttl=63))

    reply = datagram(LOCAL_POD, CLIENT, 8081, 5002, ident=300, smac=ETH0_MAC, dmac=CLIENT_MAC)
    back = run_all(node.egress, frags(reply), TC_ACT_OK)
    assert_frags(back, datagram(NODE1, CLIENT, 30081, 5002, ident=300, smac=ETH0_MAC, dmac=CLIENT_MAC))
    stats = node.maps.stats()
    assert (stats["reply_dnat"], stats["frag_tracked"], stats["frag_followed"]) == (3, 2, 4)


def test_hybrid_sends_udp_fragments_by_snat(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)), Mode.HYBRID)
    outs = run_all(node.ingress, frags(datagram(CLIENT, NODE1, 5003, 30081)))
    nat_port = Ether(outs[0])[UDP].sport
    assert_frags(outs, datagram(NODE1, REMOTE_POD, nat_port, 8081, ttl=63))


# -- fragments the datapath cannot follow -------------------------------------------------------------------


def test_a_later_fragment_without_its_first_passes_untouched_and_is_counted(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    first, middle, last = frags(datagram(CLIENT, NODE1, 5004, 30081))
    for frame in (middle, last):
        run = node.ingress(frame)
        assert run.retval == TC_ACT_OK and run.data == frame
    assert not node.maps.flows(), "a later fragment never starts a flow"
    assert node.maps.stats()["pass_fragment"] == 2

    # Out of order: the first one arrives after them, and is translated with what follows it.
    out = node.ingress(first)
    assert out.retval == TC_ACT_REDIRECT and Ether(out.data)[IP].dst == REMOTE_POD
    again = node.ingress(last)
    assert again.retval == TC_ACT_REDIRECT and Ether(again.data)[IP].dst == REMOTE_POD
    stats = node.maps.stats()
    assert (stats["pass_fragment"], stats["frag_tracked"], stats["frag_followed"]) == (2, 1, 1)


def test_fragments_of_non_service_traffic_are_untouched(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    frames = frags(datagram(CLIENT, NODE1, 5005, 53))
    for frame in frames:
        run = node.ingress(frame)
        assert run.retval == TC_ACT_OK and run.data == frame
    assert frag_records(node) == 0
    stats = node.maps.stats()
    assert (stats["pass_not_service"], stats["pass_fragment"]) == (1, 2)


def test_a_fragment_record_is_used_only_while_young(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    first, middle, last = frags(datagram(CLIENT, NODE1, 5006, 30081))
    assert node.ingress(first).retval == TC_ACT_REDIRECT
    assert node.ingress(middle).retval == TC_ACT_REDIRECT
    wait_idle(node.obj.map("lb_frags"), "created", const("LB_FRAG_LIFETIME_S"))
    run = node.ingress(last)
    assert run.retval == TC_ACT_OK and run.data == last, "an old record (the IP id may have come round) is not used"


def test_a_flood_of_first_fragments_pushes_out_fragment_records_only(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    # A flow of its own, established before the flood.
    flow = bytes(datagram(CLIENT, NODE1, 5100, 30081, payload=b"hello"))
    before = Ether(node.ingress(flow).data)
    raw = bytearray(frags(datagram(CLIENT, NODE1, 5101, 30081, payload=PAYLOAD[:1600]))[0])
    for ident in range(1, FRAG_MAX + 501):
        raw[18:20] = ident.to_bytes(2, "big")
        raw[24:26] = ipv4_checksum(bytes(raw[14:24]) + b"\0\0" + bytes(raw[26:34]))
        assert node.ingress(bytes(raw)).retval == TC_ACT_REDIRECT
    assert frag_records(node) <= FRAG_MAX
    stats = node.maps.stats()
    assert stats["frag_tracked"] == FRAG_MAX + 500 and stats["frag_track_failed"] == 0
    assert len(node.maps.flows()) == 2, "the flood's datagrams are one flow; no flow state was pushed out"
    after = Ether(node.ingress(flow).data)
    assert (after[IP].dst, after[UDP].sport) == (before[IP].dst, before[UDP].sport)
    # The newest datagram's later fragment still follows its first.
    rest = frags(datagram(CLIENT, NODE1, 5101, 30081, ident=FRAG_MAX + 500, payload=PAYLOAD[:1600]))[1]
    assert node.ingress(rest).retval == TC_ACT_REDIRECT


def test_no_icmp_error_about_a_later_fragment(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    first, middle, _ = frags(datagram(CLIENT, NODE1, 5007, 30081))
    assert node.ingress(first).retval == TC_ACT_REDIRECT
    dying = Ether(middle)
    dying[IP].ttl = 1
    del dying[IP].chksum
    run = node.ingress(bytes(dying))
    assert run.retval == TC_ACT_SHOT
    stats = node.maps.stats()
    assert (stats["drop_ttl_exceeded"], stats["icmp_sent"], stats["icmp_suppressed"]) == (1, 0, 1)
    # The first fragment is answered, as the kernel answers fragment 0.
    first2 = Ether(frags(datagram(CLIENT, NODE1, 5008, 30081, ttl=1))[0])
    assert node.ingress(bytes(first2)).retval == TC_ACT_REDIRECT
    assert node.maps.stats()["icmp_sent"] == 1


def test_xdp_hands_fragments_to_tc_untouched(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    for frame in frags(datagram(CLIENT, NODE1, 5009, 30081)):
        run = xnode.xdp(frame)
        assert run.retval == XDP_PASS and run.data == frame
    assert not xnode.maps.flows()


# -- DSR: the balancing node and the backend's node --------------------------------------------------------


def test_dsr_every_fragment_carries_the_option_when_it_fits(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)), Mode.DSR)
    # A client that learnt the path MTU (1492, the option's 8 bytes less) cuts its datagram to fit.
    request = datagram(CLIENT, NODE1, 5010, 30081)
    cut = [bytes(f) for f in fragment(request, fragsize=1472)]
    outs = run_all(node.ingress, cut)
    for i, out in enumerate(outs):
        ip = Ether(out)[IP]
        assert (ip.src, ip.dst, ip.ihl, len(ip)) == (CLIENT, REMOTE_POD, 7, len(Ether(cut[i])[IP]) + 8), i
        assert bytes(ip.options[0])[:8] == bytes(dsr_option(NODE1, 30081))
    whole = defragment([Ether(o)[IP] for o in outs])
    dgram = IP(bytes(whole[0]))
    assert (dgram[UDP].sport, dgram[UDP].dport, bytes(dgram[UDP].payload)) == (5010, 8081, PAYLOAD)
    check = dgram[UDP].chksum
    del dgram[UDP].chksum
    assert IP(bytes(dgram))[UDP].chksum == check


def test_dsr_fragments_beyond_the_path_mtu_go_translated_to_the_kernel_to_fragment(node: Node) -> None:
    """Cut at the full MTU, the first and middle fragments cannot carry the option within it.  A fragment has no
    DF: each is translated (the option in) and handed to the kernel's forwarding, which cuts it again (the
    option copied into every piece: tests/lab/test_forwarding_mtu.py shows it on the wire); the last one fits
    and is redirected.  No fragmentation needed, nothing lost."""
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)), Mode.DSR)
    cut = frags(datagram(CLIENT, NODE1, 5011, 30081))
    outs = []
    for i, (frame, verdict) in enumerate(zip(cut, (TC_ACT_OK, TC_ACT_OK, TC_ACT_REDIRECT), strict=True)):
        run = node.ingress(frame)
        assert run.retval == verdict, i
        ip = Ether(run.data)[IP]
        assert (ip.src, ip.dst, ip.ihl, len(ip)) == (CLIENT, REMOTE_POD, 7, len(Ether(frame)[IP]) + 8), i
        assert bytes(ip.options[0])[:8] == bytes(dsr_option(NODE1, 30081))
        outs.append(run.data)
    dgram = IP(bytes(defragment([Ether(o)[IP] for o in outs])[0]))
    assert (dgram[UDP].sport, dgram[UDP].dport, bytes(dgram[UDP].payload)) == (5011, 8081, PAYLOAD)
    stats = node.maps.stats()
    assert (stats["fwd_fragmented"], stats.get("icmp_frag_needed", 0), stats.get("pass_fragment", 0)) == (2, 0, 0)
    assert (stats["frag_tracked"], stats["frag_followed"]) == (1, 2)


def dsr_backend_node(node: Node) -> None:
    desired = DesiredState("node1", (IPv4Address(NODE1),), {
        l4(NODE1, 30081, Proto.UDP): fe(NODE1, 30081, (UDP_LOCAL,), proto=Proto.UDP)})
    node.program(desired, Mode.SNAT)
    node.cluster.sync(dsr_frontends(desired, {IPv4Address(NODE1), IPv4Address(OTHER_NODE)}), {UDP_LOCAL.l4},
                      {IPv4Network(f"{NODE1}/32"), IPv4Network(f"{OTHER_NODE}/32"), IPv4Network("10.244.0.0/16")},
                      dsr_backends=dsr_backends(desired))


def test_dsr_backend_node_strips_the_option_of_every_fragment_and_translates_the_reply(node: Node) -> None:
    dsr_backend_node(node)
    plain = datagram(CLIENT, LOCAL_POD, 5012, 8081, ttl=63, smac=NODE2_MAC)
    cut = []
    for f in fragment(plain, fragsize=1472):
        f[IP].options = [dsr_option(OTHER_NODE, 30081)]
        del f[IP].ihl, f[IP].len, f[IP].chksum
        cut.append(bytes(f))
    outs = run_all(node.ingress, cut)
    assert_frags_cut = [bytes(f) for f in fragment(datagram(CLIENT, LOCAL_POD, 5012, 8081, ttl=62, smac=NODE2_MAC),
                                                   fragsize=1472)]
    assert outs == assert_frags_cut, "the option stripped from every fragment, nothing else changed"
    stats = node.maps.stats()
    assert (stats["dsr_accepted"], stats["frag_tracked"], stats["frag_followed"]) == (3, 1, 2)

    reply = datagram(LOCAL_POD, CLIENT, 8081, 5012, ident=77, smac=ETH0_MAC, dmac=CLIENT_MAC)
    back = run_all(node.egress, frags(reply), TC_ACT_OK)
    assert_frags(back, datagram(OTHER_NODE, CLIENT, 30081, 5012, ident=77, smac=ETH0_MAC, dmac=CLIENT_MAC))


# -- the pod-facing ClusterIP path --------------------------------------------------------------------------

CIP = "10.96.0.10"


def pod_run(node: Node, prog: str, frame: bytes) -> loader.TestRun:
    with entered(node.ns):
        return node.obj.test_run(prog, frame, ifindex=node.lxc0)


def test_pod_to_clusterip_fragments_are_dnat_and_the_reply_fragments_come_from_the_service(node: Node) -> None:
    EastWestMaps(node.obj).sync([IPv4Network("10.244.1.0/24")])
    remote = Backend(l4(REMOTE_POD, 8081, Proto.UDP), "echo-a", "node2", False)
    svc = Frontend(l4(CIP, 53, Proto.UDP), FrontendKind.CLUSTER_IP, "default/dns", "", False, (remote,), False)
    node.program(DesiredState("node1", (IPv4Address(NODE1),), {svc.l4: svc}))
    query = datagram(LOCAL_POD, CIP, 5013, 53, smac=LOCAL_POD_MAC, dmac=LXC_MAC)
    outs = run_all(lambda f: pod_run(node, "lb_pod_ingress", f), frags(query), TC_ACT_OK)
    assert_frags(outs, datagram(LOCAL_POD, REMOTE_POD, 5013, 8081, smac=LOCAL_POD_MAC, dmac=LXC_MAC))
    flows = node.maps.flows()
    assert len(flows) == 1 and flows[0][1].flags == const("CT_F_LOCAL")

    answer = datagram(REMOTE_POD, LOCAL_POD, 8081, 5013, ident=55, ttl=63, smac=LXC_MAC, dmac=LOCAL_POD_MAC)
    back = run_all(lambda f: pod_run(node, "lb_pod_egress", f), frags(answer), TC_ACT_OK)
    assert_frags(back, datagram(CIP, LOCAL_POD, 53, 5013, ident=55, ttl=63, smac=LXC_MAC, dmac=LOCAL_POD_MAC))
    stats = node.maps.stats()
    assert (stats["pod_new_flow"], stats["pod_reply"], stats["frag_tracked"], stats["frag_followed"]) == (1, 3, 2, 4)


def forget_flows(node: Node) -> None:
    """The flows' state gone (collected, or the agent's conntrack GC): both maps emptied."""
    for m in (node.maps.ct_fwd, node.maps.ct_rev):
        for key, _ in list(m.items_raw()):
            m.delete_raw(key)


def test_a_later_fragment_whose_flow_ended_starts_no_flow(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    first, middle, _ = frags(datagram(CLIENT, NODE1, 5015, 30081))
    assert node.ingress(first).retval == TC_ACT_REDIRECT
    forget_flows(node)
    run = node.ingress(middle)
    assert run.retval == TC_ACT_OK and run.data == middle
    assert not node.maps.flows(), "no flow, and no SNAT port, for a datagram's later fragment"
    stats = node.maps.stats()
    assert (stats["frag_followed"], stats["pass_fragment"], stats["new_flow"]) == (1, 1, 1)


def test_a_pods_later_fragment_whose_flow_ended_starts_no_flow(node: Node) -> None:
    EastWestMaps(node.obj).sync([IPv4Network("10.244.1.0/24")])
    remote = Backend(l4(REMOTE_POD, 8081, Proto.UDP), "echo-a", "node2", False)
    svc = Frontend(l4(CIP, 53, Proto.UDP), FrontendKind.CLUSTER_IP, "default/dns", "", False, (remote,), False)
    node.program(DesiredState("node1", (IPv4Address(NODE1),), {svc.l4: svc}))
    first, middle, _ = frags(datagram(LOCAL_POD, CIP, 5016, 53, smac=LOCAL_POD_MAC, dmac=LXC_MAC))
    assert Ether(pod_run(node, "lb_pod_ingress", first).data)[IP].dst == REMOTE_POD
    forget_flows(node)
    run = pod_run(node, "lb_pod_ingress", middle)
    assert run.retval == TC_ACT_OK and run.data == middle
    assert not node.maps.flows()
    assert node.maps.stats()["pod_new_flow"] == 1
