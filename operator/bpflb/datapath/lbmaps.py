"""Programs a node's load-balancer maps from the model's DesiredState, as a diff of map entries.

Entries are compared as the exact bytes the kernel holds, so a sync writes only what changed
and never flushes: live flows keep their backends.  Ids of services and backends are recovered
from the pinned maps, so an agent restart picks up where the last one left off.  Maglev tables
(lb_maglev) are built per frontend from its backends' names, cached by those names, and written
in blocks with batch updates; frontends with session affinity list their eligible backends in
lb_affinity_members; frontends with enforced loadBalancerSourceRanges have their prefixes in lb_src_ranges."""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from bpflb.datapath.clustermaps import l4_key
from bpflb.datapath.libbpf import const, ffi, lib, stat_names
from bpflb.datapath.loader import Map, MapSource
from bpflb.datapath.mapdiff import MapMirror
from bpflb.model import maglev
from bpflb.model.types import (
    NAT_PORT_RANGE_DEFAULT,
    Algorithm,
    Backend,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    Mode,
    Proto,
)

log = logging.getLogger(__name__)

# The SNAT port range without a setting (NAT_PORT_{MIN,MAX}_DEFAULT of lb_structs.h, Cilium's range):
# 32,768 ports per (node, backend address, backend port, protocol).
NAT_PORT_MIN_DEFAULT, NAT_PORT_MAX_DEFAULT = NAT_PORT_RANGE_DEFAULT

_KIND_FLAG = {
    FrontendKind.NODEPORT: "LB_SVC_F_NODEPORT",
    FrontendKind.LOADBALANCER: "LB_SVC_F_LOADBALANCER",
    FrontendKind.EXTERNAL_IP: "LB_SVC_F_EXTERNAL_IP",
    FrontendKind.CLUSTER_IP: "LB_SVC_F_CLUSTER_IP",
}


@dataclass(frozen=True)
class NodeConfig:
    """The per-node runtime settings written to the lb_config map."""

    mode: Mode
    snat_addr: IPv4Address
    ext_ifindex: int
    nat_port_min: int = NAT_PORT_MIN_DEFAULT
    nat_port_max: int = NAT_PORT_MAX_DEFAULT
    tcp_timeout: int = 21600      # established TCP (nf_conntrack, Cilium: 6 h)
    udp_timeout: int = 60         # UDP, refreshed by either direction
    closing_timeout: int = 10     # after FIN from both sides
    tunnel_mode: int = 0          # TUNNEL_* of lb_structs.h
    tunnel_vni: int = 1
    syn_timeout: int = 60         # a TCP handshake that never completed: state and SNAT port at most this long


@dataclass
class SyncReport:
    """What one sync changed, for the agent's log."""

    backends_written: int = 0
    backends_removed: int = 0
    slots_written: int = 0
    slots_removed: int = 0
    frontends_added: int = 0
    frontends_removed: int = 0
    config_changed: bool = False
    maglev_tables_built: int = 0      # tables computed (not found in the cache of this agent)
    maglev_blocks_written: int = 0
    maglev_blocks_removed: int = 0
    maglev_config_changed: bool = False
    affinity_members_written: int = 0
    affinity_members_removed: int = 0
    source_ranges_written: int = 0
    source_ranges_removed: int = 0
    problems: list[str] = field(default_factory=list)     # what could not be programmed as asked (said once)
    internal_views_changed: int = 0   # lb_internal_view entries written or removed

    @property
    def changed(self) -> bool:
        return bool(self.backends_written or self.backends_removed or self.slots_written
                    or self.slots_removed or self.config_changed or self.maglev_blocks_written
                    or self.maglev_blocks_removed or self.maglev_config_changed
                    or self.affinity_members_written or self.affinity_members_removed
                    or self.source_ranges_written or self.source_ranges_removed
                    or self.internal_views_changed)


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _be32(addr: IPv4Address) -> int:
    return int.from_bytes(addr.packed, "little")


def _from_be32(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, "little"))


def _from_be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


# The three structs written by the hundred thousand, packed with precompiled layouts rather than a cffi
# allocation each (the agent's full-sync hot path).  tests/bpf/test_layout.py holds them to cffi's view
# of lb_structs.h, which the same test holds to the compiled object's BTF.  Addresses and ports go in
# network order, the rest in host order, exactly as the C structs lay them out.
SVC_KEY = struct.Struct("=4s2sHB3x")       # struct lb_svc_key: addr, port, slot, proto, pad
SVC_VAL = struct.Struct("=IHHIB3x")        # struct lb_svc_val: id, count, flags, affinity_timeout, algorithm
BACKEND = struct.Struct("=4s2sBB")         # struct lb_backend: addr, port, proto, flags


def svc_key(l4: L4Addr, slot: int) -> bytes:
    return SVC_KEY.pack(l4.addr.packed, l4.port.to_bytes(2, "big"), slot, int(l4.proto))


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def src_range_key(svc_id: int, net: IPv4Network) -> bytes:
    """struct lb_src_range_key: the LPM prefix length counts the 32 bits of the service id first."""
    return (32 + net.prefixlen).to_bytes(4, "little") + _u32(svc_id) + net.network_address.packed


def _pair(a: int, b: int) -> bytes:
    """Two host-order __u32 (struct lb_maglev_key, struct lb_affinity_member)."""
    return a.to_bytes(4, "little") + b.to_bytes(4, "little")


_NOT_IN_CLUSTER = bytes(8)           # an all-zero struct lb_l4_key (checked in tests/bpf/test_clusterip_tc.py)
_BLOCK = 8192                        # LB_MAGLEV_BLOCK (checked against the header in LBMaps.__init__)
_BLOCK_BYTES = 2 * _BLOCK
_MEMBER = _u32(1)
_TableKey = tuple[tuple[str, ...], int, int]


def maglev_names(backends: tuple[Backend, ...]) -> tuple[str, ...]:
    """The names a frontend's Maglev table is built from, in slot order: the backend's stable name (so a
    pod that comes back with a new address keeps its entries), its address added where a name repeats."""
    names = [b.name for b in backends]
    if len(set(names)) == len(names):
        return tuple(names)
    repeated = {n for n in names if names.count(n) > 1}
    return tuple(f"{b.name}@{b.l4}" if b.name in repeated else b.name for b in backends)


def table_blocks(slots: bytes) -> tuple[bytes, ...]:
    """A table of 16-bit slot numbers cut into lb_maglev values (the last one zero-padded)."""
    return tuple(slots[i:i + _BLOCK_BYTES].ljust(_BLOCK_BYTES, b"\0") for i in range(0, len(slots), _BLOCK_BYTES))


def update_batch(m: Map, items: list[tuple[bytes, bytes]]) -> None:
    """Write many entries in one batch call (Map.update_many)."""
    m.update_many(items)


def delete_batch(m: Map, keys: list[bytes]) -> None:
    """Delete many entries in one batch call (Map.delete_many); keys already gone are no error."""
    m.delete_many(keys)


class IdPool:
    """Ids for frontends or backends: recovered from the maps, never reused while recorded."""

    def __init__(self) -> None:
        self._ids: dict[L4Addr, int] = {}
        self._next = 1

    def record(self, l4: L4Addr, ident: int) -> None:
        self._ids[l4] = ident
        self._next = max(self._next, ident + 1)

    def get(self, l4: L4Addr) -> int:
        """The id of l4, allocating the next one for a newcomer."""
        ident = self._ids.get(l4)
        if ident is None:
            ident = self._next
            self._next += 1
            self._ids[l4] = ident
        return ident

    def known(self, l4: L4Addr) -> int | None:
        return self._ids.get(l4)

    def forget(self, l4: L4Addr) -> None:
        self._ids.pop(l4, None)

    def __len__(self) -> int:
        return len(self._ids)


class LBMaps:
    """The load-balancer maps of one node and the ids recorded in them."""

    def __init__(self, obj: MapSource) -> None:
        self.services: Map = obj.map("lb_services")
        self.backends: Map = obj.map("lb_backends")
        self.config: Map = obj.map("lb_config")
        self.stats_map: Map = obj.map("lb_stats")
        self.ct_fwd: Map = obj.map("ct_fwd")
        self.ct_rev: Map = obj.map("ct_rev")
        self.maglev: Map = obj.map("lb_maglev")
        self.maglev_cfg: Map = obj.map("lb_maglev_cfg")
        self.affinity: Map = obj.map("lb_affinity")
        self.affinity_members: Map = obj.map("lb_affinity_members")
        self.src_ranges: Map = obj.map("lb_src_ranges")
        self.internal_view: Map = obj.map("lb_internal_view")
        self.icmp_rl: Map = obj.map("lb_icmp_rl")
        if const("LB_MAGLEV_BLOCK") != _BLOCK or self.maglev.value_size != _BLOCK_BYTES:
            raise ValueError(f"lb_structs.h LB_MAGLEV_BLOCK is {const('LB_MAGLEV_BLOCK')}; lbmaps expects {_BLOCK}")
        self._svc_m, self._be_m = MapMirror(self.services), MapMirror(self.backends)
        self._mg_m = MapMirror(self.maglev, batch=False)      # 16 KiB blocks: batching saves nothing measurable
        self._am_m = MapMirror(self.affinity_members)
        self._sr_m = MapMirror(self.src_ranges, batch=False)      # an LPM trie: no batch operations
        self._svc, self._be, self._mg, self._am = (self._svc_m.entries, self._be_m.entries, self._mg_m.entries,
                                                   self._am_m.entries)
        self._iv_m = MapMirror(self.internal_view)
        self._tables: dict[_TableKey, tuple[bytes, ...]] = {}
        self._be_ids = IdPool()
        for k, v in self._be.items():
            be = self.backends.decode_value(v)
            l4 = L4Addr(_from_be32(be.addr), _from_be16(be.port), Proto(be.proto))
            self._be_ids.record(l4, int.from_bytes(k, "little"))
        self._svc_ids = IdPool()
        for k, v in self._svc.items():
            key = self.services.decode_key(k)
            if key.slot == 0:
                l4 = L4Addr(_from_be32(key.addr), _from_be16(key.port), Proto(key.proto))
                self._svc_ids.record(l4, self.services.decode_value(v).id)
        if self._svc or self._be:
            log.info("recovered %d frontends and %d backends from pinned maps",
                     len(self._svc_ids), len(self._be_ids))

    # -- ids ---------------------------------------------------------------------------------
    def _backend_id(self, l4: L4Addr) -> int:
        return self._be_ids.get(l4)

    def _service_id(self, l4: L4Addr) -> int:
        return self._svc_ids.get(l4)

    def backend_id(self, l4: L4Addr) -> int | None:
        return self._be_ids.known(l4)

    # -- encoding ----------------------------------------------------------------------------
    def _frontend_entries(self, fe: Frontend, out: dict[bytes, bytes], closed: bool = False) -> None:
        """closed: the frontend's source ranges did not fit lb_src_ranges; it admits nobody until they do."""
        flags = const(_KIND_FLAG[fe.kind])
        if fe.local_only:
            flags |= const("LB_SVC_F_LOCAL")
        if fe.no_endpoints:
            flags |= const("LB_SVC_F_NO_ENDPOINTS")
        if fe.source_ranges is not None:
            flags |= const("LB_SVC_F_SRC_RANGE")
            if fe.source_ranges_deny and not closed:
                flags |= const("LB_SVC_F_SRC_RANGE_DENY")
        addr, port, proto = fe.l4.addr.packed, fe.l4.port.to_bytes(2, "big"), int(fe.l4.proto)
        key, val = SVC_KEY.pack, SVC_VAL.pack
        for slot, be in enumerate(fe.backends, start=1):
            out[key(addr, port, slot, proto)] = val(self._backend_id(be.l4), 0, 0, 0, 0)
        out[key(addr, port, 0, proto)] = val(self._service_id(fe.l4), len(fe.backends), flags,
                                             fe.affinity_timeout, int(fe.algorithm))

    def _backend_entries(self, state: DesiredState) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        local_flag = const("LB_BE_F_LOCAL")
        for fe in state.frontends.values():
            for be in fe.backends + fe.draining:      # draining: in no slot, but open flows find them
                bid = self._backend_id(be.l4)
                out[_u32(bid)] = BACKEND.pack(be.l4.addr.packed, be.l4.port.to_bytes(2, "big"), int(be.l4.proto),
                                              local_flag if be.local else 0)
        return out

    def _selection_entries(self, state: DesiredState, report: SyncReport
                           ) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        """The Maglev table blocks and the affinity members the state's frontends need."""
        want_mg: dict[bytes, bytes] = {}
        want_am: dict[bytes, bytes] = {}
        used: dict[_TableKey, tuple[bytes, ...]] = {}
        m, seed = state.settings.maglev_table_size, state.settings.maglev_seed
        for fe in state.frontends.values():
            if not fe.backends:
                continue
            sid = self._service_id(fe.l4)
            if fe.algorithm == Algorithm.MAGLEV:
                key = (maglev_names(fe.backends), m, seed)
                blocks = used.get(key) or self._tables.get(key)
                if blocks is None:
                    blocks = table_blocks(maglev.build_slots(key[0], m, seed).tobytes())
                    report.maglev_tables_built += 1
                used[key] = blocks
                for i, block in enumerate(blocks):
                    want_mg[_pair(sid, i)] = block
            if fe.affinity_timeout:
                for be in fe.backends:
                    want_am[_pair(sid, self._backend_id(be.l4))] = _MEMBER
        self._tables = used          # the cache keeps exactly what is programmed
        return want_mg, want_am

    def _source_range_entries(self, state: DesiredState, report: SyncReport) -> tuple[dict[bytes, bytes], set[L4Addr]]:
        """The lb_src_ranges entries of the frontends with enforced source ranges, and the frontends whose
        prefixes no longer fit (LB_SRC_RANGES_MAX in all): those fail closed, admitting no client, and are
        reported; they recover once entries are freed."""
        limit = const("LB_SRC_RANGES_MAX")
        want: dict[bytes, bytes] = {}
        closed: set[L4Addr] = set()
        for fe in state.frontends.values():
            if not fe.source_ranges:
                continue
            if len(want) + len(fe.source_ranges) > limit:
                closed.add(fe.l4)
                report.problems.append(
                    f"Service {fe.service}: spec.loadBalancerSourceRanges: lb_src_ranges is full ({limit} prefixes "
                    f"in all); {fe.kind.value} {fe.l4} admits no client until prefixes of other Services are freed")
                continue
            sid = self._service_id(fe.l4)
            for net in fe.source_ranges:
                want[src_range_key(sid, net)] = b"\x01"
        return want, closed

    def _set_maglev_config(self, m: int, seed: int) -> bool:
        zero = ffi().new("__u32 *", 0)
        want = ffi().new("struct lb_maglev_config *", {"table_size": m, "hash_seed": seed})
        current = self.maglev_cfg.lookup(zero)
        if current is not None and bytes(ffi().buffer(current)) == bytes(ffi().buffer(want)):
            return False
        self.maglev_cfg.update(zero, want)
        return True

    # -- sync --------------------------------------------------------------------------------
    def sync(self, state: DesiredState) -> SyncReport:
        """Make the maps hold exactly the state's frontends and backends; write only differences."""
        report = SyncReport()
        want_be = self._backend_entries(state)
        want_sr, closed = self._source_range_entries(state, report)
        want_svc: dict[bytes, bytes] = {}
        masters: list[bytes] = []
        for fe in state.frontends.values():
            self._frontend_entries(fe, want_svc, fe.l4 in closed)
            masters.append(svc_key(fe.l4, 0))
            if svc_key(fe.l4, 0) not in self._svc:
                report.frontends_added += 1
        want_mg, want_am = self._selection_entries(state, report)
        # Every phase is one batch call (one syscall for many small entries); the phases keep the order
        # that makes every intermediate state valid for the datapath.
        # 1. backends first: a slot must never name a backend the datapath cannot find.
        report.backends_written = self._be_m.write(self._be_m.changed(want_be))
        # 2. backend slots before their master entry, so a grown count never points past them.
        master_set = set(masters)
        slots = self._svc_m.changed(want_svc, [k for k in want_svc if k not in master_set])
        self._svc_m.write(slots)
        # 2b. Maglev tables and affinity members name slots and backends that now exist; the table size
        # and seed follow the tables (an entry read with the other size is still a slot of the frontend).
        report.maglev_blocks_written = self._mg_m.write(self._mg_m.changed(want_mg))
        report.affinity_members_written = self._am_m.write(self._am_m.changed(want_am))
        # A frontend's prefixes exist before its master says to check them (a new allow list never drops
        # clients it admits); prefixes it no longer has go only after the master changed (step 5).
        report.source_ranges_written = self._sr_m.write(self._sr_m.changed(want_sr))
        report.maglev_config_changed = self._set_maglev_config(state.settings.maglev_table_size,
                                                               state.settings.maglev_seed)
        # 3. masters last: a frontend appears, grows, or switches algorithm or affinity only now.
        report.slots_written = len(slots) + self._svc_m.write(self._svc_m.changed(want_svc, masters))
        # 3b. internal views of external frontends (in-cluster clients): they name ClusterIP frontends, which
        # the datapath looks up itself (a view whose frontend is missing is not used); all zeros: not served
        # to in-cluster clients (east_west.h).
        want_iv: dict[bytes, bytes] = {}
        for fe in state.frontends.values():
            if not fe.in_cluster:
                want_iv[l4_key(fe.l4)] = _NOT_IN_CLUSTER
            elif fe.internal is not None:
                want_iv[l4_key(fe.l4)] = l4_key(fe.internal)
        report.internal_views_changed = self._iv_m.sync(want_iv)
        # 4. stale entries: masters before slots (a shrunk count stops using them first).
        stale_masters: list[bytes] = []
        stale_slots: list[bytes] = []
        for k in self._svc_m.stale(want_svc):
            key = self.services.decode_key(k)
            (stale_masters if key.slot == 0 else stale_slots).append(k)
            if key.slot == 0:
                self._svc_ids.forget(L4Addr(_from_be32(key.addr), _from_be16(key.port), Proto(key.proto)))
        for stale in (stale_masters, stale_slots):
            self._svc_m.remove(stale)
        report.frontends_removed = len(stale_masters)
        report.slots_removed = len(stale_masters) + len(stale_slots)
        # 5. tables and members of frontends gone, shrunk or switched off (their master no longer uses them).
        report.maglev_blocks_removed = self._mg_m.remove(self._mg_m.stale(want_mg))
        report.affinity_members_removed = self._am_m.remove(self._am_m.stale(want_am))
        report.source_ranges_removed = self._sr_m.remove(self._sr_m.stale(want_sr))
        # 6. backends nobody references any more; their flows are steered away on next packet.
        stale_be = self._be_m.stale(want_be)
        for k in stale_be:
            be = self.backends.decode_value(self._be[k])
            self._be_ids.forget(L4Addr(_from_be32(be.addr), _from_be16(be.port), Proto(be.proto)))
        report.backends_removed = self._be_m.remove(stale_be)
        return report

    def set_config(self, cfg: NodeConfig) -> bool:
        """Write the node's runtime settings; True when they changed."""
        zero = ffi().new("__u32 *", 0)
        current = self.config.lookup(zero)
        want = ffi().new("struct lb_config *", {
            "mode": int(cfg.mode), "snat_addr": _be32(cfg.snat_addr), "nat_port_min": cfg.nat_port_min,
            "nat_port_max": cfg.nat_port_max, "ext_ifindex": cfg.ext_ifindex, "tcp_timeout": cfg.tcp_timeout,
            "udp_timeout": cfg.udp_timeout, "closing_timeout": cfg.closing_timeout,
            "tunnel_mode": cfg.tunnel_mode, "tunnel_vni": cfg.tunnel_vni, "syn_timeout": cfg.syn_timeout})
        if current is not None and bytes(ffi().buffer(current)) == bytes(ffi().buffer(want)):
            return False
        self.config.update(zero, want)
        return True

    def set_icmp_limit(self, rate: int, burst: int) -> bool:
        """The node's ICMP error budget (errors per second, burst); True when it changed."""
        return set_icmp_limit(self.icmp_rl, rate, burst)

    def mode(self) -> Mode | None:
        current = self.config.lookup(ffi().new("__u32 *", 0))
        return None if current is None else Mode(current.mode)

    def stats(self) -> dict[str, int]:
        """Packet counters summed over CPUs, by name (STAT_* in lb_structs.h, lower case)."""
        return read_stats(self.stats_map)

    def flows(self) -> list[Any]:
        """Decoded forward conntrack entries (for `bpflb flows` and tests)."""
        return [(self.ct_fwd.decode_key(k), self.ct_fwd.decode_value(v)) for k, v in self.ct_fwd.items_raw()]


def set_icmp_limit(m: Map, rate: int, burst: int) -> bool:
    """Write rate and burst into lb_icmp_rl (the datapath's own defaults, 1000/s and 50 like the kernel's
    icmp_msgs_per_sec/_burst, hold while it is zero); the token bucket restarts full.  Unchanged values are
    left alone, bucket included.  True when written."""
    if not (0 < rate < 2**32 and 0 < burst < 2**32):
        raise ValueError(f"ICMP rate limit: rate and burst must be 1..{2**32 - 1}; got {rate}/s, burst {burst}")
    zero = ffi().new("__u32 *", 0)
    current = m.lookup(zero)
    if current is not None and (current.rate, current.burst) == (rate, burst):
        return False
    m.update(zero, ffi().new("struct lb_icmp_rl *", {"rate": rate, "burst": burst}))
    return True


def read_stats(stats_map: Map) -> dict[str, int]:
    """Every per-CPU counter of lb_stats summed over CPUs, by name."""
    ncpu = possible_cpus()
    buf = ffi().new("__u64[]", ncpu)
    out: dict[str, int] = {}
    for idx, name in sorted(stat_names().items()):
        if lib().bpf_map_lookup_elem(stats_map.fd, ffi().new("__u32 *", idx), buf) == 0:
            out[name] = sum(int(buf[i]) for i in range(ncpu))
    return out


def possible_cpus() -> int:
    """Number of possible CPUs (the per-CPU map value count)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) if hi else int(lo)) - int(lo) + 1
    return total
