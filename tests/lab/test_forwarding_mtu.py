"""Packets bpflb makes too big for the next hop, on the wire with the real agents: one UDP datagram of 1,500
bytes (the whole MTU of the client's link), sent through node1 to a pod on another node, grows past the path
by the DSR option (8 bytes) or the VXLAN overlay (50 bytes).  Sent WITHOUT DF (IP_PMTUDISC_DONT), it must reach
the pod whole, as through a router that fragments it: the pod answers with the address it saw and the rest
of what it got, and the answer must come back whole.  Sent WITH DF, the client must be told (fragmentation
needed: its route learns the MTU) and nothing may reach the pod.  Captures on node1 show the datagram leaving
as fragments that each fit the 1,500-byte wire (DSR: the inner packet cut by node1's forwarding, the option in
every piece, each accepted by the pod's node; VXLAN: the outer packet cut by node1's VXLAN device)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import capture, counted

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1 = "198.18.0.11"
BACKEND_NODES = {"node2": "198.18.0.12", "node3": "198.18.0.13"}
PAD = bytes(i % 251 for i in range(1472 - len(b"clientip ")))     # UDP payload 1,472: a 1,500-byte packet
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2      # linux/in.h
IPV4 = r"\d+\.\d+\.\d+\.\d+"
FRAME = re.compile(rf"length (?P<len>\d+): (?P<src>{IPV4})(\.\d+)? > (?P<dst>{IPV4})(\.\d+)?: ")

Answer = tuple[str, bool, int, str]


def one_datagram(addr: str, port: int, df: bool, timeout: float) -> Answer | None:
    """In the client: one "clientip <PAD>" datagram of 1,500 bytes, with DF or without; (the address:port the
    pod saw, the rest came back whole, the answer's size, where the answer came from), or None when no answer
    came within timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO if df else IP_PMTUDISC_DONT)
        s.bind(("0.0.0.0", 0))
        s.settimeout(timeout)
        s.sendto(b"clientip " + PAD, (addr, port))
        try:
            data, peer = s.recvfrom(65535)
        except TimeoutError:
            return None
    seen, _, rest = data.partition(b" ")
    return seen.decode(), rest == PAD, len(data), f"{peer[0]}:{peer[1]}"


def send(lab: Lab, df: bool, timeout: float = 5.0) -> Answer | None:
    return lab.run_in("client", one_datagram, NODE1, 30081, df, timeout, timeout=timeout + 10)


def frames(lines: list[str] | None, src: str, dst_in: set[str]) -> list[int]:
    """The IPv4 lengths of the captured frames from src to one of dst_in."""
    out = []
    for line in lines or []:
        m = FRAME.search(line)
        if m and m["src"] == src and m["dst"] in dst_in:
            out.append(int(m["len"]) - 14)
    return out


def flush_pmtu(lab: Lab) -> None:
    lab.exec("client", ["ip", "route", "flush", "cache"], check=True)


def learnt_mtu(lab: Lab) -> str:
    return str(lab.exec("client", ["ip", "route", "get", NODE1], check=True).stdout)


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running(mode="DSR") as shared:
        yield shared


def test_dsr_a_full_size_datagram_without_df_reaches_the_remote_pod_whole(lab: Lab) -> None:
    lab.set_mode("DSR")
    flush_pmtu(lab)
    pods = {lab.pod_ip("echo-a"), lab.pod_ip("echo-b")}
    with counted(lab, "node1", *BACKEND_NODES) as delta, \
            capture(lab, "node1", f"src host {CLIENT} and ip[6:2] & 0x3fff != 0") as wire:
        answer = send(lab, df=False)
    assert answer is not None, "no answer to a 1,500-byte datagram without DF through node1 (DSR)"
    seen, whole, size, source = answer
    assert seen.startswith(f"{CLIENT}:"), f"the pod saw {seen}, not the client (DSR)"
    assert whole and size == len(seen) + 1 + len(PAD), "the pod got all 1,463 bytes after the word, unchanged"
    assert source == f"{NODE1}:30081", source
    node1 = delta["node1"]
    assert node1["fwd_fragmented"] == 1 and node1.get("icmp_frag_needed", 0) == 0, node1
    # On node1's wire: the datagram left to the pod in fragments, each within the 1,500-byte MTU.
    out = frames(wire.lines, CLIENT, pods)
    assert len(out) >= 2 and max(out) <= 1500 and sum(out) > 1508, (out, wire.lines)
    # Every fragment carried the option (the kernel copied it): the pod's node accepted each as a DSR request.
    backend = max(delta[n]["dsr_accepted"] for n in BACKEND_NODES)
    assert backend == len(out), (backend, out)
    assert "mtu" not in learnt_mtu(lab), "nothing told the client to send smaller"


def test_dsr_a_full_size_datagram_with_df_is_answered_fragmentation_needed(lab: Lab) -> None:
    lab.set_mode("DSR")
    flush_pmtu(lab)
    try:
        with counted(lab, "node1", *BACKEND_NODES) as delta:
            answer = send(lab, df=True, timeout=2.0)
        assert answer is None, f"a DF datagram the option makes too big got through: {answer}"
        assert delta["node1"]["icmp_frag_needed"] == 1 and delta["node1"].get("fwd_fragmented", 0) == 0, delta
        assert all(delta[n].get("dsr_accepted", 0) == 0 for n in BACKEND_NODES), "nothing reached a pod"
        assert "mtu 1492" in learnt_mtu(lab), learnt_mtu(lab)
    finally:
        flush_pmtu(lab)


@pytest.fixture(scope="module")
def vxlan_lab(privileged: None) -> Iterator[Lab]:
    with lab_running(tunnel="VXLAN") as shared:
        yield shared


@pytest.mark.parametrize("mode", ["SNAT", "DSR"])
def test_vxlan_a_full_size_datagram_without_df_reaches_the_remote_pod_whole(vxlan_lab: Lab, mode: str) -> None:
    lab = vxlan_lab
    lab.set_mode(mode)
    flush_pmtu(lab)
    try:
        outer = f"src host {NODE1} and (udp port 8472 or ip[6:2] & 0x1fff != 0)"
        with counted(lab, "node1", *BACKEND_NODES) as delta, capture(lab, "node1", outer) as wire:
            answer = send(lab, df=False)
        assert answer is not None, f"{mode}: no answer to a 1,500-byte datagram without DF through the overlay"
        seen, whole, size, source = answer
        assert seen.startswith(f"{CLIENT if mode == 'DSR' else NODE1}:"), f"{mode}: the pod saw {seen}"
        assert whole and size == len(seen) + 1 + len(PAD), f"{mode}: the pod's answer was cut or changed"
        assert source == f"{NODE1}:30081", source
        node1 = delta["node1"]
        assert node1["fwd_fragmented"] == 1 and node1.get("icmp_frag_needed", 0) == 0, node1
        # The encapsulated datagram crossed the underlay in fragments that fit it (the backend's node
        # reassembled them before its VXLAN device decapsulated the datagram).
        out = frames(wire.lines, NODE1, set(BACKEND_NODES.values()))
        assert len(out) >= 2 and max(out) <= 1500 and sum(out) > 1550, (out, wire.lines)
        assert "mtu" not in learnt_mtu(lab)
    finally:
        lab.set_mode("SNAT")


def test_vxlan_a_full_size_datagram_with_df_is_answered_fragmentation_needed(vxlan_lab: Lab) -> None:
    lab = vxlan_lab
    lab.set_mode("SNAT")
    flush_pmtu(lab)
    try:
        with counted(lab, "node1", *BACKEND_NODES) as delta:
            answer = send(lab, df=True, timeout=2.0)
        assert answer is None, f"a DF datagram the overlay makes too big got through: {answer}"
        assert delta["node1"]["icmp_frag_needed"] == 1 and delta["node1"].get("fwd_fragmented", 0) == 0, delta
        assert all(delta[n].get("reply_snat", 0) + delta[n].get("tunnel_encap", 0) == 0 for n in BACKEND_NODES)
        assert "mtu 1450" in learnt_mtu(lab), learnt_mtu(lab)
    finally:
        flush_pmtu(lab)
