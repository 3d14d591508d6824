"""BPF unit tests of the SNAT datapath: the real bpf_lb.o, maps programmed by LBMaps, scapy frames
run through BPF_PROG_TEST_RUN, verdicts and whole output frames (checksums included) asserted."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
from bpflb.model.types import FrontendKind, Proto
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
    assert_frame,
    backend,
    fe,
    frame_in,
    one_port,
    recomputed,
    state,
    wait_idle,
)

pytestmark = pytest.mark.privileged

LB_IP = "198.18.1.10"
EXT_IP = "198.18.2.20"


def test_remote_backend_first_packet_is_dnat_and_snat(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (REMOTE,))))
    syn = TCP(sport=40000, dport=30080, flags="S", seq=1000)
    run = node.ingress(frame_in(syn, payload=b"hello"))
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    nat_port = out[TCP].sport
    assert 32768 <= nat_port <= 65535
    expected = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=NODE1, dst=REMOTE_POD, ttl=63, id=7) / \
        TCP(sport=nat_port, dport=8080, flags="S", seq=1000) / Raw(b"hello")
    assert_frame(run.data, bytes(expected))

    # The reply from the remote pod is translated back to the frontend and sent to the client.
    synack = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63, id=9) / \
        TCP(sport=8080, dport=nat_port, flags="SA", seq=5000, ack=1001) / Raw(b"world")
    reply = node.ingress(bytes(synack))
    assert reply.retval == TC_ACT_REDIRECT
    expected_reply = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=NODE1, dst=CLIENT, ttl=62, id=9) / \
        TCP(sport=30080, dport=40000, flags="SA", seq=5000, ack=1001) / Raw(b"world")
    assert_frame(reply.data, bytes(expected_reply))

    # A later packet of the flow keeps the backend and the SNAT port.
    ack = node.ingress(frame_in(TCP(sport=40000, dport=30080, flags="A", seq=1001, ack=5001)))
    assert ack.retval == TC_ACT_REDIRECT
    assert Ether(ack.data)[TCP].sport == nat_port
    assert Ether(ack.data)[IP].dst == REMOTE_POD
    stats = node.maps.stats()
    assert stats["new_flow"] == 1 and stats["fwd_established"] == 1 and stats["reply_snat"] == 1


def test_local_backend_is_dnat_only_and_reply_is_translated_on_egress(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (LOCAL,))))
    run = node.ingress(frame_in(TCP(sport=40001, dport=30080, flags="S", seq=1)))
    assert run.retval == TC_ACT_REDIRECT
    expected = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=7) / \
        TCP(sport=40001, dport=8080, flags="S", seq=1)
    assert_frame(run.data, bytes(expected))

    reply_in = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=63, id=3) / \
        TCP(sport=8080, dport=40001, flags="SA", seq=9, ack=2)
    out = node.egress(bytes(reply_in))
    assert out.retval == TC_ACT_OK
    expected_reply = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=NODE1, dst=CLIENT, ttl=63, id=3) / \
        TCP(sport=30080, dport=40001, flags="SA", seq=9, ack=2)
    assert_frame(out.data, bytes(expected_reply))


def test_udp_remote_backend_with_and_without_checksum(node: Node) -> None:
    udp_remote = backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP)
    node.program(state(fe(NODE1, 30081, (udp_remote,), proto=Proto.UDP)))
    run = node.ingress(frame_in(UDP(sport=5353, dport=30081), payload=b"clientip"))
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    expected = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=NODE1, dst=REMOTE_POD, ttl=63, id=7) / \
        UDP(sport=out[UDP].sport, dport=8081) / Raw(b"clientip")
    assert_frame(run.data, bytes(expected))

    # UDP checksum 0 ("none") stays 0 after translation.
    raw = Ether(frame_in(UDP(sport=5354, dport=30081), payload=b"hostname"))
    raw[UDP].chksum = 0
    run0 = node.ingress(bytes(raw))
    assert run0.retval == TC_ACT_REDIRECT
    assert Ether(run0.data)[UDP].chksum == 0
    assert Ether(run0.data)[IP].dst == REMOTE_POD


def test_loadbalancer_ip_and_external_ip(node: Node) -> None:
    node.program(state(fe(LB_IP, 80, (REMOTE,), kind=FrontendKind.LOADBALANCER),
                       fe(EXT_IP, 8443, (LOCAL,), kind=FrontendKind.EXTERNAL_IP)))
    run = node.ingress(frame_in(TCP(sport=40002, dport=80, flags="S"), dst=LB_IP))
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == (NODE1, REMOTE_POD, 8080)
    assert recomputed(run.data) == run.data
    run2 = node.ingress(frame_in(TCP(sport=40003, dport=8443, flags="S"), dst=EXT_IP))
    out2 = Ether(run2.data)
    assert (out2[IP].src, out2[IP].dst, out2[TCP].dport) == (CLIENT, LOCAL_POD, 8080)


def test_local_policy_without_local_backend_drops(node: Node) -> None:
    node.program(state(fe(NODE1, 30180, (), local_only=True)))
    run = node.ingress(frame_in(TCP(sport=40004, dport=30180, flags="S")))
    assert run.retval == TC_ACT_SHOT
    assert node.maps.stats()["drop_no_local_backend"] == 1
    assert not node.maps.flows()


def test_no_endpoints_answers_icmp_port_unreachable(node: Node) -> None:
    node.program(state(fe(NODE1, 30090, (), no_endpoints=True)))
    original = frame_in(TCP(sport=40005, dport=30090, flags="S", seq=77), payload=b"x" * 30)
    run = node.ingress(original)
    assert run.retval == TC_ACT_REDIRECT
    quoted = bytes(Ether(original)[IP])[:28]
    expected = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / \
        IP(src=NODE1, dst=CLIENT, ttl=64, id=0, tos=0xC0, proto=1) / ICMP(type=3, code=3) / Raw(quoted)
    assert_frame(run.data, bytes(expected))
    assert node.maps.stats()["reject_no_endpoints"] == 1


def test_non_service_packets_pass_untouched(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (REMOTE,))))
    for frame in (
        frame_in(TCP(sport=40006, dport=22, flags="S")),                     # other port on the node
        frame_in(TCP(sport=40006, dport=30080, flags="S"), dst="198.18.0.99"),  # other address
        frame_in(UDP(sport=40006, dport=30080)),                            # other protocol
        bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1) / ICMP()),
    ):
        run = node.ingress(frame)
        assert run.retval == TC_ACT_OK
        assert run.data == frame
    assert not node.maps.flows()


def test_truncated_packets_and_fragments_not_followed_are_never_translated(node: Node) -> None:
    """Fragments of a translated datagram follow their first one (tests/bpf/test_fragments.py); a first
    fragment whose TCP header it cuts short (RFC 1858's tiny fragment) and a later fragment without its first
    one are not followed."""
    node.program(state(fe(NODE1, 30080, (REMOTE,))))
    whole = frame_in(TCP(sport=40007, dport=30080, flags="S"), payload=b"abcdefgh")
    tiny = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1, id=7, flags="MF", proto=6) / \
        Raw(bytes(TCP(sport=40007, dport=30080, flags="S"))[:16])
    cases = {
        "tcp header cut short": whole[:14 + 20 + 12],
        "ip header length beyond frame": whole[:14] + bytes([0x4F]) + whole[15:14 + 20 + 8],
        "ip total length beyond frame": whole[:-4],
        "first fragment cutting the tcp header short": bytes(tiny),
        "later fragment": frame_in(TCP(sport=40007, dport=30080, flags="S"), frag=100),
        "tcp data offset too small": bytes(whole[:14 + 20 + 12]) + bytes([0x30]) + whole[14 + 20 + 13:],
    }
    for what, frame in cases.items():
        run = node.ingress(frame)
        assert run.retval == TC_ACT_OK, what
        assert run.data == frame, what
    assert not node.maps.flows()
    stats = node.maps.stats()
    assert stats["pass_fragment"] == 2
    assert stats["pass_truncated"] == 4


def test_ip_options_are_kept_and_checksums_stay_right(node: Node) -> None:
    node.program(state(fe(NODE1, 30080, (REMOTE,))))
    frame = frame_in(TCP(sport=40008, dport=30080, flags="S"), options=[IPOption_Router_Alert()])
    run = node.ingress(frame)
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    assert out[IP].ihl == 6 and out[IP].dst == REMOTE_POD and out[TCP].dport == 8080
    assert recomputed(run.data) == run.data


def test_removed_backend_steers_flow_to_another(node: Node) -> None:
    other = backend("10.244.2.11", 8080, local=False)
    node.program(state(fe(NODE1, 30080, (REMOTE,))))
    first = Ether(node.ingress(frame_in(TCP(sport=40009, dport=30080, flags="S"))).data)
    assert first[IP].dst == REMOTE_POD
    node.program(state(fe(NODE1, 30080, (other,))))
    again = Ether(node.ingress(frame_in(TCP(sport=40009, dport=30080, flags="A"))).data)
    assert again[IP].dst == "10.244.2.11"


def test_a_snat_port_is_free_again_once_its_flow_ends(node: Node) -> None:
    one_port(node, closing_timeout=0)
    first = node.ingress(frame_in(TCP(sport=42000, dport=30080, flags="S")))
    assert Ether(first.data)[TCP].sport == 61000
    # The only port is taken by a live flow: a second flow to the same backend cannot have it, and is
    # told so with a RST.
    refused = node.ingress(frame_in(TCP(sport=42001, dport=30080, flags="S")))
    assert refused.retval == TC_ACT_REDIRECT and Ether(refused.data)[TCP].flags == "RA"
    assert node.maps.stats()["drop_nat_exhausted"] == 1
    # Both sides end the first flow (FIN each way): both of its entries close, and the port can be reused.
    node.ingress(frame_in(TCP(sport=42000, dport=30080, flags="FA")))
    node.ingress(bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1) /
                       TCP(sport=8080, dport=61000, flags="FA")))
    again = node.ingress(frame_in(TCP(sport=42001, dport=30080, flags="S")))
    assert again.retval == TC_ACT_REDIRECT and Ether(again.data)[TCP].sport == 61000


def test_a_reset_from_the_backend_closes_the_clients_entry_too(node: Node) -> None:
    from bpflb.datapath.libbpf import const

    one_port(node, closing_timeout=3600)
    node.ingress(frame_in(TCP(sport=42002, dport=30080, flags="S")))
    rst = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1) / \
        TCP(sport=8080, dport=61000, flags="R")
    node.ingress(bytes(rst))
    [(_key, entry)] = node.maps.flows()
    assert entry.flags & const("CT_F_CLOSING") and entry.flags & const("CT_F_RESET")
    # A reset flow needs no TIME_WAIT: after a second its port serves a new flow (closing_timeout
    # of an hour notwithstanding).
    wait_idle(node.maps.ct_fwd, "last_seen", 1.0)
    again = node.ingress(frame_in(TCP(sport=42003, dport=30080, flags="S")))
    assert again.retval == TC_ACT_REDIRECT and Ether(again.data)[TCP].sport == 61000


def test_an_idle_flow_expires_after_its_lifetime_and_frees_its_port(node: Node) -> None:
    """Conntrack idle expiry with short lifetimes (lb_config's udp_timeout): a UDP flow holds the only NAT
    port while it lives; once idle past its lifetime, its port serves a new flow."""
    one_port(node, udp_timeout=1, proto=Proto.UDP)
    first = node.ingress(frame_in(UDP(sport=5000, dport=30080)))
    assert first.retval == TC_ACT_REDIRECT and Ether(first.data)[UDP].sport == 61000
    refused = node.ingress(frame_in(UDP(sport=5001, dport=30080)))   # the port is taken: ICMP port unreachable
    assert refused.retval == TC_ACT_REDIRECT and Ether(refused.data).haslayer(ICMP)
    wait_idle(node.maps.ct_fwd, "last_seen", 1.0)
    later = node.ingress(frame_in(UDP(sport=5001, dport=30080)))
    assert later.retval == TC_ACT_REDIRECT and Ether(later.data)[UDP].sport == 61000
