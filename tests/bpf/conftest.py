"""Fixtures for BPF unit tests: a throwaway namespace with a node's routes and neighbours,
the real bpf_lb.o loaded in it, and its maps programmed by the agent's own code."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest

from bpflb.datapath.loader import BpfObject, TestRun, load_lb
from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.netns import entered
from bpflb.model.types import DesiredState, Mode

NODE1 = "198.18.0.11"
NODE2 = "198.18.0.12"
CLIENT = "198.18.0.100"
ETH0_MAC = "02:00:00:00:00:11"
NODE2_MAC = "02:00:00:00:00:12"
CLIENT_MAC = "02:00:00:00:00:64"
LXC_MAC = "02:00:00:00:01:01"
LOCAL_POD = "10.244.1.10"
LOCAL_POD_MAC = "02:00:00:00:01:10"
REMOTE_POD = "10.244.2.10"


def sh(ns: str, *cmd: str) -> None:
    subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True, text=True)


@dataclass
class Node:
    """node1 as the datapath sees it: eth0 on the underlay, lxc0 towards its local pod."""

    ns: str
    obj: BpfObject
    maps: LBMaps
    eth0: int
    lxc0: int
    _extra: list[str] = field(default_factory=list)

    def program(self, state: DesiredState, mode: Mode = Mode.SNAT) -> None:
        self.maps.set_config(NodeConfig(mode=mode, snat_addr=IPv4Address(NODE1), ext_ifindex=self.eth0))
        self.maps.sync(state)

    def ingress(self, frame: bytes) -> TestRun:
        with entered(self.ns):
            return self.obj.test_run("lb_ingress", frame, ifindex=self.eth0)

    def egress(self, frame: bytes) -> TestRun:
        with entered(self.ns):
            return self.obj.test_run("lb_egress", frame, ifindex=self.eth0)


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    ns = f"bpflb-ut-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        sh(ns, "link", "set", "lo", "up")
        sh(ns, "link", "add", "eth0", "address", ETH0_MAC, "type", "veth", "peer", "name", "wire0")
        sh(ns, "link", "add", "lxc0", "address", LXC_MAC, "type", "veth", "peer", "name", "pod0")
        for dev in ("eth0", "wire0", "lxc0", "pod0"):
            sh(ns, "link", "set", dev, "up")
        sh(ns, "addr", "add", f"{NODE1}/24", "dev", "eth0")
        sh(ns, "addr", "add", "10.244.1.1/24", "dev", "lxc0")
        sh(ns, "route", "add", "10.244.2.0/24", "via", NODE2)
        sh(ns, "neigh", "add", NODE2, "lladdr", NODE2_MAC, "dev", "eth0", "nud", "permanent")
        sh(ns, "neigh", "add", CLIENT, "lladdr", CLIENT_MAC, "dev", "eth0", "nud", "permanent")
        sh(ns, "neigh", "add", LOCAL_POD, "lladdr", LOCAL_POD_MAC, "dev", "lxc0", "nud", "permanent")
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        with entered(ns):
            import socket
            eth0 = socket.if_nametoindex("eth0")
            lxc0 = socket.if_nametoindex("lxc0")
            obj = load_lb(None)
        try:
            yield Node(ns, obj, LBMaps(obj), eth0, lxc0)
        finally:
            obj.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
