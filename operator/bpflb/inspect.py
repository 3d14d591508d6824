"""`bpflb inspect`: a node's datapath as tables read from its pinned maps (frontends, backends, both conntrack
maps and the SNAT port pool per backend with their fill levels, counters)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol, Self

from bpflb.datapath import conntrack
from bpflb.datapath.lbmaps import read_stats
from bpflb.datapath.libbpf import BpfError, const, ffi, lib
from bpflb.datapath.loader import MAP_TYPES, Map
from bpflb.model.types import Mode, Proto


def _addr(v: int) -> str:
    return str(IPv4Address(int(v).to_bytes(4, "little")))


def _port(v: int) -> int:
    return int.from_bytes(int(v).to_bytes(2, "little"), "big")


def open_pinned(pin_root: Path, name: str) -> Map:
    fd = lib().bpf_obj_get(str(pin_root / name).encode())
    if fd < 0:
        raise BpfError(2, f"no pinned map {pin_root / name} (is the agent running with --pin-root {pin_root}?)")
    key_type, value_type = MAP_TYPES[name]
    return Map(name, fd, key_type, value_type)


class MapSet(Protocol):
    """The maps `inspect` reads: a node's pinned maps, or an LBMaps of a loaded object."""

    services: Map
    backends: Map
    config: Map
    stats_map: Map
    ct_fwd: Map
    ct_rev: Map


@dataclass
class PinnedMaps:
    services: Map
    backends: Map
    config: Map
    stats_map: Map
    ct_fwd: Map
    ct_rev: Map
    src_ranges: Map | None = None      # absent in pins of releases before source ranges

    def close(self) -> None:
        for m in (self.services, self.backends, self.config, self.stats_map, self.ct_fwd, self.ct_rev,
                  self.src_ranges):
            if m is not None:
                m.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @classmethod
    def open(cls, pin_root: Path) -> PinnedMaps:
        maps = cls(*(open_pinned(pin_root, n) for n in ("lb_services", "lb_backends", "lb_config", "lb_stats",
                                                        "ct_fwd", "ct_rev")))
        if (pin_root / "lb_src_ranges").exists():
            maps.src_ranges = open_pinned(pin_root, "lb_src_ranges")
        return maps


def _source_ranges(maps: MapSet) -> dict[int, list[str]]:
    """Each frontend's prefixes in lb_src_ranges, by service id."""
    m: Map | None = getattr(maps, "src_ranges", None)
    out: dict[int, list[str]] = {}
    if m is None:
        return out
    for k, _ in m.items_raw():
        key = m.decode_key(k)
        out.setdefault(int(key.svc_id), []).append(f"{_addr(key.addr)}/{int(key.prefixlen) - 32}")
    return {sid: sorted(nets) for sid, nets in out.items()}


def collect(pin_root: Path) -> dict[str, Any]:
    """Everything `inspect` shows for the node whose maps are pinned under pin_root."""
    with PinnedMaps.open(pin_root) as maps:
        data = collect_maps(maps)
    links = pin_root / "links"                     # the socket LB's pinned cgroup links (the agent's)
    data["socket_lb"] = sorted(p.name.removeprefix("cgroup_") for p in links.iterdir()) if links.is_dir() else []
    return data


def collect_maps(maps: MapSet) -> dict[str, Any]:
    """Everything `inspect` shows, as plain data."""
    svc, bes = maps.services, maps.backends
    backends: dict[int, dict[str, Any]] = {}
    for k, v in bes.items_raw():
        be = bes.decode_value(v)
        backends[int.from_bytes(k, "little")] = {
            "address": f"{_addr(be.addr)}:{_port(be.port)}", "proto": Proto(be.proto).name,
            "local": bool(be.flags & const("LB_BE_F_LOCAL"))}
    frontends: dict[tuple[str, int, str], dict[str, Any]] = {}
    slots: dict[tuple[str, int, str], dict[int, int]] = {}
    ranges = _source_ranges(maps)
    for k, v in svc.items_raw():
        key, val = svc.decode_key(k), svc.decode_value(v)
        ident = (_addr(key.addr), _port(key.port), Proto(key.proto).name)
        if key.slot == 0:
            flags = val.flags
            kind = ("NodePort" if flags & const("LB_SVC_F_NODEPORT") else
                    "LoadBalancer" if flags & const("LB_SVC_F_LOADBALANCER") else
                    "ClusterIP" if flags & const("LB_SVC_F_CLUSTER_IP") else "ExternalIP")
            frontends[ident] = {"frontend": f"{ident[0]}:{ident[1]}/{ident[2]}", "kind": kind, "id": val.id,
                                "policy": "Local" if flags & const("LB_SVC_F_LOCAL") else "Cluster",
                                "count": val.count, "reject": bool(flags & const("LB_SVC_F_NO_ENDPOINTS")),
                                "affinity_timeout": int(val.affinity_timeout),
                                "algorithm": "Maglev" if val.algorithm else "Random",
                                "source_ranges": (ranges.get(int(val.id), []) if flags & const("LB_SVC_F_SRC_RANGE")
                                                  else None),
                                "source_ranges_policy": (None if not flags & const("LB_SVC_F_SRC_RANGE") else
                                                         "deny" if flags & const("LB_SVC_F_SRC_RANGE_DENY")
                                                         else "allow")}
        else:
            slots.setdefault(ident, {})[key.slot] = val.id
    for ident, fe in frontends.items():
        ids = [slots.get(ident, {}).get(i) for i in range(1, fe["count"] + 1)]
        fe["backends"] = [backends[i]["address"] if i in backends else f"?{i}" for i in ids]
    cfg = maps.config.lookup(ffi().new("__u32 *", 0))
    stats = read_stats(maps.stats_map)
    ct = _conntrack(maps, cfg) if cfg is not None else None
    return {"mode": Mode(cfg.mode).label if cfg is not None else None,
            "snat_address": _addr(cfg.snat_addr) if cfg is not None else None,
            "frontends": sorted(frontends.values(), key=lambda f: f["frontend"]),
            "backends": backends, "flows": ct["ct_fwd"]["entries"] if ct else 0, "conntrack": ct,
            "counters": stats}


def _conntrack(maps: MapSet, cfg: Any) -> dict[str, Any]:
    """Both conntrack maps by what their entries hold, and the SNAT port pool per backend tuple."""
    snap = conntrack.snapshot(maps.ct_fwd, maps.ct_rev, maps.config)
    lo, hi = int(cfg.nat_port_min), int(cfg.nat_port_max)
    capacity = const("CT_MAX")
    out: dict[str, Any] = {}
    for name, table in (("ct_fwd", snap.fwd), ("ct_rev", snap.rev)):
        out[name] = {"entries": table.n, "max": capacity, "fill": round(table.n / capacity, 4), **table.kinds()}
    out["nat_ports"] = f"{lo}-{hi}"
    out["nat_pool"] = [{"backend": u.backend, "ports_used": u.used, "ports": u.size, "fill": round(u.fill, 4)}
                       for u in conntrack.pool_use(snap, hi - lo + 1)]
    return out


def show(pin_root: Path, as_json: bool = False) -> int:
    try:
        data = collect(pin_root)
    except BpfError as exc:
        print(f"bpflb inspect: {exc.strerror}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    sock = f"socket LB on ({', '.join(data['socket_lb'])})" if data.get("socket_lb") else "socket LB off"
    print(f"mode {data['mode']}, SNAT source {data['snat_address']}, {data['flows']} tracked flows, {sock}\n")
    rows = [(f["frontend"], f["kind"], f["policy"],
             "reject (no endpoints)" if f["reject"] else (", ".join(f["backends"]) or "drop (no local)"),
             "-" if f["source_ranges"] is None else
             f"{f['source_ranges_policy']} {', '.join(f['source_ranges']) or '(none)'}")
            for f in data["frontends"]]
    _table(("FRONTEND", "KIND", "POLICY", "BACKENDS", "SOURCE RANGES"), rows)
    print()
    ct = data["conntrack"]
    if ct:
        print()
        cols = ("handshake", "established", "closing", "udp", "dead")
        _table(("CONNTRACK", "ENTRIES", "MAX", "FILL", *(c.upper() for c in cols)),
               [(name, f"{ct[name]['entries']:,}", f"{ct[name]['max']:,}", f"{ct[name]['fill']:.1%}",
                 *(f"{ct[name][c]:,}" for c in cols)) for name in ("ct_fwd", "ct_rev")])
        print()
        print(f"SNAT port pool: ports {ct['nat_ports']}, each unique per backend address, port and protocol")
        _table(("BACKEND", "PORTS IN USE", "OF", "FILL"),
               [(p["backend"], f"{p['ports_used']:,}", f"{p['ports']:,}", f"{p['fill']:.1%}") for p in ct["nat_pool"]])
    print()
    _table(("COUNTER", "PACKETS"), [(k, str(v)) for k, v in data["counters"].items() if v])
    return 0


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
