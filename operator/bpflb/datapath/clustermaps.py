"""Programs the maps that hold cluster-wide facts (DSR frontends and the backends of this node a DSR
request may reach, this node's backend endpoints, the cluster's prefixes, the overlay's tunnel endpoints)
as differences: only changed keys are written, stale ones removed first, and a key the kernel refuses is
named in ClusterMaps.failures (never raised). Given the agent's Facts (model.cluster), which say what
changed since the facts written last, a sync writes only that."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from ipaddress import IPv4Network
from typing import Any

from bpflb.datapath.libbpf import ffi
from bpflb.datapath.loader import MapSource
from bpflb.datapath.mapdiff import Failures, MapMirror
from bpflb.model.cluster import Facts, NodeInfo
from bpflb.model.types import L4Addr

_ONE = b"\x01"
L4_KEY = struct.Struct("=4s2sBx")        # struct lb_l4_key: addr, port (network order), proto, pad
DSR_MEMBER = struct.Struct("=4s4s2s2sB3x")   # struct lb_dsr_member: fe_addr, be_addr, fe_port, be_port, proto


def l4_key(l4: L4Addr) -> bytes:
    return L4_KEY.pack((l4 >> 24).to_bytes(4, "big"), (l4 >> 8 & 0xFFFF).to_bytes(2, "big"), l4 & 0xFF)


def dsr_member_key(fe: L4Addr, be: L4Addr) -> bytes:
    """struct lb_dsr_member: a frontend (address 0 for a NodePort) and a backend of this node."""
    return DSR_MEMBER.pack(fe.addr.packed, be.addr.packed, fe.port.to_bytes(2, "big"), be.port.to_bytes(2, "big"),
                           int(be.proto))


def _member_key(pair: tuple[L4Addr, L4Addr]) -> bytes:
    return dsr_member_key(*pair)


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
        # What the last sync could not write: (map name, the object the key stands for, the kernel's reason).
        self.failures: list[tuple[str, Any, str]] = []
        self._written: dict[str, int] = {}      # the generation of the Facts each map holds, when it holds one
        self._owed: set[str] = set()            # maps a partial sync left stale keys in (removed when complete)

    def capacity(self) -> dict[str, int]:
        return {m.map.name: m.capacity for m in (self.dsr_frontends, self.dsr_backends, self.local_backends,
                                                 self.cidrs, self.tunnel)}

    def sync(self, dsr_frontends: Mapping[L4Addr, int], local_backends: AbstractSet[L4Addr] | Mapping[L4Addr, int],
             prefixes: AbstractSet[IPv4Network], nodes: Sequence[NodeInfo] = (),
             dsr_backends: Iterable[tuple[L4Addr, L4Addr]] = (), partial: bool = False) -> int:
        """Write the differences; returns how many keys were added, changed or removed. partial: the facts
        come from only some of the Services (their first list is still coming in): keys the maps hold beyond
        them stay until a complete sync.
        nodes feed the tunnel map: every node's pod CIDRs and address -> that node's address.
        dsr_backends (bpflb.model.cluster.dsr_backends) are written before the frontends that name them
        and removed after: a frontend never names backends that are not listed yet."""
        tunnel: dict[bytes, bytes] = {}
        tunnel_of: dict[bytes, Any] = {}
        for node in nodes:
            value = bytes(ffi().buffer(ffi().new("struct lb_tunnel_ep *",
                                                 {"node_addr": int.from_bytes(node.addr.packed, "little")})))
            for net in (IPv4Network(node.addr), *node.pod_cidrs):
                tunnel[cidr_key(net)] = value
                tunnel_of[cidr_key(net)] = net
        self.failures = []
        members = dsr_backends if isinstance(dsr_backends, Facts) else dict.fromkeys(dsr_backends, 1)
        local = local_backends if isinstance(local_backends, Mapping) else dict.fromkeys(local_backends, 1)
        plans = [(self.dsr_backends, members, self._plan(self.dsr_backends, members, _member_key, partial)),
                 (self.dsr_frontends, dsr_frontends, self._plan(self.dsr_frontends, dsr_frontends, l4_key, partial)),
                 (self.local_backends, local, self._plan(self.local_backends, local, l4_key, partial))]
        failed: list[Failures] = [[], [], []]
        # DSR members first (a frontend never names backends not listed yet), removed last; the others
        # remove what is stale before adding (room first).
        failed[0] += self.dsr_backends.write(list(plans[0][2][0].items()))
        for i in (1, 2):
            mirror, _want, (adds, gone, _objects) = plans[i]
            failed[i] += mirror.remove(gone) + mirror.write(list(adds.items()))
        total = 0
        for small, of, entries in ((self.cidrs, {cidr_key(x): x for x in prefixes}, None),
                                   (self.tunnel, tunnel_of, tunnel)):
            touched, refused = small.sync(entries if entries is not None else dict.fromkeys(of, _ONE))
            total += touched
            self.failures += [(small.map.name, of[k], why) for k, why in refused]
        failed[0] += self.dsr_backends.remove(plans[0][2][1])
        for (mirror, want, (adds, gone, objects)), refused in zip(plans, failed, strict=True):
            total += len(adds) + len(gone) - len(refused)
            self.failures += [(mirror.map.name, objects.get(k), why) for k, why in refused]
            if not refused and isinstance(want, Facts):
                self._written[mirror.map.name] = want.generation
        return total

    def _plan(self, mirror: MapMirror, want: Mapping[Any, int], key: Callable[[Any], bytes], partial: bool
              ) -> tuple[dict[bytes, bytes], list[bytes], dict[bytes, Any]]:
        """What one map needs (key -> its one-byte value): (to write, to delete, the objects written). Only what
        changed when want is the Facts next to the ones the map holds; else compared with the map (the first
        time, after a refused write, and at the first complete sync after a partial one left keys)."""
        name = mirror.map.name
        written = self._written.pop(name, None)      # not valid again until this sync went through
        if isinstance(want, Facts) and written is not None and want.base == written and \
                (partial or name not in self._owed):
            objects = {key(x): x for x in want.added}
            return {k: bytes([want[x]]) for k, x in objects.items()}, [key(x) for x in want.removed], objects
        objects = {key(x): x for x in want}
        full = {k: bytes([want[x]]) for k, x in objects.items()}
        stale = mirror.stale(full)
        if partial and stale:
            self._owed.add(name)
            stale = []
        elif not partial:
            self._owed.discard(name)
        return dict(mirror.changed(full)), stale, objects
