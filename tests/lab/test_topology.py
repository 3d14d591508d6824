"""The lab's namespaces and wiring: bring-up and tear-down leave nothing behind, hosts reach each other
the way the address plan says, and the sysctls are those of a Kubernetes node."""

from __future__ import annotations

import os
import subprocess

import pytest

from bpflb_lab.lab import Lab, LabError, cgroups, netns, topology
from tests.lab.helpers import root_netns_snapshot

pytestmark = pytest.mark.privileged


def test_up_down_leaves_nothing_behind(fresh_lab_name: str) -> None:
    before = root_netns_snapshot()
    lab = Lab(fresh_lab_name)
    lab.up(agents=False, nodes=3)
    names = topology.lab_namespaces(fresh_lab_name)
    assert sorted(names) == sorted([f"{fresh_lab_name}-{h}" for h in ("fabric", "client", "node1", "node2", "node3")]
                                   + [f"{fresh_lab_name}-pod-{p}" for p in ("echo-a", "echo-b", "client-pod")])
    node_cgroups = [cgroups.node_cgroup(fresh_lab_name, f"node{k}") for k in (1, 2, 3)]
    assert all(c.is_dir() for c in node_cgroups)
    assert set(cgroups.procs(node_cgroups[1])) == {lab.state().pods["default/echo-a"].echo_pid}   # node2's pod
    inodes = [netns.netns_inode(n) for n in names]
    assert netns.pids_in_netns([i for i in inodes if i is not None]), "echo servers run in the pod namespaces"
    assert root_netns_snapshot() == before, "bring-up changed the root network namespace"

    report = lab.down()
    assert sorted(report.namespaces) == sorted(names)
    assert topology.lab_namespaces(fresh_lab_name) == []
    assert not any(n.startswith(f"{fresh_lab_name}-") for n in netns.list_netns())
    assert not lab.paths.root.exists()
    assert not cgroups.lab_cgroup(fresh_lab_name).exists()
    assert netns.pids_in_netns([i for i in inodes if i is not None]) == {}
    assert root_netns_snapshot() == before, "tear-down changed the root network namespace"
    assert not lab.exists()


def test_down_when_nothing_exists(fresh_lab_name: str) -> None:
    report = Lab(fresh_lab_name).down()
    assert report.namespaces == [] and report.killed == [] and report.removed == []


def test_down_leaves_other_labs_with_a_longer_name_alone(fresh_lab_name: str) -> None:
    other = f"{fresh_lab_name}-x-fabric"  # what lab "<name>-x" would call its fabric
    netns.add_netns([other])
    try:
        Lab(fresh_lab_name).down()
        assert netns.netns_exists(other)
    finally:
        netns.delete_netns([other])


def test_up_refuses_an_existing_lab(lab: Lab) -> None:
    with pytest.raises(LabError, match="already exists"):
        Lab(lab.name).up(agents=False)


def test_addresses_and_routes(lab: Lab) -> None:
    out = lab.exec("node2", ["ip", "-4", "-o", "addr"]).stdout
    assert "198.18.0.12/24" in out and "10.244.2.1/24" in out
    routes = lab.exec("node2", ["ip", "route"]).stdout
    assert "10.244.1.0/24 via 198.18.0.11" in routes and "10.244.3.0/24 via 198.18.0.13" in routes
    assert "10.244.2.0/24 dev cni0" in routes
    client_routes = lab.exec("client", ["ip", "route"]).stdout
    assert "198.18.1.0/24 via 198.18.0.11" in client_routes
    assert "default" not in client_routes
    pod_routes = lab.exec("echo-b", ["ip", "route"]).stdout
    assert "default via 10.244.3.1 dev eth0" in pod_routes


def test_node_sysctls(lab: Lab) -> None:
    def read(keys: list[str]) -> dict[str, str]:
        return {k: open("/proc/sys/" + k.replace(".", "/")).read().strip() for k in keys}

    keys = ["net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter",
            "net.ipv4.conf.eth0.rp_filter", "net.ipv4.conf.all.send_redirects", "net.ipv4.conf.eth0.send_redirects",
            "net.ipv4.conf.all.accept_local"]
    values = lab.run_in("node1", read, keys)
    assert values == {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
                      "net.ipv4.conf.default.rp_filter": "0", "net.ipv4.conf.eth0.rp_filter": "0",
                      "net.ipv4.conf.all.send_redirects": "0", "net.ipv4.conf.eth0.send_redirects": "0",
                      "net.ipv4.conf.all.accept_local": "0"}


def test_bpffs_stays_visible_through_nsenter(lab: Lab) -> None:
    # `ip netns exec` would remount /sys; the lab's nsenter keeps the root mount namespace.
    here = os.stat("/sys/fs").st_dev
    out = lab.exec("node1", ["stat", "-c", "%d", "/sys/fs"]).stdout.strip()
    assert int(out) == here


def test_pod_to_pod_across_nodes(lab: Lab) -> None:
    assert lab.ping("echo-a", "10.244.3.10") is not None
    body, err = lab.http_get("echo-a", "http://10.244.3.10:8080/clientip")
    assert err is None and body is not None
    assert body.split(":")[0] == "10.244.2.10", "native routing: no address translation between pods"
    body, err = lab.http_get("echo-b", "http://10.244.2.10:8080/hostname")
    assert (body, err) == ("echo-a", None)


def test_node_to_node_and_node_to_pod(lab: Lab) -> None:
    for k in (2, 3):
        assert lab.ping("node1", lab.node_ip(k)) is not None
    assert lab.ping("node1", "10.244.2.10") is not None  # via node2
    body, err = lab.http_get("node1", "http://10.244.3.10:8080/clientip")
    assert err is None and body is not None and body.startswith("198.18.0.11:")
    body, err = lab.http_get("node3", "http://10.244.3.10:8080/clientip")
    assert err is None and body is not None and body.startswith("10.244.3.1:")


def test_client_reaches_nodes_but_not_pods(lab: Lab) -> None:
    for k in (1, 2, 3):
        assert lab.ping("client", lab.node_ip(k)) is not None
    # nothing listens on a node's port 9: refused proves the node answered
    assert lab.http_get("client", f"http://{lab.node_ip(2)}:9/") == (None, "connection refused")
    assert lab.ping("client", "10.244.2.10", timeout=0.3) is None


def test_exec_passes_the_exit_code(lab: Lab) -> None:
    assert lab.exec("client", ["sh", "-c", "exit 7"]).returncode == 7
    with pytest.raises(LabError, match="no host"):
        lab.exec("nosuchpod", ["true"])


def test_no_ipv6_noise(lab: Lab) -> None:
    out = lab.exec("node1", ["ip", "-6", "addr"]).stdout
    assert out.strip() == ""


def test_lab_namespaces_are_invisible_from_root(lab: Lab) -> None:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "cni0" not in links and "br0" not in links
