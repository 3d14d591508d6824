"""BPF unit tests of the ICMP errors the datapath generates (the real bpf_lb.o): none towards a zero, loopback,
multicast, class E or broadcast address, the node's own addresses, a subnet broadcast or an unroutable sender;
none for a frame sent to a broadcast or multicast MAC; none about a RST or an ICMP message; and never more than
the node's budget
(lb_icmp_rl: rate and burst, the kernel's 1000/s and 50 by default), shared by every kind of error.  What is
not sent is counted (icmp_suppressed, icmp_rate_limited)."""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.libbpf import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
from bpflb.model.types import Proto
from bpflb_lab.lab.netns import entered
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    NODE1,
    REMOTE,
    SENDERS,
    Node,
    fe,
    state,
)

pytestmark = pytest.mark.privileged

REJECT_PORT = 30090


def no_endpoints(node: Node) -> None:
    node.program(state(fe(NODE1, REJECT_PORT, (), no_endpoints=True),
                       fe(NODE1, REJECT_PORT, (), no_endpoints=True, proto=Proto.UDP),
                       fe(NODE1, 30080, (REMOTE,))))


def syn(src: str = CLIENT, *, sport: int = 43000, flags: str = "S", ttl: int = 64, dport: int = REJECT_PORT,
        dst_mac: str = ETH0_MAC) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=dst_mac) / IP(src=src, dst=NODE1, ttl=ttl) /
                 TCP(sport=sport, dport=dport, flags=flags))


def is_icmp(run_data: bytes) -> bool:
    pkt = Ether(run_data)
    return bool(pkt.haslayer(ICMP))


@pytest.mark.parametrize("case", list(SENDERS))
def test_no_error_towards_a_sender_that_is_no_unicast_host(node: Node, case: str) -> None:
    no_endpoints(node)
    run = node.ingress(syn(SENDERS[case]))
    assert run.retval == TC_ACT_SHOT and not is_icmp(run.data)
    stats = node.maps.stats()
    assert stats["icmp_suppressed"] == 1 and stats.get("icmp_sent", 0) == 0
    assert stats["reject_no_endpoints"] == 1          # the packet itself is still refused


@pytest.mark.parametrize("dst_mac", ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01"])
def test_no_error_for_a_frame_sent_to_a_broadcast_or_multicast_mac(node: Node, dst_mac: str) -> None:
    """Never this node's to refuse: passed as it came (the kernel's TCP drops it), nothing answered."""
    no_endpoints(node)
    frame = syn(dst_mac=dst_mac)
    run = node.ingress(frame)
    assert (run.retval, run.data) == (TC_ACT_OK, frame)
    stats = node.maps.stats()
    assert stats["pass_l2_group"] == 1 and not stats.get("icmp_sent") and not stats.get("reject_no_endpoints")


@pytest.mark.parametrize("flags", ["R", "RA"])
def test_no_error_about_a_reset(node: Node, flags: str) -> None:
    no_endpoints(node)
    run = node.ingress(syn(flags=flags))
    assert run.retval == TC_ACT_SHOT and not is_icmp(run.data)
    assert node.maps.stats()["icmp_suppressed"] == 1


@pytest.mark.parametrize("icmp", [ICMP(type=8), ICMP(type=3, code=3)], ids=["echo request", "an ICMP error"])
def test_no_error_about_icmp(node: Node, icmp: ICMP) -> None:
    """ICMP is never the datapath's to translate: it goes to the kernel untouched, and nothing answers it here."""
    no_endpoints(node)
    frame = bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1) / icmp / Raw(b"x" * 28))
    run = node.ingress(frame)
    assert run.retval == TC_ACT_OK and run.data == frame
    assert node.maps.stats().get("icmp_sent", 0) == 0


def test_a_unicast_sender_still_gets_its_error(node: Node) -> None:
    no_endpoints(node)
    run = node.ingress(syn())
    assert run.retval == TC_ACT_REDIRECT and Ether(run.data)[ICMP].type == 3
    udp = bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1) /
                UDP(sport=5000, dport=REJECT_PORT) / Raw(b"x"))
    assert Ether(node.ingress(udp).data)[ICMP].code == 3
    stats = node.maps.stats()
    assert stats["icmp_sent"] == 2 and stats.get("icmp_suppressed", 0) == 0


def test_time_exceeded_follows_the_same_rules(node: Node) -> None:
    no_endpoints(node)
    run = node.ingress(syn("198.18.0.255", ttl=1, dport=30080))
    assert run.retval == TC_ACT_SHOT and not is_icmp(run.data)
    stats = node.maps.stats()
    assert stats["drop_ttl_exceeded"] == 1 and stats["icmp_suppressed"] == 1 and not list(node.maps.ct_fwd.items_raw())


def _burst(node: Node, count: int, make: object) -> tuple[int, float]:
    start = time.monotonic()
    sent = sum(is_icmp(node.ingress(make(i)).data) for i in range(count))   # type: ignore[operator]
    return sent, time.monotonic() - start


def test_the_node_sends_no_more_errors_than_its_budget(node: Node) -> None:
    no_endpoints(node)
    configured = time.monotonic()
    node.maps.set_icmp_limit(rate=2, burst=5)
    sent, elapsed = _burst(node, 40, lambda i: syn(sport=44000 + i))
    refill = int((time.monotonic() - configured) * 2) + 1
    assert 5 <= sent <= 5 + refill, (sent, elapsed)
    stats = node.maps.stats()
    assert stats["icmp_rate_limited"] == 40 - sent and stats["icmp_sent"] == sent


def test_every_kind_of_error_draws_on_the_same_budget(node: Node) -> None:
    no_endpoints(node)
    node.maps.set_icmp_limit(rate=1, burst=4)
    unreachable = sum(is_icmp(node.ingress(syn(sport=45000 + i)).data) for i in range(3))
    exceeded = sum(is_icmp(node.ingress(syn(sport=45100 + i, ttl=1, dport=30080)).data) for i in range(3))
    assert unreachable == 3 and 1 <= exceeded <= 2     # 4 tokens in all (one more if a second went by)
    assert node.maps.stats()["icmp_rate_limited"] == 6 - unreachable - exceeded


def test_an_unprogrammed_budget_is_the_kernels_default(node: Node) -> None:
    """lb_icmp_rl all zero (a fresh node): a burst of 50, then 1000 per second.  A flood many times faster than
    that (frames built beforehand, run from inside the namespace in one go) gets far fewer errors than frames."""
    no_endpoints(node)
    frames = [syn(sport=46000 + i) for i in range(500)]
    count = 40 * len(frames)
    sent = 0
    with entered(node.ns):
        start = time.monotonic()
        for i in range(count):
            out = node.obj.test_run("lb_ingress", frames[i % len(frames)], ifindex=node.eth0).data
            sent += out[12:14] == b"\x08\x00" and out[23] == 1       # IPv4, protocol ICMP: an error was sent
        elapsed = time.monotonic() - start
    print(f"\n{count} refused SYNs in {elapsed:.2f}s ({count / elapsed:,.0f}/s): {sent} ICMP errors")
    # Unlimited would be every one; the budget allows the burst plus what 1000/s refills in the time taken.
    assert 50 <= sent <= 50 + int(1000 * elapsed) + 1, (sent, elapsed)
    assert sent < count, f"{count} errors for {count} frames in {elapsed:.2f}s: no budget"
    stats = node.maps.stats()
    assert stats["icmp_rate_limited"] == count - sent > 0 and stats["icmp_sent"] == sent
