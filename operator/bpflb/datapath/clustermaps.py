"""Programs the maps that hold cluster-wide facts (DSR frontends and the backends of this node a DSR
request may reach, this node's backend endpoints, the cluster's prefixes, the overlay's tunnel endpoints)
as differences: only changed keys are written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Network

from bpflb.datapath.libbpf import ffi
from bpflb.datapath.loader import BpfObject, Map
from bpflb.model.cluster import DsrFrontendKind, NodeInfo
from bpflb.model.types import L4Addr

_ONE = b"\x01"


def l4_key(l4: L4Addr) -> bytes:
    key = ffi().new("struct lb_l4_key *", {"addr": int.from_bytes(l4.addr.packed, "little"),
                                            "port": int.from_bytes(l4.port.to_bytes(2, "big"), "little"),
                                            "proto": int(l4.proto)})
    return bytes(ffi().buffer(key))


def dsr_member_key(fe: L4Addr, be: L4Addr) -> bytes:
    """struct lb_dsr_member: a frontend (address 0 for a NodePort) and a backend of this node."""
    key = ffi().new("struct lb_dsr_member *", {
        "fe_addr": int.from_bytes(fe.addr.packed, "little"), "be_addr": int.from_bytes(be.addr.packed, "little"),
        "fe_port": int.from_bytes(fe.port.to_bytes(2, "big"), "little"),
        "be_port": int.from_bytes(be.port.to_bytes(2, "big"), "little"), "proto": int(be.proto)})
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

    def add(self, want: set[bytes]) -> int:
        """Write the keys of want that are missing, removing nothing (the first half of a sync)."""
        new = want - self.keys
        for k in new:
            self.map.update_raw(k, _ONE)
        self.keys = self.keys | new
        return len(new)


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
        self.dsr_frontends = _KeyValues(obj.map("lb_dsr_frontends"))
        self.dsr_backends = _KeySet(obj.map("lb_dsr_backends"))
        self.local_backends = _KeySet(obj.map("lb_local_backends"))
        self.cidrs = _KeySet(obj.map("lb_cluster_cidrs"))
        self.tunnel = _KeyValues(obj.map("lb_tunnel_map"))

    def sync(self, dsr_frontends: Mapping[L4Addr, DsrFrontendKind], local_backends: set[L4Addr],
             prefixes: set[IPv4Network], nodes: Sequence[NodeInfo] = (),
             dsr_backends: Iterable[tuple[L4Addr, L4Addr]] = ()) -> int:
        """Write the differences; returns how many keys were added, changed or removed.
        nodes feed the tunnel map: every node's pod CIDRs and address -> that node's address.
        dsr_backends (bpflb.model.cluster.dsr_backends) are written before the frontends that name them
        and removed after: a frontend never names backends that are not listed yet."""
        tunnel: dict[bytes, bytes] = {}
        for node in nodes:
            value = bytes(ffi().buffer(ffi().new("struct lb_tunnel_ep *",
                                                 {"node_addr": int.from_bytes(node.addr.packed, "little")})))
            for net in (IPv4Network(node.addr), *node.pod_cidrs):
                tunnel[cidr_key(net)] = value
        members = {dsr_member_key(fe, be) for fe, be in dsr_backends}
        added = self.dsr_backends.add(members)
        changes = (self.dsr_frontends.sync({l4_key(x): bytes([int(kind)]) for x, kind in dsr_frontends.items()})
                   + self.local_backends.sync({l4_key(x) for x in local_backends})
                   + self.cidrs.sync({cidr_key(x) for x in prefixes})
                   + self.tunnel.sync(tunnel))
        return added + self.dsr_backends.sync(members) + changes
