"""BPF unit tests of the VXLAN paths: load-balanced requests to a backend on another node leave
encapsulated (outer IPv4/UDP 8472/VXLAN VNI 1, the destination node's VTEP MAC inside), SNAT and DSR
alike; replies from a local pod to another node's address are encapsulated on egress; growth past the
path MTU answers ICMP fragmentation-needed; a local pod's answer to another node's pod leaves the overlay
device from the frontend.  Whole frames, outer and inner checksums asserted.  And the agent's overlay says
when the node's strict rp_filter overrules its device's."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw, bind_layers

from bpflb.datapath.lbmaps import NodeConfig
from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT
from bpflb.datapath.overlay import VXLAN_DEV, Overlay
from bpflb.model.cluster import NetworkSettings, NodeInfo, Tunnel
from bpflb.model.types import Mode, Proto
from bpflb_lab.lab.netns import entered
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL,
    LOCAL_POD,
    NODE1,
    NODE2,
    NODE2_MAC,
    REMOTE,
    REMOTE_POD,
    Node,
    backend,
    dsr_option,
    fe,
    frame_in,
    state,
)

pytestmark = pytest.mark.privileged
bind_layers(UDP, VXLAN, dport=8472)

NODES = [NodeInfo("node1", IPv4Address(NODE1), (IPv4Network("10.244.1.0/24"),)),
         NodeInfo("node2", IPv4Address(NODE2), (IPv4Network("10.244.2.0/24"),))]


def vtep(addr: str) -> str:
    return "0e:b1:" + ":".join(f"{b:02x}" for b in IPv4Address(addr).packed)


def overlay(node: Node, mode: Mode, *frontends: object) -> None:
    node.maps.set_config(NodeConfig(mode=mode, snat_addr=IPv4Address(NODE1), ext_ifindex=node.eth0,
                                    tunnel_mode=1, tunnel_vni=1))
    node.maps.sync(state(*frontends))   # type: ignore[arg-type]
    node.cluster.sync({}, {backend(LOCAL_POD, 8080, local=True).l4},
                      {IPv4Network(f"{NODE1}/32"), IPv4Network(f"{NODE2}/32"), IPv4Network("10.244.0.0/16")}, NODES)


def encapsulated(outer_sport: int, inner: Packet, macs: tuple[str, str] = (ETH0_MAC, NODE2_MAC)) -> bytes:
    """macs: the outer Ethernet source and destination (a redirected frame keeps the ones it arrived with:
    the kernel's neighbour output writes its MACs)."""
    return bytes(Ether(src=macs[0], dst=macs[1]) /
                 IP(src=NODE1, dst=NODE2, ttl=64, id=0, flags=0, proto=17) /
                 UDP(sport=outer_sport, dport=8472, chksum=0) / VXLAN(flags=0x08, vni=1) /
                 Ether(dst=vtep(NODE2), src=vtep(NODE1)) / inner)


def checksums_ok(frame: bytes) -> None:
    """Every IPv4/TCP/UDP/ICMP checksum in the frame, outer and inner, is what scapy computes for the
    whole frame (pseudo-headers included); a UDP checksum of 0 means none, and an ICMP error's quote
    keeps the checksums it quotes."""
    pkt = Ether(frame)
    layer: Packet | None = pkt
    while layer is not None and not isinstance(layer, (Raw, IPerror)):
        if isinstance(layer, (IP, TCP, ICMP)) or (isinstance(layer, UDP) and layer.chksum != 0):
            layer.chksum = None
        layer = layer.payload if layer.payload else None
    assert bytes(pkt) == frame, f"checksums differ:\n{Ether(frame)!r}"


def test_snat_request_to_a_remote_backend_is_encapsulated(node: Node) -> None:
    overlay(node, Mode.SNAT, fe(NODE1, 30080, (REMOTE,)))
    run = node.ingress(frame_in(TCP(sport=40000, dport=30080, flags="S", seq=3), payload=b"hello"))
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    nat_port, outer_sport = out[VXLAN][TCP].sport, out[UDP].sport
    assert 32768 <= outer_sport < 61000 and 32768 <= nat_port <= 65535
    inner = IP(src=NODE1, dst=REMOTE_POD, ttl=63, id=7) / TCP(sport=nat_port, dport=8080, flags="S", seq=3) / \
        Raw(b"hello")
    assert run.data == encapsulated(outer_sport, inner, (CLIENT_MAC, ETH0_MAC)), f"\n{out!r}"
    checksums_ok(run.data)
    assert node.maps.stats()["tunnel_encap"] == 1


def test_dsr_request_carries_the_option_inside_the_tunnel(node: Node) -> None:
    overlay(node, Mode.DSR, fe(NODE1, 30080, (REMOTE,)))
    run = node.ingress(frame_in(TCP(sport=40001, dport=30080, flags="S", seq=9)))
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    inner = IP(src=CLIENT, dst=REMOTE_POD, ttl=63, id=7, options=[dsr_option(NODE1, 30080)]) / \
        TCP(sport=40001, dport=8080, flags="S", seq=9)
    assert run.data == encapsulated(out[UDP].sport, inner, (CLIENT_MAC, ETH0_MAC)), f"\n{out!r}"
    checksums_ok(run.data)


def test_the_outer_source_port_follows_the_flow(node: Node) -> None:
    overlay(node, Mode.SNAT, fe(NODE1, 30080, (REMOTE,)))
    ports = {Ether(node.ingress(frame_in(TCP(sport=41000 + i, dport=30080, flags="S"))).data)[UDP].sport
             for i in range(16)}
    assert len(ports) > 4   # entropy for ECMP on the underlay
    again = Ether(node.ingress(frame_in(TCP(sport=41000, dport=30080, flags="A"))).data)[UDP].sport
    first = Ether(node.ingress(frame_in(TCP(sport=41000, dport=30080, flags="A"))).data)[UDP].sport
    assert again == first


@pytest.mark.parametrize(("mode", "mtu"), [(Mode.SNAT, 1450), (Mode.DSR, 1442)])
def test_overlay_growth_past_the_mtu_answers_fragmentation_needed(node: Node, mode: Mode, mtu: int) -> None:
    udp_be = backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP)
    overlay(node, mode, fe(NODE1, 30081, (udp_be,), proto=Proto.UDP))
    big = frame_in(UDP(sport=5000, dport=30081), payload=b"q" * (mtu + 1 - 28), flags="DF")
    run = node.ingress(big)
    assert run.retval == TC_ACT_REDIRECT
    reply = Ether(run.data)
    assert (reply[IP].src, reply[IP].dst, reply[ICMP].type, reply[ICMP].code) == (NODE1, CLIENT, 3, 4)
    assert reply[ICMP].nexthopmtu == mtu
    assert bytes(reply[ICMP].payload)[:28] == bytes(Ether(big)[IP])[:28]
    checksums_ok(run.data)
    fits = node.ingress(frame_in(UDP(sport=5000, dport=30081), payload=b"q" * (mtu - 28), flags="DF"))
    assert fits.retval == TC_ACT_REDIRECT and len(Ether(fits.data)[IP]) == 1500


def test_local_pod_reply_to_another_node_is_encapsulated_on_egress(node: Node) -> None:
    overlay(node, Mode.SNAT)
    reply = Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=LOCAL_POD, dst=NODE2, ttl=63, id=4) / \
        TCP(sport=8080, dport=62000, flags="SA", seq=1, ack=2)
    out = node.egress(bytes(reply))
    assert out.retval == TC_ACT_OK
    pkt = Ether(out.data)
    expected = encapsulated(pkt[UDP].sport, reply[IP])
    assert out.data == expected, f"\n{pkt!r}"
    checksums_ok(out.data)


def test_traffic_that_is_not_for_the_tunnel_stays_native(node: Node) -> None:
    overlay(node, Mode.SNAT)
    for frame in (
        Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT) / TCP(sport=5555, dport=80),   # outside
        Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=NODE1, dst=NODE2) / UDP(sport=40000, dport=8472),      # node's own
    ):
        run = node.egress(bytes(frame))
        assert run.retval == TC_ACT_OK and run.data == bytes(frame)


def test_pod_packet_too_big_for_the_overlay_answers_fragmentation_needed_to_the_pod(node: Node) -> None:
    overlay(node, Mode.SNAT)
    big = Ether(src=ETH0_MAC, dst=NODE2_MAC) / IP(src=LOCAL_POD, dst=NODE2, ttl=63, id=4, flags="DF") / \
        TCP(sport=8080, dport=62000, flags="PA") / Raw(b"r" * (1500 - 40))
    run = node.egress(bytes(big))
    assert run.retval == TC_ACT_REDIRECT        # back into this node's stack, towards the pod
    expected = Ether(src=NODE2_MAC, dst=ETH0_MAC) / \
        IP(src=NODE2, dst=LOCAL_POD, ttl=64, id=0, tos=0xC0, proto=1) / ICMP(type=3, code=4, nexthopmtu=1450) / \
        Raw(bytes(big[IP])[:28])
    assert run.data == bytes(expected), f"\n{Ether(run.data)!r}"
    checksums_ok(run.data)
    fits = big.copy()
    fits[Raw].load = b"r" * (1450 - 40)
    fits[IP].len = None
    fits[IP].chksum = None
    out = node.egress(bytes(Ether(bytes(fits))))
    assert out.retval == TC_ACT_OK and Ether(out.data)[UDP].dport == 8472


def test_the_overlay_egress_touches_only_the_nodes_own_moved_connections(node: Node) -> None:
    """lb_overlay_egress (the overlay device's egress, where the node's own connections to other nodes' pods
    leave): the pods' traffic through the overlay, and a packet from the node's address on a port a SNAT'd
    flow holds that no socket of the node sent with that tuple (BPF_PROG_TEST_RUN's socket has no ports;
    on the wire, a request this node forwarded keeps its client's socket), pass untouched.  The move itself
    is shown in the lab (tests/lab/test_conntrack_node.py, tunnelMode VXLAN)."""
    overlay(node, Mode.SNAT, fe(NODE1, 30080, (REMOTE,)))
    nat_port = Ether(node.ingress(frame_in(TCP(sport=40000, dport=30080, flags="S", seq=1))).data)[VXLAN][TCP].sport
    frames = [
        bytes(Ether(src=vtep(NODE1), dst=vtep(NODE2)) / IP(src=LOCAL_POD, dst=REMOTE_POD, ttl=64) /
              TCP(sport=8080, dport=nat_port, flags="S", seq=1)),
        bytes(Ether(src=vtep(NODE1), dst=vtep(NODE2)) / IP(src=NODE1, dst=REMOTE_POD, ttl=64) /
              TCP(sport=nat_port, dport=8080, flags="S", seq=1)),
        bytes(Ether(src=vtep(NODE1), dst=vtep(NODE2)) / IP(src=NODE1, dst=REMOTE_POD, ttl=64) /
              UDP(sport=nat_port, dport=8080) / Raw(b"x")),
    ]
    with entered(node.ns):
        runs = [node.obj.test_run("lb_overlay_egress", f, ifindex=node.eth0) for f in frames]
    assert [(r.retval, r.data) for r in runs] == [(TC_ACT_OK, f) for f in frames]
    assert node.maps.stats().get("host_nat", 0) == 0


POD_CLIENT = "10.244.2.77"     # a pod of node2: it reaches node1's address natively, its answers come back by the overlay


@pytest.mark.parametrize("mode", [Mode.SNAT, Mode.DSR])
def test_a_local_backends_reply_to_another_nodes_pod_leaves_the_overlay_from_the_frontend(
        node: Node, mode: Mode) -> None:
    """Another node's pod connects to node1:30080, whose backend is node1's own pod (a local flow). The pod's
    reply to a pod address is routed through the overlay device, not the external one: lb_overlay_egress shows
    it from the frontend, as lb_egress does on the external device (the client's socket would reset a reply
    from the pod's own address); an ICMP error the pod sends about the request likewise."""
    overlay(node, mode, fe(NODE1, 30080, (LOCAL,)))
    run = node.ingress(frame_in(TCP(sport=40000, dport=30080, flags="S", seq=1), src=POD_CLIENT))
    assert Ether(run.data)[IP].dst == LOCAL_POD and Ether(run.data)[TCP].dport == 8080, f"\n{Ether(run.data)!r}"

    def reply(src: str, sport: int) -> Packet:
        return Ether(src=vtep(NODE1), dst=vtep(NODE2)) / IP(src=src, dst=POD_CLIENT, ttl=64, id=3) / \
            TCP(sport=sport, dport=40000, flags="SA", seq=9, ack=2)

    with entered(node.ns):
        out = node.obj.test_run("lb_overlay_egress", bytes(reply(LOCAL_POD, 8080)), ifindex=node.eth0)
    assert out.retval == TC_ACT_OK
    assert out.data == bytes(reply(NODE1, 30080)), f"\n{Ether(out.data)!r}"
    checksums_ok(out.data)

    request = IP(src=POD_CLIENT, dst=LOCAL_POD, ttl=63, id=7) / TCP(sport=40000, dport=8080, flags="S", seq=1)
    error = Ether(src=vtep(NODE1), dst=vtep(NODE2)) / IP(src=LOCAL_POD, dst=POD_CLIENT, ttl=64, id=4) / \
        ICMP(type=3, code=3) / Raw(bytes(request)[:28])
    with entered(node.ns):
        out = node.obj.test_run("lb_overlay_egress", bytes(error), ifindex=node.eth0)
    shown = Ether(out.data)
    assert out.retval == TC_ACT_OK and (shown[IP].src, shown[IPerror].dst) == (NODE1, NODE1), f"\n{shown!r}"
    assert (shown[IPerror].payload.sport, shown[IPerror].payload.dport) == (40000, 30080)


def test_a_strict_rp_filter_on_the_node_is_said_once(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """conf.all.rp_filter 1 overrules the overlay device's 0 (the kernel takes the larger): the agent's overlay
    says so once, names the setting and what it drops, and leaves the node's setting as it is."""
    rp_filter = "/proc/sys/net/ipv4/conf/all/rp_filter"
    with entered(node.ns):
        with open(rp_filter, "w") as f:
            f.write("1")
        overlay_ = Overlay("eth0")
        with caplog.at_level(logging.WARNING, logger="bpflb.datapath.overlay"):
            overlay_.apply(NetworkSettings(Tunnel.VXLAN), NODES[0], NODES[1:])
            overlay_.apply(NetworkSettings(Tunnel.VXLAN, vni=2), NODES[0], NODES[1:])
        said = [r.getMessage() for r in caplog.records if "rp_filter" in r.getMessage()]
        assert len(said) == 1 and "net.ipv4.conf.all.rp_filter is 1" in said[0] and "DSR requests" in said[0], said
        with open(rp_filter) as f:
            assert f.read().strip() == "1"
        with open(f"/proc/sys/net/ipv4/conf/{VXLAN_DEV}/rp_filter") as f:
            assert f.read().strip() == "0"
        caplog.clear()
        with open(rp_filter, "w") as f:
            f.write("2")
        with caplog.at_level(logging.WARNING, logger="bpflb.datapath.overlay"):
            Overlay("eth0").apply(NetworkSettings(Tunnel.VXLAN), NODES[0], NODES[1:])
        assert not [r for r in caplog.records if "rp_filter" in r.getMessage()]
