"""Packet builders and the datapath handles of the BPF tests, the one home of them (fixtures are in
conftest.py): node1's addresses (the scratch namespace's), frontends and states to program, frames in, the
whole-frame comparison with checksums, and waits on conditions (the datapath's own state, such as entry ages)
instead of sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.loader import BpfObject, Map, TestRun
from bpflb.model.types import Backend, DesiredState, Frontend, FrontendKind, L4Addr, Mode, Proto
from bpflb_lab.lab.netns import entered
from bpflb_lab.scratch import (
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
)

# The public names, node1's addresses from bpflb_lab.scratch among them (re-exported for the tests).
__all__ = ["CLIENT", "CLIENT_MAC", "ETH0_MAC", "LOCAL", "LOCAL_POD", "LOCAL_POD_MAC", "LXC_MAC", "NODE1", "NODE2",
           "NODE2_MAC", "OTHER_NODE", "REMOTE", "REMOTE_POD", "SENDERS", "Node", "XdpNode", "assert_frame", "backend",
           "dsr_option", "fe", "frame_in", "l4", "one_port", "recomputed", "state", "wait_for", "wait_idle"]


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


@dataclass
class XdpNode(Node):
    """node1 with the XDP object loaded too, sharing every map with the tc object."""

    xdp_obj: BpfObject | None = None

    def xdp(self, frame: bytes) -> TestRun:
        assert self.xdp_obj is not None
        with entered(self.ns):
            return self.xdp_obj.test_run_xdp("xdp_lb_prog", frame, ifindex=self.eth0)


def l4(addr: str, port: int, proto: Proto = Proto.TCP) -> L4Addr:
    return L4Addr(IPv4Address(addr), port, proto)


def backend(addr: str, port: int, *, local: bool, proto: Proto = Proto.TCP, name: str = "") -> Backend:
    return Backend(l4(addr, port, proto), name or addr, "node1" if local else "node2", local)


def fe(addr: str, port: int, backends: tuple[Backend, ...], *, proto: Proto = Proto.TCP,
       kind: FrontendKind = FrontendKind.NODEPORT, local_only: bool = False,
       no_endpoints: bool = False) -> Frontend:
    return Frontend(l4(addr, port, proto), kind, "default/echo", "", local_only, backends, no_endpoints)


def state(*frontends: Frontend) -> DesiredState:
    return DesiredState("node1", (IPv4Address(NODE1),), {f.l4: f for f in frontends})


REMOTE = backend(REMOTE_POD, 8080, local=False)
LOCAL = backend(LOCAL_POD, 8080, local=True)
OTHER_NODE = "198.18.0.13"          # the node a DSR request entered through, seen from a backend's node


# Senders no answer of the datapath (ICMP error, RST) may go to, as node1 sees them: its own addresses and
# subnet broadcasts are in its local routing table, and it has no default route.
SENDERS = {
    "this network (0/8)": "0.0.0.0",
    "0/8, not zero": "0.1.2.3",
    "loopback": "127.0.0.1",
    "multicast": "224.0.0.1",
    "multicast, admin scope": "239.1.2.3",
    "class E": "240.0.0.1",
    "limited broadcast": "255.255.255.255",
    "the node's own address": NODE1,
    "the node's other address": "10.244.1.1",
    "the subnet broadcast of the node's network": "198.18.0.255",
    "the subnet broadcast of the pod network": "10.244.1.255",
    "a sender with no route back": "203.0.113.5",
}


def frame_in(l4hdr: TCP | UDP, dst: str = NODE1, src: str = CLIENT, payload: bytes = b"", **ip: Any) -> bytes:
    """A client's frame to node1 through eth0; ip: more IP header fields (scapy's, typed Any as its own)."""
    pkt = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=src, dst=dst, ttl=64, id=7, **ip) / l4hdr
    if payload:
        pkt = pkt / Raw(payload)
    return bytes(pkt)


def recomputed(frame: bytes) -> bytes:
    """The frame with every IPv4/TCP/UDP/ICMP checksum recomputed by scapy."""
    pkt = Ether(frame)
    for layer in (IP, TCP, UDP, ICMP):
        if pkt.haslayer(layer):
            if layer is UDP and pkt[UDP].chksum == 0:
                continue
            del pkt[layer].chksum
    return bytes(Ether(bytes(pkt)))


# A frame tc redirects leaves the program with the MACs it arrived with: bpf_redirect_neigh's neighbour
# output writes the next hop's (fib.h).  Generated ICMP errors carry the arrival MACs swapped.
def assert_frame(out: bytes, expected: bytes) -> None:
    """Whole-frame equality, with a readable diff, and checksums that scapy agrees with."""
    if out != expected:
        pytest.fail(f"output frame differs\n got:      {Ether(out)!r}\n expected: {Ether(expected)!r}")
    assert recomputed(out) == out, "checksums in the output frame are wrong"


def dsr_option(addr: str, port: int) -> IPOption:
    return IPOption(b"\x9a\x08" + port.to_bytes(2, "big") + IPv4Address(addr).packed)


def one_port(node: Node, closing_timeout: int = 10, *, udp_timeout: int = 60, tcp_timeout: int = 21600,
             proto: Proto = Proto.TCP) -> None:
    """node1 in SNAT with a single NAT port (61000) and these lifetimes, one frontend :30080 to REMOTE."""
    node.maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=node.eth0,
                                    nat_port_min=61000, nat_port_max=61000, closing_timeout=closing_timeout,
                                    udp_timeout=udp_timeout, tcp_timeout=tcp_timeout))
    remote = backend(REMOTE_POD, 8080, local=False, proto=proto)
    node.maps.sync(state(fe(NODE1, 30080, (remote,), proto=proto)))


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0, step: Callable[[], None] | None = None) -> None:
    """Poll check() until it is true, calling step() between two polls (what makes the condition come, e.g.
    a datagram sent); fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        if step is not None:
            step()
        time.sleep(0.02)


def wait_idle(m: Map, stamp: str, seconds: float, timeout: float = 30.0) -> None:
    """Wait until every entry of m was last used (its `stamp` field, bpf_ktime_get_ns(), the clock Python's
    time.monotonic_ns reads) more than `seconds` ago: the datapath's own condition for expiry."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic_ns()
        ages = [now - int(getattr(m.decode_value(v), stamp)) for _, v in m.items_raw()]
        if all(age > seconds * 1e9 for age in ages):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"entries of {m.name} still younger than {seconds}s after {timeout:.0f}s: {ages}")
        time.sleep(0.02)
