"""The in-memory datapath: the same map programming (LBMaps, ClusterMaps, EastWestMaps, byte for byte) on maps
held in dicts, attach/overlay/XDP/socket LB/pod path (and the neighbour watcher's life) recorded instead of
done, and writes that can be made to fail. For the agent's
logic tests without root (pyroute2's ipmock serves netlink the same way); the datapath itself is always
tested on the real kernel (tests/bpf, tests/lab)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpflb.datapath.base import MapFill, MapsDatapath, NodeProgram, ProgramReport
from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.eastwest import EastWestMaps
from bpflb.datapath.lbmaps import LBMaps
from bpflb.datapath.libbpf import BatchError, BpfError, const, ffi
from bpflb.datapath.loader import MAP_TYPES, Map
from bpflb.model.types import Mode

E2BIG = 7
ARRAYS = frozenset({"lb_config", "lb_stats", "lb_maglev_cfg"})    # full by construction: no fill level
# The kernel maps' max_entries (the #defines their declarations use; the LPM tries' 4096 is literal there).
CAPACITY = {"lb_services": "LB_SVC_SLOTS_MAX", "lb_backends": "LB_BACKENDS_MAX", "ct_fwd": "CT_MAX",
            "ct_rev": "CT_MAX", "lb_dsr_frontends": "LB_SERVICES_MAX", "lb_local_backends": "LB_BACKENDS_MAX",
            "lb_maglev": "LB_MAGLEV_BLOCKS_MAX", "lb_affinity": "LB_AFFINITY_MAX",
            "lb_affinity_members": "LB_AFFINITY_MEMBERS_MAX", "lb_dsr_backends": "LB_DSR_BACKENDS_MAX",
            "lb_internal_view": "LB_SERVICES_MAX", "lb_frags": "LB_FRAG_MAX"}

_FIXED_CAPACITY = {"lb_config": 1, "lb_maglev_cfg": 1}


def default_capacity(name: str) -> int:
    """A map's max_entries in the default build (the LPM tries' and the others' literal 4096)."""
    if name in CAPACITY:
        return const(CAPACITY[name])
    return _FIXED_CAPACITY.get(name, 4096)


class MemoryMap(Map):
    """A map whose entries live in a dict: Map's interface, no kernel. fail(key) -> a reason makes a write of
    that key fail as the kernel's would (a BpfError naming the map); max_entries bounds it like the kernel."""

    def __init__(self, name: str, entries: dict[bytes, bytes], max_entries: int | None = None) -> None:
        key_type, value_type = MAP_TYPES[name]
        super().__init__(name, -1, key_type, value_type)
        self.entries = entries
        self.max_entries = default_capacity(name) if max_entries is None else max_entries
        self.fail: Callable[[bytes], str | None] = lambda key: None
        self.writes = 0
        self.peak = len(entries)              # the most entries the map held at once

    def _put(self, key: bytes, value: bytes) -> None:
        reason = self.fail(key)
        if reason is None and key not in self.entries and len(self.entries) >= self.max_entries:
            reason = f"map full ({self.max_entries} entries)"
        if reason is not None:
            raise BpfError(E2BIG, f"update of map {self.name}: {reason}")
        self.entries[key] = value
        self.writes += 1
        self.peak = max(self.peak, len(self.entries))

    def update(self, key: Any, value: Any, flags: int = 0) -> None:
        self._put(bytes(ffi().buffer(key)), bytes(ffi().buffer(value)))

    def update_raw(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self._put(key, value)

    def update_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self.update_columns([k for k, _ in items], [v for _, v in items])

    def update_columns(self, keys: list[bytes], values: list[bytes]) -> None:
        for done, (k, v) in enumerate(zip(keys, values, strict=True)):
            try:
                self._put(k, v)
            except BpfError as exc:     # as the kernel's batch: stops at the element, says how far it got
                raise BatchError(exc.errno or E2BIG, f"batch update of map {self.name}: {exc.strerror}", done) from exc

    def lookup(self, key: Any) -> Any | None:
        raw = self.entries.get(bytes(ffi().buffer(key)))
        return None if raw is None else self.decode_value(raw)

    def delete_raw(self, key: bytes) -> bool:
        return self.entries.pop(key, None) is not None

    def delete_many(self, keys: list[bytes]) -> None:
        for k in keys:
            self.entries.pop(k, None)

    def items_raw(self) -> Iterator[tuple[bytes, bytes]]:
        yield from list(self.entries.items())

    def close(self) -> None:
        pass


@dataclass
class MemoryPins:
    """What outlives an agent on a node: its maps' entries (bpffs pins) and counters."""

    maps: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    capacity: dict[str, int] = field(default_factory=dict)     # max_entries other than the default build's

    def map(self, name: str) -> MemoryMap:
        return MemoryMap(name, self.maps.setdefault(name, {}), self.capacity.get(name))


class MemoryDatapath(MapsDatapath):
    """A node's datapath in memory; pins shared between instances stand for a restart on pinned maps."""

    def __init__(self, pins: MemoryPins | None = None, cgroup_root: Path | None = None) -> None:
        super().__init__()
        self.pins = pins if pins is not None else MemoryPins()
        self.cgroup_root = cgroup_root or Path("/sys/fs/cgroup")
        self.socket_lb: Path | None = None           # the cgroup the socket LB is attached to
        self.pod_devices: dict[int, str] = {}        # the node's pods' veths (a test wires and unwires them)
        self.pod_path: dict[int, str] = {}           # those given the pod-facing path
        self.opened: dict[str, MemoryMap] = {}
        self.loads = 0
        self.network_applied: list[Any] = []     # (NetworkSettings, me, peers) of every change
        self.acceleration = "Disabled"
        self.uninstalled = False
        self.watching_neighbours = False         # the kernel's runs a netlink watcher from attach() to close()

    def map(self, name: str) -> MemoryMap:
        """The open map of that name (fault injection: datapath.map("lb_services").fail = ...)."""
        if name not in self.opened:
            self.opened[name] = self.pins.map(name)
        return self.opened[name]

    def load(self) -> Mode | None:
        self.loads += 1
        self.uninstalled = False
        self.maps = LBMaps(self)
        self.cluster = ClusterMaps(self)
        self.east_west = EastWestMaps(self)
        return self.maps.mode()

    def attach(self, device: str) -> None:
        if self.maps is None:
            raise BpfError(22, "attach() before load()")
        self.device = device
        self.ifindex = 1 + sum(map(ord, device)) % 1000
        self.watching_neighbours = True

    def close(self) -> None:
        self.watching_neighbours = False

    def _network(self, want: NodeProgram) -> list[str]:
        key = (want.network, want.me, tuple(n for n in want.nodes if want.me is None or n.name != want.me.name))
        if self.network_applied and self.network_applied[-1] == key:
            return []
        self.network_applied.append(key)
        routes = str(want.network.create_node_routes).lower()
        return [f"network: tunnelMode {want.network.tunnel.label}, createNodeRoutes {routes}"]

    def _accelerate(self, acceleration: str, report: ProgramReport) -> None:
        if acceleration != self.acceleration:
            self.acceleration = acceleration
            report.acceleration = None if acceleration == "Disabled" else "native"

    def _in_cluster(self, want: NodeProgram, report: ProgramReport) -> None:
        if want.socket_lb != (self.socket_lb is not None):
            self.socket_lb = self.cgroup_root if want.socket_lb else None
            report.in_cluster_actions.append(f"socket LB {'attached to' if want.socket_lb else 'detached from'} "
                                             f"cgroup {self.cgroup_root}")
        report.in_cluster_actions += self.refresh_pods()

    def refresh_pods(self) -> list[str]:
        if self.maps is None:
            return []
        added = {i: n for i, n in self.pod_devices.items() if self.pod_path.get(i) != n}
        self.pod_path = {**{i: n for i, n in self.pod_path.items() if i in self.pod_devices}, **added}
        return [f"pod path attached to {', '.join(added.values())}"] if added else []

    def counters(self) -> dict[str, int]:
        return dict(self.pins.counters)

    def _fill(self, m: Map) -> MapFill | None:
        if m.name in ARRAYS or not isinstance(m, MemoryMap):
            return None
        return MapFill(len(m.entries), m.max_entries)

    def uninstall(self, device: str | None) -> None:
        self.close()
        self.pins.maps.clear()
        self.opened.clear()
        self.maps = self.cluster = self.east_west = None
        self.device, self.ifindex = None, 0
        self.socket_lb, self.pod_path = None, {}
        self.acceleration = "Disabled"
        self.uninstalled = True
