"""DSR and Hybrid on the wire, with the real agents: the backend sees the client's address, the reply
leaves from the backend's node (its MAC) with the frontend as source and never crosses node1; modes
switch live through the agents' ConfigMap, and open connections keep the mode they started with."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import (
    answers,
    capture,
    counted,
    long_lived,
    mac_of,
    own_ports,
    seen_ip,
    wait_until,
)

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1 = "198.18.0.11"
LB_IP = "198.18.1.10"


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running(mode="DSR") as shared:
        yield shared


@pytest.mark.parametrize(("frontend", "port"), [(NODE1, 30080), (LB_IP, 80)])
def test_dsr_reply_comes_straight_from_the_backends_node(lab: Lab, frontend: str, port: int) -> None:
    lab.set_mode("DSR")
    backend_macs = {mac_of(lab, "node2"), mac_of(lab, "node3")}
    node1_mac = mac_of(lab, "node1")
    with capture(lab, "node1", "tcp") as at_node1, capture(lab, "client", "tcp") as at_client:
        results = lab.connections("client", frontend, port, 6, request="/clientip")
    assert all(r.ok for r in results), [r.error for r in results]
    # The pods saw the client's own address...
    assert {seen_ip(r.replies[0]) for r in results} == {CLIENT}
    assert {r.pod for r in results} <= {"echo-a", "echo-b"}
    # ...the requests entered node1 and went on to a pod with the client's address intact...
    ours = own_ports(results)
    assert at_node1.matching(src=CLIENT, dst=frontend, dport=port, ports=ours)
    forwarded = at_node1.matching(src=CLIENT, dport=8080, ports=ours)
    assert forwarded and {f.dst for f in forwarded} <= {"10.244.2.10", "10.244.3.10"}
    # ...and no reply crossed node1 in either form.
    assert not at_node1.matching(src=frontend, sport=port, dst=CLIENT)
    assert not at_node1.matching(sport=8080, dst=CLIENT)
    # The client got its replies from frontend:port, in frames sent by node2's or node3's interface.
    replies = at_client.matching(src=frontend, sport=port, dst=CLIENT, ports=ours)
    assert replies, at_client.frames
    assert {f.smac for f in replies} <= backend_macs and node1_mac not in {f.smac for f in replies}


def test_hybrid_tcp_by_dsr_udp_by_snat(lab: Lab) -> None:
    lab.set_mode("Hybrid")
    try:
        tcp = lab.connections("client", NODE1, 30080, 6, request="/clientip")
        assert {seen_ip(r.replies[0]) for r in tcp} == {CLIENT}
        udp = lab.connections("client", NODE1, 30081, 6, proto="UDP", request="clientip")
        assert all(r.ok for r in udp) and {seen_ip(r.replies[0]) for r in udp} == {NODE1}
    finally:
        lab.set_mode("DSR")


def test_pure_dsr_udp_preserves_the_client_address(lab: Lab) -> None:
    lab.set_mode("DSR")
    udp = lab.connections("client", NODE1, 30081, 6, proto="UDP", request="clientip")
    assert all(r.ok for r in udp) and {seen_ip(r.replies[0]) for r in udp} == {CLIENT}


def test_an_open_connection_survives_snat_dsr_snat_switches(lab: Lab, tmp_path: Path) -> None:
    lab.set_mode("SNAT")
    out: list[list[str]] = []
    progress = tmp_path / "answers"
    worker = threading.Thread(target=lambda: out.append(
        lab.run_in("client", long_lived, 5.0, str(progress), timeout=20)))
    worker.start()
    try:
        wait_until("answers in SNAT", lambda: answers(progress) >= 3)
        lab.set_mode("DSR")
        # New connections are DSR now, while the open one keeps going (it started in SNAT).
        fresh = lab.connections("client", NODE1, 30080, 4, request="/clientip")
        assert {seen_ip(r.replies[0]) for r in fresh} == {CLIENT}
        seen = answers(progress)
        wait_until("answers after the switch to DSR", lambda: answers(progress) >= seen + 3)
        lab.set_mode("SNAT")
        seen = answers(progress)
        wait_until("answers after the switch back to SNAT", lambda: answers(progress) >= seen + 3)
    finally:
        worker.join()
    pods = out[0]
    assert len(pods) >= 15 and len(set(pods)) == 1, pods
    lab.set_mode("DSR")


def test_the_lab_check_passes_in_every_mode(lab: Lab) -> None:
    try:
        for mode in ("SNAT", "DSR", "Hybrid"):
            lab.set_mode(mode)
            report = lab.check()
            assert report.ok, report.render()
            assert report.mode == mode
    finally:
        lab.set_mode("DSR")


def test_datapath_counters_show_the_dsr_work(lab: Lab) -> None:
    lab.set_mode("DSR")
    with counted(lab, "node1", "node2", "node3") as grew:          # this test's own connections only
        results = lab.connections("client", NODE1, 30080, 4)
    assert all(r.ok for r in results)
    assert grew["node1"].get("dsr_opt_inserted", 0) >= 4
    assert grew["node2"].get("dsr_accepted", 0) + grew["node3"].get("dsr_accepted", 0) >= 4
    assert all(c.get("drop_dsr_spoofed", 0) == 0 for c in grew.values())
