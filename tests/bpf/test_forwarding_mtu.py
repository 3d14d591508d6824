"""BPF unit tests of packets too big for their next hop (nodeport.h's np_too_big, fib.h's fib_forward with
the packet's length, np_snat_reply's route check), on the real bpf_lb.o / bpf_xdp.o with BPF_PROG_TEST_RUN: a
forwarded packet WITHOUT DF that bpflb's growth (the DSR option, the overlay) or a smaller MTU towards the
backend makes too big is translated and handed to the kernel to fragment, as a router would (its forwarding:
TC_ACT_OK; or, behind the overlay, its own VXLAN device: redirected unencapsulated), counted as fwd_fragmented;
one WITH DF is answered with fragmentation needed, as before.  A SNAT'd packet cannot go up the stack (its
source is the node's own) and keeps the answer.  On the backend's node a DSR request too big for the route to
its pod goes to the kernel's forwarding (pass_too_big) instead of a redirect the device would drop; a SNAT'd
reply too big for the route to the client is told to the backend.  XDP hands all of these to tc.  That the
kernel then really fragments them (and copies the option into every fragment) is shown on the wire:
tests/lab/test_forwarding_mtu.py."""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.lbmaps import NodeConfig
from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, const
from bpflb.datapath.overlay import Overlay
from bpflb.model.cluster import NetworkSettings, NodeInfo, Tunnel
from bpflb.model.types import Mode, Proto
from bpflb_lab.lab.netns import entered
from tests.bpf.ct_util import backends_node, dsr_request, from_pod
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2,
    NODE2_MAC,
    REMOTE_POD,
    Node,
    XdpNode,
    assert_frame,
    backend,
    dsr_option,
    fe,
    frame_in,
    state,
)

pytestmark = pytest.mark.privileged

UDP_REMOTE = backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP)
UDP_LOCAL = backend(LOCAL_POD, 8081, local=True, proto=Proto.UDP)
FULL = b"m" * (1500 - 28)          # a 1,500-byte UDP datagram: the whole MTU of the client's link


def ip_cmd(node: Node, *args: str) -> None:
    """`ip` in the scratch node's namespace (the test's own)."""
    subprocess.run(["ip", "-n", node.ns, *args], check=True, capture_output=True)


def big(sport: int, dport: int = 30081, *, df: bool, payload: bytes = FULL) -> bytes:
    return frame_in(UDP(sport=sport, dport=dport), payload=payload, flags="DF" if df else 0)


def frag_needed(run_data: bytes, to: str, mtu: int, sent: bytes, src: str = NODE1) -> None:
    """The output is fragmentation needed from src to `to`, with this MTU, quoting the packet as sent."""
    out = Ether(run_data)
    assert (out[IP].src, out[IP].dst, out[ICMP].type, out[ICMP].code, out[ICMP].nexthopmtu) == (src, to, 3, 4, mtu), \
        repr(out)
    assert bytes(out[ICMP].payload)[:28] == bytes(Ether(sent)[IP])[:28]


# -- DSR: the option's 8 bytes past the MTU ----------------------------------------------------------------


def test_dsr_without_df_goes_translated_to_the_kernels_forwarding_with_the_option(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)), Mode.DSR)
    for n in range(2):          # the flow's first datagram, then an established one: the same way
        run = node.ingress(big(5100, df=False))
        assert run.retval == TC_ACT_OK, n
        # DNAT'd, the option in, the TTL left to the kernel's forwarding (which decrements it), 1,508 bytes.
        expected = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / \
            IP(src=CLIENT, dst=REMOTE_POD, ttl=64, id=7, options=[dsr_option(NODE1, 30081)]) / \
            UDP(sport=5100, dport=8081) / Raw(FULL)
        assert_frame(run.data, bytes(expected))
        assert len(Ether(run.data)[IP]) == 1508
    stats = node.maps.stats()
    assert (stats["fwd_fragmented"], stats["dsr_opt_inserted"], stats.get("icmp_frag_needed", 0)) == (2, 2, 0)
    assert (stats["new_flow"], stats["fwd_established"]) == (1, 1)
    # The option's type has the copy bit: the kernel puts it into every fragment (RFC 791).
    assert const("DSR_OPT_TYPE") & 0x80


def test_dsr_with_df_is_still_answered_fragmentation_needed(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)), Mode.DSR)
    sent = big(5101, df=True)
    run = node.ingress(sent)
    assert run.retval == TC_ACT_REDIRECT
    frag_needed(run.data, CLIENT, 1492, sent)
    stats = node.maps.stats()
    assert (stats["icmp_frag_needed"], stats.get("fwd_fragmented", 0)) == (1, 0)


def test_a_fitting_dsr_datagram_without_df_is_redirected_as_ever(node: Node) -> None:
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)), Mode.DSR)
    run = node.ingress(big(5102, df=False, payload=FULL[:-8]))
    assert run.retval == TC_ACT_REDIRECT and Ether(run.data)[IP].ttl == 63
    assert node.maps.stats().get("fwd_fragmented", 0) == 0


# -- a smaller MTU towards the backend (no growth) ---------------------------------------------------------


def test_a_local_backend_behind_a_smaller_mtu_gets_the_datagram_through_the_kernel(node: Node) -> None:
    """The client's address stays (DNAT only), so the kernel's forwarding can take it on and fragment it."""
    ip_cmd(node, "route", "replace", f"{LOCAL_POD}/32", "dev", "lxc0", "mtu", "lock", "1400")
    node.program(state(fe(NODE1, 30082, (UDP_LOCAL,), proto=Proto.UDP)))
    run = node.ingress(big(5103, 30082, df=False))
    assert run.retval == TC_ACT_OK
    assert_frame(run.data, bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) /
                                 IP(src=CLIENT, dst=LOCAL_POD, ttl=64, id=7) / UDP(sport=5103, dport=8081) /
                                 Raw(FULL)))
    sent = big(5104, 30082, df=True)
    frag_needed(node.ingress(sent).data, CLIENT, 1400, sent)
    stats = node.maps.stats()
    assert (stats["fwd_fragmented"], stats["icmp_frag_needed"]) == (1, 1)


def test_a_snat_request_too_big_without_df_is_still_answered_the_kernel_cannot_take_it(node: Node) -> None:
    """SNAT'd, the packet's source is the node's own address: up the stack it would be a martian.  So a packet
    without DF too big for the route to the backend keeps the answer a DF one gets (the limit docs/datapath.md
    states)."""
    ip_cmd(node, "route", "replace", "10.244.2.0/24", "via", NODE2, "mtu", "lock", "1400")
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    sent = big(5105, df=False)
    run = node.ingress(sent)
    assert run.retval == TC_ACT_REDIRECT
    frag_needed(run.data, CLIENT, 1400, sent)
    assert node.maps.stats().get("fwd_fragmented", 0) == 0


# -- VXLAN: the overlay's 50 bytes -------------------------------------------------------------------------

NODES = [NodeInfo("node1", IPv4Address(NODE1), (IPv4Network("10.244.1.0/24"),)),
         NodeInfo("node2", IPv4Address(NODE2), (IPv4Network("10.244.2.0/24"),))]


def overlay(node: Node, mode: Mode, *, kernel_device: bool = True) -> None:
    """node1 with tunnelMode VXLAN: the maps as the agent programs them and, with kernel_device, the agent's own
    overlay (bpflb_vxlan, its FDB, neighbours and the route to node2's pod CIDR through it)."""
    node.maps.set_config(NodeConfig(mode=mode, snat_addr=IPv4Address(NODE1), ext_ifindex=node.eth0,
                                    tunnel_mode=1, tunnel_vni=1))
    node.maps.sync(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP),
                         fe(NODE1, 30083, (backend(NODE2, 9000, local=False, proto=Proto.UDP),), proto=Proto.UDP)))
    node.cluster.sync({}, set(), {IPv4Network(f"{NODE1}/32"), IPv4Network(f"{NODE2}/32"),
                                  IPv4Network("10.244.0.0/16")}, NODES)
    if kernel_device:
        with entered(node.ns):
            Overlay("eth0").apply(NetworkSettings(Tunnel.VXLAN), NODES[0], NODES[1:])


@pytest.mark.parametrize(("mode", "src"), [(Mode.SNAT, NODE1), (Mode.DSR, CLIENT)])
def test_vxlan_without_df_goes_translated_into_the_kernels_vxlan_device(node: Node, mode: Mode, src: str) -> None:
    """Redirected (to the route's device, bpflb_vxlan) as the inner packet, not encapsulated by the program: the
    kernel's VXLAN device encapsulates it and fragments the outer packet."""
    overlay(node, mode)
    run = node.ingress(big(5106, df=False))
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    assert not out.haslayer(ICMP), "not answered"
    assert (out[IP].src, out[IP].dst, out[IP].ttl, out[UDP].dport) == (src, REMOTE_POD, 63, 8081), repr(out)
    assert bytes(out[UDP].payload) == FULL
    assert out[IP].ihl == (7 if mode is Mode.DSR else 5)
    if mode is Mode.SNAT:
        assert 32768 <= out[UDP].sport <= 65535
    stats = node.maps.stats()
    assert (stats["fwd_fragmented"], stats.get("tunnel_encap", 0), stats.get("icmp_frag_needed", 0)) == (1, 0, 0)
    # With DF: fragmentation needed, the overlay's (and the option's) bytes less.
    sent = big(5107, df=True)
    frag_needed(node.ingress(sent).data, CLIENT, 1450 - (8 if mode is Mode.DSR else 0), sent)


def test_vxlan_snat_without_the_kernels_device_keeps_the_answer(node: Node) -> None:
    """The route to the backend's pod does not lead into the overlay device (the agent's routes are missing):
    a SNAT'd packet has no way to be fragmented, so it is answered rather than redirected into a device that
    would drop it."""
    overlay(node, Mode.SNAT, kernel_device=False)
    sent = big(5108, df=False)
    frag_needed(node.ingress(sent).data, CLIENT, 1450, sent)
    assert node.maps.stats().get("fwd_fragmented", 0) == 0


def test_vxlan_to_a_host_network_backend_is_not_sent_into_the_overlay_device(node: Node) -> None:
    """A backend at a node's own address (hostNetwork) is routed over the underlay, not the overlay device: a
    SNAT'd datagram too big is answered; a DSR one goes up the kernel's forwarding."""
    overlay(node, Mode.SNAT)
    sent = big(5109, 30083, df=False)
    frag_needed(node.ingress(sent).data, CLIENT, 1450, sent)
    overlay(node, Mode.DSR)
    run = node.ingress(big(5110, 30083, df=False))
    assert run.retval == TC_ACT_OK
    out = Ether(run.data)
    assert (out[IP].src, out[IP].dst, out[IP].ihl, out[UDP].dport) == (CLIENT, NODE2, 7, 9000)


# -- XDP hands them to tc ----------------------------------------------------------------------------------


def test_xdp_passes_an_oversized_datagram_without_df_to_tc_untouched(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)), Mode.DSR)
    for df in (False, True):
        frame = big(5111 + df, df=df)
        run = xnode.xdp(frame)
        assert run.retval == XDP_PASS and run.data == frame, df
    assert xnode.ingress(big(5111, df=False)).retval == TC_ACT_OK        # tc: to the kernel, to fragment
    assert xnode.maps.stats()["fwd_fragmented"] == 1


def test_xdp_passes_a_reply_too_big_for_the_route_to_the_client_to_tc(xnode: XdpNode) -> None:
    xnode.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    out = Ether(xnode.xdp(frame_in(UDP(sport=5113, dport=30081), payload=b"q")).data)
    nat_port = int(out[UDP].sport)
    ip_cmd(xnode, "route", "replace", f"{CLIENT}/32", "dev", "eth0", "mtu", "lock", "1400")
    reply = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63, id=9) /
                  UDP(sport=8081, dport=nat_port) / Raw(FULL))
    run = xnode.xdp(reply)
    assert run.retval == XDP_PASS and run.data == reply


# -- replies too big for the route to the client -----------------------------------------------------------


@pytest.mark.parametrize("df", [True, False], ids=["DF", "no DF"])
def test_a_snat_reply_too_big_for_the_client_route_is_told_to_the_backend(node: Node, df: bool) -> None:
    """Before: redirected at any size (the device drops what it cannot send).  Now the route's MTU is checked
    first, and the backend learns it about the packet it sent, from the address it sent it to."""
    node.program(state(fe(NODE1, 30081, (UDP_REMOTE,), proto=Proto.UDP)))
    nat_port = int(Ether(node.ingress(frame_in(UDP(sport=5114, dport=30081), payload=b"q")).data)[UDP].sport)
    ip_cmd(node, "route", "replace", f"{CLIENT}/32", "dev", "eth0", "mtu", "lock", "1400")
    reply = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                  IP(src=REMOTE_POD, dst=NODE1, ttl=63, id=9, flags="DF" if df else 0) /
                  UDP(sport=8081, dport=nat_port) / Raw(FULL))
    run = node.ingress(reply)
    assert run.retval == TC_ACT_REDIRECT
    frag_needed(run.data, REMOTE_POD, 1400, reply)
    stats = node.maps.stats()
    assert (stats["icmp_frag_needed"], stats.get("reply_snat", 0)) == (1, 0)
    # One that fits the route goes on translated.
    small = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63, id=10) /
                  UDP(sport=8081, dport=nat_port) / Raw(FULL[:1372]))
    ok = node.ingress(small)
    assert ok.retval == TC_ACT_REDIRECT and (Ether(ok.data)[IP].src, Ether(ok.data)[IP].dst) == (NODE1, CLIENT)


# -- the backend's node: DSR requests too big for the route to the pod -------------------------------------


@pytest.mark.parametrize("df", [True, False], ids=["DF", "no DF"])
def test_a_dsr_request_too_big_for_the_pods_route_goes_to_the_kernels_forwarding(node: Node, df: bool) -> None:
    """The option stripped, the request is 1,500 bytes, the pod's route takes 1,400: a redirect would have it
    dropped by the pod's device.  The kernel's forwarding fragments it, or answers fragmentation needed for DF
    (tests/bpf/test_conntrack_icmp.py shows that error translated for the client)."""
    backends_node(node, Proto.UDP, 8081)
    ip_cmd(node, "route", "replace", f"{LOCAL_POD}/32", "dev", "lxc0", "mtu", "lock", "1400")
    request = Ether(dsr_request(UDP(sport=5115, dport=8081), payload=FULL))
    request[IP].flags = "DF" if df else 0
    del request[IP].chksum
    run = node.ingress(bytes(Ether(bytes(request))))
    assert run.retval == TC_ACT_OK
    assert_frame(run.data, bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                                 IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=3, flags="DF" if df else 0) /
                                 UDP(sport=5115, dport=8081) / Raw(FULL)))
    stats = node.maps.stats()
    assert (stats["dsr_accepted"], stats["pass_too_big"]) == (1, 1)
    # One that fits is redirected to the pod as before.
    fits = node.ingress(dsr_request(UDP(sport=5115, dport=8081), payload=FULL[:1372]))
    assert fits.retval == TC_ACT_REDIRECT and node.maps.stats()["pass_too_big"] == 1


def test_a_remapped_dsr_segment_too_big_for_the_pods_route_goes_to_the_kernels_forwarding(node: Node) -> None:
    """dsr_mapped_ingress: a later segment (no option) of a DSR flow whose client port was remapped."""
    backends_node(node)
    node.ingress(frame_in(TCP(sport=45200, dport=30180, flags="S", seq=100)))
    node.egress(from_pod(TCP(sport=8080, dport=45200, flags="SA", seq=900, ack=101)))
    syn = Ether(node.ingress(dsr_request(TCP(sport=45200, dport=8080, flags="S", seq=5000))).data)
    mapped = int(syn[TCP].sport)
    assert mapped != 45200
    node.egress(from_pod(TCP(sport=8080, dport=mapped, flags="SA", seq=7000, ack=5001)))
    ip_cmd(node, "route", "replace", f"{LOCAL_POD}/32", "dev", "lxc0", "mtu", "lock", "1400")
    later = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=4, flags="DF") /
                  TCP(sport=45200, dport=8080, flags="PA", seq=5001, ack=7001) / Raw(b"p" * 1460))
    run = node.ingress(later)
    assert run.retval == TC_ACT_OK
    out = Ether(run.data)
    assert (out[IP].src, out[IP].dst, out[IP].ttl, out[TCP].sport, len(out[IP])) == (CLIENT, LOCAL_POD, 63, mapped,
                                                                                     1500)
    assert node.maps.stats()["pass_too_big"] == 1
