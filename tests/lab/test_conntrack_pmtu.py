"""Path-MTU discovery through bpflb on the wire: the pods' nodes reach their pods over a route with a smaller
MTU (1400), so the client's 1500-byte segments are too big past node1 and the pods' nodes answer with ICMP
fragmentation-needed about packets bpflb translated. The error must reach the client about the packet it
sent (SNAT: node1 translates it back, with XDP on it too; DSR and Hybrid: the pod's node does, on its way out),
or the client's large upload stalls for good."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator

import pytest

from bpflb.inspect import collect
from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running

pytestmark = pytest.mark.privileged

NODE1 = "198.18.0.11"
SIZE = 1 << 20


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running() as shared:
        for node, pod in (("node2", "echo-a"), ("node3", "echo-b")):
            shared.exec(node, ["ip", "route", "add", f"{shared.pod_ip(pod)}/32", "dev", "cni0", "mtu", "lock",
                               "1400"], check=True)
        yield shared


def upload(addr: str, port: int, size: int, timeout: float) -> tuple[bool, str, float]:
    """POST size bytes to the echo server and read them back (in the client's namespace): (the echo
    matched, what went wrong, seconds)."""
    body = bytes(i % 251 for i in range(size))
    start = time.monotonic()
    conn = http.client.HTTPConnection(addr, port, timeout=timeout)
    try:
        conn.request("POST", "/echo", body=body, headers={"Connection": "close"})
        answer = conn.getresponse().read()
        return answer == body, "" if answer == body else f"{len(answer)} bytes back", time.monotonic() - start
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}", time.monotonic() - start
    finally:
        conn.close()


@pytest.mark.parametrize(("mode", "acceleration"),
                         [("SNAT", "Disabled"), ("DSR", "Disabled"), ("Hybrid", "Disabled"), ("SNAT", "Native")])
def test_a_smaller_mtu_towards_the_pod_makes_a_large_upload_succeed(lab: Lab, mode: str, acceleration: str) -> None:
    from bpflb_lab.lab import cluster, topology
    from tests.lab.helpers import wait_until

    def accelerate(to: str) -> None:
        """XDP on every node (acceleration Native, node1's the one that matters here) or none, as the agents'
        ConfigMap says; the lab's veths prepared for XDP as Lab.up(acceleration=...) does (idempotent)."""
        state = lab.state()
        if to != "Disabled":
            topology.prepare_for_xdp(lab.name, state.nodes)
            for pod in ("echo-a", "echo-b"):
                lab.exec(pod, ["ethtool", "-K", "eth0", "tx", "off"], in_cgroup=False, check=True)
        with lab.paths.locked():
            lab.cluster.write(cluster.agent_config(state.mode, state.algorithm, state.tunnel, to, state.settings))
            state.acceleration = to
            state.save(lab.paths)
        for node in ("node1", "node2", "node3"):
            wait_until(f"{node}: XDP {'attached' if to != 'Disabled' else 'detached'}",
                       lambda node=node: ("prog/xdp" in lab.exec(node, ["ip", "-d", "link", "show", "eth0"],  # type: ignore[misc]
                                                                 check=True).stdout) == (to != "Disabled"),
                       timeout=30)

    lab.set_mode(mode)
    accelerate(acceleration)
    try:
        lab.exec("client", ["ip", "route", "flush", "cache"], check=True)     # no path MTU learnt before
        before = {n: dict(collect(lab.pin_root / n)["counters"]) for n in ("node1", "node2", "node3")}
        ok, why, took = lab.run_in("client", upload, NODE1, 30080, SIZE, 20.0, timeout=60)
        assert ok, f"{mode}, XDP {acceleration}: the 1 MiB upload through node1 failed after {took:.1f}s: {why}"
        after = {n: dict(collect(lab.pin_root / n)["counters"]) for n in before}
    finally:
        accelerate("Disabled")
    got = {n: after[n]["icmp_related"] - before[n].get("icmp_related", 0) for n in before}
    if mode == "SNAT":
        assert got["node1"] >= 1, f"node1 translated the pods' nodes' errors back to the client: {got}"
    else:       # DSR, and Hybrid's TCP
        assert got["node2"] + got["node3"] >= 1, f"the pod's node translated its own error: {got}"
    if acceleration != "Disabled":
        xdp_tx = after["node1"]["xdp_tx"] - before["node1"].get("xdp_tx", 0)
        assert xdp_tx >= 1, "node1 forwarded the upload's packets at XDP"
    learnt = lab.exec("client", ["ip", "route", "get", NODE1], check=True).stdout
    assert "mtu 1400" in learnt, f"the client learnt the path MTU: {learnt}"
