"""Programs a node's load-balancer maps from the model's DesiredState, as a diff of map entries.

Entries are compared as the exact bytes the kernel holds, so a sync writes only what changed
and never flushes: live flows keep their backends.  Ids of services and backends are recovered
from the pinned maps, so an agent restart picks up where the last one left off."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from bpflb.datapath.libbpf import const, ffi, lib, stat_names
from bpflb.datapath.loader import BpfObject, Map
from bpflb.model.types import DesiredState, Frontend, FrontendKind, L4Addr, Mode, Proto

log = logging.getLogger(__name__)

_KIND_FLAG = {
    FrontendKind.NODEPORT: "LB_SVC_F_NODEPORT",
    FrontendKind.LOADBALANCER: "LB_SVC_F_LOADBALANCER",
    FrontendKind.EXTERNAL_IP: "LB_SVC_F_EXTERNAL_IP",
}


@dataclass(frozen=True)
class NodeConfig:
    """The per-node runtime settings written to the lb_config map."""

    mode: Mode
    snat_addr: IPv4Address
    ext_ifindex: int
    nat_port_min: int = 61000
    nat_port_max: int = 65535
    tcp_timeout: int = 21600
    udp_timeout: int = 60
    closing_timeout: int = 10


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

    @property
    def changed(self) -> bool:
        return bool(self.backends_written or self.backends_removed or self.slots_written
                    or self.slots_removed or self.config_changed)


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _be32(addr: IPv4Address) -> int:
    return int.from_bytes(addr.packed, "little")


def _from_be32(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, "little"))


def _from_be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


def svc_key(l4: L4Addr, slot: int) -> bytes:
    key = ffi().new("struct lb_svc_key *", {"addr": _be32(l4.addr), "port": _be16(l4.port),
                                             "slot": slot, "proto": int(l4.proto)})
    return bytes(ffi().buffer(key))


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


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

    def __init__(self, obj: BpfObject) -> None:
        self.services: Map = obj.map("lb_services")
        self.backends: Map = obj.map("lb_backends")
        self.config: Map = obj.map("lb_config")
        self.stats_map: Map = obj.map("lb_stats")
        self.ct_fwd: Map = obj.map("ct_fwd")
        self.ct_rev: Map = obj.map("ct_rev")
        self._svc: dict[bytes, bytes] = dict(self.services.items_raw())
        self._be: dict[bytes, bytes] = dict(self.backends.items_raw())
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
    def _frontend_entries(self, fe: Frontend, out: dict[bytes, bytes]) -> None:
        flags = const(_KIND_FLAG[fe.kind])
        if fe.local_only:
            flags |= const("LB_SVC_F_LOCAL")
        if fe.no_endpoints:
            flags |= const("LB_SVC_F_NO_ENDPOINTS")
        new = ffi().new
        for slot, be in enumerate(fe.backends, start=1):
            val = new("struct lb_svc_val *", {"id": self._backend_id(be.l4)})
            out[svc_key(fe.l4, slot)] = bytes(ffi().buffer(val))
        master = new("struct lb_svc_val *", {
            "id": self._service_id(fe.l4), "count": len(fe.backends), "flags": flags,
            "affinity_timeout": fe.affinity_timeout, "algorithm": int(fe.algorithm)})
        out[svc_key(fe.l4, 0)] = bytes(ffi().buffer(master))

    def _backend_entries(self, state: DesiredState) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        local_flag = const("LB_BE_F_LOCAL")
        for fe in state.frontends.values():
            for be in fe.backends:
                bid = self._backend_id(be.l4)
                val = ffi().new("struct lb_backend *", {
                    "addr": _be32(be.l4.addr), "port": _be16(be.l4.port), "proto": int(be.l4.proto),
                    "flags": local_flag if be.local else 0})
                out[_u32(bid)] = bytes(ffi().buffer(val))
        return out

    # -- sync --------------------------------------------------------------------------------
    def sync(self, state: DesiredState) -> SyncReport:
        """Make the maps hold exactly the state's frontends and backends; write only differences."""
        report = SyncReport()
        want_be = self._backend_entries(state)
        want_svc: dict[bytes, bytes] = {}
        masters: list[bytes] = []
        for fe in state.frontends.values():
            self._frontend_entries(fe, want_svc)
            masters.append(svc_key(fe.l4, 0))
            if svc_key(fe.l4, 0) not in self._svc:
                report.frontends_added += 1
        # 1. backends first: a slot must never name a backend the datapath cannot find.
        for k, v in want_be.items():
            if self._be.get(k) != v:
                self.backends.update_raw(k, v)
                self._be[k] = v
                report.backends_written += 1
        # 2. backend slots before their master entry, so a grown count never points past them.
        master_set = set(masters)
        for k, v in want_svc.items():
            if k not in master_set and self._svc.get(k) != v:
                self.services.update_raw(k, v)
                self._svc[k] = v
                report.slots_written += 1
        for k in masters:
            v = want_svc[k]
            if self._svc.get(k) != v:
                self.services.update_raw(k, v)
                self._svc[k] = v
                report.slots_written += 1
        # 3. stale entries: masters before slots (a shrunk count stops using them first).
        stale = [k for k in self._svc if k not in want_svc]
        stale.sort(key=lambda k: self.services.decode_key(k).slot != 0)
        for k in stale:
            key = self.services.decode_key(k)
            if key.slot == 0:
                report.frontends_removed += 1
                self._svc_ids.forget(L4Addr(_from_be32(key.addr), _from_be16(key.port), Proto(key.proto)))
            self.services.delete_raw(k)
            del self._svc[k]
            report.slots_removed += 1
        # 4. backends nobody references any more; their flows are steered away on next packet.
        for k in [k for k in self._be if k not in want_be]:
            be = self.backends.decode_value(self._be[k])
            self._be_ids.forget(L4Addr(_from_be32(be.addr), _from_be16(be.port), Proto(be.proto)))
            self.backends.delete_raw(k)
            del self._be[k]
            report.backends_removed += 1
        return report

    def set_config(self, cfg: NodeConfig) -> bool:
        """Write the node's runtime settings; True when they changed."""
        zero = ffi().new("__u32 *", 0)
        current = self.config.lookup(zero)
        want = ffi().new("struct lb_config *", {
            "mode": int(cfg.mode), "snat_addr": _be32(cfg.snat_addr), "nat_port_min": cfg.nat_port_min,
            "nat_port_max": cfg.nat_port_max, "ext_ifindex": cfg.ext_ifindex, "tcp_timeout": cfg.tcp_timeout,
            "udp_timeout": cfg.udp_timeout, "closing_timeout": cfg.closing_timeout})
        if current is not None and bytes(ffi().buffer(current)) == bytes(ffi().buffer(want)):
            return False
        self.config.update(zero, want)
        return True

    def mode(self) -> Mode | None:
        current = self.config.lookup(ffi().new("__u32 *", 0))
        return None if current is None else Mode(current.mode)

    def stats(self) -> dict[str, int]:
        """Packet counters summed over CPUs, by name (STAT_* in lb_structs.h, lower case)."""
        return read_stats(self.stats_map)

    def flows(self) -> list[Any]:
        """Decoded forward conntrack entries (for `bpflb flows` and tests)."""
        return [(self.ct_fwd.decode_key(k), self.ct_fwd.decode_value(v)) for k, v in self.ct_fwd.items_raw()]


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
