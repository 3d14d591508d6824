"""Programs the maps that hold cluster-wide facts (DSR frontends, this node's backend endpoints, the
cluster's prefixes, the overlay's tunnel endpoints) as differences: only changed keys are written."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network

from bpflb.datapath.libbpf import ffi
from bpflb.datapath.loader import BpfObject, Map
from bpflb.model.cluster import NodeInfo
from bpflb.model.types import L4Addr

_ONE = b"\x01"


def l4_key(l4: L4Addr) -> bytes:
    key = ffi().new("struct lb_l4_key *", {"addr": int.from_bytes(l4.addr.packed, "little"),
                                            "port": int.from_bytes(l4.port.to_bytes(2, "big"), "little"),
                                            "proto": int(l4.proto)})
    return bytes(ffi().buffer(key))


def cidr_key(net: IPv4Network) -> bytes:
    key = ffi().new("struct lb_cidr_key *", {"prefixlen": net.prefixlen,
                                              "addr": int.from_bytes(net.network_address.packed, "little")})
    return bytes(ffi().buffer(key))


class _KeySet:
    """A map used as a set of keys, mirrored in memory."""

    def __init__(self, m: Map) -> None:
        self.map = m
        self.keys = {k for k, _ in m.items_raw()}

    def sync(self, want: set[bytes]) -> int:
        for k in want - self.keys:
            self.map.update_raw(k, _ONE)
        for k in self.keys - want:
            self.map.delete_raw(k)
        changes = len(want ^ self.keys)
        self.keys = want
        return changes


class _KeyValues:
    """A map of keys to values, mirrored in memory; sync writes only what differs."""

    def __init__(self, m: Map) -> None:
        self.map = m
        self.items = dict(m.items_raw())

    def sync(self, want: dict[bytes, bytes]) -> int:
        changes = 0
        for k, v in want.items():
            if self.items.get(k) != v:
                self.map.update_raw(k, v)
                changes += 1
        for k in set(self.items) - set(want):
            self.map.delete_raw(k)
            changes += 1
        self.items = dict(want)
        return changes


class ClusterMaps:
    def __init__(self, obj: BpfObject) -> None:
        self.dsr_frontends = _KeySet(obj.map("lb_dsr_frontends"))
        self.local_backends = _KeySet(obj.map("lb_local_backends"))
        self.cidrs = _KeySet(obj.map("lb_cluster_cidrs"))
        self.tunnel = _KeyValues(obj.map("lb_tunnel_map"))

    def sync(self, dsr_frontends: set[L4Addr], local_backends: set[L4Addr], prefixes: set[IPv4Network],
             nodes: Sequence[NodeInfo] = ()) -> int:
        """Write the differences; returns how many keys were added, changed or removed.
        nodes feed the tunnel map: every node's pod CIDRs and address -> that node's address."""
        tunnel: dict[bytes, bytes] = {}
        for node in nodes:
            value = bytes(ffi().buffer(ffi().new("struct lb_tunnel_ep *",
                                                 {"node_addr": int.from_bytes(node.addr.packed, "little")})))
            for net in (IPv4Network(node.addr), *node.pod_cidrs):
                tunnel[cidr_key(net)] = value
        return (self.dsr_frontends.sync({l4_key(x) for x in dsr_frontends})
                + self.local_backends.sync({l4_key(x) for x in local_backends})
                + self.cidrs.sync({cidr_key(x) for x in prefixes})
                + self.tunnel.sync(tunnel))
