"""BPF tests of ClusterIP at the packet level, on the real bpf_lb.o / bpf_xdp.o with BPF_PROG_TEST_RUN:
the pod-facing path (lb_pod_ingress / lb_pod_egress, on the host side of a pod's veth) DNATs a pod's
packets to a Service's backends and shows the replies from the Service again (hairpin through
169.254.42.1, reject, iTP Local, affinity, Maglev, the internal view of a NodePort), only for sources in
this node's pod CIDRs, and never for an externalIP that is not the node's own; and a ClusterIP is not
served to clients outside the cluster, neither at tc nor at XDP, nor named by a DSR option."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath import loader
from bpflb.datapath.clustermaps import l4_key
from bpflb.datapath.eastwest import EastWestMaps
from bpflb.datapath.lbmaps import NodeConfig
from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_PASS, const
from bpflb.model import maglev
from bpflb.model.cluster import NodeInfo, dsr_backends, dsr_frontends, local_backends
from bpflb.model.types import (
    AgentSettings,
    Algorithm,
    Backend,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    Mode,
    Proto,
)
from bpflb_lab.lab.netns import entered
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    LOCAL_POD_MAC,
    LXC_MAC,
    NODE1,
    NODE2,
    REMOTE_POD,
    Node,
    XdpNode,
    assert_frame,
    frame_in,
)

pytestmark = pytest.mark.privileged

CIP = "10.96.0.10"
HAIRPIN = "169.254.42.1"
REMOTE_PODS = {"echo-a": REMOTE_POD, "echo-b": "10.244.2.11", "echo-c": "10.244.2.12"}
POD_CIDR = IPv4Network("10.244.1.0/24")             # node1's: LOCAL_POD's


@pytest.fixture
def node(node: Node) -> Node:
    """node1 with its pod CIDR written, as its agent does: the pod path serves only sources inside it."""
    EastWestMaps(node.obj).sync([POD_CIDR])
    return node


def l4(addr: str, port: int, proto: Proto = Proto.TCP) -> L4Addr:
    return L4Addr(IPv4Address(addr), port, proto)


def be(name: str, proto: Proto = Proto.TCP) -> Backend:
    if name == "self":
        return Backend(l4(LOCAL_POD, 8080, proto), "self", "node1", True)
    return Backend(l4(REMOTE_PODS[name], 8080, proto), name, "node2", False)


def cip(names: list[str], *, port: int = 80, proto: Proto = Proto.TCP, no_endpoints: bool = False,
        algorithm: Algorithm = Algorithm.RANDOM, affinity: int = 0) -> Frontend:
    return Frontend(l4(CIP, port, proto), FrontendKind.CLUSTER_IP, "default/echo", "", False,
                    tuple(be(n, proto) for n in names), no_endpoints, algorithm=algorithm, affinity_timeout=affinity)


def state(*frontends: Frontend, seed: int = 0) -> DesiredState:
    return DesiredState("node1", (IPv4Address(NODE1),), {f.l4: f for f in frontends},
                        settings=AgentSettings(maglev_table_size=251, maglev_seed=seed))


def from_pod(l4hdr: TCP | UDP, dst: str = CIP, payload: bytes = b"") -> bytes:
    pkt = Ether(src=LOCAL_POD_MAC, dst=LXC_MAC) / IP(src=LOCAL_POD, dst=dst, ttl=64, id=7) / l4hdr
    return bytes(pkt / Raw(payload) if payload else pkt)


def ip_of(be32: int) -> IPv4Address:
    """An address as a map holds it (network order, read as a host-order integer)."""
    return IPv4Address(int(be32).to_bytes(4, "little"))


def to_pod(src: str, l4hdr: TCP | UDP, payload: bytes = b"", smac: str = LXC_MAC) -> bytes:
    pkt = Ether(src=smac, dst=LOCAL_POD_MAC) / IP(src=src, dst=LOCAL_POD, ttl=63, id=9) / l4hdr
    return bytes(pkt / Raw(payload) if payload else pkt)


def pod_in(node: Node, frame: bytes) -> loader.TestRun:
    with entered(node.ns):
        return node.obj.test_run("lb_pod_ingress", frame, ifindex=node.lxc0)


def pod_out(node: Node, frame: bytes) -> loader.TestRun:
    with entered(node.ns):
        return node.obj.test_run("lb_pod_egress", frame, ifindex=node.lxc0)


# -- the pod-facing path ---------------------------------------------------------------------------------


def test_pod_to_clusterip_is_dnat_only_and_the_reply_comes_from_the_service(node: Node) -> None:
    node.program(state(cip(["echo-a"])))
    run = pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="S", seq=1), payload=b"hi"))
    assert run.retval == TC_ACT_OK                      # the kernel routes it on, as any pod's packet
    expected = Ether(src=LOCAL_POD_MAC, dst=LXC_MAC) / IP(src=LOCAL_POD, dst=REMOTE_POD, ttl=64, id=7) / \
        TCP(sport=40000, dport=8080, flags="S", seq=1) / Raw(b"hi")
    assert_frame(run.data, bytes(expected))
    flows = node.maps.flows()
    assert len(flows) == 1 and flows[0][1].flags == const("CT_F_LOCAL")

    reply = pod_out(node, to_pod(REMOTE_POD, TCP(sport=8080, dport=40000, flags="SA", seq=9, ack=2)))
    assert reply.retval == TC_ACT_OK
    assert_frame(reply.data, to_pod(CIP, TCP(sport=80, dport=40000, flags="SA", seq=9, ack=2)))

    ack = pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="A", seq=2, ack=10)))
    assert ack.retval == TC_ACT_OK and Ether(ack.data)[IP].dst == REMOTE_POD
    stats = node.maps.stats()
    assert (stats["pod_new_flow"], stats["pod_reply"], stats["fwd_established"]) == (1, 1, 1)
    assert stats["new_flow"] == 0 and stats["reply_dnat"] == 0        # the external counters stay still


def test_a_pod_segment_without_syn_and_without_state_is_counted_as_the_node_path_counts_it(node: Node) -> None:
    """A pod's mid-stream TCP segment to a Service that finds no live flow (expired, or never seen here) is
    carried as nf_conntrack's loose tracking does (a new flow), and counted in ct_no_state like the
    node-facing path's: the sign of lost or expired state. Its SYN-opened flows are not."""
    node.program(state(cip(["echo-a"])))
    assert pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="S", seq=1))).retval == TC_ACT_OK
    assert pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="A", seq=2, ack=10))).retval == TC_ACT_OK
    assert node.maps.stats()["ct_no_state"] == 0
    stray = pod_in(node, from_pod(TCP(sport=40001, dport=80, flags="A", seq=5, ack=7)))
    assert stray.retval == TC_ACT_OK and Ether(stray.data)[IP].dst == REMOTE_POD
    stats = node.maps.stats()
    assert (stats["pod_new_flow"], stats["ct_no_state"], stats["fwd_established"]) == (2, 1, 1)


def test_udp_keeps_a_zero_checksum_and_non_service_traffic_is_untouched(node: Node) -> None:
    node.program(state(cip(["echo-b"], port=53, proto=Proto.UDP)))
    raw = Ether(from_pod(UDP(sport=5000, dport=53), payload=b"query"))
    raw[UDP].chksum = 0
    run = pod_in(node, bytes(raw))
    assert run.retval == TC_ACT_OK
    out = Ether(run.data)
    assert (out[IP].dst, out[UDP].dport, out[UDP].chksum) == ("10.244.2.11", 8080, 0)
    reply = pod_out(node, to_pod("10.244.2.11", UDP(sport=8080, dport=5000), b"answer"))
    assert (Ether(reply.data)[IP].src, Ether(reply.data)[UDP].sport) == (CIP, 53)
    assert_frame(reply.data, to_pod(CIP, UDP(sport=53, dport=5000), b"answer"))

    for frame in (from_pod(TCP(sport=40001, dport=8080, flags="S"), dst=REMOTE_POD),    # pod to pod
                  from_pod(UDP(sport=5000, dport=54))):                                # another port
        assert (r := pod_in(node, frame)).retval == TC_ACT_OK and r.data == frame
    unrelated = to_pod("10.244.2.11", UDP(sport=8080, dport=5001), b"x")               # no flow of ours
    assert (r := pod_out(node, unrelated)).retval == TC_ACT_OK and r.data == unrelated
    assert len(node.maps.flows()) == 1


def test_hairpin_goes_straight_back_into_the_pod_from_the_hairpin_address(node: Node) -> None:
    node.program(state(cip(["self"])))
    run = pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="S", seq=1)))
    assert run.retval == TC_ACT_REDIRECT                # out of the veth it came in on, back to the pod
    expected = Ether(src=LXC_MAC, dst=LOCAL_POD_MAC) / IP(src=HAIRPIN, dst=LOCAL_POD, ttl=64, id=7) / \
        TCP(sport=40000, dport=8080, flags="S", seq=1)
    assert_frame(run.data, bytes(expected))
    # The pod answers the hairpin address through its gateway: translated back and returned.
    answer = Ether(src=LOCAL_POD_MAC, dst=LXC_MAC) / IP(src=LOCAL_POD, dst=HAIRPIN, ttl=64, id=3) / \
        TCP(sport=8080, dport=40000, flags="SA", seq=5, ack=2)
    back = pod_in(node, bytes(answer))
    assert back.retval == TC_ACT_REDIRECT
    expected_back = Ether(src=LXC_MAC, dst=LOCAL_POD_MAC) / IP(src=CIP, dst=LOCAL_POD, ttl=64, id=3) / \
        TCP(sport=80, dport=40000, flags="SA", seq=5, ack=2)
    assert_frame(back.data, bytes(expected_back))
    stats = node.maps.stats()
    assert (stats["pod_new_flow"], stats["pod_reply"]) == (1, 1)
    [(_, entry)] = node.maps.flows()
    assert entry.flags & const("CT_F_SNAT") and ip_of(entry.nat_addr) == IPv4Address(HAIRPIN)
    # An RST from the pod's client side closes both directions of the flow.
    pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="R", seq=2)))
    assert all(e.flags & const("CT_F_RESET") for _, e in node.maps.flows())
    assert all(e.flags & const("CT_F_RESET") for _, e in ((k, node.maps.ct_rev.decode_value(v))
                                                          for k, v in node.maps.ct_rev.items_raw()))
    # A packet to the hairpin address that belongs to no flow is left to the stack.
    stray = Ether(src=LOCAL_POD_MAC, dst=LXC_MAC) / IP(src=LOCAL_POD, dst=HAIRPIN) / UDP(sport=1, dport=2)
    assert (r := pod_in(node, bytes(stray))).retval == TC_ACT_OK and r.data == bytes(stray)


def test_an_ended_flows_entry_leaves_a_later_connection_on_its_tuple_alone(node: Node) -> None:
    """The pod's flow through the ClusterIP is over (here: its UDP lifetime, set to 0, has passed); the pod
    then talks to the backend directly from the same port: the backend's answers are not rewritten."""
    node.program(state(cip(["echo-b"], port=53, proto=Proto.UDP)))
    pod_in(node, from_pod(UDP(sport=5000, dport=53), payload=b"query"))
    node.maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=node.eth0,
                                    udp_timeout=0))
    answer = to_pod("10.244.2.11", UDP(sport=8080, dport=5000), b"direct")
    run = pod_out(node, answer)
    assert run.retval == TC_ACT_OK and run.data == answer
    assert node.maps.stats()["pod_reply"] == 0


def test_no_endpoints_rejects_to_the_pod_and_itp_local_without_a_local_one_drops(node: Node) -> None:
    local_none = Frontend(l4(CIP, 81), FrontendKind.CLUSTER_IP, "default/local", "", True, (), False)
    node.program(state(cip([], no_endpoints=True), local_none))
    syn = from_pod(TCP(sport=40000, dport=80, flags="S", seq=1))
    run = pod_in(node, syn)
    assert run.retval == TC_ACT_REDIRECT
    icmp = Ether(run.data)
    assert (icmp.src, icmp.dst) == (LXC_MAC, LOCAL_POD_MAC)
    assert (icmp[IP].src, icmp[IP].dst, icmp[ICMP].type, icmp[ICMP].code) == (CIP, LOCAL_POD, 3, 3)
    assert (icmp[IPerror].dst, icmp[TCPerror].dport) == (CIP, 80)     # the quote matches the pod's socket
    assert pod_in(node, from_pod(TCP(sport=40001, dport=81, flags="S"))).retval == TC_ACT_SHOT
    stats = node.maps.stats()
    assert (stats["reject_no_endpoints"], stats["drop_no_local_backend"]) == (1, 1)
    assert node.maps.flows() == []


def test_pod_affinity_and_maglev_use_the_pods_own_flow(node: Node) -> None:
    order = ["echo-a", "echo-b", "echo-c"]
    node.program(state(cip(order, algorithm=Algorithm.MAGLEV), seed=5), Mode.SNAT)
    for sport in range(41000, 41012):
        run = pod_in(node, from_pod(TCP(sport=sport, dport=80, flags="S")))
        want = maglev.pick(order, IPv4Address(LOCAL_POD), sport, 80, int(Proto.TCP), m=251, seed=5)
        assert Ether(run.data)[IP].dst == REMOTE_PODS[want], sport
    node.program(state(cip(order, affinity=600, port=8000)))
    got = {Ether(pod_in(node, from_pod(TCP(sport=s, dport=8000, flags="S"))).data)[IP].dst
           for s in range(42000, 42010)}
    assert len(got) == 1


def test_a_nodeport_addressed_by_a_pod_gets_the_internal_view(node: Node) -> None:
    """The NodePort itself has no backend here (eTP Local, none on node1); in-cluster it is the
    ClusterIP's backends, and the reply comes from the NodePort the pod addressed."""
    service_cip = cip(["echo-c"])
    nodeport = Frontend(l4(NODE1, 30080), FrontendKind.NODEPORT, "default/echo", "", True, (), False,
                        internal=service_cip.l4)
    node.program(state(service_cip, nodeport))
    run = pod_in(node, from_pod(TCP(sport=40000, dport=30080, flags="S"), dst=NODE1))
    assert run.retval == TC_ACT_OK and Ether(run.data)[IP].dst == REMOTE_PODS["echo-c"]
    reply = pod_out(node, to_pod(REMOTE_PODS["echo-c"], TCP(sport=8080, dport=40000, flags="SA")))
    assert (Ether(reply.data)[IP].src, Ether(reply.data)[TCP].sport) == (NODE1, 30080)
    # From outside, the same NodePort keeps its external view: eTP Local without a local endpoint drops.
    assert node.ingress(frame_in(TCP(sport=40001, dport=30080, flags="S"))).retval == TC_ACT_SHOT


def test_another_nodes_nodeport_addressed_by_a_pod_gets_the_internal_view_too(node: Node) -> None:
    """node2's address (a node's own in the node map) with node1's NodePort: the same Service port, so the
    pod path DNATs it to the internal view's backend here and shows the reply from node2's address. A pod
    address of node2 with that port, and node2's address with a port that is no NodePort, pass untouched."""
    node.cluster.sync({}, set(), set(), [NodeInfo("node1", IPv4Address(NODE1), (POD_CIDR,)),
                                         NodeInfo("node2", IPv4Address(NODE2), (IPv4Network("10.244.2.0/24"),))])
    service_cip = cip(["echo-c"])
    nodeport = Frontend(l4(NODE1, 30080), FrontendKind.NODEPORT, "default/echo", "", True, (), False,
                        internal=service_cip.l4)
    node.program(state(service_cip, nodeport))
    run = pod_in(node, from_pod(TCP(sport=40000, dport=30080, flags="S"), dst=NODE2))
    assert run.retval == TC_ACT_OK and Ether(run.data)[IP].dst == REMOTE_PODS["echo-c"], f"\n{Ether(run.data)!r}"
    reply = pod_out(node, to_pod(REMOTE_PODS["echo-c"], TCP(sport=8080, dport=40000, flags="SA")))
    assert (Ether(reply.data)[IP].src, Ether(reply.data)[TCP].sport) == (NODE2, 30080)
    for dst, port in (("10.244.2.50", 30080), (NODE2, 30081)):
        frame = from_pod(TCP(sport=40001, dport=port, flags="S"), dst=dst)
        out = pod_in(node, frame)
        assert (out.retval, out.data) == (TC_ACT_OK, frame), (dst, port)


def test_pod_flows_leave_the_external_device_untouched(node: Node) -> None:
    node.program(state(cip(["echo-a"])))
    run = pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="S")))
    request_out = Ether(src=ETH0_MAC, dst="02:00:00:00:00:12") / IP(src=LOCAL_POD, dst=REMOTE_POD, ttl=63, id=7) / \
        TCP(sport=40000, dport=8080, flags="S")
    assert run.retval == TC_ACT_OK
    out = node.egress(bytes(request_out))
    assert out.retval == TC_ACT_OK and out.data == bytes(request_out)
    reply_in = Ether(src="02:00:00:00:00:12", dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=LOCAL_POD, ttl=63) / \
        TCP(sport=8080, dport=40000, flags="SA")
    back = node.ingress(bytes(reply_in))
    assert back.retval == TC_ACT_OK and back.data == bytes(reply_in)      # translated at the pod's veth


def test_a_pod_claiming_an_address_outside_the_nodes_pod_cidr_is_dropped(node: Node) -> None:
    """A pod sending as another node's pod, a node or an outside host would make a backend answer someone
    else (a reflection); the pod path drops it and counts it, and starts no flow."""
    node.program(state(cip(["echo-a"]), cip(["echo-a"], port=53, proto=Proto.UDP)))
    for src in (REMOTE_PODS["echo-b"], NODE1, CLIENT):
        for l4hdr in (TCP(sport=40000, dport=80, flags="S"), UDP(sport=5000, dport=53)):
            frame = bytes(Ether(src=LOCAL_POD_MAC, dst=LXC_MAC) / IP(src=src, dst=CIP) / l4hdr)
            assert pod_in(node, frame).retval == TC_ACT_SHOT, src
    stats = node.maps.stats()
    assert (stats["pod_spoofed"], stats["pod_new_flow"]) == (6, 0) and node.maps.flows() == []
    # Its own address (any of this node's pod CIDR) is served; a packet to no Service is not checked.
    assert pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="S"))).retval == TC_ACT_OK
    other = bytes(Ether(src=LOCAL_POD_MAC, dst=LXC_MAC) / IP(src=CLIENT, dst=REMOTE_POD) / UDP(sport=1, dport=2))
    assert (r := pod_in(node, other)).retval == TC_ACT_OK and r.data == other
    assert node.maps.stats()["pod_spoofed"] == 6


def test_an_external_ip_not_the_nodes_own_is_not_served_in_cluster(node: Node) -> None:
    """CVE-2020-8554: a Service that lists someone else's address as an externalIP must not capture the
    cluster's traffic to it (Cilium's rule); one of the node's own addresses is served as any frontend."""
    service_cip = cip(["echo-a"])
    foreign = Frontend(l4("203.0.113.9", 80), FrontendKind.EXTERNAL_IP, "default/echo", "", False,
                       (be("echo-b"),), False, internal=service_cip.l4, in_cluster=False)
    own = Frontend(l4(NODE1, 80), FrontendKind.EXTERNAL_IP, "default/echo", "", False, (be("echo-b"),), False,
                   internal=service_cip.l4)
    node.program(state(service_cip, foreign, own))
    assert dict(node.maps.internal_view.items_raw())[l4_key(foreign.l4)] == bytes(8)
    frame = from_pod(TCP(sport=40000, dport=80, flags="S"), dst="203.0.113.9")
    assert (r := pod_in(node, frame)).retval == TC_ACT_OK and r.data == frame      # on to that address
    run = pod_in(node, from_pod(TCP(sport=40001, dport=80, flags="S"), dst=NODE1))
    assert Ether(run.data)[IP].dst == REMOTE_PODS["echo-a"]                        # the internal view
    # From outside, the externalIP is a frontend as before.
    node.ingress(frame_in(TCP(sport=40002, dport=80, flags="S"), dst="203.0.113.9"))
    external = [e for _, e in node.maps.flows() if ip_of(e.client_addr) == IPv4Address(CLIENT)]
    assert len(external) == 1 and node.maps.stats()["new_flow"] == 1
    assert ip_of(external[0].backend_addr) == IPv4Address(REMOTE_PODS["echo-b"])


# -- a ClusterIP is not reachable from outside -------------------------------------------------------------


def test_clusterip_is_not_served_to_external_clients_at_tc(node: Node) -> None:
    node.program(state(cip(["echo-a"]), cip(["echo-a"], port=53, proto=Proto.UDP)))
    for l4hdr in (TCP(sport=40000, dport=80, flags="S"), UDP(sport=5000, dport=53)):
        frame = frame_in(l4hdr, dst=CIP, src=CLIENT)
        run = node.ingress(frame)
        assert run.retval == TC_ACT_OK and run.data == frame
    stats = node.maps.stats()
    assert stats["pass_not_service"] == 2 and stats["new_flow"] == 0 and node.maps.flows() == []
    # Not even a flow a pod opened can be entered from outside by addressing the ClusterIP.
    pod_in(node, from_pod(TCP(sport=40000, dport=80, flags="S")))
    spoofed = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=LOCAL_POD, dst=CIP) / TCP(sport=40000, dport=80, flags="A")
    run = node.ingress(bytes(spoofed))
    assert run.retval == TC_ACT_OK and run.data == bytes(spoofed)


def test_clusterip_is_not_served_to_external_clients_at_xdp(xnode: XdpNode) -> None:
    xnode.program(state(cip(["echo-a"])))
    frame = frame_in(TCP(sport=40000, dport=80, flags="S"), dst=CIP, src=CLIENT)
    run = xnode.xdp(frame)
    assert run.retval == XDP_PASS and run.data == frame
    assert xnode.maps.flows() == [] and xnode.maps.stats()["xdp_tx"] == 0


def test_the_maps_mark_clusterips_and_hold_the_internal_views(node: Node) -> None:
    service_cip = cip(["echo-a"])
    nodeport = Frontend(l4(NODE1, 30080), FrontendKind.NODEPORT, "default/echo", "", False, (be("echo-a"),),
                        False, internal=service_cip.l4)
    node.program(state(service_cip, nodeport))
    masters = {str(l4(a, p)): v.flags for a, p in ((CIP, 80), (NODE1, 30080))
               if (v := node.maps.services.lookup(node.maps.services.new_key(
                   addr=int.from_bytes(IPv4Address(a).packed, "little"),
                   port=int.from_bytes(p.to_bytes(2, "big"), "little"), slot=0, proto=6))) is not None}
    assert masters == {f"{CIP}:80/TCP": const("LB_SVC_F_CLUSTER_IP"), f"{NODE1}:30080/TCP": const("LB_SVC_F_NODEPORT")}
    assert dict(node.maps.internal_view.items_raw()) == {l4_key(nodeport.l4): l4_key(service_cip.l4)}
    report = node.maps.sync(state(service_cip))
    assert report.internal_views_changed == 1 and dict(node.maps.internal_view.items_raw()) == {}
    # DSR options may never name a ClusterIP, and its backends are not guarded as DSR backends (a pod that
    # backs only a ClusterIP may answer whoever reaches its own address).
    assert set(dsr_frontends(state(service_cip, nodeport), {IPv4Address(NODE1)})) == {nodeport.l4}
    local_cip_pair = Frontend(l4(CIP, 82), FrontendKind.CLUSTER_IP, "default/self", "", False, (be("self"),), False)
    assert dsr_backends(state(local_cip_pair)) == set()
    local_cip = Frontend(l4(CIP, 81), FrontendKind.CLUSTER_IP, "default/self", "", False, (be("self"),), False)
    assert local_backends(state(local_cip)) == set()
    assert local_backends(state(Frontend(l4(NODE1, 30081), FrontendKind.NODEPORT, "default/self", "", False,
                                         (be("self"),), False))) == {be("self").l4}
