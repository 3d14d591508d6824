"""Programs the maps that hold cluster-wide facts (DSR frontends, this node's backend endpoints, the
cluster's prefixes, the overlay's tunnel endpoints) as differences: only changed keys are written."""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from ipaddress import IPv4Network

from bpflb.datapath.libbpf import ffi
from bpflb.datapath.loader import MapSource
from bpflb.datapath.mapdiff import MapMirror
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


class ClusterMaps:
    """The cluster-wide maps, each a MapMirror written key by key (the LPM tries have no batch operations)."""

    def __init__(self, obj: MapSource) -> None:
        self.dsr_frontends = MapMirror(obj.map("lb_dsr_frontends"), batch=False)
        self.local_backends = MapMirror(obj.map("lb_local_backends"), batch=False)
        self.cidrs = MapMirror(obj.map("lb_cluster_cidrs"), batch=False)
        self.tunnel = MapMirror(obj.map("lb_tunnel_map"), batch=False)

    def sync(self, dsr_frontends: AbstractSet[L4Addr], local_backends: AbstractSet[L4Addr],
             prefixes: AbstractSet[IPv4Network],
             nodes: Sequence[NodeInfo] = ()) -> int:
        """Write the differences; returns how many keys were added, changed or removed.
        nodes feed the tunnel map: every node's pod CIDRs and address -> that node's address."""
        tunnel: dict[bytes, bytes] = {}
        for node in nodes:
            value = bytes(ffi().buffer(ffi().new("struct lb_tunnel_ep *",
                                                 {"node_addr": int.from_bytes(node.addr.packed, "little")})))
            for net in (IPv4Network(node.addr), *node.pod_cidrs):
                tunnel[cidr_key(net)] = value
        return (self.dsr_frontends.sync(dict.fromkeys((l4_key(x) for x in dsr_frontends), _ONE))
                + self.local_backends.sync(dict.fromkeys((l4_key(x) for x in local_backends), _ONE))
                + self.cidrs.sync(dict.fromkeys((cidr_key(x) for x in prefixes), _ONE))
                + self.tunnel.sync(tunnel))
