"""The kernel datapath's in-cluster wiring, on the real kernel in a scratch node namespace and a scratch cgroup:
which veths it takes for pods' (bridged to the pod CIDR's gateway, or routed to an address of the pod CIDR;
never the external device, a veth to another node's pods or a veth whose peer is in the same namespace),
a pod wired after a sync getting the pod path from the netlink events alone, the socket LB attached to the
cgroup with pinned links and detached when socketLB turns false, and uninstall taking both away."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from bpflb.datapath.base import NodeProgram
from bpflb.datapath.cgroup import attached_programs, default_cgroup_root
from bpflb.datapath.kernel import KernelDatapath
from bpflb.datapath.lbmaps import NodeConfig
from bpflb.datapath.loader import ensure_bpffs, remove_pins, tc_attached_prog_id
from bpflb.datapath.pods import LinkWatch, pod_devices
from bpflb.model.cluster import NodeInfo
from bpflb.model.types import DesiredState, Mode
from bpflb_lab.lab.netns import entered

pytestmark = pytest.mark.privileged

NODE1 = "198.18.0.11"
POD_CIDR = IPv4Network("10.244.1.0/24")


@dataclass
class World:
    ns: str
    pods: str              # the namespace of the pods' ends of the veths
    cgroup: Path
    pins: Path

    def ip(self, *cmd: str, ns: str | None = None) -> None:
        done = subprocess.run(["ip", "-n", ns or self.ns, *cmd], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"ip {' '.join(cmd)}: {done.stderr}"

    def veth(self, name: str, peer_ns: str | None = None) -> None:
        """A veth in the node namespace, its peer in peer_ns (default the pods' namespace)."""
        peer = f"p{name}"
        self.ip("link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_ns or self.pods)
        self.ip("link", "set", name, "up")

    def ifindex(self, name: str) -> int:
        with entered(self.ns):
            return socket.if_nametoindex(name)

    def path_on(self, name: str) -> bool:
        idx = self.ifindex(name)
        with entered(self.ns):
            return tc_attached_prog_id(idx, ingress=True) is not None and \
                tc_attached_prog_id(idx, ingress=False) is not None


@pytest.fixture
def world() -> Iterator[World]:
    root = default_cgroup_root()
    if root is None:
        pytest.fail("no cgroup v2 hierarchy is mounted (the socket LB needs one)", pytrace=False)
    tag = uuid.uuid4().hex[:8]
    w = World(f"bpflb-ia-{tag}", f"bpflb-ia-{tag}-p", root / f"bpflb-test-ia-{tag}",
              Path("/sys/fs/bpf") / f"bpflb-test-ia-{tag}")
    made: list[str] = []
    w.cgroup.mkdir()
    try:
        for ns in (w.ns, w.pods, f"{w.ns}-x"):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            made.append(ns)
        w.veth("eth0", f"{w.ns}-x")                             # the external device: its peer is elsewhere too
        w.ip("addr", "add", f"{NODE1}/24", "dev", "eth0")
        w.ip("link", "add", "cni0", "type", "bridge")
        w.ip("addr", "add", "10.244.1.1/24", "dev", "cni0")
        w.ip("link", "set", "cni0", "up")
        w.veth("vbridged")                                     # a bridge CNI's pod
        w.ip("link", "set", "vbridged", "master", "cni0")
        w.veth("vrouted")                                      # a routed CNI's pod (a /32 through its veth)
        w.ip("route", "add", "10.244.1.20/32", "dev", "vrouted")
        w.veth("vother")                                       # a veth to another node's pod CIDR
        w.ip("route", "add", "10.244.2.0/24", "dev", "vother")
        w.ip("link", "add", "vlocal", "type", "veth", "peer", "name", "vlocal-peer")   # both ends here
        w.ip("link", "set", "vlocal", "master", "cni0")
        ensure_bpffs(w.pins)
        yield w
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        remove_pins(w.pins)
        deadline = time.monotonic() + 10
        while w.cgroup.exists():
            try:
                w.cgroup.rmdir()
            except OSError:
                assert time.monotonic() < deadline, f"{w.cgroup} still busy"
                time.sleep(0.02)


def want(socket_lb: bool) -> NodeProgram:
    me = NodeInfo("node1", IPv4Address(NODE1), (POD_CIDR,))
    return NodeProgram(state=DesiredState("node1", (IPv4Address(NODE1),), {}),
                       config=NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=0),
                       nodes=(me,), me=me, socket_lb=socket_lb)


def test_pod_veths_are_found_by_bridge_or_route_to_the_pod_cidr(world: World) -> None:
    with entered(world.ns):
        found = pod_devices([POD_CIDR], exclude={socket.if_nametoindex("eth0")})
        assert set(found.values()) == {"vbridged", "vrouted"}
        assert pod_devices([]) == {}                          # no pod CIDR known: nothing is a pod's
        assert set(pod_devices([IPv4Network("10.244.2.0/24")]).values()) == {"vother"}


def test_a_link_watch_sees_a_new_pod_veth_and_only_then(world: World) -> None:
    with entered(world.ns):
        watch = LinkWatch()
    try:
        assert not watch.changed()
        world.veth("vnew")
        deadline = time.monotonic() + 5
        while not watch.changed():
            assert time.monotonic() < deadline, "no netlink event for a new veth"
            time.sleep(0.01)
        assert not watch.changed()
    finally:
        watch.close()


def test_the_kernel_datapath_attaches_the_in_cluster_paths_and_takes_them_away(world: World) -> None:
    dp = KernelDatapath(world.pins, world.cgroup)
    try:
        with entered(world.ns):
            dp.load()
            dp.attach("eth0")
            report = dp.program(want(socket_lb=True))
        assert report.problems == []
        assert all(attached_programs(world.cgroup, p) for p in ("lb_connect4", "lb_sendmsg4", "lb_recvmsg4",
                                                                 "lb_getpeername4"))
        assert sorted(p.name for p in (world.pins / "links").iterdir()) == [
            "cgroup_lb_connect4", "cgroup_lb_getpeername4", "cgroup_lb_recvmsg4", "cgroup_lb_sendmsg4"]
        assert [n for n in ("vbridged", "vrouted", "vother", "vlocal") if world.path_on(n)] == ["vbridged", "vrouted"]
        assert any("socket LB attached to cgroup" in a for a in report.in_cluster_actions)

        # A pod wired after the sync: the kernel's announcement alone gets it the path.
        world.veth("vnew")
        world.ip("link", "set", "vnew", "master", "cni0")
        deadline = time.monotonic() + 5
        with entered(world.ns):
            while not world.path_on("vnew"):
                assert time.monotonic() < deadline, "the new pod's veth never got the pod path"
                dp.refresh_pods()
                time.sleep(0.01)
            assert dp.refresh_pods() == []                   # nothing new: nothing done

        with entered(world.ns):
            report = dp.program(want(socket_lb=False))       # a cluster that keeps kube-proxy
        assert not any(attached_programs(world.cgroup, p) for p in ("lb_connect4", "lb_sendmsg4"))
        assert not (world.pins / "links").exists() or not any((world.pins / "links").iterdir())
        assert any(a.startswith("socketLB false") for a in report.in_cluster_actions)
        with entered(world.ns):
            report = dp.program(want(socket_lb=True))        # and back
        assert attached_programs(world.cgroup, "lb_connect4")

        with entered(world.ns):
            dp.uninstall("eth0")
        assert not attached_programs(world.cgroup, "lb_connect4")
        assert [n for n in ("vbridged", "vrouted", "vnew") if world.path_on(n)] == []
        assert not world.pins.exists()
    finally:
        if dp.obj is not None:
            with entered(world.ns):
                dp.uninstall("eth0")
