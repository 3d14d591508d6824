"""Programs a node's load-balancer maps from the model's DesiredState, as a diff of map entries.

Entries are compared as the exact bytes the kernel holds, so a sync writes only what changed
and never flushes: live flows keep their backends.  Ids of services and backends are recovered
from the pinned maps, so an agent restart picks up where the last one left off.  Maglev tables
(lb_maglev) are built per frontend from its backends' names, cached by those names, and written
in blocks with batch updates; frontends with session affinity list their eligible backends in
lb_affinity_members; frontends with enforced loadBalancerSourceRanges have their prefixes in lb_src_ranges."""

from __future__ import annotations

import functools
import logging
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from itertools import chain
from types import MappingProxyType
from typing import Any

from bpflb.datapath.clustermaps import l4_key
from bpflb.datapath.libbpf import BpfError, const, ffi, lib, possible_cpus, stat_names
from bpflb.datapath.loader import Map, MapSource
from bpflb.datapath.mapdiff import Failures, MapMirror, after_failed_batch, remove_keys
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
    failures: list[WriteFailure] = field(default_factory=list)   # frontends the kernel refused (left out)

    @property
    def changed(self) -> bool:
        return bool(self.backends_written or self.backends_removed or self.slots_written
                    or self.slots_removed or self.config_changed or self.maglev_blocks_written
                    or self.maglev_blocks_removed or self.maglev_config_changed
                    or self.affinity_members_written or self.affinity_members_removed or self.failures
                    or self.frontends_added or self.frontends_removed or self.internal_views_changed
                    or self.source_ranges_written or self.source_ranges_removed)


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
# An L4Addr's value shifted by a byte, with the flags below, is struct lb_backend in network order as
# BACKEND packs it (addr, port, proto, flags): ((l4 << 8) | flags).to_bytes(8, "big").


@functools.cache
def _svc_flags(kind: FrontendKind, local_only: bool, no_endpoints: bool, ranged: bool, deny: bool) -> int:
    """lb_svc_val.flags of a frontend (LB_SVC_F_* of lb_structs.h)."""
    flags = const(_KIND_FLAG[kind])
    if local_only:
        flags |= const("LB_SVC_F_LOCAL")
    if no_endpoints:
        flags |= const("LB_SVC_F_NO_ENDPOINTS")
    if ranged:
        flags |= const("LB_SVC_F_SRC_RANGE")
        if deny:
            flags |= const("LB_SVC_F_SRC_RANGE_DENY")
    return flags


def svc_key(l4: L4Addr, slot: int) -> bytes:
    return SVC_KEY.pack((l4 >> 24).to_bytes(4, "big"), (l4 >> 8 & 0xFFFF).to_bytes(2, "big"), slot, l4 & 0xFF)


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

    def items(self) -> list[tuple[L4Addr, int]]:
        return list(self._ids.items())

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(frozen=True)
class WriteFailure:
    """A frontend whose entries the kernel refused: it is not programmed (removed whole, the rest is)."""

    frontend: L4Addr
    service: str
    map_name: str
    reason: str


_NONE: Mapping[bytes, bytes] = MappingProxyType({})     # the entries of a kind a frontend has none of (shared)


@dataclass(slots=True)
class _Entries:
    """What one frontend holds in the maps (the exact bytes), as last programmed or as planned. Its lb_services
    entries are its master (key, value) and the values of its slots 1..n, whose keys are the master's with the
    slot number (_slot_keys): a large cluster has a hundred thousand slots, kept once (the values are shared by
    the frontends of one Service port)."""

    fe: Frontend
    sid: int
    master: tuple[bytes, bytes]
    slots: bytes                         # lb_services values of slots 1..n, one after the other
    blocks: Mapping[bytes, bytes]        # lb_maglev
    members: Mapping[bytes, bytes]       # lb_affinity_members
    table: _TableKey | None = None
    view: Mapping[bytes, bytes] = field(default_factory=lambda: _NONE)     # lb_internal_view: what in-cluster
    ranges: Mapping[bytes, bytes] = field(default_factory=lambda: _NONE)   # clients get; lb_src_ranges: its
    #                                                                       enforced source prefixes

    @property
    def n(self) -> int:
        """Its number of slots."""
        return len(self.slots) // _VAL

    @property
    def backends(self) -> list[L4Addr]:
        """Every backend it references: its slots' and its draining ones (read from its frontend, not kept:
        a tuple per Service port, 1.4 MiB at 10,000 Services)."""
        fe = self.fe
        return [b[0] for b in fe.backends] + [b[0] for b in fe.draining] if fe.draining else \
            [b[0] for b in fe.backends]


_SLOT_AT = slice(6, 8)                   # lb_svc_key.slot (host order) within the key
_VAL = SVC_VAL.size
_CHUNK = 8192                            # lb_services keys per batch update of a large sync


@functools.cache
def _cutter(n: int) -> struct.Struct:
    """Cuts the values of n slots, one after the other, into one bytes object each, in C (n <= 64: cached)."""
    return struct.Struct(f"{_VAL}s" * n)


def _values(slots: bytes, n: int) -> list[bytes] | tuple[bytes, ...]:
    """The values of n slots, one after the other, one bytes object each."""
    if n <= 64:
        return _cutter(n).unpack(slots)
    return [slots[i:i + _VAL] for i in range(0, len(slots), _VAL)]


def _slot_keys(master: bytes, first: int, last: int) -> list[bytes]:
    """The lb_services keys of slots first..last of the frontend whose master key this is."""
    head, tail = master[:6], master[8:]
    return [head + slot.to_bytes(2, sys.byteorder) + tail for slot in range(first, last + 1)]


class ServiceMirror:
    """lb_services as the kernel holds it (MapMirror's rules: it follows every write the kernel accepted and is
    re-read after a failure it cannot account for), kept per frontend rather than per key: each frontend's
    master key -> [its master's value, its slots' values]. The slots' values are one bytes object while the
    map holds all of slots 1..n (nearly always; the plan's own object, shared by the frontends of a Service
    port), else a list by slot number - 1 (None: absent). A dict of the 140,000 keys of 10,000 Services would
    cost 12 MiB, and their values 3 MiB more; this is a sixth of it, and whole frontends are written at once."""

    batch = True

    def __init__(self, m: Map) -> None:
        self.map = m
        self.frontends: dict[bytes, list[Any]] = {}      # master key -> [bytes | None, bytes | list[bytes | None]]
        self.size = 0
        self.reloads = 0
        self._read()

    @property
    def capacity(self) -> int:
        return self.map.max_entries

    @property
    def entries(self) -> dict[bytes, bytes]:
        """Every (key, value), made anew (for inspection and tests: the sync never asks for them)."""
        return dict(self.items())

    def _read(self) -> None:
        self.frontends.clear()
        self.size = 0
        for k, v in self.map.items_raw():
            self._put(k, v)
        for master in self.frontends:
            self._compact(master)

    def reload(self) -> None:
        self._read()
        self.reloads += 1

    @staticmethod
    def split(key: bytes) -> tuple[bytes, int]:
        """(the master key of the key's frontend, its slot number)."""
        return key[:6] + b"\0\0" + key[8:], int.from_bytes(key[_SLOT_AT], sys.byteorder)

    @staticmethod
    def slots(rec: list[Any]) -> Iterator[tuple[int, bytes]]:
        """(slot number, value) of each slot of a frontend's record that the map holds."""
        held = rec[1]
        if type(held) is bytes:
            for i in range(0, len(held), _VAL):
                yield i // _VAL + 1, held[i:i + _VAL]
            return
        for slot, v in enumerate(held, 1):
            if v is not None:
                yield slot, v

    @staticmethod
    def slot(rec: list[Any], slot: int) -> bytes | None:
        """The value of one slot (1..) of a frontend's record, None when the map does not hold it."""
        held = rec[1]
        if type(held) is bytes:
            i = (slot - 1) * _VAL
            return held[i:i + _VAL] if i + _VAL <= len(held) else None
        value: bytes | None = held[slot - 1] if slot <= len(held) else None
        return value

    def __len__(self) -> int:
        return self.size

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def get(self, key: bytes) -> bytes | None:
        master, slot = self.split(key)
        rec = self.frontends.get(master)
        if rec is None:
            return None
        if slot == 0:
            value: bytes | None = rec[0]
            return value
        return self.slot(rec, slot)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for master, rec in self.frontends.items():
            if rec[0] is not None:
                yield master, rec[0]
            head, tail = master[:6], master[8:]
            for slot, v in self.slots(rec):
                yield head + slot.to_bytes(2, sys.byteorder) + tail, v

    def absent(self, master: bytes, last: int) -> int:
        """How many of slots 0..last of the frontend the map does not hold."""
        rec = self.frontends.get(master)
        if rec is None:
            return last + 1
        held = rec[1]
        if type(held) is bytes:
            missing = max(0, last - len(held) // _VAL)
        else:
            missing = held[:last].count(None) + max(0, last - len(held))
        return missing + (rec[0] is None)

    def _put(self, key: bytes, value: bytes) -> None:
        master, slot = self.split(key)
        rec = self.frontends.get(master)
        if rec is None:
            rec = self.frontends[master] = [None, b""]
        if slot == 0:
            self.size += rec[0] is None
            rec[0] = value
            return
        held = rec[1]
        if type(held) is bytes:
            held = rec[1] = [held[i:i + _VAL] for i in range(0, len(held), _VAL)]
        if len(held) < slot:
            held.extend([None] * (slot - len(held)))
        self.size += held[slot - 1] is None
        held[slot - 1] = value

    def _drop(self, key: bytes) -> None:
        master, slot = self.split(key)
        rec = self.frontends.get(master)
        if rec is None:
            return
        if slot == 0:
            if rec[0] is None:
                return
            rec[0] = None
        else:
            held = rec[1]
            if type(held) is bytes:
                if slot * _VAL > len(held):
                    return
                held = rec[1] = [held[i:i + _VAL] for i in range(0, len(held), _VAL)]
            if slot > len(held) or held[slot - 1] is None:
                return
            held[slot - 1] = None
            while held and held[-1] is None:
                held.pop()
        self.size -= 1
        if rec[0] is None and not rec[1]:
            del self.frontends[master]

    def write(self, keys: list[bytes], values: list[bytes], runs: list[tuple[bytes, int, int, int, bytes | None]]
              ) -> Failures:
        """MapMirror.write_columns of keys[i] -> values[i], which runs describe: (master key, first slot, index of
        its first key in keys, how many consecutive slots; for all the slots of a frontend that held none, their
        values as one bytes object, else None), in the order of keys. Returns the refused writes."""
        if not keys:
            return []
        try:
            self.map.update_columns(keys, values)
        except BpfError as exc:
            failures = after_failed_batch(self.map, keys, values, exc, self.reload, self.get, self._put)
            for master in {run[0] for run in runs}:
                self._compact(master)
            return failures
        frontends = self.frontends
        for master, first, start, n, whole in runs:
            rec = frontends.get(master)
            if first == 0 and n == 1:              # a master
                if rec is None:
                    rec = frontends[master] = [None, b""]
                self.size += rec[0] is None
                rec[0] = values[start]
                continue
            if whole is not None and (rec is None or not rec[1]):
                if rec is None:
                    frontends[master] = [None, whole]
                else:
                    rec[1] = whole
                self.size += n
                continue
            for k, v in zip(keys[start:start + n], values[start:start + n], strict=True):
                self._put(k, v)
            self._compact(master)
        return []

    def _compact(self, master: bytes) -> None:
        """A frontend's slots back to one object once the map holds all of slots 1..n again."""
        rec = self.frontends.get(master)
        if rec is not None and type(rec[1]) is list and None not in rec[1]:
            rec[1] = b"".join(rec[1])

    def remove(self, keys: list[bytes]) -> Failures:
        """MapMirror.remove: delete the keys (missing ones are no error); return those the kernel refused."""
        failures = remove_keys(self.map, keys, True, self.reload, self.__contains__, self._drop)
        for master in {self.split(k)[0] for k in keys}:
            self._compact(master)
        return failures


class _BackendEntries(Mapping[bytes, bytes]):
    """A BackendMirror's entries as MapMirror.entries holds them (key bytes -> value bytes), made on demand."""

    def __init__(self, mirror: BackendMirror) -> None:
        self._mirror = mirror

    def __getitem__(self, key: bytes) -> bytes:
        value = self._mirror.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[bytes]:
        return (_u32(ident) for ident in self._mirror.backends)

    def __len__(self) -> int:
        return len(self._mirror.backends)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and len(key) == 4 and int.from_bytes(key, "little") in self._mirror.backends


class BackendMirror:
    """lb_backends as the kernel holds it (MapMirror's rules: it follows every write the kernel accepted and is
    re-read after a failure it cannot account for), kept by backend id: id -> the L4Addr its value names (the
    same object the ids are kept by) and, apart, the few ids whose flags are not 0. A value is the L4Addr's
    integer shifted by a byte with the flags below (struct lb_backend in network order), so nothing else needs
    keeping: two bytes objects a backend (96 bytes; 5.5 MiB at 60,000 backends) are not."""

    batch = True

    def __init__(self, m: Map) -> None:
        if m.value_size != BACKEND.size:
            raise ValueError(f"lb_backends values are {m.value_size} bytes; lbmaps expects {BACKEND.size}")
        self.map = m
        self.backends: dict[int, L4Addr] = {}
        self.flags: dict[int, int] = {}        # the ids whose value's flags are not 0
        self.reloads = 0
        self._read()

    @property
    def capacity(self) -> int:
        return self.map.max_entries

    @property
    def entries(self) -> Mapping[bytes, bytes]:
        """Every (key, value) as bytes, made when read (a comparison, inspection, tests)."""
        return _BackendEntries(self)

    def __len__(self) -> int:
        return len(self.backends)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and len(key) == 4 and int.from_bytes(key, "little") in self.backends

    def _read(self) -> None:
        self.backends.clear()
        self.flags.clear()
        for k, v in self.map.items_raw():
            self.put(k, v)

    def reload(self) -> None:
        self._read()
        self.reloads += 1

    def get(self, key: bytes) -> bytes | None:
        ident = int.from_bytes(key, "little")
        l4 = self.backends.get(ident)
        if l4 is None:
            return None
        return (l4 << 8 | self.flags.get(ident, 0)).to_bytes(BACKEND.size, "big")

    def put(self, key: bytes, value: bytes) -> None:
        ident, whole = int.from_bytes(key, "little"), int.from_bytes(value, "big")
        self._set(ident, L4Addr.of(whole >> 32, whole >> 16 & 0xFFFF, whole >> 8 & 0xFF), whole & 0xFF)

    def _set(self, ident: int, l4: L4Addr, flags: int) -> None:
        self.backends[ident] = l4
        if flags:
            self.flags[ident] = flags
        elif self.flags:
            self.flags.pop(ident, None)

    def write_columns(self, keys: list[bytes], values: list[bytes],
                      named: tuple[list[int], list[L4Addr]] | None = None) -> Failures:
        """MapMirror.write_columns; named: each key's id and the L4Addr its value names (value >> 8), which
        the mirror then keeps as they are (the ids' own objects) rather than new ones."""
        if not keys:
            return []
        try:
            self.map.update_columns(keys, values)
        except BpfError as exc:
            return after_failed_batch(self.map, keys, values, exc, self.reload, self.get, self.put)
        if named is None:
            for k, v in zip(keys, values, strict=True):
                self.put(k, v)
            return []
        for ident, l4, v in zip(*named, values, strict=True):
            self._set(ident, l4, v[-1])
        return []

    def remove(self, keys: list[bytes]) -> Failures:
        """MapMirror.remove: delete the keys (missing ones are no error); return those the kernel refused."""
        def forget(k: bytes) -> None:
            ident = int.from_bytes(k, "little")
            self.backends.pop(ident, None)
            self.flags.pop(ident, None)

        return remove_keys(self.map, keys, True, self.reload, self.__contains__, forget)


class LBMaps:
    """The load-balancer maps of one node and the ids recorded in them.

    A sync is incremental: only frontends that differ from the last sync (a new Frontend object that is
    not equal to the programmed one) are encoded and diffed against the maps' mirrors; the first sync after
    a start (or after the mirror had to be re-read) compares everything and removes what nobody wants.
    Deletions come before additions wherever the datapath stays valid (removed frontends whole, backends no
    slot names any more), and all of them when a map would otherwise overflow in between. A write the kernel
    refuses fails its frontend alone: that frontend is removed and reported (SyncReport.failures), every
    other one is programmed."""

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
        self.dsr_mapped: Map = obj.map("lb_dsr_mapped")      # closed by the conntrack collector (conntrack.py)
        if const("LB_MAGLEV_BLOCK") != _BLOCK or self.maglev.value_size != _BLOCK_BYTES:
            raise ValueError(f"lb_structs.h LB_MAGLEV_BLOCK is {const('LB_MAGLEV_BLOCK')}; lbmaps expects {_BLOCK}")
        self._svc_m, self._be_m = ServiceMirror(self.services), BackendMirror(self.backends)
        self._mg_m = MapMirror(self.maglev, batch=False)      # 16 KiB blocks: batching saves nothing measurable
        self._am_m = MapMirror(self.affinity_members)
        self._sr_m = MapMirror(self.src_ranges, batch=False)      # an LPM trie: no batch operations
        self._iv_m = MapMirror(self.internal_view)
        self._tables: dict[_TableKey, tuple[bytes, ...]] = {}
        self._tables_kept = 0
        self._prog: dict[L4Addr, _Entries] = {}           # frontends as programmed by this process
        self._be_refs: dict[L4Addr, int] = {}             # programmed frontends referencing each backend
        # Within one sync: the lb_backends value of each backend its plans reference (the others' are in the map
        # as they should be: a backend whose write failed failed its frontends, which the next sync plans again).
        self._be_val: dict[L4Addr, bytes] = {}
        self._full = True                                 # compare everything (maps included) at the next sync
        self._sweep = False           # a partial sync kept entries of the maps nobody may want: compare at the next complete one
        self._seen = -2                                   # the generation of the state synced last
        self._retry: set[L4Addr] = set()                  # frontends the kernel refused at the last sync
        self._sr_used = 0                                 # lb_src_ranges entries programmed frontends hold
        self._table_params: tuple[int, int] | None = None
        # Within one sync: the slots of each backends tuple (by identity), each backend id's slot value.
        self._per_tuple: dict[int, tuple[tuple[Backend, ...], tuple[Backend, ...], list[int], bytes]] = {}
        self._slot_val: dict[int, bytes] = {}
        self._recover_ids()
        if len(self._svc_m) or len(self._be_m):
            log.info("recovered %d frontends and %d backends from pinned maps",
                     len(self._svc_ids), len(self._be_ids))

    def _recover_ids(self) -> None:
        """Ids from the maps themselves (pins survive the agent): a restart rewrites nothing."""
        self._be_ids = IdPool()
        for ident, l4 in self._be_m.backends.items():      # the mirror's objects, shared
            self._be_ids.record(l4, ident)
        self._svc_ids = IdPool()
        for master, rec in self._svc_m.frontends.items():
            if rec[0] is not None:
                addr, port, _slot, proto = SVC_KEY.unpack(master)
                l4 = L4Addr(IPv4Address(addr), int.from_bytes(port, "big"), Proto(proto))
                self._svc_ids.record(l4, SVC_VAL.unpack(rec[0])[0])

    # -- ids ---------------------------------------------------------------------------------
    def _backend_id(self, l4: L4Addr) -> int:
        return self._be_ids.get(l4)

    def _service_id(self, l4: L4Addr) -> int:
        return self._svc_ids.get(l4)

    def backend_id(self, l4: L4Addr) -> int | None:
        return self._be_ids.known(l4)

    def capacity(self) -> dict[str, int]:
        """max_entries of the maps a sync fills, by map name (the kernel's: a build may change them)."""
        return {m.map.name: m.capacity for m in (self._svc_m, self._be_m, self._mg_m, self._am_m, self._iv_m,
                                                 self._sr_m)}

    # -- encoding ----------------------------------------------------------------------------
    def _plan(self, fe: Frontend, m: int, seed: int, report: SyncReport) -> _Entries:
        """The entries one frontend needs (allocating its ids). Its source ranges take room in lb_src_ranges
        (LB_SRC_RANGES_MAX in all); when they no longer fit, the frontend fails closed, admitting no client,
        reported, until prefixes are freed."""
        sid = self._service_id(fe.l4)
        ranges: Mapping[bytes, bytes] = _NONE
        closed = False
        if fe.source_ranges:
            if self._sr_used + len(fe.source_ranges) > const("LB_SRC_RANGES_MAX"):
                closed = True
                report.problems.append(
                    f"Service {fe.service}: spec.loadBalancerSourceRanges: lb_src_ranges is full "
                    f"({const('LB_SRC_RANGES_MAX')} prefixes in all); {fe.kind.value} {fe.l4} admits no client "
                    f"until prefixes of other Services are freed")
            else:
                ranges = {src_range_key(sid, net): b"\x01" for net in fe.source_ranges}
                self._sr_used += len(ranges)
        flags = _svc_flags(fe.kind, fe.local_only, fe.no_endpoints, fe.source_ranges is not None,
                           fe.source_ranges_deny and not closed)
        l4 = fe.l4
        addr, port, proto = (l4 >> 24).to_bytes(4, "big"), (l4 >> 8 & 0xFFFF).to_bytes(2, "big"), l4 & 0xFF
        ids, slots = self._slot_values(fe.backends, fe.draining)
        master = (SVC_KEY.pack(addr, port, 0, proto),
                  SVC_VAL.pack(sid, len(fe.backends), flags, fe.affinity_timeout, int(fe.algorithm)))
        blocks: Mapping[bytes, bytes] = _NONE
        members: Mapping[bytes, bytes] = _NONE
        table: _TableKey | None = None
        if fe.backends and fe.algorithm == Algorithm.MAGLEV:
            table = (maglev_names(fe.backends), m, seed)
            cached = self._tables.get(table)
            if cached is None:
                cached = table_blocks(maglev.build_slots(table[0], m, seed).tobytes())
                self._tables[table] = cached
                report.maglev_tables_built += 1
            blocks = {_pair(sid, i): block for i, block in enumerate(cached)}
        if fe.backends and fe.affinity_timeout:
            members = {_pair(sid, ident): _MEMBER for ident in ids}
        view: Mapping[bytes, bytes] = _NONE
        if not fe.in_cluster:
            view = {l4_key(fe.l4): _NOT_IN_CLUSTER}
        elif fe.internal is not None:
            view = {l4_key(fe.l4): l4_key(fe.internal)}
        return _Entries(fe, sid, master, slots, blocks, members, table, view, ranges)

    def _slot_values(self, backends: tuple[Backend, ...], draining: tuple[Backend, ...]
                     ) -> tuple[list[int], bytes]:
        """The backend ids of a frontend's slots and their lb_services values (allocating the ids), and each
        backend's lb_backends value recorded (draining ones too: in no slot, but open flows find them).
        The frontends of one Service port share their backends (one tuple): done once per tuple in a sync."""
        known = self._per_tuple.get(id(backends))
        if known is not None and known[0] is backends and known[1] is draining:
            return known[2], known[3]
        ids = self._be_ids
        got, new = ids._ids.get, ids.get
        local_flag = const("LB_BE_F_LOCAL")
        be_val = self._be_val
        idents: list[int] = []
        for be in backends:
            l4 = be[0]
            ident = got(l4)
            idents.append(new(l4) if ident is None else ident)
            be_val[l4] = (l4 << 8 | (local_flag if be[3] else 0)).to_bytes(8, "big")
        for be in draining:
            l4 = be[0]
            be_val[l4] = (l4 << 8 | (local_flag if be[3] else 0)).to_bytes(8, "big")
        shared, pack_val = self._slot_val, SVC_VAL.pack
        values = b"".join([shared.get(i) or shared.setdefault(i, pack_val(i, 0, 0, 0, 0)) for i in idents])
        self._per_tuple[id(backends)] = (backends, draining, idents, values)
        return idents, values

    def _set_maglev_config(self, m: int, seed: int) -> bool:
        zero = ffi().new("__u32 *", 0)
        want = ffi().new("struct lb_maglev_config *", {"table_size": m, "hash_seed": seed})
        current = self.maglev_cfg.lookup(zero)
        if current is not None and bytes(ffi().buffer(current)) == bytes(ffi().buffer(want)):
            return False
        self.maglev_cfg.update(zero, want)
        return True

    # -- sync --------------------------------------------------------------------------------
    def sync(self, state: DesiredState, partial: bool = False) -> SyncReport:
        """Make the maps hold exactly the state's frontends and backends; write only differences. A frontend
        whose writes the kernel refuses is left out (SyncReport.failures) and tried again at the next sync.
        partial: the state holds only some of the Services (the first list is still coming in): what the maps
        hold beyond it is kept, and removed at the first complete sync (when there is any: what the maps hold
        against every frontend programmed, without encoding those again)."""
        report = SyncReport()
        m, seed = state.settings.maglev_table_size, state.settings.maglev_seed
        retable = self._table_params != (m, seed)
        new, prog = state.frontends, self._prog
        full = self._full
        sweep = self._sweep and not partial and not full    # what partial syncs kept, looked at once
        if full and partial:        # what a previous agent left stays until a complete state says who wants it
            self._sweep = self._sweep or any(len(x) for x in (self._svc_m, self._be_m, self._mg_m, self._am_m,
                                                                  self._iv_m, self._sr_m))
        if full and prog:                        # after a sync that did not finish: start from the maps
            prog.clear()
            self._be_refs.clear()
            self._retry.clear()
            self._recover_ids()
        self._full = True                        # until this sync is done
        self._be_val = {}
        if full:
            changed = list(new.values())
            removed = []
        elif state.changes is not None and state.base == self._seen and not retable:
            # The state says what changed since the one synced last: look at those frontends alone (and at
            # those the kernel refused last time).
            look = state.changes | self._retry
            changed = [fe for l4 in look if (fe := new.get(l4)) is not None
                       and ((p := prog.get(l4)) is None or (p.fe is not fe and p.fe != fe))]
            removed = [p for l4 in look if l4 not in new and (p := prog.get(l4)) is not None]
        else:
            changed = [fe for l4, fe in new.items()
                       if (p := prog.get(l4)) is None or (p.fe is not fe and p.fe != fe)
                       or (retable and p.table is not None)]
            removed = [p for l4, p in prog.items() if l4 not in new]
        old = {fe.l4: prog[fe.l4] for fe in changed if fe.l4 in prog}
        if full:
            self._sr_used = 0
        self._sr_used -= sum(len(p.ranges) for p in (*removed, *old.values()))
        try:
            plans = {fe.l4: self._plan(fe, m, seed, report) for fe in changed}
        finally:
            self._per_tuple, self._slot_val = {}, {}
        # Backend references: what the removed and changed frontends held goes, what the plans hold comes.
        refs = self._be_refs
        touched: set[L4Addr] = set()
        for p in (*removed, *old.values()):
            for l4 in p.backends:
                refs[l4] -= 1
                touched.add(l4)
        for l4, n in Counter(chain.from_iterable(p.backends for p in plans.values())).items():
            refs[l4] = refs.get(l4, 0) + n
            touched.add(l4)
        still_named = {l4 for p in old.values() for l4 in p.backends}   # by slots that stay until rewritten
        stale_be = [l4 for l4 in touched if refs[l4] <= 0]
        early_be = [l4 for l4 in stale_be if l4 not in still_named]
        late_be = [l4 for l4 in stale_be if l4 in still_named]
        known, bid, be_val = self._be_ids._ids.get, self._be_ids.get, self._be_val   # draining ones: ids now
        # What lb_backends should hold of them, as two columns (a large sync's 60,000 without a pair each).
        want_be = [l4 for l4 in touched if refs[l4] > 0 and l4 in be_val]
        del touched
        be_idents = [known(l4) or bid(l4) for l4 in want_be]
        be_keys = [ident.to_bytes(4, "little") for ident in be_idents]
        be_vals = [be_val[l4] for l4 in want_be]
        self._be_val = {}

        svc, be_m, mg, am = self._svc_m, self._be_m, self._mg_m, self._am_m
        # Stale entries of frontends that change, removed once their new master is in place (a shrunk count
        # stops using them first).
        late: dict[str, list[bytes]] = {"svc": [], "mg": [], "am": [], "iv": [], "sr": []}
        for l4, p in old.items():
            plan = plans[l4]
            if p.n > plan.n:
                late["svc"] += _slot_keys(p.master[0], plan.n + 1, p.n)
            late["mg"] += [k for k in p.blocks if k not in plan.blocks]
            late["am"] += [k for k in p.members if k not in plan.members]
            late["iv"] += [k for k in p.view if k not in plan.view]
            late["sr"] += [k for k in p.ranges if k not in plan.ranges]

        # 0. Room first: removed frontends whole (master, then what it named), backends nobody names.
        #    When a map would still overflow before its late deletions, those go first too.
        early: dict[str, list[bytes]] = {
            "svc": [p.master[0] for p in removed] + [k for p in removed for k in _slot_keys(p.master[0], 1,
                                                                                              p.n)],
            "mg": [k for p in removed for k in p.blocks], "am": [k for p in removed for k in p.members],
            "iv": [k for p in removed for k in p.view], "sr": [k for p in removed for k in p.ranges]}
        leftover_frontends = 0
        if full and not partial:
            leftover_frontends = self._leftovers(plans, early, late, early_be, late_be)
        elif sweep:                 # every frontend wanted is programmed (or planned now): the rest is leftovers
            dropped = {p.fe.l4 for p in removed}
            wanted = {l4: p for l4, p in prog.items() if l4 not in dropped}
            wanted.update(plans)
            leftover_frontends = self._leftovers(wanted, early, late, early_be, late_be)
        iv, sr = self._iv_m, self._sr_m

        def adding(mirror: MapMirror, part: Callable[[_Entries], Mapping[bytes, bytes]]) -> int:
            have = mirror.entries
            if not have:                # the first sync: every key is new
                return sum(len(part(p)) for p in plans.values())
            return sum(1 for p in plans.values() for k in part(p) if k not in have)

        adds = {"svc": sum(svc.absent(p.master[0], p.n) for p in plans.values()),
                "mg": adding(mg, lambda p: p.blocks), "am": adding(am, lambda p: p.members),
                "iv": adding(iv, lambda p: p.view), "sr": adding(sr, lambda p: p.ranges)}
        for name, mirror in (("svc", svc), ("mg", mg), ("am", am), ("iv", iv), ("sr", sr)):
            if mirror.capacity and len(mirror) - len(early[name]) + adds[name] > mirror.capacity:
                early[name] += late[name]
                late[name] = []
        if be_m.capacity and len(be_m) - len(early_be) + \
                sum(1 for ident in be_idents if ident not in be_m.backends) > be_m.capacity:
            early_be, late_be = early_be + late_be, []
        report.frontends_removed = len(removed) + leftover_frontends
        report.slots_removed += self._remove(svc, early["svc"])
        report.maglev_blocks_removed += self._remove(mg, early["mg"])
        report.affinity_members_removed += self._remove(am, early["am"])
        report.internal_views_changed += self._remove(iv, early["iv"])
        report.source_ranges_removed += self._remove(sr, early["sr"])
        for p in removed:
            self._svc_ids.forget(p.fe.l4)
            del prog[p.fe.l4]
        report.backends_removed += self._remove_backends(early_be)

        failed: dict[L4Addr, WriteFailure] = {}

        def fail(l4: L4Addr, map_name: str, reason: str) -> None:
            if l4 not in failed:
                failed[l4] = WriteFailure(l4, plans[l4].fe.service, map_name, reason)

        # 1. backends first: a slot must never name a backend the datapath cannot find.
        if len(be_m):               # its keys are distinct
            have_be, have_flags = be_m.backends, be_m.flags
            changed_be = [i for i, (ident, l4, v) in enumerate(zip(be_idents, want_be, be_vals, strict=True))
                          if have_be.get(ident) != l4 or have_flags.get(ident, 0) != v[-1]]
            be_keys, be_vals = [be_keys[i] for i in changed_be], [be_vals[i] for i in changed_be]
            be_idents, want_be = [be_idents[i] for i in changed_be], [want_be[i] for i in changed_be]
        bad_be = dict(be_m.write_columns(be_keys, be_vals, (be_idents, want_be)))
        report.backends_written = len(be_keys) - len(bad_be)
        del be_keys, be_vals, be_idents, want_be
        if bad_be:
            for l4, p in plans.items():
                for b in p.backends:
                    why = bad_be.get(_u32(self._backend_id(b)))
                    if why is not None:
                        fail(l4, self.backends.name, f"backend {b}: {why}")
                        break
        # 2. backend slots before their master entry, so a grown count never points past them.
        report.slots_written = self._write_services(plans, failed, fail, masters=False)
        # 2b. Maglev tables and affinity members name slots and backends that now exist; the table size
        # and seed follow the tables (an entry read with the other size is still a slot of the frontend).
        report.maglev_blocks_written = self._write(mg, plans, failed, lambda p: p.blocks, fail)
        report.affinity_members_written = self._write(am, plans, failed, lambda p: p.members, fail)
        # A frontend's prefixes exist before its master says to check them (a new allow list never drops
        # clients it admits); prefixes it no longer has go only after the master changed (step 4).
        report.source_ranges_written = self._write(sr, plans, failed, lambda p: p.ranges, fail)
        report.maglev_config_changed = self._set_maglev_config(m, seed)
        self._table_params = (m, seed)
        # 3. masters last: a frontend appears, grows, or switches algorithm or affinity only now.
        appearing = [l4 for l4, p in plans.items() if l4 not in old and p.master[0] not in svc]
        report.slots_written += self._write_services(plans, failed, fail, masters=True)
        report.frontends_added = sum(1 for l4 in appearing if l4 not in failed)
        # 3b. internal views of external frontends (in-cluster clients): they name ClusterIP frontends, which
        # the datapath looks up itself (a view whose frontend is missing is not used); all zeros: not served
        # to in-cluster clients (east_west.h).
        report.internal_views_changed += self._write(iv, plans, failed, lambda p: p.view, fail)
        # 4. what changed frontends no longer use: masters before slots, tables and members.
        report.slots_removed += self._remove(svc, late["svc"])
        report.maglev_blocks_removed += self._remove(mg, late["mg"])
        report.affinity_members_removed += self._remove(am, late["am"])
        report.internal_views_changed += self._remove(iv, late["iv"])
        report.source_ranges_removed += self._remove(sr, late["sr"])
        # 5. failed frontends leave whole: master first, then everything either version of them wrote.
        for l4, failure in failed.items():
            plan = plans.pop(l4)
            gone = [plan, *([old[l4]] if l4 in old else [])]
            report.slots_removed += self._remove(svc, [plan.master[0]] + [k for p in gone for k in
                                                                           _slot_keys(p.master[0], 1, p.n)])
            report.maglev_blocks_removed += self._remove(mg, [k for p in gone for k in p.blocks])
            report.affinity_members_removed += self._remove(am, [k for p in gone for k in p.members])
            report.internal_views_changed += self._remove(iv, [k for p in gone for k in p.view])
            report.source_ranges_removed += self._remove(sr, [k for p in gone for k in p.ranges])
            self._sr_used -= len(plan.ranges)
            for b in plan.backends:
                refs[b] -= 1
                late_be.append(b)
            prog.pop(l4, None)
            self._svc_ids.forget(l4)
            report.failures.append(failure)
        prog.update(plans)
        # 6. backends nobody references any more; their flows are steered away on next packet.
        report.backends_removed += self._remove_backends([b for b in dict.fromkeys(late_be) if refs.get(b, 0) <= 0])
        self._retry = {f.frontend for f in report.failures}
        self._full = any(x.reloads for x in (svc, be_m, mg, am, iv, sr))   # the mirrors were re-read: compare all
        for x in (svc, be_m, mg, am, iv, sr):
            x.reloads = 0
        self._seen = state.generation
        if (full or sweep) and not partial:
            self._sweep = False
        self._prune_tables()
        return report

    def _write_services(self, plans: dict[L4Addr, _Entries], failed: dict[L4Addr, WriteFailure],
                        fail: Callable[[L4Addr, str, str], None], masters: bool) -> int:
        """_write of lb_services: the slots of every plan not failed yet (masters: their masters), a frontend at
        a time, in batches of about _CHUNK keys (their keys are made for the write and dropped after it, rather
        than all of them held at once); refused keys fail their frontend."""
        svc = self._svc_m
        have = svc.frontends
        keys: list[bytes] = []
        values: list[bytes] = []
        runs: list[tuple[bytes, int, int, int, bytes | None]] = []
        refused: Failures = []
        written = 0
        for l4, p in plans.items():
            if len(keys) >= _CHUNK:
                refused += svc.write(keys, values, runs)
                written += len(keys)
                keys, values, runs = [], [], []
            if l4 in failed:
                continue
            master = p.master[0]
            rec = have.get(master)
            if masters:
                if rec is None or rec[0] != p.master[1]:
                    runs.append((master, 0, len(keys), 1, None))
                    keys.append(master)
                    values.append(p.master[1])
                continue
            slots = p.slots
            n = p.n
            if not n or (rec is not None and rec[1] == slots):
                continue
            if rec is None or not rec[1]:
                runs.append((master, 1, len(keys), n, slots))
                keys += _slot_keys(master, 1, n)
                values += _values(slots, n)
                continue
            for slot in range(1, n + 1):
                v = slots[(slot - 1) * _VAL:slot * _VAL]
                if svc.slot(rec, slot) != v:
                    runs.append((master, slot, len(keys), 1, None))
                    keys += _slot_keys(master, slot, slot)
                    values.append(v)
        refused += svc.write(keys, values, runs)
        written += len(keys)
        if refused:
            owner = {p.master[0]: l4 for l4, p in plans.items()}
            for k, why in refused:
                fail(owner[svc.split(k)[0]], svc.map.name, why)
        return written - len(refused)

    def _write(self, mirror: MapMirror, plans: dict[L4Addr, _Entries], failed: dict[L4Addr, WriteFailure],
               part: Callable[[_Entries], Mapping[bytes, bytes]],
               fail: Callable[[L4Addr, str, str], None]) -> int:
        """Write one kind of entry of every plan not failed yet; refused keys fail their frontend."""
        keys: list[bytes] = []
        values: list[bytes] = []
        have = mirror.entries
        for l4, p in plans.items():
            if l4 not in failed:
                entries = part(p)
                if have:
                    entries = {k: v for k, v in entries.items() if have.get(k) != v}
                keys += entries
                values += entries.values()
        refused = mirror.write_columns(keys, values)
        if refused:
            owner = {k: l4 for l4, p in plans.items() if l4 not in failed for k in part(p)}
            for k, why in refused:
                fail(owner[k], mirror.map.name, why)
        return len(keys) - len(refused)

    def _remove(self, mirror: MapMirror | ServiceMirror | BackendMirror, keys: list[bytes]) -> int:
        """Delete the keys the map holds; a refused delete only re-reads the mirror (nothing to refuse)."""
        present = [k for k in keys if k in mirror]
        bad = mirror.remove(present)
        if bad:
            log.warning("map %s: %d deletions refused (%s); the next sync compares everything again",
                        mirror.map.name, len(bad), bad[0][1])
            mirror.reloads += 1
        return len(present) - len(bad)

    def _remove_backends(self, stale: list[L4Addr]) -> int:
        keys = []
        for l4 in stale:
            ident = self._be_ids.known(l4)
            self._be_refs.pop(l4, None)
            if ident is not None:
                keys.append(_u32(ident))
                self._be_ids.forget(l4)
        return self._remove(self._be_m, keys)

    def _leftovers(self, plans: dict[L4Addr, _Entries], early: dict[str, list[bytes]], late: dict[str, list[bytes]],
                   early_be: list[L4Addr], late_be: list[L4Addr]) -> int:
        """After a start, or at the first complete sync after partial ones (plans: then every frontend programmed):
        what the maps hold that no frontend wants (a previous agent's state). Frontends gone
        whole go first (their masters before the rest); what frontends still served hold goes after their new
        entries are in place. Returns how many frontends are gone."""
        masters: list[bytes] = []
        slots: list[bytes] = []
        served: list[list[Any]] = []         # the records of frontends still served (their slots name backends)
        for master, rec in self._svc_m.frontends.items():
            addr, port, _slot, proto = SVC_KEY.unpack(master)
            l4 = L4Addr(IPv4Address(addr), int.from_bytes(port, "big"), Proto(proto))
            plan = plans.get(l4)
            if plan is not None:
                served.append(rec)
                late["svc"] += [k for slot, _ in ServiceMirror.slots(rec) if slot > plan.n
                                for k in _slot_keys(master, slot, slot)]
                continue
            slots += [k for slot, _ in ServiceMirror.slots(rec) for k in _slot_keys(master, slot, slot)]
            if rec[0] is not None:
                masters.append(master)
                self._svc_ids.forget(l4)
        early["svc"][:0] = masters + slots
        unnamed = [(l4, ident) for l4, ident in self._be_ids.items() if self._be_refs.get(l4, 0) <= 0]
        named: set[int] = set()              # backend ids the slots of served frontends name meanwhile
        if unnamed:                          # (read only when some backend is no frontend's any more)
            for rec in served:
                named.update(SVC_VAL.unpack(v)[0] for _, v in ServiceMirror.slots(rec))
        sids = {p.sid for p in plans.values()}
        for name, mirror, part in (("mg", self._mg_m, "blocks"), ("am", self._am_m, "members")):
            want = {k for p in plans.values() for k in getattr(p, part)}
            for k in mirror.entries:
                if k not in want:
                    (late if int.from_bytes(k[:4], "little") in sids else early)[name].append(k)
        ranges = {k for p in plans.values() for k in p.ranges}
        for k in self._sr_m.entries:
            if k not in ranges:
                (late if int.from_bytes(k[4:8], "little") in sids else early)["sr"].append(k)
        views = {k for p in plans.values() for k in p.view}
        early["iv"] += [k for k in self._iv_m.entries if k not in views]     # a view names nothing the others need
        for l4, ident in unnamed:
            (late_be if ident in named else early_be).append(l4)
        return len(masters)

    def _prune_tables(self) -> None:
        """The Maglev cache keeps the tables programmed frontends use (looked at when it has grown by half)."""
        if len(self._tables) > max(16, self._tables_kept * 3 // 2):
            used = {p.table for p in self._prog.values() if p.table is not None}
            self._tables = {k: v for k, v in self._tables.items() if k in used}
            self._tables_kept = len(self._tables)

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
