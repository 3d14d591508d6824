"""Programs the maps that hold cluster-wide facts (DSR frontends, this node's backend endpoints, the
cluster's prefixes) as set differences: only added and removed keys are written."""

from __future__ import annotations

from ipaddress import IPv4Network

from bpflb.datapath.libbpf import ffi
from bpflb.datapath.loader import BpfObject, Map
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


class ClusterMaps:
    def __init__(self, obj: BpfObject) -> None:
        self.dsr_frontends = _KeySet(obj.map("lb_dsr_frontends"))
        self.local_backends = _KeySet(obj.map("lb_local_backends"))
        self.cidrs = _KeySet(obj.map("lb_cluster_cidrs"))

    def sync(self, dsr_frontends: set[L4Addr], local_backends: set[L4Addr], prefixes: set[IPv4Network]) -> int:
        """Write the differences; returns how many keys were added or removed."""
        return (self.dsr_frontends.sync({l4_key(x) for x in dsr_frontends})
                + self.local_backends.sync({l4_key(x) for x in local_backends})
                + self.cidrs.sync({cidr_key(x) for x in prefixes}))
