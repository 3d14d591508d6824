"""xdpAcceleration on the wire: every node runs the XDP fast path in front of tc (native XDP on the lab's
veths); the SNAT, DSR and Hybrid checks hold, node1's forwarding is done at XDP (its counters say so),
DSR replies still leave from the backends' nodes, and turning acceleration off hands flows back to tc."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bpflb.inspect import collect
from bpflb_lab.lab import Lab, cluster
from tests.lab.conftest import lab_running
from tests.lab.helpers import capture, mac_of, own_ports, seen_ip

pytestmark = pytest.mark.privileged

CLIENT, NODE1 = "198.18.0.100", "198.18.0.11"


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running(acceleration="Native") as shared:
        yield shared


def counters(lab: Lab, node: str) -> dict[str, int]:
    return dict(collect(lab.pin_root / node)["counters"])


def test_agents_attached_the_xdp_program(lab: Lab) -> None:
    for node in ("node1", "node2", "node3"):
        out = lab.exec(node, ["ip", "-d", "link", "show", "eth0"], check=True).stdout
        assert "xdp" in out and "prog/xdp" in out, out
        log = lab.paths.agent_log(node).read_text()
        assert "XDP program attached in native mode" in log


@pytest.mark.parametrize("mode", ["SNAT", "DSR", "Hybrid"])
def test_checks_hold_with_acceleration_and_node1_forwards_at_xdp(lab: Lab, mode: str) -> None:
    lab.set_mode(mode)
    report = lab.check()
    assert report.ok, report.render()
    before = counters(lab, "node1").get("xdp_tx", 0)         # after the check's probes: only the 8 below count
    tcp = lab.connections("client", NODE1, 30080, 8, request="/clientip")
    assert all(r.ok for r in tcp)
    expect = CLIENT if mode in ("DSR", "Hybrid") else NODE1
    assert {seen_ip(r.replies[0]) for r in tcp} == {expect}
    after = counters(lab, "node1").get("xdp_tx", 0)
    # Every request packet of the 8 connections (and in SNAT the replies too) went out at XDP.
    assert after - before >= 8 * 3, (before, after)


def test_dsr_replies_still_leave_from_the_backends_nodes(lab: Lab) -> None:
    lab.set_mode("DSR")
    backends = {mac_of(lab, "node2"), mac_of(lab, "node3")}
    with capture(lab, "client", "tcp") as at_client:
        results = lab.connections("client", NODE1, 30080, 4, request="/clientip")
    assert {seen_ip(r.replies[0]) for r in results} == {CLIENT}
    replies = at_client.matching(src=NODE1, sport=30080, dst=CLIENT, ports=own_ports(results))
    assert replies and {f.smac for f in replies} <= backends


def test_turning_acceleration_off_hands_everything_back_to_tc(lab: Lab) -> None:
    lab.set_mode("SNAT")
    state = lab.state()
    try:
        lab.cluster.write(cluster.agent_config("SNAT", state.algorithm, state.tunnel, "Disabled"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "xdp" in lab.exec("node1", ["ip", "link", "show", "eth0"]).stdout:
            time.sleep(0.1)
        assert "prog/xdp" not in lab.exec("node1", ["ip", "-d", "link", "show", "eth0"]).stdout
        before = counters(lab, "node1").get("xdp_tx", 0)
        assert lab.check().ok
        assert counters(lab, "node1").get("xdp_tx", 0) == before
    finally:
        lab.cluster.write(cluster.agent_config("SNAT", state.algorithm, state.tunnel, "Native"))
