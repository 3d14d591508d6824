"""Programs the maps that hold cluster-wide facts (DSR frontends and the backends of this node a DSR
request may reach, this node's backend endpoints, the cluster's prefixes, the overlay's tunnel endpoints)
as differences: only changed keys are written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from ipaddress import IPv4Network

from bpflb.datapath.libbpf import ffi
from bpflb.datapath.loader import MapSource
from bpflb.datapath.mapdiff import MapMirror
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


class ClusterMaps:
    """The cluster-wide maps, each a MapMirror; the small ones written key by key (the LPM tries have no batch
    operations), lb_dsr_backends (frontends x this node's backends) in batches."""

    def __init__(self, obj: MapSource) -> None:
        self.dsr_frontends = MapMirror(obj.map("lb_dsr_frontends"), batch=False)
        self.dsr_backends = MapMirror(obj.map("lb_dsr_backends"))
        self.local_backends = MapMirror(obj.map("lb_local_backends"), batch=False)
        self.cidrs = MapMirror(obj.map("lb_cluster_cidrs"), batch=False)
        self.tunnel = MapMirror(obj.map("lb_tunnel_map"), batch=False)

    def sync(self, dsr_frontends: Mapping[L4Addr, DsrFrontendKind], local_backends: AbstractSet[L4Addr],
             prefixes: AbstractSet[IPv4Network], nodes: Sequence[NodeInfo] = (),
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
        members = dict.fromkeys((dsr_member_key(fe, be) for fe, be in dsr_backends), _ONE)
        changes = self.dsr_backends.write(self.dsr_backends.changed(members))
        changes += (self.dsr_frontends.sync({l4_key(x): bytes([int(kind)]) for x, kind in dsr_frontends.items()})
                    + self.local_backends.sync(dict.fromkeys((l4_key(x) for x in local_backends), _ONE))
                    + self.cidrs.sync(dict.fromkeys((cidr_key(x) for x in prefixes), _ONE))
                    + self.tunnel.sync(tunnel))
        return changes + self.dsr_backends.remove(self.dsr_backends.stale(members))
