"""Fixtures for BPF unit tests: the real bpf_lb.o loaded in a scratch namespace that looks like
node1 (routes and neighbours for its FIB lookups), its maps programmed by the agent's own code."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.loader import BpfObject, TestRun, load_lb, load_xdp
from bpflb.model.types import DesiredState, Mode
from bpflb_lab.lab.netns import entered
from bpflb_lab.scratch import (  # noqa: F401  (re-exported for the tests)
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    LOCAL_POD_MAC,
    LXC_MAC,
    NODE1,
    NODE2,
    NODE2_MAC,
    REMOTE_POD,
    scratch_node,
)


@dataclass
class Node:
    """node1's datapath: run frames through its programs inside its namespace."""

    ns: str
    obj: BpfObject
    maps: LBMaps
    eth0: int
    lxc0: int

    @property
    def cluster(self) -> ClusterMaps:
        return ClusterMaps(self.obj)

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
def node() -> Iterator[Node]:
    with scratch_node() as sn:
        obj = load_lb(None)
        try:
            yield Node(sn.ns, obj, LBMaps(obj), sn.eth0, sn.lxc0)
        finally:
            obj.close()


@dataclass
class XdpNode(Node):
    """node1 with the XDP object loaded too, sharing every map with the tc object."""

    xdp_obj: BpfObject | None = None

    def xdp(self, frame: bytes) -> TestRun:
        assert self.xdp_obj is not None
        with entered(self.ns):
            return self.xdp_obj.test_run_xdp("xdp_lb_prog", frame, ifindex=self.eth0)


@pytest.fixture
def xnode() -> Iterator[XdpNode]:
    with scratch_node() as sn:
        obj = load_lb(None)
        xdp = load_xdp(None, share_with=obj)
        try:
            yield XdpNode(sn.ns, obj, LBMaps(obj), sn.eth0, sn.lxc0, xdp)
        finally:
            xdp.close()
            obj.close()
