"""Helpers of the conntrack BPF tests: node settings, fast frames for thousands of flows, reading and
ageing the conntrack entries the datapath wrote (time travel for lifetimes of a minute and more)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

from scapy.layers.inet import IP, TCP, UDP, IPOption
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpflb.datapath.conntrack import CT_ENTRY, Entry, port
from bpflb.datapath.lbmaps import NodeConfig
from bpflb.datapath.libbpf import const
from bpflb.datapath.loader import Map
from bpflb.model.types import Mode, Proto
from bpflb_lab.lab.netns import entered
from tests.bpf.packets import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2_MAC,
    OTHER_NODE,
    REMOTE_POD,
    Node,
)

NS = 1_000_000_000


def configure(node: Node, mode: Mode = Mode.SNAT, **settings: Any) -> NodeConfig:
    """node1's lb_config: the agent's defaults, with the given fields changed."""
    cfg = replace(NodeConfig(mode=mode, snat_addr=IPv4Address(NODE1), ext_ifindex=node.eth0), **settings)
    node.maps.set_config(cfg)
    return cfg


def client_frame(l4: TCP | UDP, payload: bytes = b"", src: str = CLIENT, dst: str = NODE1) -> bytes:
    pkt = Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=src, dst=dst, ttl=64, id=7) / l4
    return bytes(pkt / Raw(payload) if payload else pkt)


def backend_frame(l4: TCP | UDP, dport: int, payload: bytes = b"", src: str = REMOTE_POD) -> bytes:
    """A packet from the remote pod to node1 (a reply to a SNAT'd flow), l4's dport replaced by dport."""
    l4 = l4.copy()
    l4.dport = dport
    pkt = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=src, dst=NODE1, ttl=63, id=9) / l4
    return bytes(pkt / Raw(payload) if payload else pkt)


def _csum_update(check: int, old: int, new: int) -> int:
    """RFC 1624: HC' = ~(~HC + ~m + m')."""
    s = (~check & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def with_sport(frame: bytes, sport: int) -> bytes:
    """The frame (IPv4 without options, TCP or UDP with a checksum) from another source port."""
    b = bytearray(frame)
    old = int.from_bytes(b[34:36], "big")
    b[34:36] = sport.to_bytes(2, "big")
    off = 34 + (16 if b[23] == 6 else 6)
    check = int.from_bytes(b[off:off + 2], "big")
    b[off:off + 2] = _csum_update(check, old, sport).to_bytes(2, "big")
    return bytes(b)


def out_sport(data: bytes) -> int:
    """The source port of an output frame (IPv4 without options)."""
    return int.from_bytes(data[34:36], "big")


@contextmanager
def inside(node: Node) -> Iterator[None]:
    """Stay in node1's namespace for many runs (node.ingress enters it each time)."""
    with entered(node.ns):
        yield


def entries(m: Map) -> dict[bytes, Entry]:
    return {k: Entry(*CT_ENTRY.unpack(v)) for k, v in m.items_raw()}


def the_flow(node: Node, client_port: int) -> tuple[Entry, Entry | None]:
    """The forward entry of the client's flow from client_port, and its reverse entry (if it has one)."""
    fwd = [e for k, e in entries(node.maps.ct_fwd).items() if port(int.from_bytes(k[8:10], "little")) == client_port]
    assert len(fwd) == 1, f"{len(fwd)} forward entries for client port {client_port}"
    rev = [e for e in entries(node.maps.ct_rev).values()
           if e.client_port == fwd[0].client_port and e.client_addr == fwd[0].client_addr
           and e.nat_port == fwd[0].nat_port and e.backend_addr == fwd[0].backend_addr]
    return fwd[0], (rev[0] if rev else None)


def age(node: Node, seconds: float) -> None:
    """Move every conntrack entry's clock back: as if `seconds` had passed without a packet."""
    shift = int(seconds * NS)
    for m in (node.maps.ct_fwd, node.maps.ct_rev):
        for key, raw in list(m.items_raw()):
            value = m.decode_value(raw)
            assert value.last_seen > shift, (
                f"the machine booted {time.monotonic():.0f}s ago: an entry cannot be made {seconds:g}s old")
            value.last_seen -= shift
            m.update(m.decode_key(key), value)


def flag(name: str) -> int:
    return const(name)


def dsr_backend_node(node: Node, balancers: tuple[str, ...]) -> None:
    """node1 as the backend's node of DSR flows: LOCAL_POD:8080 is its pod, the NodePort :30080 its frontend
    on every address in balancers; the cluster maps programmed from the model, as the agent does."""
    from ipaddress import IPv4Network

    from bpflb.model.cluster import dsr_backends, dsr_frontends
    from tests.bpf.packets import LOCAL_POD, backend, fe, state

    local = backend(LOCAL_POD, 8080, local=True)
    desired = state(fe(NODE1, 30080, (local,)))
    configure(node, mode=Mode.DSR)
    node.maps.sync(desired)
    nodes = {IPv4Address(NODE1), *(IPv4Address(b) for b in balancers)}
    node.cluster.sync(dsr_frontends(desired, nodes), {local.l4}, {IPv4Network(f"{n}/32") for n in nodes},
                      dsr_backends=dsr_backends(desired))


# A backend's node where client tuples clash (test_conntrack_clash.py, test_conntrack_icmp.py).

LB_IP = "198.18.1.10"      # a LoadBalancer IP another node balances (DSR), leading to the same pod


def backends_node(node: Node, proto: Proto = Proto.TCP, port: int = 8080) -> None:
    """node1 as the node of LOCAL_POD:port, reached at its NodePorts :30080 and :30180 (node1's own, a
    local backend) and by DSR through OTHER_NODE's NodePort :30080 and LB_IP:80 (balanced elsewhere)."""
    from ipaddress import IPv4Network

    from bpflb.model.cluster import dsr_backends, dsr_frontends
    from tests.bpf.packets import backend, fe, state

    local = backend(LOCAL_POD, port, local=True, proto=proto)
    desired = state(fe(NODE1, 30080, (local,), proto=proto), fe(NODE1, 30180, (local,), proto=proto, local_only=True))
    configure(node, mode=Mode.DSR)
    node.maps.sync(desired)
    nodes = {IPv4Address(NODE1), IPv4Address(OTHER_NODE)}
    node.cluster.sync(dsr_frontends(desired, nodes), {local.l4}, {IPv4Network(f"{n}/32") for n in nodes},
                      dsr_backends=dsr_backends(desired))


def dsr_request(l4: TCP | UDP, fe_addr: str = OTHER_NODE, fe_port: int = 30080, payload: bytes = b"") -> bytes:
    """A DSR request as the balancing node forwards it: to the pod, the frontend in the option."""
    opt = IPOption(b"\x9a\x08" + fe_port.to_bytes(2, "big") + IPv4Address(fe_addr).packed)
    pkt = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63, id=3, options=[opt]) / l4
    return bytes(pkt / Raw(payload) if payload else pkt)


def from_pod(l4: TCP | UDP, payload: bytes = b"") -> bytes:
    """The pod's packet to the client as it leaves node1 (tc egress of the external device)."""
    pkt = Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=63, id=8) / l4
    return bytes(pkt / Raw(payload) if payload else pkt)
