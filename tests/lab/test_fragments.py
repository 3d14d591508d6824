"""Fragmented UDP datagrams through a NodePort on the wire, with the real agents: a request and an answer both
larger than the lab's 1,500-byte MTU, so the client's stack and the pod's cut them into fragments and every
fragment crosses bpflb on its own (nothing on the way reassembles them). The client must get the whole
answer, and the pod must have seen the address the mode promises: node1's in SNAT and Hybrid (UDP is SNAT'd),
the client's own for a backend on the node it entered. In DSR (and over the VXLAN overlay) the option (the
overlay's headers) makes the client's full-size fragments too big for the path: a fragment has no DF, so node1
has the kernel cut them again, as a router would, and the datagram goes through at once, nothing learnt."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import cluster_ip, counted, pod_path_on, wait_until

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1, NODE2 = "198.18.0.11", "198.18.0.12"
SIZE = 3000                       # three fragments each way at 1,500 bytes


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running() as shared:
        yield shared


Outcome = tuple[str, bool, str]


def big_udp(addr: str, port: int, attempts: int, timeout: float) -> list[Outcome | None]:
    """In the client: "clientip <SIZE bytes>" from one socket, `attempts` times, each waiting `timeout` for the
    answer: per attempt (the address:port the pod saw, the rest came back whole, the address:port the answer
    came from), or None without an answer."""
    pad = bytes(i % 251 for i in range(SIZE))
    outcomes: list[Outcome | None] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        s.settimeout(timeout)
        for _ in range(attempts):
            s.sendto(b"clientip " + pad, (addr, port))
            try:
                data, peer = s.recvfrom(65535)
            except TimeoutError:
                outcomes.append(None)
                continue
            seen, _, rest = data.partition(b" ")
            outcomes.append((seen.decode(), rest == pad, f"{peer[0]}:{peer[1]}"))
    return outcomes


def ask(lab: Lab, addr: str, port: int = 30081, attempts: int = 1, timeout: float = 5.0, host: str = "client",
        in_cgroup: bool = True) -> list[Outcome | None]:
    return lab.run_in(host, big_udp, addr, port, attempts, timeout, timeout=attempts * timeout + 10,
                      in_cgroup=in_cgroup)


@pytest.mark.parametrize("mode", ["SNAT", "Hybrid"])
def test_a_fragmented_request_and_answer_through_node1_to_a_remote_pod(lab: Lab, mode: str) -> None:
    lab.set_mode(mode)
    with counted(lab, "node1") as delta:
        [outcome] = ask(lab, NODE1)
    assert outcome is not None, f"{mode}: no answer to a {SIZE}-byte datagram through {NODE1}:30081"
    seen, whole, source = outcome
    assert whole, f"{mode}: the answer came back cut or changed"
    assert source == f"{NODE1}:30081", source
    assert seen.startswith(f"{NODE1}:"), f"{mode}: the pod saw {seen}, not node1 (SNAT)"
    node1 = delta["node1"]
    # Two first fragments translated (request, answer), four later ones following them.
    assert node1["frag_tracked"] >= 2 and node1["frag_followed"] >= 4, node1
    assert node1["pass_fragment"] == 0 and node1["frag_track_failed"] == 0, node1


def test_a_fragmented_request_and_answer_to_a_local_pod_keep_the_client_address(lab: Lab) -> None:
    """node2's NodePort: its own pod (echo-a) sees the client, node3's (echo-b) sees node2; both answer whole.
    New sockets (new flows) until the local pod has answered."""
    lab.set_mode("SNAT")
    seen = set()
    with counted(lab, "node2") as delta:
        for _ in range(20):
            [outcome] = ask(lab, NODE2)
            assert outcome is not None and outcome[1] and outcome[2] == f"{NODE2}:30081", \
                f"no whole answer through {NODE2}:30081: {outcome}"
            seen.add(outcome[0].partition(":")[0])
            if CLIENT in seen:
                break
    assert CLIENT in seen and seen <= {CLIENT, NODE2}, seen
    node2 = delta["node2"]
    assert node2["frag_tracked"] >= 2 and node2["frag_followed"] >= 4, node2


def test_dsr_fragments_at_the_full_mtu_are_cut_again_and_delivered_with_the_client_address(lab: Lab) -> None:
    lab.set_mode("DSR")
    try:
        lab.exec("client", ["ip", "route", "flush", "cache"], check=True)    # no path MTU learnt before
        with counted(lab, "node1", "node2", "node3") as delta:
            outcomes = ask(lab, NODE1, attempts=2, timeout=3.0)
        for outcome in outcomes:
            assert outcome is not None, f"a datagram cut at the full MTU got no answer: {outcomes}"
            seen, whole, source = outcome
            assert whole and seen.startswith(f"{CLIENT}:") and source == f"{NODE1}:30081", outcome
        node1 = delta["node1"]
        assert node1.get("icmp_frag_needed", 0) == 0 and node1["fwd_fragmented"] >= 4, node1
        assert node1["frag_followed"] >= 4 and node1["dsr_opt_inserted"] >= 6, node1
        backend = delta["node2"] if delta["node2"]["dsr_accepted"] else delta["node3"]
        # node1's forwarding cut each too-big fragment in two, the option copied into every piece: the pod's
        # node accepted more DSR requests than the client sent fragments (3 a datagram).
        assert backend["dsr_accepted"] > 6, backend
        assert backend["frag_tracked"] >= 2 and backend["frag_followed"] >= 4, backend
        route = lab.exec("client", ["ip", "route", "get", NODE1], check=True).stdout
        assert "mtu" not in route, route
    finally:
        lab.exec("client", ["ip", "route", "flush", "cache"], check=True)
        lab.set_mode("SNAT")


@pytest.mark.parametrize("in_cgroup", [True, False], ids=["socket", "packet"])
def test_a_pods_fragmented_datagram_to_a_clusterip_and_the_answer(lab: Lab, in_cgroup: bool) -> None:
    """client-pod on node1 to the echo Service's clusterIP: by the socket LB (the datagram leaves addressed
    to the backend), or by the pod-facing tc path (in_cgroup False: each fragment DNAT'd on the pod's veth,
    the answer's shown from the Service). The backend sees the pod's own address either way."""
    lab.set_mode("SNAT")
    cip = cluster_ip(lab, "default/echo")
    wait_until("the pod path on client-pod's veth", lambda: pod_path_on(lab, "client-pod"))
    with counted(lab, "node1") as delta:
        [outcome] = ask(lab, cip, 8081, host="client-pod", in_cgroup=in_cgroup)
    assert outcome is not None, f"no answer to a {SIZE}-byte datagram to {cip}:8081"
    seen, whole, source = outcome
    assert whole and source == f"{cip}:8081", outcome
    assert seen.partition(":")[0] == lab.pod_ip("client-pod"), seen
    if not in_cgroup:
        node1 = delta["node1"]
        assert node1["frag_tracked"] >= 2 and node1["frag_followed"] >= 4, node1


@pytest.fixture(scope="module")
def vxlan_lab(privileged: None) -> Iterator[Lab]:
    with lab_running(tunnel="VXLAN") as shared:
        yield shared


def test_vxlan_fragments_at_the_full_mtu_cross_the_overlay_whole(vxlan_lab: Lab) -> None:
    """Over the overlay each fragment grows by 50 bytes: the client's 1,500-byte fragments no longer fit.  They
    carry no DF, so node1 sends them into its kernel VXLAN device, whose outer packets the kernel fragments and
    the backend's node reassembles: every datagram goes through whole, the first one too, nothing answered with
    fragmentation needed; every fragment of the answer is encapsulated by the backend's node (none leaving with
    the pod's address on the underlay) and translated back on node1 after decapsulation."""
    lab = vxlan_lab
    lab.exec("client", ["ip", "route", "flush", "cache"], check=True)
    with counted(lab, "node1", "node2", "node3") as delta:
        outcomes = ask(lab, NODE1, attempts=3, timeout=2.0)
    for outcome in outcomes:
        assert outcome is not None, f"no answer to a datagram cut at the full MTU: {outcomes}"
        seen, whole, source = outcome
        assert whole and seen.startswith(f"{NODE1}:") and source == f"{NODE1}:30081", outcome
    node1 = delta["node1"]
    assert node1.get("icmp_frag_needed", 0) == 0 and node1["fwd_fragmented"] >= 6, node1
    assert node1["reply_snat"] >= 6 and node1["frag_followed"] >= 8, node1
    backend = max((delta["node2"], delta["node3"]), key=lambda d: d.get("tunnel_encap", 0))
    assert backend["tunnel_encap"] >= 6 and backend["frag_tracked"] >= 2, backend
    route = lab.exec("client", ["ip", "route", "get", NODE1], check=True).stdout
    assert "mtu" not in route, route
