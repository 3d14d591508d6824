"""Programs the maps that hold cluster-wide facts (DSR frontends, this node's backend endpoints, the
cluster's prefixes, the overlay's tunnel endpoints) as differences: only changed keys are written, stale
ones removed first, and a key the kernel refuses is named in ClusterMaps.failures (never raised)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from ipaddress import IPv4Network
from typing import Any

from bpflb.datapath.libbpf import ffi
from bpflb.datapath.loader import MapSource
from bpflb.datapath.mapdiff import Failures, MapMirror
from bpflb.model.cluster import FactSet, NodeInfo
from bpflb.model.types import L4Addr

_ONE = b"\x01"
L4_KEY = struct.Struct("=4s2sBx")        # struct lb_l4_key: addr, port (network order), proto, pad


def l4_key(l4: L4Addr) -> bytes:
    return L4_KEY.pack(l4.addr.packed, l4.port.to_bytes(2, "big"), int(l4.proto))


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
        # What the last sync could not write: (map name, the object the key stands for, the kernel's reason).
        self.failures: list[tuple[str, Any, str]] = []
        self._prev: dict[str, set[L4Addr]] = {}             # the key sets written last, by map
        self._written: dict[str, int] = {}                  # or the generation of the FactSet written last

    def capacity(self) -> dict[str, int]:
        return {m.map.name: m.capacity for m in (self.dsr_frontends, self.local_backends, self.cidrs, self.tunnel)}

    def sync(self, dsr_frontends: AbstractSet[L4Addr], local_backends: AbstractSet[L4Addr],
             prefixes: AbstractSet[IPv4Network],
             nodes: Sequence[NodeInfo] = ()) -> int:
        """Write the differences; returns how many keys were added, changed or removed.
        nodes feed the tunnel map: every node's pod CIDRs and address -> that node's address."""
        tunnel: dict[bytes, bytes] = {}
        tunnel_of: dict[bytes, Any] = {}
        for node in nodes:
            value = bytes(ffi().buffer(ffi().new("struct lb_tunnel_ep *",
                                                 {"node_addr": int.from_bytes(node.addr.packed, "little")})))
            for net in (IPv4Network(node.addr), *node.pod_cidrs):
                tunnel[cidr_key(net)] = value
                tunnel_of[cidr_key(net)] = net
        self.failures = []
        total = self._sync_set(self.dsr_frontends, dsr_frontends) + self._sync_set(self.local_backends,
                                                                                     local_backends)
        for mirror, objects, want in ((self.cidrs, {cidr_key(x): x for x in prefixes}, None),
                                      (self.tunnel, tunnel_of, tunnel)):
            touched, failed = mirror.sync(want if want is not None else dict.fromkeys(objects, _ONE))
            total += touched
            self.failures += [(mirror.map.name, objects[k], why) for k, why in failed]
        return total

    def _sync_set(self, mirror: MapMirror, want: AbstractSet[L4Addr]) -> int:
        """A map of address:port/protocol keys: compared with the map the first time (and after a refused
        write); then only what changed, as the FactSet says (model.cluster) or as a set difference from the keys
        written last."""
        name = mirror.map.name
        prev = self._prev.pop(name, None)
        written = self._written.pop(name, None)
        gone: AbstractSet[L4Addr]
        came: AbstractSet[L4Addr]
        if isinstance(want, FactSet) and written is not None and want.base == written:
            gone, came = want.removed, want.added
        elif prev is not None:
            gone, came = prev - want, want - prev
        else:
            objects = {l4_key(x): x for x in want}
            touched, failed = mirror.sync(dict.fromkeys(objects, _ONE))
            self._done(name, want, objects, failed)
            return touched
        failed = mirror.remove([l4_key(x) for x in gone])
        objects = {l4_key(x): x for x in came}
        failed += mirror.write([(k, _ONE) for k in objects])
        self._done(name, want, objects, failed)
        return len(gone) + len(came) - len(failed)

    def _done(self, name: str, want: AbstractSet[L4Addr], objects: dict[bytes, L4Addr], failed: Failures) -> None:
        """Remember what was written, unless the kernel refused something: then compare with the map next time."""
        self.failures += [(name, objects.get(k), why) for k, why in failed]
        if failed:
            return
        if isinstance(want, FactSet):
            self._written[name] = want.generation
        else:
            self._prev[name] = set(want)
